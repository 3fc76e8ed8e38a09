#!/usr/bin/env bash
# Time to first token when backends misbehave: the frozen-backend scenario and hedging on and off. Everything listens
# on 127.0.0.1; every process it starts is stopped by PID on exit (a frozen one is thawed first); every load is bounded
# by `timeout`.
#
# Usage: scripts/ttft-bench.sh [frozen|hedge|all]
#   frozen  three simulators (speed 1, --max-batch 32), 32 clients sending short non-streamed chat requests in a closed
#           loop (8 tokens out, 60 s client timeout); FREEZE_AT seconds in, one simulator is frozen with SIGSTOP (its
#           process stops: no answers, no resets) and stays frozen. Reported per binary: requests answered, errors,
#           p99 and worst latency. BINARIES="before:/path/to/old/nanogate after:target/release/nanogate" compares builds.
#   hedge   the unequal fleet of routing-bench.sh (fast, fast, half speed, fast with 5 % 1 s spikes), streamed 16-prompt
#           shared-prefix load at RATE req/s, hedging off and on ([hedge] enabled), ROUNDS rounds interleaved, medians:
#           p50/p99 TTFT and requests the backends received per client request (the hedges' cost). POLICY picks the
#           routing policy (default cache_aware, which itself keeps most spikes out of the tail; round_robin shows
#           what the hedge alone saves).
# Environment: BINARIES, REQUESTS (frozen: 6000; hedge: 1200), FREEZE_AT (3), RATE (30: round robin's knee on that
#   fleet and workload, routing-bench.sh's unequal-p16, since the simulators' prefills share their GPU), ROUNDS (3, odd),
#   POLICY, OUT.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-all}
BINARIES=${BINARIES:-after:$root/target/release/nanogate}
FREEZE_AT=${FREEZE_AT:-3}
RATE=${RATE:-30}
ROUNDS=${ROUNDS:-3}
[ $((ROUNDS % 2)) = 1 ] || { echo "ROUNDS must be odd (the median of an even count is a mean)" >&2; exit 2; }
SIM_PORTS=(19311 19312 19313 19314)
GW_PORT=18195
case $mode in frozen|hedge|all) ;; *) echo "usage: $0 [frozen|hedge|all]" >&2; exit 2;; esac
out=${OUT:-$root/bench-results/ttft-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out/logs"
log() { echo "[$(date +%T)] $*" | tee -a "$out/run.log" >&2; }
command -v curl >/dev/null && command -v python3 >/dev/null || { echo "needs curl and python3" >&2; exit 1; }

# shellcheck source=scripts/lib/processes.sh
source "$root/scripts/lib/processes.sh"
start_bg() { local n=$1; shift; "$@" >"$out/logs/$n.log" 2>&1 & PID[$n]=$!; }
ready() { # name port
  for _ in $(seq 120); do
    curl -fsS -m 5 -o /dev/null -XPOST -H 'content-type: application/json' \
      -d '{"model":"sim","messages":[{"role":"user","content":"hi"}],"max_tokens":1}' \
      "http://127.0.0.1:$2/v1/chat/completions" 2>/dev/null && return 0
    kill -0 "${PID[$1]}" 2>/dev/null || break
    sleep 0.5
  done
  log "$1 did not become ready"; tail -n 5 "$out/logs/$1.log" >&2; return 1
}
sims_csv() { local n=$1 i urls=(); for i in $(seq 0 $((n - 1))); do urls+=("http://127.0.0.1:${SIM_PORTS[$i]}"); done; (IFS=,; echo "${urls[*]}"); }

frozen_run() { # label binary
  local label=$1 bin=$2 i
  cp "$bin" "$out/nanogate-$label" || return 1; bin=$out/nanogate-$label
  for i in 0 1 2; do
    RUST_LOG=warn start_bg "sim$i" "$bin" simulate --listen "127.0.0.1:${SIM_PORTS[$i]}" --max-batch 32
  done
  for i in 0 1 2; do ready "sim$i" "${SIM_PORTS[$i]}" || return 1; done
  RUST_LOG=warn start_bg gw "$bin" serve --listen "127.0.0.1:$GW_PORT" --backends "$(sims_csv 3)"
  ready gw "$GW_PORT" || return 1
  ( sleep "$FREEZE_AT"; kill -STOP "${PID[sim1]}" ) &
  local freezer=$!
  timeout 300 "$bin" loadtest --url "http://127.0.0.1:$GW_PORT/v1/chat/completions" --concurrency 32 \
    --requests "${REQUESTS:-6000}" --max-tokens 8 --timeout 60 --json --quiet > "$out/frozen-$label.json" 2>> "$out/logs/load.err"
  wait "$freezer" 2>/dev/null
  stop gw; for i in 0 1 2; do stop "sim$i"; done
  python3 - "$label" "$out/frozen-$label.json" <<'PY' | tee -a "$out/summary.md"
import json, sys
label, f = sys.argv[1:]
s = json.load(open(f)); lat = s["latency_ms"]
print(f"| {label} | {s['ok']} | {s['failed']} | {lat['p50']:.1f} | {lat['p99']:.1f} | {lat['max']:.1f} | {s.get('failures') or ''} |")
PY
}

hedge_run() { # label enabled round -> appends a JSON line
  local label=$1 enabled=$2 r=$3 bin=$out/nanogate i
  local args=("--speed 1.0" "--speed 1.0" "--speed 0.5" "--speed 1.0 --spike-rate 0.05 --spike-ms 1000")
  for i in 0 1 2 3; do curl -fsS -m 5 -o /dev/null -XPOST "http://127.0.0.1:${SIM_PORTS[$i]}/sim/flush" || return 1; done
  NANOGATE__HEDGE__ENABLED=$enabled NANOGATE__BALANCER__POLICY=${POLICY:-cache_aware} RUST_LOG=warn start_bg gw "$bin" serve --listen "127.0.0.1:$GW_PORT" --backends "$(sims_csv 4)"
  ready gw "$GW_PORT" || return 1
  for i in 0 1 2 3; do curl -fsS -m 5 -o /dev/null -XPOST "http://127.0.0.1:${SIM_PORTS[$i]}/sim/flush" || return 1; done
  timeout 300 "$bin" loadtest --url "http://127.0.0.1:$GW_PORT/v1/chat/completions" --stream --rate "$RATE" \
    --requests "${REQUESTS:-1200}" --concurrency 5000 --prefixes 16 --max-tokens 32 --seed 42 --timeout 30 --json --quiet \
    > "$out/logs/load.json" 2>> "$out/logs/load.err"
  local stats; stats=$(curl -fsS -m 5 "http://127.0.0.1:$GW_PORT/stats/balancer" || echo null)
  stop gw
  local sims=()
  for i in 0 1 2 3; do sims+=("$(curl -fsS -m 5 "http://127.0.0.1:${SIM_PORTS[$i]}/sim/stats" || echo null)"); done
  python3 - "$label" "$r" "$out/logs/load.json" "$stats" "${sims[@]}" >> "$out/hedge.jsonl" <<'PY'
import json, sys
label, r, load, stats = sys.argv[1:5]
print(json.dumps({"label": label, "round": int(r), "load": json.load(open(load)), "stats": json.loads(stats),
                  "sims": [json.loads(s) for s in sys.argv[5:]]}))
PY
  tail -n 1 "$out/hedge.jsonl" | python3 -c '
import json, sys
d = json.loads(sys.stdin.read()); l = d["load"]; t = l["ttft_ms"]; sent = sum(s["requests"] for s in d["sims"])
b = (d["stats"] or {}).get("retry_budget", {})
print("  hedging %s r%d: ok=%d failed=%d ttft p50=%s p99=%s backend requests %d (%.3f per request) hedges=%s won=%s" % (
      d["label"], d["round"], l["ok"], l["failed"], t["p50"], t["p99"], sent, sent / max(1, l["ok"] + l["failed"]),
      b.get("hedges"), b.get("hedges_won")))' \
    | tee -a "$out/run.log" >&2
}

if [ "$mode" = frozen ] || [ "$mode" = all ]; then
  log "frozen backend: 3 simulators, 32 clients in a closed loop, one simulator SIGSTOPped ${FREEZE_AT}s in"
  { echo "## Frozen backend (SIGSTOP ${FREEZE_AT} s into ${REQUESTS:-6000} requests from 32 clients, 3 simulators)"; echo
    echo "| build | answered | errors | p50 ms | p99 ms | worst ms | failures by cause |"; echo "|---|---:|---:|---:|---:|---:|---|"; } >> "$out/summary.md"
  for b in $BINARIES; do frozen_run "${b%%:*}" "${b#*:}" || log "${b%%:*}: run failed"; done
  echo >> "$out/summary.md"
fi

if [ "$mode" = hedge ] || [ "$mode" = all ]; then
  bin=${BINARIES##*:}; cp "$bin" "$out/nanogate" || exit 1
  args=("--speed 1.0" "--speed 1.0" "--speed 0.5" "--speed 1.0 --spike-rate 0.05 --spike-ms 1000")
  for i in 0 1 2 3; do
    # shellcheck disable=SC2086 # flag lists
    RUST_LOG=warn start_bg "sim$i" "$out/nanogate" simulate --listen "127.0.0.1:${SIM_PORTS[$i]}" --max-batch 16 \
      --prefix-cache-blocks 768 ${args[$i]}
  done
  for i in 0 1 2 3; do ready "sim$i" "${SIM_PORTS[$i]}" || exit 1; done
  log "hedging off and on: unequal fleet, 16 shared prompts, $RATE req/s, $ROUNDS rounds"
  for r in $(seq "$ROUNDS"); do hedge_run off false "$r"; hedge_run on true "$r"; done
  python3 - "$out/hedge.jsonl" <<'PY' | tee -a "$out/summary.md"
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
print("## Hedged first tokens (unequal fleet with a spiky backend, 16 shared prompts, medians)\n")
print("| hedging | p50 TTFT ms | p99 TTFT ms | backend requests per client request | hedges | hedges won | errors |")
print("|---|---:|---:|---:|---:|---:|---:|")
for label in ("off", "on"):
    rs = [r for r in runs if r["label"] == label]
    if not rs:
        continue
    med = lambda f: statistics.median(f(r) for r in rs)
    per = med(lambda r: sum(s["requests"] for s in r["sims"]) / max(1, r["load"]["ok"] + r["load"]["failed"]))
    budget = lambda r, k: ((r["stats"] or {}).get("retry_budget") or {}).get(k, 0)
    print(f"| {label} | {med(lambda r: r['load']['ttft_ms']['p50']):.1f} | {med(lambda r: r['load']['ttft_ms']['p99']):.1f} "
          f"| {per:.3f} | {med(lambda r: budget(r, 'hedges')):g} | {med(lambda r: budget(r, 'hedges_won')):g} "
          f"| {med(lambda r: r['load']['failed']):g} |")
PY
fi
log "summary: $out/summary.md"
