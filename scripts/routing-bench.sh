#!/usr/bin/env bash
# Routing-quality benchmark matrix: nanogate's balancer policies against sglang-router's, on the same simulated fleets,
# under the same open-loop streamed loads. Everything listens on 127.0.0.1; every process it starts is stopped by PID on
# exit; every load is bounded by `timeout`.
#
# Usage: scripts/routing-bench.sh [run|calibrate]
#   run (default)  for every fleet x workload cell: find round robin's knee (unless RATE_<fleet>_<workload> is set), then
#                  every policy, ROUNDS rounds interleaved, medians -> OUT/summary.md (+ raw JSON per run)
#   calibrate      only the knees, printed per cell
# Environment: FLEETS ("unequal equal"), WORKLOADS ("p16 p40 z128 turns unique"), POLICIES (nanogate, default
#   "cache_aware round_robin p2c least_load affinity weighted"; POLICY@LABEL runs that policy on the binary in
#   BIN_<LABEL>, to compare builds in one interleaved run, e.g. POLICIES="p2c p2c@before" BIN_before=/tmp/old),
#   SG_POLICIES (sglang-router, "round_robin power_of_two cache_aware"; empty for none), REQUESTS per run (900),
#   ROUNDS (3, odd), CAL_REQUESTS per calibration step (300), CACHE_BLOCKS per simulator (768), SEED of the workload's
#   prompts and picks (42), SEED_STEP (1: round r runs seed SEED + (r - 1) x SEED_STEP, every router the same seed in a
#   round; 0 repeats one draw, and then round robin's figures are that one draw every round, since it sends the same
#   request to the same simulator each time), RATE_<fleet>_<workload> (skip that cell's calibration), ARRIVALS (fixed:
#   one start every 1/rate; poisson: exponential gaps), REQUEST_LOG (1: each simulator writes a line per request,
#   `simulate --request-log`, kept per run as OUT/requests/<run>-sim<i>.jsonl, and the client a line per request,
#   `loadtest --request-log`, as OUT/requests/<run>-client.jsonl; `scripts/routing-requests.py OUT`
#   then says per run where each prompt went: prompts per simulator, prompts on several, moves), NANOGATE_BIN,
#   PEERS_VENV, OUT.
#
# Fleets (4 simulators, --max-batch 16, --prefix-cache-blocks CACHE_BLOCKS):
#   unequal  fast (speed 1), fast, half speed, fast with latency spikes (5 % of requests wait 1 s before the first token)
#   equal    four at speed 1
# Workloads (streamed, 32 tokens out, seed SEED):
#   p16      16 system prompts of 8,000 chars (~2,000 tokens), picked uniformly, plus a unique question
#   p40      the same with 40 prompts: more than the fleet's caches hold (see CACHE_BLOCKS)
#   z128     128 prompts with Zipf(1.0) popularity: a few hot prompts, a long cold tail
#   turns    64 conversations of 6 turns going on at once over 8 system prompts of 4,000 chars; each turn resends the
#            conversation so far, so a turn is warm only where the session's previous turn ran
#   unique   every request its own 4,000-char system prompt: nothing to share, pure load balancing
# A cold prefill of 2,000 tokens costs ~105 ms at speed 1 on an idle simulator, a cached one ~5 ms; prefills share the
# simulator's GPU first come first served (as vLLM fills each step's token budget), so a fast simulator prefills about
# 20,000 prompt tokens a second however many batch slots are free.
#
# Why CACHE_BLOCKS=768 (blocks of 16 tokens, as vLLM's; the simulator evicts free blocks LRU and pins running ones):
# the 16 prompts of p16 take 16 x 125 = 2,000 blocks, so each simulator holds about 6 of them: a router that spreads
# every prompt over every simulator mostly misses, one that keeps each prompt on one simulator mostly hits. p40 and z128
# hold far more than the fleet's 3,072 blocks, so even perfect routing misses, and routing must choose what to keep.
#
# The rate of a cell is round robin's knee, found by `calibrate`: nanogate round_robin at rising rates (CAL_RATES_<fleet>,
# CAL_REQUESTS each); the first rate where its p90 TTFT exceeds 1.5 x its p90 at the lowest rate, i.e. where queueing
# starts to show, is the cell's rate. There a policy that routes around slow and spiky simulators, or onto warm caches,
# keeps its latency; one that spreads blindly queues.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
BIN=${NANOGATE_BIN:-$root/target/release/nanogate}
V=${PEERS_VENV:-$HOME/.cache/nanogate-peers}
mode=${1:-run}
REQUESTS=${REQUESTS:-900}
CAL_REQUESTS=${CAL_REQUESTS:-300}
ROUNDS=${ROUNDS:-3}
# The median of an even number of rounds is the mean of the middle two: with p99s of 1,010 ms (a
# spike) and 109 ms it read 559.5, a figure no round had, and the verdicts came from it.
[ $((ROUNDS % 2)) = 1 ] || { echo "ROUNDS must be odd (the median of an even count is a mean)" >&2; exit 2; }
FLEETS=${FLEETS:-unequal equal}
WORKLOADS=${WORKLOADS:-p16 p40 z128 turns unique}
ARRIVALS=${ARRIVALS:-fixed}
POLICIES=${POLICIES:-cache_aware round_robin p2c least_load affinity weighted}
SG_POLICIES=${SG_POLICIES-round_robin power_of_two cache_aware}
CACHE_BLOCKS=${CACHE_BLOCKS:-768}
CAL_RATES_unequal=${CAL_RATES_unequal:-10 15 20 25 30 40 50 60 70}
CAL_RATES_equal=${CAL_RATES_equal:-15 20 30 40 50 60 70 85 100}
MAX_TOKENS=32; SEED=${SEED:-42}; SEED_STEP=${SEED_STEP:-1}
SIM_PORTS=(19301 19302 19303 19304)
NG_PORT=18190; SG_PORT=18191; SG_PROM=29185
URLS=(); for p in "${SIM_PORTS[@]}"; do URLS+=("http://127.0.0.1:$p"); done
URL_CSV=$(IFS=,; echo "${URLS[*]}")

fleet_args() { # fleet index -> simulator flags
  case $1 in
    unequal) local a=("--speed 1.0" "--speed 1.0" "--speed 0.5" "--speed 1.0 --spike-rate 0.05 --spike-ms 1000"); echo "${a[$2]}";;
    equal) echo "--speed 1.0";;
  esac
}
workload_args() {
  case $1 in
    p16) echo "--prefixes 16";;
    p40) echo "--prefixes 40";;
    z128) echo "--prefixes 128 --zipf 1.0";;
    turns) echo "--prefixes 8 --prefix-chars 4000 --turns 6 --sessions 64";;
    unique) echo "--unique --prefix-chars 4000";;
    *) return 1;;
  esac
}

case $mode in run|calibrate) ;; *) echo "usage: $0 [run|calibrate]" >&2; exit 2;; esac
for f in $FLEETS; do [ -n "$(fleet_args "$f" 0)" ] || { echo "unknown fleet $f" >&2; exit 2; }; done
for w in $WORKLOADS; do workload_args "$w" >/dev/null || { echo "unknown workload $w" >&2; exit 2; }; done
out=${OUT:-$root/bench-results/routing-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out/raw" "$out/logs"
log() { echo "[$(date +%T)] $*" | tee -a "$out/run.log" >&2; }

if [ ! -x "$BIN" ]; then
  log "no $BIN: building it (cargo build --release)"
  (cd "$root" && cargo build --release) || exit 1
fi
if ! "$BIN" loadtest --help | grep -q -- --arrivals || ! "$BIN" simulate --help | grep -q -- --prefix-cache-blocks; then
  echo "$BIN predates the --arrivals option of loadtest: rebuild it (cargo build --release)" >&2; exit 1
fi
if [ "${REQUEST_LOG:-0}" = 1 ] && ! "$BIN" loadtest --help | grep -q -- --request-log; then
  echo "$BIN predates the --request-log options of simulate and loadtest: rebuild it (cargo build --release)" >&2; exit 1
fi
command -v curl >/dev/null && command -v python3 >/dev/null || { echo "needs curl and python3" >&2; exit 1; }
# Run a private copy: a rebuild of target/release during the run must not change what is measured half-way.
cp "$BIN" "$out/nanogate" && BIN=$out/nanogate || exit 1

# shellcheck source=scripts/lib/processes.sh
source "$root/scripts/lib/processes.sh"

start_bg() { # name, command... : runs in the background, PID recorded
  local n=$1; shift; "$@" >"$out/logs/$n.log" 2>&1 & PID[$n]=$!; }

ready() { # name port: POST /v1/chat/completions until 200, up to 60 s; fails early if the process died
  for _ in $(seq 120); do
    curl -fsS -m 5 -o /dev/null -XPOST -H 'content-type: application/json' \
      -d '{"model":"sim","messages":[{"role":"user","content":"hi"}],"max_tokens":1}' \
      "http://127.0.0.1:$2/v1/chat/completions" 2>/dev/null && return 0
    kill -0 "${PID[$1]}" 2>/dev/null || break
    sleep 0.5
  done
  log "$1 did not become ready; log tail:"; tail -n 5 "$out/logs/$1.log" | tee -a "$out/run.log" >&2
  return 1
}

start_fleet() { # fleet
  local i
  for i in "${!SIM_PORTS[@]}"; do stop "sim$i"; done
  for i in "${!SIM_PORTS[@]}"; do
    local log=(); [ "${REQUEST_LOG:-0}" = 1 ] && log=(--request-log "$out/logs/sim$i-requests.jsonl")
    # shellcheck disable=SC2046 # fleet_args is a flag list
    RUST_LOG=warn start_bg "sim$i" "$BIN" simulate --listen "127.0.0.1:${SIM_PORTS[$i]}" \
      --max-batch 16 --prefix-cache-blocks "$CACHE_BLOCKS" "${log[@]}" $(fleet_args "$1" "$i")
  done
  for i in "${!SIM_PORTS[@]}"; do ready "sim$i" "${SIM_PORTS[$i]}" || exit 1; done
}

# Empties every simulator's prefix cache and counters, so each run starts cold and its hit rate is its own.
flush_fleet() { local p; for p in "${SIM_PORTS[@]}"; do curl -fsS -m 5 -o /dev/null -XPOST "http://127.0.0.1:$p/sim/flush" || return 1; done; }

start_router() { # kind policy: sets ROUTER_PORT; 1 if it does not come up
  local kind=$1 pol=$2
  if [ "$kind" = nanogate ]; then
    local gateway=$BIN
    if [[ $pol == *@* ]]; then
      local build="BIN_${pol#*@}"; gateway=${!build:-}; pol=${pol%@*}
      [ -x "$gateway" ] || { log "$build is not an executable"; return 1; }
    fi
    NANOGATE__BALANCER__POLICY=$pol RUST_LOG=warn start_bg router "$gateway" serve --listen "127.0.0.1:$NG_PORT" --backends "$URL_CSV"
    ROUTER_PORT=$NG_PORT
  else
    start_bg router "$V/bin/python" -m sglang_router.launch_router --host 127.0.0.1 --port "$SG_PORT" \
      --worker-urls "${URLS[@]}" --policy "$pol" --log-level warn --prometheus-port "$SG_PROM" --worker-startup-check-interval 1
    ROUTER_PORT=$SG_PORT
  fi
  ready router "$ROUTER_PORT" || { stop router; return 1; }
}

run_load() { # cell kind policy round rate requests -> raw JSON file, one summary line; 1 if the router did not start
  local cell=$1 kind=$2 pol=$3 r=$4 rate=$5 n=$6 f
  f="$out/raw/$cell-$kind-$pol-rate$rate-r$r.json"
  local seed=$SEED; [[ $r =~ ^[0-9]+$ ]] && seed=$((SEED + (r - 1) * SEED_STEP))
  start_router "$kind" "$pol" || return 1
  flush_fleet || { log "flush failed"; stop router; return 1; }
  local client_log=(); [ "${REQUEST_LOG:-0}" = 1 ] && client_log=(--request-log "$out/logs/client-requests.jsonl")
  # shellcheck disable=SC2046 # workload_args is a flag list
  timeout $((n / ${rate%.*} + 120)) "$BIN" loadtest --url "http://127.0.0.1:$ROUTER_PORT/v1/chat/completions" --stream \
    --rate "$rate" --requests "$n" --concurrency 5000 $(workload_args "${cell#*-}") --max-tokens "$MAX_TOKENS" \
    --seed "$seed" --arrivals "$ARRIVALS" --timeout 30 "${client_log[@]}" --json --quiet \
    > "$out/logs/load.json" 2>> "$out/logs/load.err"
  # What the balancer had learned by the end (batch capacities, estimates): why a policy picked as it did.
  local balancer=null
  [ "$kind" = nanogate ] && balancer=$(curl -fsS -m 5 "http://127.0.0.1:$ROUTER_PORT/stats/balancer" || echo null)
  stop router
  local sims=() p i
  for p in "${SIM_PORTS[@]}"; do sims+=("$(curl -fsS -m 5 "http://127.0.0.1:$p/sim/stats" || echo null)"); done
  # This run's requests (the flush before the next run starts each simulator's file afresh).
  if [ "${REQUEST_LOG:-0}" = 1 ]; then
    mkdir -p "$out/requests"
    for i in "${!SIM_PORTS[@]}"; do
      mv "$out/logs/sim$i-requests.jsonl" "$out/requests/$(basename "$f" .json)-sim$i.jsonl" 2>/dev/null
    done
    mv "$out/logs/client-requests.jsonl" "$out/requests/$(basename "$f" .json)-client.jsonl" 2>/dev/null
  fi
  python3 - "$cell" "$kind" "$pol" "$r" "$rate" "$out/logs/load.json" "$balancer" "${sims[@]}" > "$f" <<'PY'
import json, sys
cell, kind, pol, rnd, rate, load, balancer = sys.argv[1:8]
try:
    summary = json.load(open(load))
except ValueError:
    summary = None
try:
    balancer = json.loads(balancer)
except ValueError:
    balancer = None
print(json.dumps({"cell": cell, "router": kind, "policy": pol, "round": int(rnd) if rnd.isdigit() else rnd, "rate": float(rate),
                  "loadtest": summary, "balancer": balancer, "sims": [json.loads(s) for s in sys.argv[8:]]}))
PY
  python3 - "$f" "$seed" <<'PY' | tee -a "$out/run.log" >&2
import json, sys
d = json.load(open(sys.argv[1])); s = d["loadtest"] or {}; t = s.get("ttft_ms") or {}; sims = [x or {} for x in d["sims"]]
q = sum(x.get("prefix_query_tokens", 0) for x in sims); h = sum(x.get("prefix_hit_tokens", 0) for x in sims)
# Batch capacities the balancer ended with, "?" where still a guess.
caps = [f'{e["estimate"]["capacity"]}{"" if e["estimate"]["capacity_known"] else "?"}'
        for e in (d.get("balancer") or {}).get("endpoints", [])]
print(f'  {d["cell"]} {d["router"]} {d["policy"]} r{d["round"]} seed {sys.argv[2]} rate {d["rate"]:g}: ok={s.get("ok")} '
      f'failed={s.get("failed")} ttft p50={t.get("p50")} p90={t.get("p90")} p99={t.get("p99")} ok/s={s.get("ok_rps", 0):.1f} '
      f'hit={100 * h / q if q else 0:.0f}% split={[x.get("requests") for x in sims]}' + (f' capacity={caps}' if caps else ''))
PY
}

have_sglang() { [ -x "$V/bin/python" ] && "$V/bin/python" -c 'import sglang_router' 2>/dev/null; }

calibrate() { # cell -> echoes the knee rate
  local cell=$1 fleet=${1%%-*} rates var base="" rate p90 last=""
  var="CAL_RATES_$fleet"; rates=${!var}
  for rate in $rates; do
    run_load "$cell" nanogate round_robin cal "$rate" "$CAL_REQUESTS" || return 1
    p90=$(python3 -c 'import json,sys; print((json.load(open(sys.argv[1]))["loadtest"] or {}).get("ttft_ms",{}).get("p90",1e9))' \
      "$out/raw/$cell-nanogate-round_robin-rate$rate-rcal.json")
    last=$rate
    [ -z "$base" ] && { base=$p90; continue; }
    if python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) > 1.5 * float(sys.argv[2]) else 1)' "$p90" "$base"; then
      echo "$rate"; return 0
    fi
  done
  log "$cell: round robin's p90 TTFT never left its plateau up to $last req/s; using $last"
  echo "$last"
}

targets=()
for p in $POLICIES; do targets+=("nanogate:$p"); done
if have_sglang; then for p in $SG_POLICIES; do targets+=("sglang:$p"); done
else log "sglang-router not installed in $V (benches/peers/setup.sh): skipping it"; fi

log "binary $BIN; fleets $FLEETS; workloads $WORKLOADS; prefix cache $CACHE_BLOCKS blocks per simulator; results in $out"
: > "$out/rates.tsv"
for fleet in $FLEETS; do
  log "fleet $fleet"
  start_fleet "$fleet"
  for w in $WORKLOADS; do
    cell="$fleet-$w"; var="RATE_${fleet}_$w"
    rate=${!var:-}
    if [ -z "$rate" ]; then
      rate=$(calibrate "$cell") || { log "$cell: calibration failed"; continue; }
      log "$cell: round robin's knee at $rate req/s"
    fi
    printf '%s\t%s\n' "$cell" "$rate" >> "$out/rates.tsv"
    [ "$mode" = calibrate ] && continue
    declare -A skipped=()
    for r in $(seq "$ROUNDS"); do
      for t in "${targets[@]}"; do
        [ -n "${skipped[$t]:-}" ] && continue
        run_load "$cell" "${t%%:*}" "${t#*:}" "$r" "$rate" "$REQUESTS" || { log "$t: router did not start, skipped"; skipped[$t]=1; }
      done
    done
  done
done
[ "$mode" = calibrate ] && { log "knees:"; cat "$out/rates.tsv"; exit 0; }

python3 "$root/scripts/routing-summary.py" "$out" "$REQUESTS" "$ROUNDS" "$CACHE_BLOCKS" "${targets[@]}" > "$out/summary.md"
log "summary: $out/summary.md"
cat "$out/summary.md"
