#!/usr/bin/env bash
# End-to-end throughput: fills a local tansu topic with N generated CDRs, then
#   1. times a bare librdkafka consumer reading the topic (the baseline), and
#   2. times tallyd draining the same topic to flushed records, into SQLite and
#      into PostgreSQL,
# and prints CDRs/s for each, tallyd's ratio to the baseline, its CPU seconds and
# peak RSS. Timing starts at the first consumed message (tansu's consumer-group
# join takes ~20 s and is not tallyd's work).
#
# Usage: scripts/bench-e2e.sh [N] [ACCOUNTS]      (defaults: 2000000, 10000)
#   BENCH_RUNS=R  repeats bare, SQLite and PostgreSQL R times over the same topic
#                 (each ratio against the bare run of its own round: a shared VM
#                 drifts by 15-20% over minutes) and ends with each store's
#                 median ratio.
#   BENCH_STORES=sqlite|postgres  runs tallyd against that store only.
#   BENCH_LOG=FILTER  tallyd's RUST_LOG (default warn), e.g. info,tallyd::flush=debug.
#   BENCH_KEEP=1      keeps the work directory (tallyd's logs per store) and prints it.
#   BENCH_TRACE=1     prints every sample of the watcher (scripts/bench_watch.py).
#   BENCH_COMPARE="BIN[=CONFIG] ..." also runs other tallyd binaries (say,
#                 release builds of earlier commits) after this one in each
#                 round, against the same bare run, each labelled
#                 "<file name of BIN>-<store>": a before/after comparison
#                 measured in one run. CONFIG is the config that build reads (an
#                 older build rejects keys added since; e.g.
#                 `git show REV:config/tallyd.toml > old.toml`).
#   BENCH_TRIGGERS=K  also runs tallyd on each store with K usage triggers on
#                 every account (labelled "<store>-triggers", against the same
#                 bare run): a daily sms count trigger that fires for busy
#                 accounts, the others never (examples/trigger_bench.rs), the
#                 callbacks sent to a local sink; after the drain it waits for
#                 the outbox to empty and prints the crossing → callback
#                 quantiles from tallyd's /metrics. With BENCH_COMPARE, the
#                 other builds drain with the same triggers too
#                 ("<file name>-<store>-triggers").
#                 The triggers' cost is measured against a drain of the same
#                 accounts without triggers ("<store>-accounts", seeded the
#                 same way with 0 triggers each): registered accounts have
#                 wallets, whose debits and low-balance events the flush
#                 writes too, triggers or not. With BENCH_RUNS > 1 the end
#                 also prints the median per-round cost of the triggers.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000000}
ACCOUNTS=${2:-10000}
PARTITIONS=4
PORT=${BENCH_PORT:-29092}
PG=${TALLYD_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
case "${BENCH_STORES:-}" in
  "" | sqlite | postgres) ;;
  *) echo "BENCH_STORES=$BENCH_STORES: must be sqlite or postgres (unset: both)" >&2; exit 2 ;;
esac

cargo build --release --bin tallyd --example bare_consumer ${BENCH_TRIGGERS:+--example trigger_bench} >&2
BIN=target/release/tallyd
TRIGGER_BENCH=target/release/examples/trigger_bench
BARE=target/release/examples/bare_consumer
. scripts/bench-broker.sh
"$TANSU" topic create cdrs --partitions $PARTITIONS --broker tcp://127.0.0.1:$PORT >/dev/null

echo "filling topic with $N CDRs over $ACCOUNTS accounts…" >&2
"$BIN" generate --brokers 127.0.0.1:$PORT --topic cdrs --count "$N" --accounts "$ACCOUNTS" \
  --duplicate-rate 0.01 --malformed-rate 0.001 2>&1 | tail -1 >&2

tansu_cpu() { awk '{print ($14 + $15) / '"$(getconf CLK_TCK)"'}' /proc/$TANSU_PID/stat; }

run_tallyd() { # $1 = label, $2 = store url, $3 = group, $4 = binary (default $BIN), $5 = config
  local label=$1 url=$2 group=$3 bin=${4:-$BIN} config=${5:-config/tallyd.toml}
  local http_port=$((PORT + 100))
  # Only the trigger runs set [webhooks] (an earlier build rejects the key).
  local loopback=()
  case $label in *-triggers) loopback=(TALLYD_WEBHOOKS__ALLOW_LOOPBACK=true) ;; esac
  env "${loopback[@]}" \
  TALLYD_KAFKA__BROKERS=127.0.0.1:$PORT TALLYD_KAFKA__GROUP_ID=$group TALLYD_STORE__URL=$url \
  TALLYD_HTTP__LISTEN=127.0.0.1:$http_port TALLYD_FLUSH__INTERVAL_MS=1000 RUST_LOG=${BENCH_LOG:-warn} \
    "$bin" run --config "$config" 2>"$WORK/$label.log" &
  TALLYD_PID=$!
  TANSU_PID=$TANSU_PID METRICS_URL=http://127.0.0.1:$http_port/metrics python3 scripts/bench_watch.py "$label" "$url" "$N" "$TALLYD_PID" "$BARE_RATE" \
    | tee -a "$WORK/results.txt"
  case $label in *-triggers) trigger_latency "$label" $http_port ;; esac
  kill -TERM $TALLYD_PID; wait $TALLYD_PID || true
  TALLYD_PID=
}

# Waits (up to 120 s) for the webhook outbox to empty, then prints the usage
# trigger crossing → callback quantiles and the callbacks delivered.
trigger_latency() { # $1 = label, $2 = tallyd's HTTP port
  local metrics=http://127.0.0.1:$2/metrics
  # Every firing delivered (the pending gauge lags a poll behind the flush).
  for _ in $(seq 1 600); do
    curl -s "$metrics" | awk '/^tallyd_triggers_fired_total/ {f = $2}
      /^tallyd_webhook_deliveries_total\{outcome="delivered"\}/ {d = $2}
      END {exit !(f > 0 && d >= f)}' && break
    sleep 0.2
  done
  curl -s "$metrics" | awk -v l="$1" '
    /^tallyd_trigger_crossing_to_callback_seconds\{quantile="0.5"\}/ {p50 = $2}
    /^tallyd_trigger_crossing_to_callback_seconds\{quantile="0.99"\}/ {p99 = $2}
    /^tallyd_trigger_crossing_to_callback_seconds_count/ {n = $2}
    /^tallyd_webhook_deliveries_total\{outcome="delivered"\}/ {d = $2}
    /^tallyd_triggers_fired_total/ {f = $2}
    END {printf "tallyd[%s] triggers fired %d, callbacks delivered %d; crossing -> callback p50 %.3f s, p99 %.3f s (n=%d)\n", l, f, d, p50, p99, n}' \
    | tee -a "$WORK/results.txt"
}

# A store with the generator's accounts and $2 (default $BENCH_TRIGGERS)
# triggers each.
seed_triggers() { # $1 = store url, $2 = triggers per account
  "$TRIGGER_BENCH" seed "$1" "$ACCOUNTS" "${2:-$BENCH_TRIGGERS}" "http://127.0.0.1:$SINK_PORT/usage" >&2
}
if [ -n "${BENCH_TRIGGERS:-}" ]; then
  SINK_PORT=$((PORT + 200))
  "$TRIGGER_BENCH" sink $SINK_PORT &
  SINK_PID=$!
fi

# A compared build's label (its file name) and config (after "=", if any).
compared_label() { basename "${1%%=*}"; }
compared_config() { case $1 in *=*) echo "${1#*=}" ;; esac; }

RUNS=${BENCH_RUNS:-1}
for round in $(seq 1 "$RUNS"); do
  [ "$RUNS" -gt 1 ] && echo "round $round of $RUNS"
  BEFORE=$(tansu_cpu)
  "$BARE" 127.0.0.1:$PORT cdrs $PARTITIONS "$N" | tee "$WORK/bare.txt"
  echo "  broker (tansu) CPU meanwhile: $(awk -v a="$BEFORE" -v b="$(tansu_cpu)" 'BEGIN {printf "%.1f", b - a}') s"
  BARE_RATE=$(awk '{print $(NF-1)}' "$WORK/bare.txt")

  if [ "${BENCH_STORES:-sqlite}" = sqlite ]; then
    rm -f "$WORK"/bench.db*
    run_tallyd sqlite "sqlite://$WORK/bench.db" bench-sqlite-$round
    for other in ${BENCH_COMPARE:-}; do
      rm -f "$WORK"/bench.db*
      run_tallyd "$(compared_label "$other")-sqlite" "sqlite://$WORK/bench.db" bench-$(compared_label "$other")-sqlite-$round \
        "${other%%=*}" "$(compared_config "$other")"
    done
    if [ -n "${BENCH_TRIGGERS:-}" ]; then
      rm -f "$WORK"/bench.db*
      seed_triggers "sqlite://$WORK/bench.db" 0
      run_tallyd sqlite-accounts "sqlite://$WORK/bench.db" bench-acc-sqlite-$round
      rm -f "$WORK"/bench.db*
      seed_triggers "sqlite://$WORK/bench.db"
      run_tallyd sqlite-triggers "sqlite://$WORK/bench.db" bench-trig-sqlite-$round
      for other in ${BENCH_COMPARE:-}; do
        rm -f "$WORK"/bench.db*
        seed_triggers "sqlite://$WORK/bench.db" 0
        run_tallyd "$(compared_label "$other")-sqlite-accounts" "sqlite://$WORK/bench.db" \
          bench-$(compared_label "$other")-acc-sqlite-$round "${other%%=*}" "$(compared_config "$other")"
        rm -f "$WORK"/bench.db*
        seed_triggers "sqlite://$WORK/bench.db"
        run_tallyd "$(compared_label "$other")-sqlite-triggers" "sqlite://$WORK/bench.db" \
          bench-$(compared_label "$other")-trig-sqlite-$round "${other%%=*}" "$(compared_config "$other")"
      done
    fi
  fi
  if [ "${BENCH_STORES:-postgres}" = postgres ]; then
    SCHEMA=bench_$$_$round
    PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE; CREATE SCHEMA $SCHEMA" >/dev/null
    run_tallyd postgres "$PG?options=-csearch_path%3D$SCHEMA" bench-pg-$round
    PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null
    for other in ${BENCH_COMPARE:-}; do
      PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "CREATE SCHEMA $SCHEMA" >/dev/null
      run_tallyd "$(compared_label "$other")-postgres" "$PG?options=-csearch_path%3D$SCHEMA" bench-$(compared_label "$other")-pg-$round \
        "${other%%=*}" "$(compared_config "$other")"
      PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null
    done
    if [ -n "${BENCH_TRIGGERS:-}" ]; then
      PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "CREATE SCHEMA $SCHEMA" >/dev/null
      seed_triggers "$PG?options=-csearch_path%3D$SCHEMA" 0
      run_tallyd postgres-accounts "$PG?options=-csearch_path%3D$SCHEMA" bench-acc-pg-$round
      PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE; CREATE SCHEMA $SCHEMA" >/dev/null
      seed_triggers "$PG?options=-csearch_path%3D$SCHEMA"
      run_tallyd postgres-triggers "$PG?options=-csearch_path%3D$SCHEMA" bench-trig-pg-$round
      PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null
      for other in ${BENCH_COMPARE:-}; do
        PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "CREATE SCHEMA $SCHEMA" >/dev/null
        seed_triggers "$PG?options=-csearch_path%3D$SCHEMA" 0
        run_tallyd "$(compared_label "$other")-postgres-accounts" "$PG?options=-csearch_path%3D$SCHEMA" \
          bench-$(compared_label "$other")-acc-pg-$round "${other%%=*}" "$(compared_config "$other")"
        PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE; CREATE SCHEMA $SCHEMA" >/dev/null
        seed_triggers "$PG?options=-csearch_path%3D$SCHEMA"
        run_tallyd "$(compared_label "$other")-postgres-triggers" "$PG?options=-csearch_path%3D$SCHEMA" \
          bench-$(compared_label "$other")-trig-pg-$round "${other%%=*}" "$(compared_config "$other")"
        PGOPTIONS="-c client_min_messages=warning" psql "$PG" -qc "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null
      done
    fi
  fi
done

if [ "$RUNS" -gt 1 ]; then
  compared=""
  for other in ${BENCH_COMPARE:-}; do
    l=$(compared_label "$other")
    compared="$compared $l-sqlite $l-postgres $l-sqlite-accounts $l-postgres-accounts $l-sqlite-triggers $l-postgres-triggers"
  done
  for label in sqlite postgres sqlite-accounts postgres-accounts sqlite-triggers postgres-triggers $compared; do
    grep -q "^tallyd\[$label\]" "$WORK/results.txt" || continue
    grep "^tallyd\[$label\]" "$WORK/results.txt" | grep -v "triggers fired" | sed 's/.*ratio to bare consumer \([0-9.]*\);.*/\1/' | sort -n \
      | awk -v l="$label" '{r[NR] = $1} END {m = NR % 2 ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2;
          printf "tallyd[%s] over %d runs: median ratio %.2f (min %.2f, max %.2f)\n", l, NR, m, r[1], r[NR]}'
  done
fi
# The triggers' cost per round: the drain with triggers against the same
# accounts without (same round, same build).
if [ -n "${BENCH_TRIGGERS:-}" ]; then
  for other in "" ${BENCH_COMPARE:-}; do
    for store in ${other:+$(compared_label "$other")-}sqlite ${other:+$(compared_label "$other")-}postgres; do
      grep -q "^tallyd\[$store-triggers\]:" "$WORK/results.txt" || continue
      awk -v s="$store" '
        function secs(line) { sub(/.* flushed in /, "", line); sub(/ s = .*/, "", line); return line }
        index($0, "tallyd[" s "-accounts]:") == 1 {a[++na] = secs($0)}
        index($0, "tallyd[" s "-triggers]:") == 1 {t[++nt] = secs($0)}
        END {
          n = na < nt ? na : nt
          for (i = 1; i <= n; i++) { c[i] = a[i] / t[i] - 1; printf "  round %d: %s %.2f s with accounts only, %.2f s with triggers: %+.1f%%\n", i, s, a[i], t[i], 100 * c[i] }
          if (n == 0) exit
          for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (c[j] < c[i]) { x = c[i]; c[i] = c[j]; c[j] = x }
          m = n % 2 ? c[(n + 1) / 2] : (c[n / 2] + c[n / 2 + 1]) / 2
          printf "tallyd[%s] cost of the triggers (throughput against the same accounts without triggers), median of %d rounds: %+.1f%%\n", s, n, 100 * m
        }' "$WORK/results.txt"
    done
  done
fi
