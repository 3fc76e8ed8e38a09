#!/usr/bin/env bash
# CPU per streamed chunk: the marginal cost of one more SSE chunk through a proxy, separated from
# the per-stream cost (connection, headers, routing) by loading each target twice with streams of
# different lengths and taking the difference:
#   per_chunk_us = (cpu_per_stream(LONG chunks) - cpu_per_stream(SHORT chunks)) / (LONG - SHORT)
# Targets: nanogate and nginx (proxy_buffering off), both in front of the same streamtool backend;
# 64 streams at a time, chunks sent with no gap. CPU is the target process tree's (utime+stime).
# Usage: scripts/bench-chunks.sh [--no-build]      (needs benches/peers/setup.sh's tools; ~1 min)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
V=${PEERS_VENV:-$HOME/.cache/nanogate-peers}
ST=${STREAMTOOL:-$V/streamtool-target/release/streamtool}
[ -x "$ST" ] && command -v nginx >/dev/null || bash "$root/benches/peers/setup.sh" "$V"
[ "${1:-}" = --no-build ] || (cd "$root" && timeout 3600 cargo build --release --bin nanogate)
ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d); pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
SHORT=10; LONG=1000; CONC=64; SECS=4; TICK=$(getconf CLK_TCK)
"$ST" serve --ports 19501 --chunks 10 --delay-ms 0 > "$work/backend.log" 2>&1 & pids+=($!)
RUST_LOG=warn "$root/target/release/nanogate" serve --listen 127.0.0.1:19510 --backends http://127.0.0.1:19501 \
  > "$work/nanogate.log" 2>&1 & ng=$!; pids+=($ng)
cat > "$work/nginx.conf" <<CONF
worker_processes 2; daemon off; pid $work/nginx.pid; error_log $work/nginx.err warn;
events { worker_connections 4096; }
http { access_log off; upstream b { server 127.0.0.1:19501; keepalive 256; }
  server { listen 127.0.0.1:19511; location / { proxy_pass http://b; proxy_http_version 1.1;
    proxy_set_header Connection ""; proxy_buffering off; } } }
CONF
nginx -c "$work/nginx.conf" & nx=$!; pids+=($nx)
for port in 19510 19511; do
  for _ in $(seq 100); do curl -sf -o /dev/null -XPOST -d '{"model":"sim","messages":[]}' \
    -H 'content-type: application/json' "http://127.0.0.1:$port/v1/chat/completions" && break; sleep 0.1; done
done
cpu() { python3 "$root/benches/peers/bench.py" cpu "$1"; }
per_stream() { # pid port chunks -> "cpu_us_per_stream streams"
  local c0 c1 out ok
  c0=$(cpu "$1")
  out=$(timeout 60 "$ST" load --url "http://127.0.0.1:$2/v1/chat/completions" --conc $CONC --secs $SECS \
        --chunks "$3" --delay-ms 0 | tail -n 1)
  c1=$(cpu "$1")
  ok=$(echo "$out" | tr ' ' '\n' | awk -F= '$1=="ok"{print $2}')
  awk -v d=$((c1 - c0)) -v n="$ok" -v t="$TICK" 'BEGIN{printf "%.2f %d\n", d*1e6/t/n, n}'
}
printf '| target | µs/stream (%d chunks) | µs/stream (%d chunks) | µs per chunk |\n|---|---:|---:|---:|\n' $SHORT $LONG
for t in nanogate:$ng:19510 nginx:$nx:19511; do
  IFS=: read -r name pid port <<<"$t"
  read -r short _ <<<"$(per_stream "$pid" "$port" $SHORT)"
  read -r long _ <<<"$(per_stream "$pid" "$port" $LONG)"
  awk -v n="$name" -v s="$short" -v l="$long" -v a=$SHORT -v b=$LONG \
    'BEGIN{printf "| %s | %.1f | %.1f | %.3f |\n", n, s, l, (l-s)/(b-a)}'
done
