#!/usr/bin/env bash
# Fuzzes the CDR decoder: fuzz/fuzz_targets/decode.rs (never panics, every rejection
# has a reason and a message, the fast path agrees with the serde_json path).
#
#   scripts/fuzz.sh [SECONDS] [LIBFUZZER_ARGS...]    (default 900 s, one worker)
#
# Installs cargo-fuzz if missing, seeds fuzz/corpus/decode from the generator and
# the hand-written edge cases in fuzz/seeds/, and runs with fuzz/decode.dict. The
# corpus grows across runs; crashes land in fuzz/artifacts/decode/ (both ignored
# by git). Reproduce one with `cargo fuzz run decode <file>`, shrink it with
# `cargo fuzz tmin decode <file>` (both with RUSTC_BOOTSTRAP=1 as below).
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-900}"
shift || true
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
# cargo-fuzz passes sanitizer flags that only nightly rustc accepts; this lets the
# stable compiler take them.
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

corpus=fuzz/corpus/decode
mkdir -p "$corpus"
cp fuzz/seeds/*.json "$corpus"/
# Realistic CDRs from the project's generator (fixed seed and day, 5% malformed),
# one per file; the same names every run, so reruns add nothing twice.
gen=$(mktemp)
trap 'rm -f "$gen"' EXIT
cargo run --release --quiet -- generate --no-kafka --file "$gen" --count 200 \
  --malformed-rate 0.05 --last-day 2025-01-09 --seed 7
split -l 1 -d -a 3 "$gen" "$corpus/gen-"

# The instrumented build stays in fuzz/target whatever CARGO_TARGET_DIR says.
env -u CARGO_TARGET_DIR cargo fuzz run decode "$corpus" -- \
  -dict=fuzz/decode.dict -max_total_time="$secs" -print_final_stats=1 "$@"
