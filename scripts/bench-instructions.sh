#!/usr/bin/env bash
# Instructions the gateway executes per request, counted by callgrind: unlike CPU time, the count does not move with
# what else the machine is doing, so a before/after comparison of the hot path holds on a shared, noisy machine.
# 127.0.0.1 only; every process started is stopped at exit.
#
# Usage: scripts/bench-instructions.sh [BIN [BASELINE_BIN]]     (default BIN: target/release/nanogate, built if missing)
#   For each binary: a simulated backend (fast, so it never waits), the gateway under valgrind --tool=callgrind,
#   200 warm-up requests, counters zeroed, then REQUESTS (default 2000) non-streamed chat completions and the same
#   number of 8-token streams at concurrency 1 from `nanogate loadtest`; prints instructions per request of each.
# Env: REQUESTS, PORT_BASE (default 18300), GW_ARGS (more `serve` arguments for both binaries, e.g. `--config F`),
#      (not the baseline's), API_KEY (sent by the load tester as `Authorization: Bearer`), LABEL (instead of `nanogate` in the output).
# Needs valgrind (Debian: valgrind).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=${1:-target/release/nanogate}
baseline=${2:-}
requests=${REQUESTS:-2000}
port=${PORT_BASE:-18300}
command -v valgrind >/dev/null || { echo "bench-instructions.sh: valgrind is missing (apt-get install valgrind)" >&2; exit 1; }
[ -x "$bin" ] || timeout 3600 cargo build --release --bin nanogate
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

"$bin" simulate --listen "127.0.0.1:$((port + 1))" --speed 1000 --ttft-base-ms 0 >/dev/null 2>&1 &
pids+=($!)

measure() { # BIN NAME
  local gw=$1 name=$2 listen="127.0.0.1:$port" args=${GW_ARGS:-}
  [ "$name" = baseline ] && args=""   # an older binary may not know the keys GW_ARGS' config sets
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$work/$name.%p" \
    "$gw" serve --listen "$listen" --backends "http://127.0.0.1:$((port + 1))" $args >"$work/$name.log" 2>&1 &
  local vg=$!
  pids+=("$vg")
  for _ in $(seq 600); do curl -sf "http://$listen/ready" >/dev/null && break; sleep 0.1; done
  "$bin" loadtest --url "http://$listen/v1/chat/completions" --requests 200 --concurrency 1 "${key[@]}" >/dev/null
  for mode in json stream; do
    local flag=""; [ "$mode" = stream ] && flag=--stream
    callgrind_control -z "$vg" >/dev/null 2>&1
    timeout 1800 "$bin" loadtest --url "http://$listen/v1/chat/completions" --requests "$requests" --concurrency 1 \
      --max-tokens 8 $flag "${key[@]}" --json >"$work/$name-$mode.json"
    callgrind_control -d "$name-$mode" "$vg" >/dev/null 2>&1
    local file total
    file=$(ls -t "$work/$name".* | grep -v '\.log$' | head -n 1)
    total=$(grep -E '^(summary|totals):' "$file" | head -n 1 | awk '{print $2}')
    echo "$name $mode: $((total / requests)) instructions per request ($requests requests, $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['ok'])" "$work/$name-$mode.json") ok)"
  done
  kill "$vg"; wait "$vg" 2>/dev/null || true
}

key=()
[ -n "${API_KEY:-}" ] && key=(--api-key "$API_KEY")
measure "$bin" "${LABEL:-nanogate}"
[ -n "$baseline" ] && measure "$baseline" baseline
exit 0
