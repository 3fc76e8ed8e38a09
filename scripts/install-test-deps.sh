#!/usr/bin/env bash
# Installs what the tests need besides Cargo, each part only if it is missing:
#   postgres  PostgreSQL server binaries (initdb, pg_ctl) for the tests' throwaway servers
#             (tests/common/postgres.rs): Debian's `postgresql` package through apt-get (as root, or with
#             sudo), unless `pg_config --bindir` or /usr/lib/postgresql/*/bin already has initdb.
#   python    a venv at <repo>/.venv (git-ignored) with the official `openai` SDK, pinned; needs python3
#             (>= 3.8) and PyPI, and is skipped, saying so, where python3 is missing.
#   node      the official `openai` SDK for Node (openai-node), pinned, in <repo>/.node (git-ignored); needs
#             node (>= 18) and npm, and is skipped, saying so, where they are missing.
# Usage: scripts/install-test-deps.sh [all|postgres|python|node]   (default all)
#        then e.g.: .venv/bin/python tests/openai_sdk.py http://127.0.0.1:PORT/v1
# Idempotent and quiet: exits 0 at once when everything is already installed. A part that fails does not stop
# the other; the exit status is then 1.
# Env: PYTHON (interpreter used to create the venv, default python3).
set -euo pipefail
OPENAI_VERSION=1.109.1   # latest 1.x on PyPI (2.x/3.x exist; the tests target the 1.x API, which they keep)
OPENAI_NODE_VERSION=5.23.2   # latest 5.x on npm (6.x/7.x exist; the test uses the API 5.x shares with them)
what=${1:-all}
case $what in all | postgres | python | node) ;; *) echo "usage: $0 [all|postgres|python|node]" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$root/.venv
py=$venv/bin/python
# Tests running in parallel may all call this on a fresh checkout: one installs, the others wait for it.
exec 9>"$venv.lock"
flock 9

# The same search as tests/common/postgres.rs: pg_config (which may belong to another version's libpq-dev), then
# Debian's versioned directories.
have_initdb() {
  local d
  d=$(pg_config --bindir 2>/dev/null) && [ -x "$d/initdb" ] && return 0
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && return 0; done
  return 1
}

# Note: functions called as `f || status=1` run without `set -e`, hence the explicit `|| return 1`.
install_postgres() {
  have_initdb && return 0
  echo "install-test-deps: installing PostgreSQL (apt-get install postgresql)" >&2
  if ! apt_install postgresql; then
    echo "install-test-deps: no PostgreSQL server (initdb) found, and installing it needs root or sudo, and apt-get: install it (initdb, pg_ctl) yourself" >&2
    return 1
  fi
  have_initdb || { echo "install-test-deps: postgresql installed, but still no initdb found" >&2; return 1; }
  echo "PostgreSQL server binaries in $(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin)"
}

# apt-get install, as root or through sudo -n; 1 where neither is possible.
apt_install() {
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || return 1
    sudo="sudo -n"   # -n: fail rather than wait for a password nobody will type
  fi
  command -v apt-get >/dev/null || return 1
  # Lock::Timeout: wait for another apt/dpkg (e.g. a parallel CI job) rather than fail at once.
  local apt="$sudo env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o DPkg::Lock::Timeout=120"
  # Package lists may be stale or absent (containers): refresh them only when the install fails.
  if ! timeout 600 $apt install --no-install-recommends "$@" >/dev/null 2>&1; then
    timeout 300 $apt update >/dev/null || return 1
    timeout 600 $apt install --no-install-recommends "$@" >/dev/null || return 1
  fi
}

# A venv with pip, made afresh: Debian's python3 makes one only with python3-venv installed, and
# without it leaves a venv with an interpreter and no pip, which is removed rather than kept.
make_venv() {
  rm -rf "$venv"
  timeout 300 "${PYTHON:-python3}" -m venv "$venv" >/dev/null 2>&1 && return 0
  rm -rf "$venv"
  echo "install-test-deps: ${PYTHON:-python3} -m venv failed; installing python3-venv" >&2
  apt_install python3-venv || { echo "install-test-deps: could not install python3-venv (needs root or sudo, and apt-get)" >&2; return 1; }
  timeout 300 "${PYTHON:-python3}" -m venv "$venv" || { rm -rf "$venv"; return 1; }
}

install_python() {
  if [ -x "$py" ] && "$py" - "$OPENAI_VERSION" >/dev/null 2>&1 <<'EOF'
import sys, openai
sys.exit(0 if openai.__version__ == sys.argv[1] else 1)
EOF
  then return 0; fi
  if ! command -v "${PYTHON:-python3}" >/dev/null; then
    echo "install-test-deps: ${PYTHON:-python3} is missing: skipping the openai SDK (.venv)" >&2
    return 0
  fi
  if ! [ -x "$py" ] || ! "$py" -m pip --version >/dev/null 2>&1; then
    make_venv || return 1
  fi
  timeout 600 "$py" -m pip install -q --disable-pip-version-check "openai==$OPENAI_VERSION" || return 1
  "$py" -c 'import openai; print("openai", openai.__version__, "in", __import__("sys").prefix)'
}

install_node() {
  local dir=$root/.node
  if [ "$(node -p "require('$dir/node_modules/openai/package.json').version" 2>/dev/null)" = "$OPENAI_NODE_VERSION" ]; then
    return 0
  fi
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "install-test-deps: node or npm is missing: skipping the openai SDK for Node (.node)" >&2
    return 0
  fi
  mkdir -p "$dir"
  timeout 600 npm install --prefix "$dir" --silent --no-audit --no-fund "openai@$OPENAI_NODE_VERSION" || return 1
  echo "openai-node $OPENAI_NODE_VERSION in $dir"
}

status=0
case $what in all | postgres) install_postgres || status=1 ;; esac
case $what in all | python) install_python || status=1 ;; esac
case $what in all | node) install_node || status=1 ;; esac
exit $status
