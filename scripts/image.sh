#!/usr/bin/env bash
# tallyd's container image.
#   scripts/image.sh check   static check of the Dockerfile against the repository
#                            (no container engine needed; scripts/test.sh runs it)
#   scripts/image.sh build   the check, then build the image (tag tallyd:VERSION and
#                            tallyd:latest, or IMAGE=name:tag) with docker or podman
#                            if one is running, and smoke-test it: --version,
#                            check-config on its own config, its user and entrypoint.
#                            With no engine it says so and exits 0 (3 with
#                            IMAGE_REQUIRE_ENGINE=1, for a CI that must build it).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"

static_check() {
  cargo build --quiet --bin tallyd
  local target_dir
  target_dir=$(cargo metadata --format-version 1 --no-deps --offline | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  python3 scripts/check_dockerfile.py check --binary "$target_dir/debug/tallyd"
}

# The first engine whose daemon answers, with why the others do not.
find_engine() {
  ENGINE=""
  WHY=()
  for e in docker podman; do
    if ! command -v "$e" >/dev/null; then
      WHY+=("$e: not installed")
    elif ! out=$("$e" info </dev/null 2>&1); then
      WHY+=("$e: installed, but $(printf '%s\n' "$out" | grep -m1 -iE 'cannot|error|refused|denied' || echo 'its daemon does not answer')")
    else
      ENGINE=$e
      return
    fi
  done
}

case "${1:-}" in
  check)
    static_check
    ;;
  build)
    static_check
    find_engine
    if [ -z "$ENGINE" ]; then
      echo "image.sh: no container engine available, so the image was NOT built:"
      printf '  %s\n' "${WHY[@]}"
      echo "  (the static check above passed; run this where docker or podman works)"
      [ "${IMAGE_REQUIRE_ENGINE:-0}" = 1 ] && exit 3
      exit 0
    fi
    version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
    image="${IMAGE:-tallyd:$version}"
    echo "image.sh: building $image with $ENGINE"
    "$ENGINE" build -t "$image" -t tallyd:latest .
    echo "image.sh: smoke test"
    got=$("$ENGINE" run --rm "$image" --version)
    [ "$got" = "tallyd $version" ] || { echo "--version said '$got', expected 'tallyd $version'" >&2; exit 1; }
    "$ENGINE" run --rm "$image" check-config --config /etc/tallyd/tallyd.toml
    fact() { python3 scripts/check_dockerfile.py facts | python3 -c "import json, sys; print(json.dumps(json.load(sys.stdin)['$1']))"; }
    user=$("$ENGINE" image inspect -f '{{json .Config.User}}' "$image")
    entry=$("$ENGINE" image inspect -f '{{json .Config.Entrypoint}}' "$image")
    [ "$user" = "$(fact user)" ] || { echo "image user is $user, the Dockerfile says $(fact user)" >&2; exit 1; }
    [ "$entry" = "$(fact entrypoint | tr -d ' ')" ] || { echo "image entrypoint is $entry, the Dockerfile says $(fact entrypoint)" >&2; exit 1; }
    # The default command starts as the image's user with its data volume
    # writable (the SQLite store is made there) and serves /healthz without a
    # broker; SIGTERM stops it cleanly.
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    id=$("$ENGINE" run -d -p "127.0.0.1:$port:8080" -e TALLYD_KAFKA__BROKERS=127.0.0.1:1 "$image")
    trap '"$ENGINE" rm -f "$id" >/dev/null 2>&1 || true' EXIT
    python3 - "$port" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/healthz"
for _ in range(60):
    try:
        if urllib.request.urlopen(url, timeout=2).read() == b"ok\n":
            sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(f"{url} did not answer ok within 60 s")
PY
    "$ENGINE" stop -t 60 "$id" >/dev/null
    code=$("$ENGINE" wait "$id")
    [ "$code" = 0 ] || { "$ENGINE" logs "$id" >&2; echo "tallyd exited with $code on SIGTERM" >&2; exit 1; }
    echo "image.sh: $image built and checked (user $user, entrypoint $entry, /healthz answered, clean stop)"
    ;;
  *)
    sed -n '2,10p' "$0" >&2
    exit 2
    ;;
esac
