#!/usr/bin/env bash
# job.sh <dir> <user> <node> <account> [--no-wait] [--timeout S] [-- cmd args...]
#     Submits a batch job as <user> (from the controller namespace, SLURM_CONF=<dir>/slurm.conf)
#     pinned to <node> (w1|w2) with --account=<account>, running `cmd args...` (default:
#     `true`). Without --no-wait it waits (bounded, default 30 s) for the job to end and prints
#     "<jobid> <state> <exitcode> <submit-to-start seconds>"; the job's stdout+stderr are in
#     <dir>/jobs/<jobid>.out. Exits 0 only for COMPLETED 0:0. With --no-wait it prints the
#     job id at once.
# job.sh --wait <dir> <jobid> [--timeout S]
#     Waits for a submitted job as above.
#
# The job's processes run on the node inside that slurmd's network namespace.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

job_state() { # <dir> <jobid> -> "STATE EXITCODE" (empty if unknown)
    se_client "$1" root scontrol show job -o "$2" 2>/dev/null |
        sed -nE 's/.*JobState=([A-Z_]+).* ExitCode=([0-9:]+).*/\1 \2/p'
}

wait_job() { # <dir> <jobid> <timeout>
    local dir=$1 id=$2 limit=$3 s=
    is_done() {
        s=$(job_state "$dir" "$id")
        [[ $s =~ ^(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|PREEMPTED|BOOT_FAIL|DEADLINE|OUT_OF_MEMORY) ]]
    }
    if ! se_poll "$limit" is_done; then
        echo "$id ${s:-UNKNOWN} - -"
        se_log "job $id not finished after ${limit}s (state ${s:-unknown})"
        return 1
    fi
    local lat=- start submit
    if [[ -f $dir/jobs/$id.start && -f $dir/jobs/$id.submit ]]; then
        start=$(cat "$dir/jobs/$id.start")
        submit=$(cat "$dir/jobs/$id.submit")
        lat=$(awk -v a="$submit" -v b="$start" 'BEGIN {printf "%.3f", b - a}')
    fi
    echo "$id $s $lat"
    [[ $s == "COMPLETED 0:0" ]]
}

if [[ ${1:-} == --wait ]]; then
    [[ $# -ge 3 ]] || se_die "usage: $0 --wait <dir> <jobid> [--timeout S]"
    dir=$(se_dir "$2")
    wait_job "$dir" "$3" "${5:-30}"
    exit
fi

[[ $# -ge 4 ]] || se_die "usage: $0 <dir> <user> <node> <account> [--no-wait] [--timeout S] [-- cmd...]"
dir=$(se_dir "$1")
user=$2 node=$3 account=$4
shift 4
wait=1 limit=30
while [[ $# -gt 0 ]]; do
    case $1 in
    --no-wait) wait=0; shift ;;
    --timeout) limit=$2; shift 2 ;;
    --) shift; break ;;
    *) se_die "unknown option $1" ;;
    esac
done
[[ $# -gt 0 ]] || set -- true
id "$user" >/dev/null 2>&1 || se_die "no user $user (the tests create their users)"

script=$(mktemp "$dir/jobs/job.XXXXXX.sh")
{
    echo '#!/bin/sh'
    echo "date +%s.%N >$dir/jobs/\$SLURM_JOB_ID.start"
    printf 'exec'
    printf ' %q' "$@"
    echo
} >"$script"
chmod 0755 "$script"

t_submit=$(date +%s.%N)
jobid=$(se_client "$dir" "$user" sbatch --parsable -w "$node" --account="$account" \
    --chdir=/tmp --output="$dir/jobs/%j.out" --job-name=se-job "$script")
jobid=${jobid%%;*}
echo "$t_submit" >"$dir/jobs/$jobid.submit"
if ((wait)); then
    wait_job "$dir" "$jobid" "$limit"
else
    echo "$jobid"
fi
