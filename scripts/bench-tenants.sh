#!/usr/bin/env bash
# What tenants cost on the hot path: the same release binary three ways, interleaved in one run of
# `scripts/bench.sh cpu` (json phase, c=1 and c=64, in front of nginx serving a canned answer with usage):
#   off      [auth] off, usage.database = "off": nothing of issue 8 on
#   nanogate the defaults: auth off, usage log to SQLite (nanogate-usage.db in the repo root, git-ignored)
#   keys     [auth] keys + a key with every limit (as below), usage.database = "off": keys and limits alone
#   tenants  [auth] keys + a key with every limit (rpm, tpm, max_concurrent, daily_tokens; high enough never to
#            refuse) + the usage log to a PostgreSQL server this script starts in a temp dir
# wrk sends `Authorization: Bearer sk-bench`, the tenants key's secret. Afterwards it prints the rows the usage log
# wrote to PostgreSQL. Needs Debian's postgresql (scripts/install-test-deps.sh postgres) and the peers' tools
# (benches/peers/setup.sh, run by bench.sh when missing).
# Then, unless INSTRUCTIONS=0, the instructions per request of `off` and `tenants` (and of BASELINE, a binary from
# before tenants, run with its defaults) by scripts/bench-instructions.sh: a count, not a time, so it holds on a
# noisy machine.
# Last, unless THROUGHPUT=0, the ignored test `usage_log_throughput` (release build): records/s the store takes into
# SQLite and PostgreSQL, and the usage log's buffer, drops and drain with PostgreSQL down for 5 s under load.
# CPU=0 skips the bench.sh part.
# Usage: scripts/bench-tenants.sh [--no-build] [bench.sh cpu args...]   (~2 min with the defaults, ~6 with INSTRUCTIONS)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=${CARGO_TARGET_DIR:-$root/target}/release/nanogate
bindir=$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
[ -x "$bindir/initdb" ] || { echo "bench-tenants.sh: no initdb; run scripts/install-test-deps.sh postgres" >&2; exit 1; }
tmp=$(mktemp -d /tmp/nanogate-bench-tenants.XXXXXX)
chmod 755 "$tmp"
port=${PG_PORT:-55439}
as_pg=()
[ "$(id -u)" = 0 ] && { chown postgres "$tmp"; as_pg=(runuser -u postgres --); }
cleanup() {
  "${as_pg[@]}" "$bindir/pg_ctl" -D "$tmp/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT
"${as_pg[@]}" "$bindir/initdb" -D "$tmp/data" -A trust -U nanogate --no-sync >/dev/null
"${as_pg[@]}" "$bindir/pg_ctl" -D "$tmp/data" -l "$tmp/pg.log" -w -t 30 \
  -o "-p $port -k $tmp -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off" start >/dev/null
url="postgres://nanogate@127.0.0.1:$port/postgres"

cat > "$tmp/off.toml" <<EOF
[usage]
database = "off"
EOF
for name in keys tenants; do
  database="$url"; [ $name = keys ] && database=off
  cat > "$tmp/$name.toml" <<EOF
[auth]
mode = "keys"
[usage]
database = "$database"
[[keys]]
name = "bench"
secret = "sk-bench"
rpm = 1000000000
tpm = 1000000000000
max_concurrent = 100000
daily_tokens = 1000000000000000
EOF
done
[ "${as_pg[*]}" ] && chown postgres "$tmp"/*.toml
# CPU seconds (user + system) of this script's PostgreSQL server now: the postmaster's own and its reaped children's
# (fields 14-17 of its /proc stat), and its live children's (backends of connections still open).
pg_cpu() {
  local main ticks pid
  main=$(head -1 "$tmp/data/postmaster.pid")
  ticks=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$main/stat")
  for pid in $(pgrep -P "$main" || true); do
    [ -r "/proc/$pid/stat" ] && ticks=$((ticks + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "scale=2; $ticks / $(getconf CLK_TCK)" | bc
}
pg_before=$(pg_cpu)
serve() { printf '%q serve --config %q --listen 127.0.0.1:$PORT --backends $UPSTREAMS' "$bin" "$1"; }
status=0
[ "${CPU:-1}" = 0 ] || scripts/bench.sh cpu "$@" \
  --gateway off 18093 "$(serve "$tmp/off.toml")" \
  --gateway keys 18094 "$(serve "$tmp/keys.toml")" \
  --gateway tenants 18095 "$(serve "$tmp/tenants.toml")" || status=$?
if [ "${INSTRUCTIONS:-1}" != 0 ]; then
  LABEL=off GW_ARGS="--config $tmp/off.toml" scripts/bench-instructions.sh "$bin" ${BASELINE:-}
  LABEL=tenants GW_ARGS="--config $tmp/tenants.toml" API_KEY=sk-bench scripts/bench-instructions.sh "$bin"
fi
if [ "${THROUGHPUT:-1}" != 0 ]; then
  # The store's records/s into SQLite and PostgreSQL, and the log's buffer with PostgreSQL down under load.
  timeout 1800 cargo test --release --test tenants -- --ignored --nocapture usage_log_throughput 2>&1 |
    grep -E "^(store|postgres down)|test result"
fi
echo "PostgreSQL server CPU during the run: $(echo "$(pg_cpu) - $pg_before" | bc) s (it shares the machine's cores with the gateway, wrk and nginx)"
echo "usage_log rows in PostgreSQL (tenants), by status:"
psql "$url" -Atc "select status, count(*), sum(prompt_tokens), sum(completion_tokens) from usage_log group by status" || true
exit $status
