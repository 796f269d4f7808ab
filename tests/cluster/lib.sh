# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this
# Shared by the cluster scripts: names, paths and small bounded helpers. Source it, don't run it.
#
# Layout of a cluster directory <dir> (absolute, created by up.sh):
#   slurm.conf plugstack.conf env.sh   configuration; `. <dir>/env.sh` sets SLURM_CONF
#   pids                               "<name> <pid>" of every daemon up.sh started
#   munge/                             munged's key, socket, pid, log, seed
#   ctld/                              slurmctld state, log, pid
#   w1/ w2/                            each slurmd's spool, log, pid
#   jobs/                              batch scripts and job output (mode 1777)
#   timings                            how long up.sh took

# The network is not ours: the caller (tests/common/cluster.rs) has made the namespaces
# ${SE_SL_PREFIX}ctl (10.20.0.10), ${SE_SL_PREFIX}w1 (10.20.1.1) and ${SE_SL_PREFIX}w2
# (10.20.1.2) on one fabric, and removes them.
SE_SL_PREFIX=${SE_SL_PREFIX:?set SE_SL_PREFIX to the namespace prefix, e.g. se-slurm-}
SE_SL_NS_CTL=${SE_SL_PREFIX}ctl
SE_SL_ALL_NS=("$SE_SL_NS_CTL" "${SE_SL_PREFIX}w1" "${SE_SL_PREFIX}w2")
# Daemons start with a clean environment (env execs them, so $! stays their PID): what the
# caller had (cargo's, a CI's) must not leak into slurmd, slurmstepd and the jobs.
SE_SL_DAEMON_ENV=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)
declare -A SE_SL_ADDR=([ctl]=10.20.0.10 [w1]=10.20.1.1 [w2]=10.20.1.2)

se_log() { printf '[%s] %s\n' "$(date +%T.%N | cut -c1-12)" "$*" >&2; }
se_die() { se_log "ERROR: $*"; exit 1; }

# The absolute path of an existing cluster directory.
se_dir() {
    [[ $# -ge 1 && -n $1 ]] || se_die "usage: $0 <dir> ..."
    [[ -d $1 ]] || se_die "$1: no such directory"
    (cd "$1" && pwd)
}

se_ns_path() { echo "/run/netns/$1"; }

# Runs a command in a network namespace with nsenter, which (unlike `ip netns exec`) leaves
# the mount namespace alone, so /sys/fs/cgroup stays visible.
se_in_ns() {
    local ns=$1
    shift
    nsenter --net="$(se_ns_path "$ns")" -- "$@"
}

# Deadline-based polling on /proc/uptime (tenths of a second), immune to SECONDS rounding.
se_now_ds() { awk '{print int($1*10)}' /proc/uptime; }
se_poll() {
    local limit_s=$1
    shift
    local deadline=$(($(se_now_ds) + limit_s * 10))
    while true; do
        "$@" && return 0
        (($(se_now_ds) >= deadline)) && return 1
        sleep 0.1
    done
}

se_alive() { [[ -d /proc/$1 ]] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

# se_stop_pid <pid> <expected comm> <seconds>: TERM, wait up to <seconds>, then KILL. Does
# nothing if the PID is gone or now belongs to another program (PID reuse).
se_stop_pid() {
    local pid=$1 comm=$2 limit=$3
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    se_alive "$pid" || return 0
    if [[ -n $comm && $(cat "/proc/$pid/comm" 2>/dev/null) != "$comm" ]]; then
        se_log "pid $pid is no longer $comm: left alone"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || return 0
    if ! se_poll "$limit" bash -c "! [[ -d /proc/$pid ]] || grep -q '^State:.*Z' /proc/$pid/status"; then
        se_log "pid $pid ($comm) ignored TERM for ${limit}s: KILL"
        kill -KILL "$pid" 2>/dev/null || true
        se_poll 5 bash -c "! [[ -d /proc/$pid ]] || grep -q '^State:.*Z' /proc/$pid/status" || true
    fi
}

# Records a started daemon.
se_record() { echo "$2 $3" >>"$1/pids"; }

# SLURM_CONF for client commands.
se_conf_env() { echo "SLURM_CONF=$1/slurm.conf"; }

# se_client <dir> <user> <cmd...>: a Slurm client command run in the controller namespace as
# <user> (root or a name), with SLURM_CONF set.
se_client() {
    local dir=$1 user=$2
    shift 2
    if [[ $user == root ]]; then
        se_in_ns "$SE_SL_NS_CTL" env "SLURM_CONF=$dir/slurm.conf" "$@"
    else
        se_in_ns "$SE_SL_NS_CTL" setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups \
            env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp USER="$user" LOGNAME="$user" \
            "SLURM_CONF=$dir/slurm.conf" "$@"
    fi
}
