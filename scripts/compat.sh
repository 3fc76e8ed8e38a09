#!/usr/bin/env bash
# Compatibility of third-party clients, backends and monitoring tools with the gateway: each one is run against (or
# behind) the release binary and a markdown table says what passed. Not part of the default test run. Everything
# listens on 127.0.0.1; every process it starts is stopped by PID on exit; every step is bounded by `timeout`.
#
# Usage: scripts/compat.sh [--only GROUP[,GROUP]] [--install-only]
#   groups: openai (latest SDK and latest 1.x), litellm, langchain, metrics (promtool, prometheus_client), aiperf,
#           guidellm, mockllm; default all. ~2 minutes once installed (the first install takes a few minutes more).
# Writes the table to bench-results/compat-DATE.md and the logs, the raw rows (results.jsonl) and aiperf's artifacts
# to bench-results/compat-DATE/ (git-ignored). Exit status 1 if any check failed, 2 if it could not run.
# Env: NANOGATE_BIN (default target/release/nanogate; never built here: run `cargo build --release` first),
#      COMPAT_VENV (default ~/.cache/nanogate-compat), COMPAT_PORT_BASE (default 18400; uses BASE..BASE+21),
#      PYTHON (interpreter for the venvs, default python3, 3.11 tested), PROMTOOL (a promtool to use).
#
# What it checks (scripts/compat/*.py hold the checks; each prints JSON rows that report.py renders):
#   clients, through a gateway in front of two simulators (`nanogate simulate --speed 20`, model `sim`) and
#   fake_backend.py (models `fake`, `fake-slow`, `fake-drip`: the Responses API the simulator lacks, an answer after
#   5 s, a 2.5 s stream with a chunk every 0.1 s):
#     openai SDK, latest release and latest 1.x: models.list/retrieve, chat (JSON, streamed with include_usage),
#       completions, embeddings, responses.create (JSON, streamed), timeout=1.0 against the 5 s answer ->
#       openai.APITimeoutError (10 at once), and against the 2.5 s stream -> it completes (the SDK's timeout bounds each
#       read, not the whole request)
#     litellm.completion(model="openai/sim") and langchain-openai ChatOpenAI, each plain and streamed
#   tools: promtool check metrics and prometheus_client's parser on the gateway's /metrics; aiperf profiling the
#     gateway (20 streamed chats, concurrency 2) with a tokenizer built here (make_tokenizer.py; no Hugging Face hub),
#     and aiperf's own scrape of /metrics
#   backends, each alone behind its own gateway: guidellm's mock server (models learned from its /v1/models) and
#     mockllm (no /v1/models: the model is set in the config); backends.py
#   and, for the record, the request headers each client sends (straight to fake_backend.py, and as the gateway
#     forwards them) and what the third-party backends answer on /health, /v1/models, /metrics, unknown routes.
#
# Installation (idempotent: a venv whose pinned list is unchanged is kept): venvs under COMPAT_VENV, one per pinned
# list in scripts/compat/requirements/ (every package pinned, installed with pip --no-deps), and promtool: the one on
# PATH, else extracted from Debian's `prometheus` package (apt-get download + dpkg-deb -x into COMPAT_VENV/prometheus:
# promtool alone, without installing the server package, its JavaScript dependencies and its service).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
here=$root/scripts/compat
BIN=${NANOGATE_BIN:-target/release/nanogate}
V=${COMPAT_VENV:-$HOME/.cache/nanogate-compat}
PY=${PYTHON:-python3}
BASE=${COMPAT_PORT_BASE:-18400}
GW=$BASE; SIM1=$((BASE + 1)); SIM2=$((BASE + 2)); FAKE=$((BASE + 3))
GW_GUIDELLM=$((BASE + 10)); GUIDELLM=$((BASE + 11)); GW_MOCKLLM=$((BASE + 20)); MOCKLLM=$((BASE + 21))
AIPERF_REQUESTS=20
ALL_GROUPS=openai,litellm,langchain,metrics,aiperf,guidellm,mockllm
groups=$ALL_GROUPS; install_only=0
while [ $# -gt 0 ]; do
  case $1 in
    --only) groups=$2; shift;;
    --install-only) install_only=1;;
    *) echo "usage: $0 [--only GROUP[,GROUP]] [--install-only]   (groups: $ALL_GROUPS)" >&2; exit 2;;
  esac
  shift
done
for g in ${groups//,/ }; do
  case ",$ALL_GROUPS," in *",$g,"*) ;; *) echo "compat.sh: unknown group $g (groups: $ALL_GROUPS)" >&2; exit 2;; esac
done
want() { case ",$groups," in *",$1,"*) return 0;; *) return 1;; esac; }

if [ ! -x "$BIN" ]; then
  echo "compat.sh: $BIN not found: run \`cargo build --release\` first (or set NANOGATE_BIN)" >&2; exit 2
fi
for c in curl "$PY"; do command -v "$c" >/dev/null || { echo "compat.sh: needs $c" >&2; exit 2; }; done
stamp=$(date +%Y%m%d-%H%M%S)
out=$root/bench-results/compat-$stamp
mkdir -p "$out/logs"
results=$out/results.jsonl; : > "$results"
log() { echo "[$(date +%T)] $*" | tee -a "$out/run.log" >&2; }

# ---- installation -------------------------------------------------------------------------------------------------
install_venv() { # NAME: COMPAT_VENV/NAME from requirements/NAME.txt, unless it was installed from the same list
  local n=$1 req=$here/requirements/$1.txt dir=$V/$1
  [ -x "$dir/bin/python" ] && cmp -s "$req" "$dir/.compat-requirements" && return 0
  log "installing venv $n ($(grep -c '==' "$req") pinned packages) into $dir"
  rm -rf "$dir"
  timeout 300 "$PY" -m venv "$dir" &&
    timeout 1800 "$dir/bin/pip" install -q --disable-pip-version-check --no-deps -r "$req" \
      >> "$out/logs/install.log" 2>&1 &&
    cp "$req" "$dir/.compat-requirements" && return 0
  log "install of $n failed (see $out/logs/install.log)"; return 1
}
find_promtool() { # sets PROMTOOL, installing it if needed; empty when it cannot be had
  PROMTOOL=${PROMTOOL:-$(command -v promtool || true)}
  [ -n "$PROMTOOL" ] && return 0
  PROMTOOL=$V/prometheus/usr/bin/promtool
  [ -x "$PROMTOOL" ] && return 0
  log "extracting promtool from Debian's prometheus package into $V/prometheus"
  local tmp; tmp=$(mktemp -d)
  if ! (cd "$tmp" && timeout 600 apt-get download prometheus) >> "$out/logs/install.log" 2>&1; then
    timeout 600 apt-get update -qq >> "$out/logs/install.log" 2>&1
    (cd "$tmp" && timeout 600 apt-get download prometheus) >> "$out/logs/install.log" 2>&1
  fi
  ls "$tmp"/prometheus_*.deb >/dev/null 2>&1 && dpkg-deb -x "$tmp"/prometheus_*.deb "$V/prometheus"
  rm -rf "$tmp"
  [ -x "$PROMTOOL" ] || { log "promtool unavailable (see $out/logs/install.log)"; PROMTOOL=""; }
}
mkdir -p "$V"
exec 9>"$V/.lock"   # two runs at once: one installs, the other waits for it
flock 9
venvs=(clients)   # the latest openai SDK, litellm, langchain-openai, prometheus-client: every group's checks use it
want openai && venvs+=(openai1)
want aiperf && venvs+=(aiperf)
want guidellm && venvs+=(guidellm)
want mockllm && venvs+=(mockllm)
declare -A installed
for n in "${venvs[@]}"; do install_venv "$n" && installed[$n]=1; done
PROMTOOL=""; want metrics && find_promtool
flock -u 9
[ $install_only = 1 ] && { log "installed: ${!installed[*]}${PROMTOOL:+, promtool $PROMTOOL}"; exit 0; }

# ---- processes ----------------------------------------------------------------------------------------------------
# shellcheck source=scripts/lib/processes.sh
source "$root/scripts/lib/processes.sh"
start_bg() { # NAME CMD...: in the background, bounded by timeout in case this script is killed, PID recorded
  local n=$1; shift
  echo "$n: $*" >> "$out/run.log"
  timeout 1800 "$@" < /dev/null > "$out/logs/$n.log" 2>&1 & PID[$n]=$!
}
wait_http() { # NAME URL SECS: until URL answers any HTTP status; 1 if it does not or the process died
  for _ in $(seq $(($3 * 4))); do
    [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$2")" != 000 ] && return 0
    kill -0 "${PID[$1]}" 2>/dev/null || break
    sleep 0.25
  done
  log "$1 did not answer on $2 within $3 s; log tail:"; tail -n 5 "$out/logs/$1.log" | tee -a "$out/run.log" >&2
  return 1
}
wait_ready() { # URL SECS: until the gateway's /ready is 200 (endpoints healthy); 1 if not
  for _ in $(seq $(($2 * 4))); do
    [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$1/ready")" = 200 ] && return 0
    sleep 0.25
  done
  return 1
}
start_gateway() { # NAME PORT ENDPOINT_TOML: writes NAME.toml (health probes every second) and starts the gateway
  local n=$1 port=$2
  printf '[server]\nlisten = "127.0.0.1:%s"\n[health]\ninterval_ms = 1000\n%s\n' "$port" "$3" > "$out/$n.toml"
  RUST_LOG=${RUST_LOG:-warn} start_bg "$n" "$bin" serve --config "$out/$n.toml"
  wait_http "$n" "http://127.0.0.1:$port/health" 20
}

# ---- result rows --------------------------------------------------------------------------------------------------
row() { # COMPONENT KIND VERSION CHECK RESULT DETAIL
  "$PY" -c 'import json, sys; print(json.dumps(dict(zip(
    ["component", "kind", "version", "check", "result", "detail"], sys.argv[1:]))))' "$@" >> "$results"
}
helper() { # COMPONENT KIND SECS VENV SCRIPT ARGS...: runs a check helper, its rows into results.jsonl
  local comp=$1 kind=$2 secs=$3 venv=$4 st=0; shift 4
  echo "helper: $venv/bin/python $*" >> "$out/run.log"
  (cd "$here" && timeout -k 5 "$secs" "$V/$venv/bin/python" "$@" >> "$results" \
     2> >(tee -a "$out/logs/checks.log" >&2)) || st=$?
  if [ $st = 124 ]; then row "$comp" "$kind" "-" "$1 $2" FAIL "timed out after $secs s (rows before it stand)"
  elif [ $st != 0 ]; then row "$comp" "$kind" "-" "$1 $2" FAIL "helper exited $st: see $out/logs/checks.log"; fi
}
skip_unless_installed() { # VENV COMPONENT KIND: a skipped row when the venv could not be installed
  [ -n "${installed[$1]:-}" ] && return 0
  row "$2" "$3" "-" "all" skipped "install of venv $1 failed: see $out/logs/install.log"; return 1
}
pyver() { # VENV PACKAGE: its installed version
  "$V/$1/bin/python" -c "from importlib.metadata import version; print(version('$2'))" 2>/dev/null || echo "?"
}

# Run a private copy: a rebuild of target/release during the run must not change what is checked half-way.
bin=$out/nanogate
cp "$BIN" "$bin" || exit 2
log "binary $BIN ($("$bin" --version 2>/dev/null)); venvs in $V; logs in $out"
export LITELLM_LOCAL_MODEL_COST_MAP=True   # litellm: no fetch of its price list at import
export PYTHONDONTWRITEBYTECODE=1           # no __pycache__ next to the helpers in the work tree
fakelog=$out/fake-backend.jsonl

# ---- clients and tools, through one gateway in front of two simulators and the fake backend -----------------------
if want openai || want litellm || want langchain || want metrics || want aiperf; then
  RUST_LOG=warn start_bg sim1 "$bin" simulate --listen "127.0.0.1:$SIM1" --models sim --speed 20
  RUST_LOG=warn start_bg sim2 "$bin" simulate --listen "127.0.0.1:$SIM2" --models sim --speed 20
  start_bg fake "$PY" "$here/fake_backend.py" --port "$FAKE" --models fake,fake-slow,fake-drip --slow-s 5 --log "$fakelog"
  up=1
  for n in sim1:$SIM1 sim2:$SIM2 fake:$FAKE; do wait_http "${n%%:*}" "http://127.0.0.1:${n#*:}/health" 20 || up=0; done
  endpoints=$(printf '[[endpoints]]\nurl = "http://127.0.0.1:%s"\nmodels = ["sim"]\n' "$SIM1" "$SIM2"
               printf '[[endpoints]]\nurl = "http://127.0.0.1:%s"\nmodels = ["fake", "fake-slow", "fake-drip"]\n' "$FAKE")
  start_gateway gateway "$GW" "$endpoints" || up=0
  [ $up = 1 ] && { wait_ready "http://127.0.0.1:$GW" 10 || log "gateway not ready after 10 s: checking anyway"; }
  gw=http://127.0.0.1:$GW

  if [ $up = 0 ]; then
    row gateway setup "-" "simulators, fake backend and gateway start" FAIL "see $out/logs"
  else
    # Headers as sent (straight to the fake backend), then as forwarded by the gateway (the openai checks below).
    if want openai || want litellm || want langchain; then
      [ -n "${installed[openai1]:-}" ] && helper headers info 120 openai1 clients.py headers "http://127.0.0.1:$FAKE"
      helper headers info 120 clients clients.py headers "http://127.0.0.1:$FAKE"
      curl -s -m 5 -o /dev/null "http://127.0.0.1:$FAKE/_compat/mark?name=via%20gateway"
    fi

    if want openai; then
      log "openai SDK (latest, then latest 1.x)"
      helper openai client 180 clients clients.py openai "$gw"
      sleep 3   # the timeout checks may get the fake backend ejected (2 s cooldown): let it come back first
      skip_unless_installed openai1 openai-1.x client &&
        helper openai-1.x client 180 openai1 clients.py openai "$gw" --label openai-1.x
    fi
    want litellm && { log "litellm"; helper litellm client 120 clients clients.py litellm "$gw"; }
    want langchain && { log "langchain-openai"; helper langchain-openai client 120 clients clients.py langchain "$gw"; }
    if want metrics; then
      log "metrics: promtool ${PROMTOOL:-(none)}, prometheus_client"
      helper metrics tool 120 clients metrics.py "$gw/metrics" ${PROMTOOL:+--promtool "$PROMTOOL"} \
        --save "$out/metrics.txt"
    fi
    if want aiperf && skip_unless_installed aiperf aiperf tool; then
      log "aiperf: local tokenizer, then profile ($AIPERF_REQUESTS streamed chats, concurrency 2)"
      hf=$out/hf-cache
      # Trained on the Shakespeare text aiperf ships (its default prompt corpus), when it is where 0.13 has it.
      corpus=$(timeout 60 "$V/aiperf/bin/python" -c 'import aiperf, os
print(os.path.join(os.path.dirname(aiperf.__file__), "dataset", "generator", "assets", "shakespeare.txt"))')
      corpora=(); [ -f "$corpus" ] && corpora=("$corpus")
      if ! (cd "$here" && HF_HUB_OFFLINE=1 timeout 120 "$V/aiperf/bin/python" make_tokenizer.py "$hf" \
              nanogate/compat-tokenizer "${corpora[@]}") >> "$out/logs/aiperf.log" 2>&1; then
        row aiperf tool "$(pyver aiperf aiperf)" "local tokenizer (make_tokenizer.py)" FAIL "see $out/logs/aiperf.log"
      else
        # aiperf scrapes base URL + /metrics by default (--server-metrics): that is the gateway's /metrics.
        cmd=("$V/aiperf/bin/aiperf" profile --model sim --tokenizer nanogate/compat-tokenizer --url "$gw"
             --endpoint-type chat --streaming --request-count "$AIPERF_REQUESTS" --concurrency 2 --isl 64 --osl 16
             --random-seed 1 --ui none --no-gpu-telemetry --artifact-dir "$out/aiperf")
        echo "aiperf: ${cmd[*]}" >> "$out/run.log"
        st=0
        (cd "$out" && HF_HUB_CACHE=$hf HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 timeout -k 10 300 "${cmd[@]}") \
          >> "$out/logs/aiperf.log" 2>&1 || st=$?
        helper aiperf tool 60 clients aiperf_result.py "$out/aiperf" "$st" "$(pyver aiperf aiperf)" \
          "$AIPERF_REQUESTS" "$out/logs/aiperf.log"
      fi
    fi
  fi
  for n in gateway sim1 sim2 fake; do stop "$n"; done
fi

# ---- third-party backends, each behind its own gateway ------------------------------------------------------------
if want guidellm && skip_unless_installed guidellm guidellm backend; then
  log "guidellm mock server behind the gateway"
  ver=$(pyver guidellm guidellm)
  start_bg guidellm "$V/guidellm/bin/guidellm" mock-server --host 127.0.0.1 --port "$GUIDELLM" --model guidellm-mock \
    --request-latency 0.05 --ttft-ms 10 --itl-ms 2 --output-tokens 8
  if wait_http guidellm "http://127.0.0.1:$GUIDELLM/health" 90 &&
     start_gateway gw-guidellm "$GW_GUIDELLM" "$(printf '[[endpoints]]\nurl = "http://127.0.0.1:%s"' "$GUIDELLM")"; then
    helper guidellm backend 120 clients backends.py guidellm "$ver" "http://127.0.0.1:$GW_GUIDELLM" \
      "http://127.0.0.1:$GUIDELLM" guidellm-mock
  else
    row guidellm backend "$ver" "mock-server and gateway start" FAIL "see $out/logs/guidellm.log, gw-guidellm.log"
  fi
  stop gw-guidellm; stop guidellm
fi
if want mockllm && skip_unless_installed mockllm mockllm backend; then
  log "mockllm behind the gateway"
  ver=$(pyver mockllm mockllm)
  printf 'responses:\n  "Say hello.": "Hello from mockllm."\ndefaults:\n  unknown_response: "I am mockllm."\n' \
    > "$out/mockllm.yml"
  # Its `mockllm start` binds 0.0.0.0 by default and always runs uvicorn's --reload file watcher: run its app directly.
  MOCKLLM_RESPONSES_FILE=$out/mockllm.yml start_bg mockllm "$V/mockllm/bin/python" -m uvicorn mockllm.server:app \
    --host 127.0.0.1 --port "$MOCKLLM" --log-level warning
  if wait_http mockllm "http://127.0.0.1:$MOCKLLM/" 60 &&
     start_gateway gw-mockllm "$GW_MOCKLLM" \
       "$(printf '[[endpoints]]\nurl = "http://127.0.0.1:%s"\nmodels = ["mockllm-model"]' "$MOCKLLM")"; then
    helper mockllm backend 120 clients backends.py mockllm "$ver" "http://127.0.0.1:$GW_MOCKLLM" \
      "http://127.0.0.1:$MOCKLLM" mockllm-model
  else
    row mockllm backend "$ver" "server and gateway start" FAIL "see $out/logs/mockllm.log, gw-mockllm.log"
  fi
  stop gw-mockllm; stop mockllm
fi

# ---- report -------------------------------------------------------------------------------------------------------
table=$root/bench-results/compat-$stamp.md
status=0
sum=$(sha256sum "$bin" | cut -c1-12)
report_args=(--title "nanogate compatibility, $(date '+%Y-%m-%d %H:%M'), $("$bin" --version 2>/dev/null) ($BIN, sha256 $sum)")
[ -s "$fakelog" ] && report_args+=(--headers "$fakelog")
timeout 60 "$PY" "$here/report.py" "$results" "${report_args[@]}" > "$table" || status=$?
cat "$table"
log "table in $table, logs in $out (exit $status)"
exit $status
