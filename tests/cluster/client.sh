#!/usr/bin/env bash
# client.sh <dir> <user> <cmd args...>: runs a Slurm client command (sinfo, squeue, scontrol,
# srun, sbatch, scancel...) in the controller namespace as <user> (root or a user name), with
# SLURM_CONF=<dir>/slurm.conf. Example, a job step on w1 that shows w1's address:
#   client.sh <dir> se-alice1 srun -w w1 -A foo ip -4 -o addr show eth0
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"
[[ $# -ge 3 ]] || se_die "usage: $0 <dir> <user> <cmd args...>"
dir=$(se_dir "$1")
user=$2
shift 2
se_client "$dir" "$user" "$@"
