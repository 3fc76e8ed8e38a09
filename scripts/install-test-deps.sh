#!/usr/bin/env bash
# Installs the Python test dependencies: a venv at <repo>/.venv (git-ignored) with the official `openai` SDK, pinned.
# Usage: scripts/install-test-deps.sh        (then: .venv/bin/python tests/openai_sdk.py http://127.0.0.1:PORT/v1)
# Idempotent and quiet: exits 0 at once when the pinned version is already installed. Needs python3 (>= 3.8) and PyPI.
# Env: PYTHON (interpreter used to create the venv, default python3).
set -euo pipefail
OPENAI_VERSION=1.109.1   # latest 1.x on PyPI (2.x/3.x exist; the tests target the 1.x API, which they keep)
venv=$(cd "$(dirname "$0")/.." && pwd)/.venv
py=$venv/bin/python
# Tests running in parallel may all call this on a fresh checkout: one installs, the others wait for it.
exec 9>"$venv.lock"
flock 9
if [ -x "$py" ] && "$py" - "$OPENAI_VERSION" >/dev/null 2>&1 <<'EOF'
import sys, openai
sys.exit(0 if openai.__version__ == sys.argv[1] else 1)
EOF
then exit 0; fi
if ! [ -x "$py" ]; then
  rm -rf "$venv"
  timeout 300 "${PYTHON:-python3}" -m venv "$venv"
fi
timeout 600 "$py" -m pip install -q --disable-pip-version-check "openai==$OPENAI_VERSION"
"$py" -c 'import openai; print("openai", openai.__version__, "in", __import__("sys").prefix)'
