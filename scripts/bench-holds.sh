#!/usr/bin/env bash
# Holds over HTTP on loopback while the daemon ingests CDRs: fills a local tansu
# topic with N generated CDRs, starts tallyd (SQLite, then PostgreSQL) on it,
# and while it drains runs examples/hold_load.rs — CONNECTIONS closed-loop
# clients placing (timed) and releasing holds on ACCOUNTS accounts for SECONDS —
# after the same load against GET /healthz (the HTTP round trip alone, the
# baseline). Prints the achieved rates, p50/p99/p99.9 latency and the hold
# writes (grants, releases) per store transaction (group commit).
#
# Usage: scripts/bench-holds.sh [N] [CONNECTIONS] [SECONDS] [ACCOUNTS]
#        (defaults: 1000000, 32, 20, 100)
#   BENCH_STORES=sqlite|postgres  runs one store only.
#   BENCH_KEEP=1      keeps the work directory (the daemons' logs) and prints it.
#   BENCH_CDR_RATE=R  instead of a drain of N prefilled CDRs (which takes both
#                     cores), CDRs are produced live at R per second (`tallyd
#                     generate --rate`) for as long as the two loads run; N is
#                     ignored.
#   HOLD_LOAD_RATE=R  open loop: both loads send R requests per second over
#                     the CONNECTIONS (latency counted from when each was due).
#   HOLD_LOAD_RELEASE=0 leaves each hold granted (no DELETE): R holds per
#                     second are then the whole request rate, as for /healthz.
#   BENCH_COMPARE=BIN[=CONFIG] also runs each store with that tallyd binary
#                     (label `<store>-compare`), just before the one built
#                     here; CONFIG is the config it reads (an older build
#                     rejects keys added since; e.g.
#                     `git show REV:config/tallyd.toml > old.toml`).
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
. scripts/bench-broker.sh
"$TANSU" topic create cdrs --partitions 4 --broker tcp://127.0.0.1:$PORT >/dev/null
if [ -z "${BENCH_CDR_RATE:-}" ]; then
  echo "filling topic with $N CDRs…" >&2
  "$BIN" generate --brokers 127.0.0.1:$PORT --topic cdrs --count "$N" --accounts 10000 2>&1 | tail -1 >&2
fi

metric() { curl -s "http://127.0.0.1:$HTTP/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
lag() { curl -s "http://127.0.0.1:$HTTP/metrics" | awk '/^tallyd_consumer_lag/ {s += $2} END {print s + 0}'; }

run() { # $1 = label, $2 = store url, $3 = tallyd binary, $4 = its config
  # Live CDRs go to a topic of the run's own, which its daemon starts on empty.
  local topic=cdrs
  if [ -n "${BENCH_CDR_RATE:-}" ]; then
    topic=cdrs-$1
    "$TANSU" topic create "$topic" --partitions 4 --broker tcp://127.0.0.1:$PORT >/dev/null
  fi
  TALLYD_KAFKA__BROKERS=127.0.0.1:$PORT TALLYD_KAFKA__GROUP_ID=holds-$1-$$ TALLYD_STORE__URL=$2 TALLYD_KAFKA__TOPIC=$topic \
  TALLYD_HTTP__LISTEN=127.0.0.1:$HTTP TALLYD_API__ADMIN_TOKEN=$ADMIN RUST_LOG=warn \
    "$3" run --config "${4:-config/tallyd.toml}" 2>"$WORK/$1.log" &
  TALLYD_PID=$!
  # Ready, and consuming (every partition assigned and loaded).
  for _ in $(seq 1 300); do
    [ "$(metric tallyd_partitions_assigned)" = "4" ] && break
    sleep 0.2
  done
  if [ -n "${BENCH_CDR_RATE:-}" ]; then
    # Enough for both loads and the accounts' setup, stopped after them.
    "$BIN" generate --brokers 127.0.0.1:$PORT --topic "$topic" --accounts 10000 --late-rate 0 \
      --rate "$BENCH_CDR_RATE" --count $((BENCH_CDR_RATE * (2 * SECONDS_ + 30))) >"$WORK/generate.log" 2>&1 &
    GENERATE_PID=$!
    echo "[$1] producing CDRs live at $BENCH_CDR_RATE/s"
    sleep 2
  fi
  echo "[$1] consumer lag at start: $(lag)"
  "$LOAD" "http://127.0.0.1:$HTTP" $ADMIN "$ACCOUNTS" "$CONNECTIONS" "$SECONDS_" baseline | sed "s/^/[$1] /"
  "$LOAD" "http://127.0.0.1:$HTTP" $ADMIN "$ACCOUNTS" "$CONNECTIONS" "$SECONDS_" | sed "s/^/[$1] /"
  local writes commits consumed
  writes=$(metric tallyd_hold_writes_total)
  commits=$(metric tallyd_hold_commits_total)
  consumed=$(curl -s "http://127.0.0.1:$HTTP/metrics" | awk '/^tallyd_cdrs_total/ {s += $2} END {print s}')
  echo "[$1] hold writes per store transaction: $(awk -v g="$writes" -v c="$commits" 'BEGIN {printf "%.1f", g / c}') ($writes grants and releases, $commits transactions); CDRs consumed $consumed; consumer lag at end: $(lag)"
  if [ -n "${GENERATE_PID:-}" ]; then kill "$GENERATE_PID" 2>/dev/null || true; wait "$GENERATE_PID" 2>/dev/null || true; GENERATE_PID=; fi
  kill -TERM $TALLYD_PID; wait $TALLYD_PID || true
  TALLYD_PID=
}

# A drain runs each store's daemons over the same prefilled topic (each its
# own consumer group); live CDRs go to a topic per run.
both() { # $1 = label, $2 = store url maker
  if [ -n "${BENCH_COMPARE:-}" ]; then
    case $BENCH_COMPARE in *=*) other_config=${BENCH_COMPARE#*=} ;; *) other_config= ;; esac
    run "$1-compare" "$($2 "$1-compare")" "${BENCH_COMPARE%%=*}" "$other_config"
  fi
  run "$1" "$($2 "$1")" "$BIN"
}
sqlite_url() { echo "sqlite://$WORK/$1.db"; }
pg_url() {
  local schema="holds_$$_${1//-/_}"
  PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "DROP SCHEMA IF EXISTS $schema CASCADE; CREATE SCHEMA $schema" >/dev/null
  echo "$PG?options=-csearch_path%3D$schema"
}
if [ "${BENCH_STORES:-sqlite}" = sqlite ]; then
  both sqlite sqlite_url
fi
if [ "${BENCH_STORES:-postgres}" = postgres ]; then
  both postgres pg_url
  for schema in $(PGOPTIONS="-c client_min_messages=warning" psql "$PG" -Atqc "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'holds_$$%'"); do
    PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null
  done
fi
