#!/usr/bin/env bash
# Hostile clients and broken backends against the release binary (SECURITY.md's table), then the property tests of the
# request classifier, the path normaliser, the SSE scanning and the upstream reader for longer than the default test run.
# 127.0.0.1 only; every probe is bounded in time; every process started is killed at the end. ~4 minutes.
#
# Usage: scripts/hostile.sh [--no-build] [--only PROBE[,PROBE]] [--cases N]
#   --no-build  use the existing target/release/nanogate
#   --only      run only these probes (names in the first column of the table)
#   --cases N   property-test cases per property (default 100000; 0 skips them)
# Writes the table to bench-results/hostile-DATE.md (git-ignored). Exit status 1 if any probe or property failed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
build=1; only=""; cases=100000
while [ $# -gt 0 ]; do
  case $1 in
    --no-build) build=0;;
    --only) only=$2; shift;;
    --cases) cases=$2; shift;;
    *) echo "unknown argument $1" >&2; exit 2;;
  esac
  shift
done
if [ $build = 1 ]; then
  timeout --foreground 3600 cargo build --release --bin nanogate
fi
ulimit -n "$(ulimit -Hn)"
mkdir -p bench-results
out=bench-results/hostile-$(date +%Y%m%d-%H%M%S).md
status=0
timeout --foreground 900 python3 scripts/hostile.py --bin target/release/nanogate --out "$out" ${only:+--only "$only"} || status=$?
if [ "$cases" != 0 ] && [ -z "$only" ]; then
  echo; echo "property tests, $cases cases each:"
  PROPTEST_CASES=$cases timeout --foreground 1800 cargo test --release --test fuzz 2>&1 | grep -E "^test |test result" || status=1
fi
echo "hostile.sh: table in $out (exit $status)"
exit $status
