#!/usr/bin/env bash
# Installs what the peer benchmarks need, from the registries only (Debian, PyPI, crates.io). Idempotent.
# Usage: setup.sh [VENV_DIR] [--with-litellm] [--with-oha] [--all]      (default VENV_DIR: $HOME/.cache/nanogate-peers)
#   always : nginx-light, haproxy, wrk, curl (apt); sglang-router, vllm-router, aiohttp (pip, pinned) into VENV_DIR;
#            streamtool (streamtool/ next to this script, cargo build --release, ~1 min) into VENV_DIR/streamtool-target
#   --with-litellm : litellm[proxy]==1.106.12 (~2 min). 1.108+ need a 'litellm-proxy' package the registry lacks;
#                    1.107.0 was a compromised release and is gone from PyPI: keep the pin.
#   --with-oha     : cargo install oha --locked into VENV_DIR/oha (~12 min on 2 cores); run.sh itself uses wrk.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=$HOME/.cache/nanogate-peers; litellm=0; oha=0
for a in "$@"; do case $a in --with-litellm) litellm=1;; --with-oha) oha=1;; --all) litellm=1; oha=1;; -*) echo "unknown $a" >&2; exit 2;; *) venv=$a;; esac; done
need=""; for c in nginx haproxy wrk curl; do command -v $c >/dev/null || need=1; done
if [ -n "$need" ]; then
  timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq nginx-light haproxy wrk curl >/dev/null
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
timeout 900 "$venv/bin/pip" install -q sglang-router==0.3.2 vllm-router==0.1.17 aiohttp
[ $litellm = 1 ] && timeout 900 "$venv/bin/pip" install -q 'litellm[proxy]==1.106.12'
(cd "$here/streamtool" && CARGO_TARGET_DIR="$venv/streamtool-target" timeout 900 cargo build --release -q)
[ $oha = 1 ] && { [ -x "$venv/oha/bin/oha" ] || timeout 1800 cargo install oha --locked -q --root "$venv/oha"; }
echo "peers ready in $venv: nginx $(nginx -v 2>&1 | sed 's/.*\///'), $(haproxy -v | head -n1 | awk '{print "haproxy " $3}'), wrk," \
  "$("$venv/bin/pip" list 2>/dev/null | grep -E '^(sglang-router|vllm-router|litellm) ' | tr -s ' ' | tr '\n' ' ')streamtool"
