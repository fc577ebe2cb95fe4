#!/usr/bin/env bash
# Usage-trigger latency at a steady rate: tallyd runs on an empty topic with
# usage triggers on every account (examples/trigger_bench.rs: 3 per account, a
# daily sms count trigger, two that never fire), the callbacks go to a local
# sink, and CDRs are produced live at RATE per second. Without FIRINGS, the sms
# trigger is at 20 and every account crosses it (about RATE / 40 firings a
# second while the accounts cross); with FIRINGS, the sms triggers are set so
# that the accounts cross one after another, FIRINGS a second from the
# stream's second second on, whatever RATE is (SECONDS should reach past
# 1 + ACCOUNTS / FIRINGS). Prints the firings (and the most in one second),
# the deliveries and the crossing → callback quantiles (tallyd's hdrhistogram
# summary: from when the crossing CDRs were consumed to when the callback
# request left).
#
# Usage: scripts/bench-triggers.sh [RATE] [SECONDS] [ACCOUNTS] [FIRINGS]
#        (defaults: 40000, 15, 10000, none); RATE may list rates run one after
#        another, e.g. 10000,20000,40000.
#   BENCH_STORES=sqlite|postgres  runs one store only.
#   BENCH_LOG=FILTER  tallyd's RUST_LOG (default warn), e.g. info,tallyd::flush=debug.
#   BENCH_KEEP=1      keeps the work directory (tallyd's logs per run) and prints it.
#   BENCH_COMPARE=BIN  also runs another tallyd binary (a release build of an
#                 earlier commit) after this one on each store, labelled
#                 "before-<store>-<rate>": a before/after comparison in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
RATES=${1:-40000}
SECS=${2:-15}
ACCOUNTS=${3:-10000}
FIRINGS=${4:-}
PORT=${BENCH_PORT:-29492}
HTTP=$((PORT + 1))
SINK=$((PORT + 2))
PG=${TALLYD_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}

cargo build --release --bin tallyd --example trigger_bench >&2
BIN=target/release/tallyd
TB=target/release/examples/trigger_bench
. scripts/bench-broker.sh
"$TB" sink $SINK &
SINK_PID=$!

metrics() { curl -s "http://127.0.0.1:$HTTP/metrics"; }

run() { # $1 = label, $2 = store url, $3 = topic, $4 = binary (default $BIN)
  local bin=${4:-$BIN}
  local N=$((RATE * SECS))
  "$TANSU" topic create "$3" --partitions 4 --broker tcp://127.0.0.1:$PORT >/dev/null
  "$TB" seed "$2" "$ACCOUNTS" 3 "http://127.0.0.1:$SINK/usage" ${FIRINGS:+"$FIRINGS" "$RATE" "$N"}
  TALLYD_KAFKA__BROKERS=127.0.0.1:$PORT TALLYD_KAFKA__TOPIC=$3 TALLYD_KAFKA__GROUP_ID=trig-$3 \
  TALLYD_STORE__URL=$2 TALLYD_HTTP__LISTEN=127.0.0.1:$HTTP TALLYD_WEBHOOKS__ALLOW_LOOPBACK=true \
  RUST_LOG=${BENCH_LOG:-warn} "$bin" run --config config/tallyd.toml 2>"$WORK/$1.log" &
  TALLYD_PID=$!
  for _ in $(seq 1 300); do
    [ "$(metrics | awk '$1 == "tallyd_partitions_assigned" {print $2}')" = "4" ] && break
    sleep 0.2
  done
  echo "[$1] producing $N CDRs at $RATE/s over $ACCOUNTS accounts…" >&2
  # The firings counter every half second meanwhile: the most in a second.
  (while :; do metrics | awk '/^tallyd_triggers_fired_total/ {print $2}'; sleep 0.5; done) >"$WORK/$1.fired" &
  local sampler=$!
  "$BIN" generate --brokers 127.0.0.1:$PORT --topic "$3" --count "$N" --accounts "$ACCOUNTS" \
    --rate "$RATE" --late-rate 0 2>&1 | tail -1 >&2
  # Consumed to the end, and every firing delivered.
  for _ in $(seq 1 600); do
    metrics | awk '/^tallyd_consumer_lag/ {l += $2} /^tallyd_triggers_fired_total/ {f = $2}
      /^tallyd_webhook_deliveries_total\{outcome="delivered"\}/ {d = $2}
      END {exit !(l == 0 && f > 0 && d >= f)}' && break
    sleep 0.2
  done
  kill $sampler; wait $sampler 2>/dev/null || true
  local peak
  peak=$(awk '{v[NR] = $1} END {m = 0; for (i = 3; i <= NR; i++) if (v[i] - v[i-2] > m) m = v[i] - v[i-2]; print m}' "$WORK/$1.fired")
  metrics | awk -v l="$1" -v secs="$SECS" -v peak="$peak" '
    /^tallyd_trigger_crossing_to_callback_seconds\{quantile="0.5"\}/ {p50 = $2}
    /^tallyd_trigger_crossing_to_callback_seconds\{quantile="0.99"\}/ {p99 = $2}
    /^tallyd_trigger_crossing_to_callback_seconds\{quantile="0.999"\}/ {p999 = $2}
    /^tallyd_trigger_crossing_to_callback_seconds_count/ {n = $2}
    /^tallyd_webhook_deliveries_total\{outcome="delivered"\}/ {d = $2}
    /^tallyd_triggers_fired_total/ {f = $2}
    END {printf "[%s] triggers fired %d (%.0f/s over the run, at most %d in a second), callbacks delivered %d; crossing -> callback p50 %.3f s, p99 %.3f s, p99.9 %.3f s (n=%d)\n", l, f, f / secs, peak, d, p50, p99, p999, n}'
  kill -TERM $TALLYD_PID; wait $TALLYD_PID || true
  TALLYD_PID=
}

for RATE in ${RATES//,/ }; do
  if [ "${BENCH_STORES:-sqlite}" = sqlite ]; then
    run sqlite-$RATE "sqlite://$WORK/trig-$RATE.db" cdrs-sqlite-$RATE
    if [ -n "${BENCH_COMPARE:-}" ]; then
      run before-sqlite-$RATE "sqlite://$WORK/before-$RATE.db" cdrs-before-sqlite-$RATE "$BENCH_COMPARE"
    fi
  fi
  if [ "${BENCH_STORES:-postgres}" = postgres ]; then
    SCHEMA=trig_$$
    PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE; CREATE SCHEMA $SCHEMA" >/dev/null
    run postgres-$RATE "$PG?options=-csearch_path%3D$SCHEMA" cdrs-postgres-$RATE
    PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null
    if [ -n "${BENCH_COMPARE:-}" ]; then
      PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "CREATE SCHEMA $SCHEMA" >/dev/null
      run before-postgres-$RATE "$PG?options=-csearch_path%3D$SCHEMA" cdrs-before-postgres-$RATE "$BENCH_COMPARE"
      PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null
    fi
  fi
done
