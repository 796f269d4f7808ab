#!/usr/bin/env bash
# up.sh <dir>: a real Slurm 22.05 cluster on this machine, in network namespaces that the
# caller made (see lib.sh):
#
#   ${SE_SL_PREFIX}ctl  10.20.0.10   slurmctld (SlurmctldHost=$(hostname)); clients run here
#   ${SE_SL_PREFIX}w1   10.20.1.1    slurmd -N w1
#   ${SE_SL_PREFIX}w2   10.20.1.2    slurmd -N w2
#   munged runs in the root namespace with its own key and socket under <dir>/munge: a unix
#   socket path is reachable from every network namespace.
#
# Daemons run in the foreground (-D / -F) in the background of this script, started with
# `nsenter --net` (never `ip netns exec`, which hides /sys/fs/cgroup), and their PIDs are
# recorded in <dir>/pids for down.sh. Waits (bounded) until sinfo shows both nodes idle.
# On failure it prints the logs' tails and runs down.sh (unless SE_SL_KEEP_ON_FAILURE=1).
#
# Environment:
#   SE_SL_PLUGIN=/path/libslurm_egress.so  SPANK plugin to load (none if unset)
#   SE_SL_PLUGIN_ARGS="config=/x"          its plugstack.conf arguments
#   SE_SL_PLUGIN_MODE=required|optional    default required
#   SE_SL_SLURMD_DEBUG=info                SlurmdDebug (info, verbose, debug, ...)
#   SE_SL_PROLOG_FLAGS=                    PrologFlags (e.g. Alloc); unset by default
#   SE_SL_SCHED_PARAMS=...                 SchedulerParameters; default
#                                          batch_sched_delay=0,sched_min_interval=0 (jobs start
#                                          within ~1 s instead of ~3 s); set empty for Slurm's defaults
#   SE_SL_UP_TIMEOUT=30                    seconds to wait for each daemon / the nodes
#   SE_SL_EXPECT_SLURMD_FAIL=1             don't wait for the nodes (for load-failure tests)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

[[ $(id -u) == 0 ]] || se_die "must run as root"
[[ $# == 1 ]] || se_die "usage: $0 <dir>"
mkdir -p "$1"
dir=$(se_dir "$1")
[[ ! -s $dir/pids ]] || se_die "$dir/pids exists: this cluster is (partly) up, run down.sh $dir first"
timeout_s=${SE_SL_UP_TIMEOUT:-30}
t0=$(se_now_ds)

failed=1
on_exit() {
    if ((failed)); then
        se_log "up.sh failed; log tails:"
        for f in "$dir"/munge/munged.log "$dir"/ctld/slurmctld.log "$dir"/w1/slurmd.log "$dir"/w2/slurmd.log; do
            [[ -f $f ]] && { echo "== $f" >&2; tail -n 15 "$f" >&2; }
        done
        if [[ ${SE_SL_KEEP_ON_FAILURE:-0} != 1 ]]; then
            "$here/down.sh" "$dir" || true
        fi
    fi
}
trap on_exit EXIT

# --- network: made by the caller ----------------------------------------------------------
for ns in "${SE_SL_ALL_NS[@]}"; do
    [[ -e /run/netns/$ns ]] || se_die "namespace $ns does not exist"
done
: >"$dir/pids"

# --- munged --------------------------------------------------------------------------------
mkdir -p "$dir/munge"
chmod 0700 "$dir/munge"
mungekey --create --keyfile="$dir/munge/munge.key" --bits=1024
chmod 0400 "$dir/munge/munge.key"
"${SE_SL_DAEMON_ENV[@]}" munged --foreground --force \
    --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munged.seed" </dev/null >>"$dir/munge/munged.out" 2>&1 &
se_record "$dir" munged $!
# Clients (sbatch as a test user) and slurmstepd must reach the socket through the directory.
se_poll "$timeout_s" test -S "$dir/munge/munge.socket" || se_die "munged did not create its socket"
chmod 0755 "$dir/munge"
se_log "munged up (pid $!)"

# --- configuration -------------------------------------------------------------------------
mkdir -p "$dir/ctld/state" "$dir/jobs" "$dir/w1/spool" "$dir/w2/spool"
chmod 1777 "$dir/jobs"
chmod 0755 "$dir"
host=$(hostname)
cat >"$dir/slurm.conf" <<EOF
# Written by tests/cluster/up.sh
ClusterName=sesl
SlurmctldHost=${host}(${SE_SL_ADDR[ctl]})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/ctld/state
SlurmctldPidFile=$dir/ctld/slurmctld.pid
SlurmctldLogFile=$dir/ctld/slurmctld.log
SlurmctldDebug=info
SlurmdSpoolDir=$dir/%n/spool
SlurmdPidFile=$dir/%n/slurmd.pid
SlurmdLogFile=$dir/%n/slurmd.log
SlurmdDebug=${SE_SL_SLURMD_DEBUG:-info}
PlugStackConfig=$dir/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/ctld/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
# 64 CPUs on a 2-core machine: room for many concurrent one-CPU jobs per node.
SlurmdParameters=config_overrides
SwitchType=switch/none
ReturnToService=2
SchedulerParameters=${SE_SL_SCHED_PARAMS-batch_sched_delay=0,sched_min_interval=0}
SlurmdTimeout=30
MessageTimeout=10
KillWait=5
MinJobAge=600
InactiveLimit=0
${SE_SL_PROLOG_FLAGS:+PrologFlags=$SE_SL_PROLOG_FLAGS}
NodeName=w1 NodeAddr=${SE_SL_ADDR[w1]} CPUs=64 State=UNKNOWN
NodeName=w2 NodeAddr=${SE_SL_ADDR[w2]} CPUs=64 State=UNKNOWN
PartitionName=main Nodes=w1,w2 Default=YES MaxTime=INFINITE State=UP
EOF
if [[ -n ${SE_SL_PLUGIN:-} ]]; then
    plugin=$SE_SL_PLUGIN
    if [[ -f $plugin ]]; then
        # A private copy: rebuilding the crate must not rewrite a file slurmd has mapped.
        mkdir -p "$dir/plugin"
        cp -f "$plugin" "$dir/plugin/"
        plugin=$dir/plugin/$(basename "$plugin")
    else
        se_log "plugin $plugin does not exist: written to plugstack.conf as is"
    fi
    echo "${SE_SL_PLUGIN_MODE:-required} $plugin ${SE_SL_PLUGIN_ARGS:-}" >"$dir/plugstack.conf"
else
    : >"$dir/plugstack.conf"
fi
chmod 0644 "$dir/slurm.conf" "$dir/plugstack.conf"
echo "export SLURM_CONF=$dir/slurm.conf" >"$dir/env.sh"

# --- slurmctld -----------------------------------------------------------------------------
# nsenter itself, not the se_in_ns function: `$!` must be the daemon (nsenter execs it).
nsenter --net="$(se_ns_path "$SE_SL_NS_CTL")" -- "${SE_SL_DAEMON_ENV[@]}" slurmctld -D -f "$dir/slurm.conf" \
    </dev/null >>"$dir/ctld/slurmctld.out" 2>&1 &
se_record "$dir" slurmctld $!
se_poll "$timeout_s" se_client "$dir" root scontrol ping >/dev/null 2>&1 ||
    se_die "slurmctld does not answer scontrol ping"
se_log "slurmctld up (pid $!)"

# --- slurmd --------------------------------------------------------------------------------
"$here/slurmd.sh" "$dir" start w1
"$here/slurmd.sh" "$dir" start w2

nodes_idle() {
    local out
    out=$(se_client "$dir" root sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    [[ $(grep -cE '^w[12] idle$' <<<"$out") == 2 ]]
}
if [[ ${SE_SL_EXPECT_SLURMD_FAIL:-0} != 1 ]]; then
    se_poll "$timeout_s" nodes_idle || {
        se_client "$dir" root sinfo -N >&2 || true
        se_die "nodes not idle after ${timeout_s}s"
    }
fi
t1=$(se_now_ds)
printf 'up.sh %d.%d s\n' $(((t1 - t0) / 10)) $(((t1 - t0) % 10)) | tee -a "$dir/timings" >&2
failed=0
