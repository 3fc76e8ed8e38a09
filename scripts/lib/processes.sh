# Sourced by the benchmark and compatibility scripts: the processes a script starts, recorded by name in PID, and
# stopping them by PID (never by name: other runs may share the machine). Sets the EXIT trap to stop them all; a script
# with more to clean up sets its own trap and calls stop_all from it.
declare -A PID
# Stops one process and the children it spawned (children first): CONT (a frozen one cannot die of TERM), TERM, and
# KILL after 5 s.
stop_pid() {
  local p=$1 c
  for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do stop_pid "$c"; done
  kill -CONT "$p" 2>/dev/null
  kill "$p" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$p" 2>/dev/null
}
stop() { [ -n "${PID[$1]:-}" ] && stop_pid "${PID[$1]}"; unset "PID[$1]"; }
# shellcheck disable=SC2317 # run by the EXIT trap
stop_all() { local k; for k in "${!PID[@]}"; do stop "$k"; done; }
trap stop_all EXIT
trap 'exit 130' INT TERM
