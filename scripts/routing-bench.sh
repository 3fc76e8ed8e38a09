#!/usr/bin/env bash
# Routing-quality benchmark: nanogate's balancer policies against sglang-router's on the same simulated fleet and the
# same open-loop, shared-prefix load. Everything listens on 127.0.0.1; every process it starts is stopped by PID on exit;
# every load is bounded by `timeout`.
#
# Usage: scripts/routing-bench.sh [run|calibrate]
#   run (default)  every policy, ROUNDS rounds interleaved, medians -> bench-results/routing-DATE/summary.md (+ raw JSON)
#   calibrate      round robin at rising rates, to pick RATE (prints p50/p99 TTFT per rate)
# Environment: RATE (req/s, default below), REQUESTS per run (1200), ROUNDS (2), POLICIES (nanogate, default
#   "weighted round_robin p2c least_load affinity"), SG_POLICIES (sglang-router, default
#   "round_robin random power_of_two cache_aware"), CACHE_BLOCKS per simulator (768), NANOGATE_BIN, PEERS_VENV, OUT.
#
# The fleet (4 simulators, --max-batch 16): two fast (speed 1.0), one at half speed, one fast with latency spikes
# (5 % of requests wait 1 s more before their first token). The load: 16 system prompts of 8,000 characters (about
# 2,000 tokens), one per request picked uniformly, plus a unique question; streamed, 32 tokens out, same seed every run.
# A cold prefill of such a prompt costs ~100 ms at speed 1, a cached one ~5 ms.
#
# Why CACHE_BLOCKS=768: the 16 prompts take 16 x 125 = 2,000 cache blocks. With the simulator's default of 4,096 every
# simulator ends up holding all of them whatever the routing, and no policy could be told apart. 768 blocks hold about
# 6 prompts: a router that spreads every prompt over every simulator hits about 6/16 of the time (LRU over uniform
# picks), so its median request is a cold one; one that keeps each prompt on one simulator (4 each) nearly always hits.
#
# Calibration (done once; `calibrate` repeats it): round robin sends a quarter of the load to the half-speed simulator,
# the first to saturate. From the batch model, a full batch of 16 decodes a step in 10 ms x 1.3 = 13 ms at speed 1, so a
# request holds its slot ~0.42 s + its prefill (5-105 ms) at speed 1, twice that at half speed: the slow simulator
# serves ~16-18 req/s, i.e. round robin tops out near 65-70 req/s for the fleet (the fleet as a whole, ~115).
# The sweep (sglang-router round_robin, as nanogate had no round robin yet; 600 requests per rate) put the knee there:
#   rate      40   50   60   70   80 req/s
#   TTFT mean 101  107  111  143  262 ms      (p50 stays ~108 = a cold prefill; p99 is the spiky simulator's 1 s)
#   TTFT p90  214  214  214  316  938 ms      (214 = a cold prefill at half speed, then queueing on top)
# so RATE=70: just past round robin's knee, ~60 % of the fleet. A policy that routes around the slow and spiky
# simulators, or onto warm caches, keeps its latency there; one that spreads blindly queues on the slow one.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
BIN=${NANOGATE_BIN:-$root/target/release/nanogate}
V=${PEERS_VENV:-$HOME/.cache/nanogate-peers}
mode=${1:-run}
RATE=${RATE:-70}
REQUESTS=${REQUESTS:-1200}
ROUNDS=${ROUNDS:-2}
POLICIES=${POLICIES:-weighted round_robin p2c least_load affinity}
SG_POLICIES=${SG_POLICIES:-round_robin random power_of_two cache_aware}
CACHE_BLOCKS=${CACHE_BLOCKS:-768}
PREFIXES=16; MAX_TOKENS=32; SEED=42
SIM_PORTS=(19301 19302 19303 19304)
SIM_ARGS=("--speed 1.0" "--speed 1.0" "--speed 0.5" "--speed 1.0 --spike-rate 0.05 --spike-ms 1000")
SIM_NAMES=(fast1 fast2 half spiky)
NG_PORT=18190; SG_PORT=18191; SG_PROM=29185
URLS=(); for p in "${SIM_PORTS[@]}"; do URLS+=("http://127.0.0.1:$p"); done
URL_CSV=$(IFS=,; echo "${URLS[*]}")

case $mode in run|calibrate) ;; *) echo "usage: $0 [run|calibrate]" >&2; exit 2;; esac
out=${OUT:-$root/bench-results/routing-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out/raw" "$out/logs"
log() { echo "[$(date +%T)] $*" | tee -a "$out/run.log" >&2; }

if [ ! -x "$BIN" ]; then
  log "no $BIN: building it (cargo build --release)"
  (cd "$root" && cargo build --release) || exit 1
fi
if ! "$BIN" loadtest --help | grep -q -- --prefixes || ! "$BIN" simulate --help | grep -q -- --prefix-cache-blocks; then
  echo "$BIN predates the prefix-cache simulator and --prefixes workload: rebuild it (cargo build --release)" >&2; exit 1
fi
command -v curl >/dev/null && command -v python3 >/dev/null || { echo "needs curl and python3" >&2; exit 1; }
# Run a private copy: a rebuild of target/release during the run must not change what is measured half-way.
cp "$BIN" "$out/nanogate" && BIN=$out/nanogate || exit 1

declare -A PID
# Stops one process and any children it spawned, by PID: TERM, then KILL after 5 s.
stop_pid() {
  local p=$1 c
  for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do stop_pid "$c"; done
  kill "$p" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$p" 2>/dev/null
}
stop() { [ -n "${PID[$1]:-}" ] && stop_pid "${PID[$1]}"; unset "PID[$1]"; }
stop_all() { local k; for k in "${!PID[@]}"; do stop "$k"; done; }
trap stop_all EXIT
trap 'exit 130' INT TERM

start_bg() { # name, command... : runs in the background, PID recorded
  local n=$1; shift; "$@" >"$out/logs/$n.log" 2>&1 & PID[$n]=$!; }

ready() { # name port [quiet]: POST /v1/chat/completions until 200, up to 60 s; fails early if the process died
  for _ in $(seq 120); do
    curl -fsS -m 5 -o /dev/null -XPOST -H 'content-type: application/json' \
      -d '{"model":"sim","messages":[{"role":"user","content":"hi"}],"max_tokens":1}' \
      "http://127.0.0.1:$2/v1/chat/completions" 2>/dev/null && return 0
    kill -0 "${PID[$1]}" 2>/dev/null || break
    sleep 0.5
  done
  [ -n "${3:-}" ] || { log "$1 did not become ready; log tail:"; tail -n 5 "$out/logs/$1.log" | tee -a "$out/run.log" >&2; }
  return 1
}

start_fleet() {
  local i
  for i in "${!SIM_PORTS[@]}"; do
    # shellcheck disable=SC2086 # SIM_ARGS entries are flag lists
    RUST_LOG=warn start_bg "sim-${SIM_NAMES[$i]}" "$BIN" simulate --listen "127.0.0.1:${SIM_PORTS[$i]}" \
      --max-batch 16 --prefix-cache-blocks "$CACHE_BLOCKS" ${SIM_ARGS[$i]}
  done
  for i in "${!SIM_PORTS[@]}"; do ready "sim-${SIM_NAMES[$i]}" "${SIM_PORTS[$i]}" || exit 1; done
}

# Empties every simulator's prefix cache and counters, so each run starts cold and its hit rate is its own.
flush_fleet() { local p; for p in "${SIM_PORTS[@]}"; do curl -fsS -m 5 -o /dev/null -XPOST "http://127.0.0.1:$p/sim/flush" || return 1; done; }

start_router() { # kind policy: sets ROUTER_PORT; 1 if it does not come up (e.g. a policy this build rejects)
  local kind=$1 pol=$2
  if [ "$kind" = nanogate ]; then
    NANOGATE__BALANCER__POLICY=$pol RUST_LOG=warn start_bg router "$BIN" serve --listen "127.0.0.1:$NG_PORT" --backends "$URL_CSV"
    ROUTER_PORT=$NG_PORT
    # Builds from before the policies have no balancer.policy key at all; their one policy is weighted.
    if [ "$pol" = weighted ] && ! ready router "$ROUTER_PORT" quiet && grep -q 'unknown field `policy`' "$out/logs/router.log"; then
      log "this build has no balancer.policy key: running its only policy (weighted) without it"
      stop router; RUST_LOG=warn start_bg router "$BIN" serve --listen "127.0.0.1:$NG_PORT" --backends "$URL_CSV"
    fi
  else
    start_bg router "$V/bin/python" -m sglang_router.launch_router --host 127.0.0.1 --port "$SG_PORT" \
      --worker-urls "${URLS[@]}" --policy "$pol" --log-level warn --prometheus-port "$SG_PROM" --worker-startup-check-interval 1
    ROUTER_PORT=$SG_PORT
  fi
  ready router "$ROUTER_PORT" || { stop router; return 1; }
}

run_load() { # kind policy round rate requests -> raw JSON file; 1 if the router did not start
  local kind=$1 pol=$2 r=$3 rate=$4 n=$5 f
  f="$out/raw/$kind-$pol-rate$rate-r$r.json"
  start_router "$kind" "$pol" || return 1
  flush_fleet || { log "flush failed"; stop router; return 1; }
  timeout $((n / ${rate%.*} + 120)) "$BIN" loadtest --url "http://127.0.0.1:$ROUTER_PORT/v1/chat/completions" --stream \
    --rate "$rate" --requests "$n" --concurrency 5000 --prefixes "$PREFIXES" --max-tokens "$MAX_TOKENS" --seed "$SEED" \
    --timeout 30 --json --quiet > "$out/logs/load.json" 2>> "$out/logs/load.err"
  stop router
  local sims=() p
  for p in "${SIM_PORTS[@]}"; do sims+=("$(curl -fsS -m 5 "http://127.0.0.1:$p/sim/stats" || echo null)"); done
  python3 - "$kind" "$pol" "$r" "$rate" "$out/logs/load.json" "${sims[@]}" > "$f" <<'PY'
import json, sys
kind, pol, rnd, rate, load = sys.argv[1:6]
try:
    summary = json.load(open(load))
except ValueError:
    summary = None
print(json.dumps({"router": kind, "policy": pol, "round": int(rnd), "rate": float(rate), "loadtest": summary,
                  "sims": [json.loads(s) for s in sys.argv[6:]]}))
PY
  python3 - "$f" <<'PY' | tee -a "$out/run.log" >&2
import json, sys
d = json.load(open(sys.argv[1])); s = d["loadtest"] or {}; t = s.get("ttft_ms") or {}; sims = [x or {} for x in d["sims"]]
q = sum(x.get("prefix_query_tokens", 0) for x in sims); h = sum(x.get("prefix_hit_tokens", 0) for x in sims)
print(f'  {d["router"]} {d["policy"]} r{d["round"]} rate {d["rate"]:g}: ok={s.get("ok")} failed={s.get("failed")} '
      f'ttft p50={t.get("p50")} p99={t.get("p99")} total p99={(s.get("latency_ms") or {}).get("p99")} '
      f'ok/s={s.get("ok_rps", 0):.1f} hit={100 * h / q if q else 0:.0f}% split={[x.get("requests") for x in sims]}')
PY
}

have_sglang() { [ -x "$V/bin/python" ] && "$V/bin/python" -c 'import sglang_router' 2>/dev/null; }

log "binary $BIN; fleet ${SIM_NAMES[*]} on ports ${SIM_PORTS[*]}; prefix cache $CACHE_BLOCKS blocks each; results in $out"
start_fleet

if [ "$mode" = calibrate ]; then
  # Round robin, nanogate's if this build has it, else sglang-router's.
  if start_router nanogate round_robin; then stop router; kind=nanogate
  elif have_sglang; then kind=sglang
  else echo "no round robin router available" >&2; exit 1; fi
  for rate in ${CAL_RATES:-30 40 50 60 70 80}; do run_load "$kind" round_robin 1 "$rate" 600 || exit 1; done
  log "calibration done: pick the rate where p99 TTFT leaves its plateau; raw JSON in $out/raw"
  exit 0
fi

targets=()
for p in $POLICIES; do targets+=("nanogate:$p"); done
if have_sglang; then for p in $SG_POLICIES; do targets+=("sglang:$p"); done
else log "sglang-router not installed in $V (bench/peers/setup.sh): skipping it"; fi

log "rate $RATE req/s, $REQUESTS requests per run, $ROUNDS rounds, seed $SEED"
declare -A skipped
for r in $(seq "$ROUNDS"); do
  for t in "${targets[@]}"; do
    [ -n "${skipped[$t]:-}" ] && continue
    run_load "${t%%:*}" "${t#*:}" "$r" "$RATE" "$REQUESTS" || { log "$t: router did not start, skipped"; skipped[$t]=1; }
  done
done

python3 - "$out" "$RATE" "$REQUESTS" "$ROUNDS" "$CACHE_BLOCKS" "${targets[@]}" <<'PY' > "$out/summary.md"
import glob, json, statistics, sys
out, rate, n, rounds, blocks, targets = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
print(f"# Routing quality, {rate} req/s open loop, {n} streamed requests per run, median of {rounds} rounds\n")
print("Fleet: 4 simulators (--max-batch 16, --prefix-cache-blocks " + blocks + "): fast, fast, half speed, fast with "
      "5 % 1 s spikes. Load: 16 shared system prompts of 8,000 chars (uniform), unique questions, 32 tokens out.\n")
print("| router | policy | p50 TTFT ms | p99 TTFT ms | p99 total ms | throughput ok/s | errors | prefix hit % "
      "| requests fast/fast/half/spiky |")
print("|---|---|---:|---:|---:|---:|---:|---:|---|")
med = lambda xs: statistics.median(xs) if xs else float("nan")
for t in targets:
    kind, pol = t.split(":", 1)
    runs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/raw/{kind}-{pol}-rate{rate}-r*.json"))]
    runs = [r for r in runs if r["loadtest"]]
    if not runs:
        print(f"| {kind} | {pol} | not run (router did not start with this policy) | | | | | | |")
        continue
    lt = [r["loadtest"] for r in runs]
    ttft = [s.get("ttft_ms") or {} for s in lt]
    hits = []
    for r in runs:
        sims = [x or {} for x in r["sims"]]
        q = sum(x.get("prefix_query_tokens", 0) for x in sims)
        hits.append(100 * sum(x.get("prefix_hit_tokens", 0) for x in sims) / q if q else 0)
    split = "/".join(str(round(med([(r["sims"][i] or {}).get("requests", 0) for r in runs]))) for i in range(4))
    print(f"| {kind} | {pol} | {med([x.get('p50', 0) for x in ttft]):.1f} | {med([x.get('p99', 0) for x in ttft]):.1f} "
          f"| {med([s['latency_ms']['p99'] for s in lt]):.1f} | {med([s['ok_rps'] for s in lt]):.1f} "
          f"| {med([s['failed'] for s in lt]):g} | {med(hits):.0f} | {split} |")
PY
log "summary: $out/summary.md"
cat "$out/summary.md"
