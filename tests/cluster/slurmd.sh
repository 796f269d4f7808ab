#!/usr/bin/env bash
# slurmd.sh <dir> start|stop|restart <node>: one slurmd of an up.sh cluster.
#
# start: `slurmd -D -N <node>` in ${SE_SL_PREFIX}<node> (nsenter --net), PID appended to <dir>/pids;
#        waits (bounded) until it writes its pid file, i.e. has initialised its plugins.
# stop:  TERM (then KILL after 10 s) the slurmd PID recorded for <node>. Jobs and their
#        slurmstepd keep running: they are not slurmd's children once started.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

[[ $# == 3 ]] || se_die "usage: $0 <dir> start|stop|restart <node>"
dir=$(se_dir "$1")
action=$2
node=$3
[[ $node =~ ^w[12]$ ]] || se_die "node must be w1 or w2"
ns=${SE_SL_PREFIX}$node
name=slurmd-$node

recorded_pid() { awk -v n="$name" '$1 == n {p = $2} END {print p}' "$dir/pids" 2>/dev/null; }

stop() {
    local pid
    pid=$(recorded_pid)
    [[ -n $pid ]] || { se_log "no recorded $name"; return 0; }
    se_stop_pid "$pid" slurmd 10
    se_log "$name (pid $pid) stopped"
}

start() {
    local pid
    pid=$(recorded_pid)
    if [[ -n $pid ]] && se_alive "$pid" && [[ $(cat "/proc/$pid/comm") == slurmd ]]; then
        se_die "$name already running (pid $pid)"
    fi
    mkdir -p "$dir/$node/spool"
    rm -f "$dir/$node/slurmd.pid"
    # nsenter itself, not the se_in_ns function: `$!` must be slurmd (nsenter execs it).
    nsenter --net="$(se_ns_path "$ns")" -- "${SE_SL_DAEMON_ENV[@]}" slurmd -D -N "$node" -f "$dir/slurm.conf" \
        </dev/null >>"$dir/$node/slurmd.out" 2>&1 &
    pid=$!
    se_record "$dir" "$name" "$pid"
    # slurmd writes its pid file after loading its plugins (SPANK included); it exits at once
    # when a required plugin fails.
    started_or_dead() { [[ -s $dir/$node/slurmd.pid ]] || ! se_alive "$pid"; }
    se_poll "${SE_SL_UP_TIMEOUT:-30}" started_or_dead || true
    if ! [[ -s $dir/$node/slurmd.pid ]] || ! se_alive "$pid"; then
        se_alive "$pid" || se_log "$name (pid $pid) exited"
        if [[ ${SE_SL_EXPECT_SLURMD_FAIL:-0} == 1 ]]; then return 0; fi
        se_die "$name wrote no pid file"
    fi
    se_log "$name up (pid $pid)"
}

case $action in
start) start ;;
stop) stop ;;
restart) stop && start ;;
*) se_die "unknown action $action" ;;
esac
