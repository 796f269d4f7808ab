#!/usr/bin/env bash
# down.sh <dir>: stops what up.sh started, and every process left in the cluster's
# namespaces (the caller removes the namespaces themselves).
#
# 1. every daemon recorded in <dir>/pids, newest first: TERM, up to 10 s, then KILL (a PID
#    that now belongs to another program is left alone);
# 2. any process still inside one of our namespaces (job processes, slurmstepd), by the PIDs
#    `ip netns pids` lists: TERM, up to 10 s, then KILL;
# Safe after a partial up.sh and when run twice; never matches processes by name.
# The logs stay in <dir>; <dir>/pids is renamed to pids.down.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

[[ $(id -u) == 0 ]] || se_die "must run as root"
[[ $# == 1 ]] || se_die "usage: $0 <dir>"

dir=$(se_dir "$1")
if [[ -f $dir/pids ]]; then
    # newest first: slurmd, slurmctld, then munged
    tac "$dir/pids" | while read -r name pid; do
        [[ -n ${name:-} ]] || continue
        case $name in
        slurmd-*) comm=slurmd ;;
        *) comm=$name ;;
        esac
        se_stop_pid "$pid" "$comm" 10
    done
    mv -f "$dir/pids" "$dir/pids.down"
fi

ns_pids() { ip netns pids "$1" 2>/dev/null || true; }
for ns in "${SE_SL_ALL_NS[@]}"; do
    [[ -e /run/netns/$ns ]] || continue
    pids=$(ns_pids "$ns")
    if [[ -n $pids ]]; then
        se_log "$ns: stopping leftover processes ${pids//$'\n'/ }"
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        if ! se_poll 10 bash -c "[[ -z \$(ip netns pids $ns 2>/dev/null) ]]"; then
            pids=$(ns_pids "$ns")
            se_log "$ns: KILL ${pids//$'\n'/ }"
            # shellcheck disable=SC2086
            [[ -n $pids ]] && kill -KILL $pids 2>/dev/null
            se_poll 5 bash -c "[[ -z \$(ip netns pids $ns 2>/dev/null) ]]" ||
                se_log "$ns: processes survive KILL"
        fi
    fi
done
exit 0
