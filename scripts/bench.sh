#!/usr/bin/env bash
# Peer comparison: nanogate side by side with direct / nginx / HAProxy / sglang-router / vllm-router / LiteLLM,
# on 127.0.0.1 only, in front of the same backends (benches/peers/README.md explains the scenarios and columns).
#
# Usage (from anywhere; paths are relative to the repo root):
#   scripts/bench.sh [--no-build] [RUN.SH ARGS...]      (--no-build: use the existing target/release/nanogate)
#       full run (defaults of benches/peers/run.sh: all peers, json + stream phases, 3 rounds; ~20 min), e.g.
#       scripts/bench.sh --peers "direct nginx sglang" --rounds 1 --secs 3
#   scripts/bench.sh cpu [--no-build] [--baseline BIN] [RUN.SH ARGS...]
#       gateway CPU per request at concurrency 1 and 64 vs direct (json phase only, c1 and c64, ~1 min).
#       Read summary.md, tables `c1` and `c64`: column `cpu_us_per_req` of row `nanogate` is the gateway's own CPU µs
#       per request (its process tree only); row `direct` is the backend's, the floor. `cpu_pct` is the gateway's CPU
#       share during the run; "ratio to direct" gives `rps xN` and `p50_ms +Nus` (latency the hop adds).
#   --baseline BIN (either mode) runs another nanogate binary as the target `baseline` in the same interleaved rounds,
#       e.g. a copy of target/release/nanogate built from main before a change: before/after in one run.
#
# What it does: (a) runs benches/peers/setup.sh if the peer tools are missing; (b) `cargo build --release` once (skip
# with --no-build); (c) raises `ulimit -n` to the hard limit; (d) runs benches/peers/run.sh with
#   --gateway nanogate 18090 'target/release/nanogate serve --listen 127.0.0.1:$PORT --backends $UPSTREAMS'
# and --out bench-results/DATE (git-ignored). Arguments after the mode pass through to run.sh and win over the
# defaults here (run.sh takes the last value of a repeated option), so `--out DIR` also works.
# Env: PEERS_VENV (default ~/.cache/nanogate-peers), CARGO_TARGET_DIR, RUST_LOG (default warn: no per-request logs),
#      BENCH_TIMEOUT_S (whole run.sh bound, default 7200).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mode=full
if [ "${1:-}" = cpu ]; then mode=cpu; shift; fi
build=1; pass=(); baseline=""; prev=""
for a in "$@"; do
  if [ "$prev" = --baseline ]; then baseline=$a; prev=""; continue; fi
  if [ "$a" = --no-build ]; then build=0; elif [ "$a" != --baseline ]; then pass+=("$a"); fi
  prev=$a
done
set -- "${pass[@]}"

venv=${PEERS_VENV:-$HOME/.cache/nanogate-peers}
export PEERS_VENV=$venv
st=$venv/streamtool-target/release/streamtool
missing=""
for c in nginx haproxy wrk curl python3; do command -v "$c" >/dev/null || missing+=" $c"; done
[ -x "$st" ] || missing+=" streamtool"
[ -x "$venv/bin/vllm-router" ] || missing+=" vllm-router"
[ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import sglang_router' 2>/dev/null || missing+=" sglang-router"
# LiteLLM is a default peer of run.sh but optional in setup.sh: install it when the run will include it.
peers="direct nginx haproxy sglang vllm litellm"; [ $mode = cpu ] && peers=direct
prev=""; for a in "$@"; do [ "$prev" = --peers ] && peers=$a; prev=$a; done
setup_args=()
case " $peers " in *" litellm "*) [ -x "$venv/bin/litellm" ] || { missing+=" litellm"; setup_args=(--with-litellm); };; esac
if [ -n "$missing" ]; then
  echo "bench.sh: missing:$missing; running benches/peers/setup.sh" >&2
  timeout 3600 bash "$root/benches/peers/setup.sh" "$venv" "${setup_args[@]}"
fi

target_dir=${CARGO_TARGET_DIR:-$root/target}
bin=$target_dir/release/nanogate
if [ $build = 1 ]; then
  echo "bench.sh: cargo build --release" >&2
  timeout --foreground 3600 cargo build --release --manifest-path "$root/Cargo.toml" --bin nanogate
fi
[ -x "$bin" ] || { echo "bench.sh: $bin not found (build failed or --no-build without a build)" >&2; exit 1; }

hard=$(ulimit -Hn)
ulimit -n "$hard"
export RUST_LOG=${RUST_LOG:-warn}

out=$root/bench-results/$(date +%Y%m%d-%H%M%S)
defaults=()
if [ $mode = cpu ]; then
  out+=-cpu
  defaults=(--peers direct --phases json --conc "1 64" --hold "" --rounds 3 --secs 5)
fi
prev=""; for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done   # a passed --out wins (run.sh takes the last)
# The command runs under `bash -c "exec ..."` in run.sh with PORT and UPSTREAMS set; the single quotes keep them
# unexpanded here. The binary path is quoted for the inner shell.
gw_cmd="$(printf '%q' "$bin") serve --listen 127.0.0.1:\$PORT --backends \$UPSTREAMS"
gateways=(--gateway nanogate 18090 "$gw_cmd")
if [ -n "$baseline" ]; then
  [ -x "$baseline" ] || { echo "bench.sh: --baseline $baseline is not an executable" >&2; exit 1; }
  gateways+=(--gateway baseline 18091 "$(printf '%q' "$baseline") serve --listen 127.0.0.1:\$PORT --backends \$UPSTREAMS")
fi
echo "bench.sh: mode=$mode open-files=$(ulimit -n) gateway: $gw_cmd${baseline:+ baseline: $baseline}" >&2
status=0
timeout --foreground "${BENCH_TIMEOUT_S:-7200}" bash "$root/benches/peers/run.sh" --out "$out" "${defaults[@]}" \
  "${gateways[@]}" "$@" || status=$?
if [ $mode = cpu ] && [ -f "$out/summary.md" ]; then
  echo
  echo "CPU µs per request (cpu_us_per_req; nanogate = gateway process only, direct = backend only):"
  awk -F'\t' 'NR==1{for(i=1;i<=NF;i++)h[$i]=i; next} ($1=="c1"||$1=="c64"){print $1, $3, "rps=" $h["rps"], "p50_ms=" $h["p50_ms"], "cpu_us_per_req=" $h["cpu_us_per_req"] " (round " $2 ")"}' "$out/results.tsv" | sort -s -k1,2
fi
echo "bench.sh: results in $out (exit $status)" >&2
exit $status
