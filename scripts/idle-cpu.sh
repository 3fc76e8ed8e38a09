#!/usr/bin/env bash
# CPU an idle gateway uses: nanogate serve in front of four simulators, no traffic, the gateway's
# utime + stime from /proc/PID/stat over SECONDS (30) after 5 s of start-up. What an idle gateway
# costs is its timers and health checks; this is how a change to them is measured.
#
# Usage: scripts/idle-cpu.sh [BIN ...]   (default target/release/nanogate; several are run in turn)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
SECONDS_IDLE=${SECONDS_IDLE:-30}
[ $# -gt 0 ] || set -- "$root/target/release/nanogate"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
for bin in "$@"; do
  pids=()
  for i in 0 1 2 3; do "$bin" simulate --listen "127.0.0.1:1950$i" >/dev/null 2>&1 & pids+=($!); done
  sleep 1
  RUST_LOG=warn "$bin" serve --listen 127.0.0.1:19510 \
    --backends http://127.0.0.1:19500,http://127.0.0.1:19501,http://127.0.0.1:19502,http://127.0.0.1:19503 \
    >/dev/null 2>&1 & gateway=$!; pids+=("$gateway")
  sleep 5
  a=$(ticks "$gateway"); sleep "$SECONDS_IDLE"; b=$(ticks "$gateway")
  echo "$bin: idle gateway CPU $(( (b - a) * 1000 / $(getconf CLK_TCK) )) ms in $SECONDS_IDLE s"
  cleanup
done
