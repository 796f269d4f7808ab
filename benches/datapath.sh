#!/usr/bin/env bash
# The data path: what marking costs a selected job's traffic. Throughput (iperf3) and
# connect() latency from a worker through a NAT router to an "internet" host, as the selected
# user, for the seed's iptables owner rules (iptables-nft and iptables-legacy) and for
# slurm-egress, each as a ratio to a baseline worker without any marking.
#
#   base ib0 10.20.1.1 ─┐                  ┌─ nat 10.20.3.227 ── 203.0.113.1 ── inet 203.0.113.10
#   w    ib0 10.20.1.2 ─┴─ fab (bridge) ───┤   (forwards, masquerades)
#                                          └─ gw  10.20.0.1 (blackhole: the closed default path)
#
# `base` routes everything via the router and marks nothing. `w` is built afresh for each
# variant (no conntrack, iptables-legacy or nft state carried over); its main default route
# goes to gw, which drops everything, so only marked traffic gets out (an unselected user's
# connect is checked to fail). Points alternate base, w, base, ..., base, and each of w's is
# divided by the mean of the base points on either side: drift and the other load of a
# shared machine cancel out; the table reports medians. GSO/TSO and every other offload stay
# at the kernel's defaults. A last, smaller table measures what a mark on the socket from its
# creation would give, with a bulk sender that sets SO_MARK (iperf3 cannot).
#
# Root. Namespaces are named se-bench-*; nothing changes in the machine's own namespace, and
# everything is removed on exit, also on failure. Environment: PAIRS (6 points per variant),
# SECONDS_PER_POINT (2, plus 1 s of iperf3 warm-up), CONNECTS (1000 per point), SIZES_IPT
# ("1 100 1000"), SIZES_SE ("1 100 1000 10000").
set -euo pipefail
cd "$(dirname "$0")/.."

PAIRS=${PAIRS:-6}
SECONDS_PER_POINT=${SECONDS_PER_POINT:-2}
CONNECTS=${CONNECTS:-1000}
read -ra SIZES_IPT <<<"${SIZES_IPT:-1 100 1000}"
read -ra SIZES_SE <<<"${SIZES_SE:-1 100 1000 10000}"

P=se-bench-
FAB=${P}fab GW=${P}gw NAT=${P}nat INET=${P}inet BASE=${P}base W=${P}w
VIP=10.20.3.227 CLOSED_GW=10.20.0.1 INTERNET=203.0.113.10
IPERF_PORT=5201 CONNECT_PORT=8090 SINK_PORT=8091
# The matching user is the seed's aliprod (created like tests/common/mod.rs does), the
# others are uids that exist nowhere; se-other checks that the default path is closed.
USER_SEL=aliprod USER_OTHER=se-other
BIN=$PWD/target/release/slurm-egress
NETBENCH=$PWD/benches/netbench.py
PYTHON=/usr/bin/python3

die() {
    echo "benches/datapath.sh: $*" >&2
    exit 1
}

[[ $(id -u) == 0 ]] || die "run as root (it builds network namespaces)"
command -v iperf3 >/dev/null || die "iperf3 is missing: apt-get install iperf3"
for tool in /usr/sbin/iptables-nft-restore /usr/sbin/iptables-legacy-restore; do
    [[ -x $tool ]] || die "$tool is missing: apt-get install iptables"
done
for tool in ip nft setpriv useradd groupadd; do
    command -v "$tool" >/dev/null || die "$tool is missing: apt-get install iproute2 nftables util-linux passwd"
done
[[ -x $PYTHON ]] || die "$PYTHON is missing: apt-get install python3"
[[ -x $BIN ]] || die "$BIN is missing: cargo build --release (benches/run.sh does)"

# One run at a time: two would share the namespace names.
exec 9>/run/lock/slurm-egress-bench.lock
flock -n 9 || die "another benchmark run holds /run/lock/slurm-egress-bench.lock"

SCRATCH=$(mktemp -d /tmp/slurm-egress-datapath.XXXXXX)
RESULTS=$SCRATCH/results
HOST_TABLE_NAMES=/etc/iproute2/rt_tables.d/slurm-egress.conf
host_had_table_names=false
[[ -e $HOST_TABLE_NAMES ]] && host_had_table_names=true
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    for ns in "$W" "$BASE" "$INET" "$NAT" "$GW" "$FAB"; do
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "/etc/netns/$W" "$SCRATCH"
    if ! $host_had_table_names && [[ -e $HOST_TABLE_NAMES ]]; then
        echo "benches/datapath.sh: $HOST_TABLE_NAMES appeared during the run" >&2
        exit 1
    fi
}
trap cleanup EXIT

# Leftovers of a killed run (the lock says none is running).
for ns in "$W" "$BASE" "$INET" "$NAT" "$GW" "$FAB"; do
    ip netns del "$ns" 2>/dev/null || true
done

# The tests' users: getent, else create them the same way.
getent group se-other >/dev/null || groupadd se-other
for user in "$USER_SEL" "$USER_OTHER"; do
    getent passwd "$user" >/dev/null ||
        useradd --no-create-home --shell /usr/sbin/nologin --gid se-other "$user"
done
UID_SEL=$(id -u "$USER_SEL")

in_ns() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

# Runs a command in namespace $1 as user $2, with that user's groups, like a job.
as_user() {
    local ns=$1 user=$2
    shift 2
    in_ns "$ns" setpriv --reuid "$user" --regid "$(id -g "$user")" --init-groups "$@"
}

host() {
    ip netns add "$1"
    ip -n "$1" link set lo up
    in_ns "$1" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
        net.ipv4.ip_forward="${2:-0}"
}

# A veth from $1's interface $2 to $3's interface $4.
link() {
    ip -n "$1" link add "$2" type veth peer name "$4" netns "$3"
    ip -n "$1" link set "$2" up
    ip -n "$3" link set "$4" up
}

plug() {
    link "$1" "$2" "$FAB" "$3"
    ip -n "$FAB" link set "$3" master br0
}

# The fabric, the closed gateway, the router, the internet host and the baseline worker:
# built once.
topology() {
    host "$FAB"
    ip -n "$FAB" link add br0 type bridge stp_state 0 mcast_snooping 0 forward_delay 0
    ip -n "$FAB" link set br0 up
    # Frames are switched, not filtered (br_netfilter is built in).
    in_ns "$FAB" sysctl -qew net.bridge.bridge-nf-call-iptables=0 \
        net.bridge.bridge-nf-call-ip6tables=0 net.bridge.bridge-nf-call-arptables=0
    host "$GW" 1
    plug "$GW" fab0 p-gw
    ip -n "$GW" addr add "$CLOSED_GW/16" dev fab0
    ip -n "$GW" route add blackhole default
    host "$NAT" 1
    plug "$NAT" fab0 p-nat
    ip -n "$NAT" addr add "$VIP/16" dev fab0
    host "$INET"
    link "$NAT" out0 "$INET" eth0
    ip -n "$NAT" addr add 203.0.113.1/24 dev out0
    ip -n "$INET" addr add "$INTERNET/24" dev eth0
    in_ns "$NAT" nft 'add table ip se_bench_nat
        add chain ip se_bench_nat post { type nat hook postrouting priority 100; }
        add rule ip se_bench_nat post oifname out0 masquerade'
    # `ip netns exec` execs its command: $! is the server's own PID.
    ip netns exec "$INET" iperf3 -s -B "$INTERNET" -p "$IPERF_PORT" >/dev/null 2>&1 &
    PIDS+=($!)
    ip netns exec "$INET" "$PYTHON" "$NETBENCH" serve "$INTERNET" "$CONNECT_PORT" \
        >"$SCRATCH/serve.log" 2>&1 &
    PIDS+=($!)
    ip netns exec "$INET" "$PYTHON" "$NETBENCH" sink "$INTERNET" "$SINK_PORT" \
        >"$SCRATCH/sink.log" 2>&1 &
    PIDS+=($!)
    # `ip netns exec` mounts /etc/netns/<ns>/iproute2 over /etc/iproute2: the table name
    # that `slurm-egress apply` registers stays in this copy.
    mkdir -p "/etc/netns/$W"
    cp -a /etc/iproute2 "/etc/netns/$W/"
    host "$BASE"
    plug "$BASE" ib0 p-base
    ip -n "$BASE" addr add 10.20.1.1/16 dev ib0
    ip -n "$BASE" route add default via "$VIP"
}

# A fresh worker, plugged into the fabric, with no route beyond its subnet yet.
worker() {
    ip netns del "$W" 2>/dev/null || true
    host "$W"
    plug "$W" ib0 p-w
    ip -n "$W" addr add 10.20.1.2/16 dev ib0
    rm -f "/etc/netns/$W/iproute2/rt_tables.d/slurm-egress.conf"
    rm -rf "$SCRATCH/state"
}

# The seed's policy routing: marked packets to table 201, whose default is the router.
seed_routing() {
    ip -n "$W" route add 10.20.0.0/16 dev ib0 table 201
    ip -n "$W" route add default via "$VIP" dev ib0 table 201
    ip -n "$W" rule add fwmark 1 table 201 priority 1000
}

# The seed's rules (-t mangle OUTPUT -p tcp -m owner --uid-owner U -j MARK --set-mark 1)
# for $2 users, the matching one last, loaded with iptables-$1-restore.
iptables_variant() {
    local flavour=$1 n=$2 i
    ip -n "$W" route add default via "$CLOSED_GW"
    {
        echo '*mangle'
        for ((i = 1; i < n; i++)); do
            echo "-A OUTPUT -p tcp -m owner --uid-owner $((100000 + i)) -j MARK --set-mark 1"
        done
        echo "-A OUTPUT -p tcp -m owner --uid-owner $UID_SEL -j MARK --set-mark 1"
        echo 'COMMIT'
    } >"$SCRATCH/rules"
    in_ns "$W" "/usr/sbin/iptables-$flavour-restore" <"$SCRATCH/rules"
    seed_routing
}

config() {
    cat >"$SCRATCH/config.toml" <<EOF
[routing]
table = 201
table_name = "alinat"
mark = 0x1
mask = 0x1
priority = 1000
interface = "ib0"
gateway = "$VIP"
protocols = ["tcp"]
exceptions = [{ to = "10.20.0.0/16" }]

[select]
$1

[jobs]
state_dir = "$SCRATCH/state"
EOF
}

# slurm-egress with $1 selected uids in [select] users, the matching one among them.
users_variant() {
    local n=$1
    ip -n "$W" route add default via "$CLOSED_GW"
    local others=""
    if ((n > 1)); then others="$(seq -s, 100001 $((100000 + n - 1))),"; fi
    config "users = [$others$UID_SEL]"
    in_ns "$W" "$BIN" --config "$SCRATCH/config.toml" apply >/dev/null
}

# slurm-egress with $1 running jobs of a selected account, one uid each: $1 - 1 recorded
# in the node's ledger (its per-job layout, see src/ledger.rs) and put in the set by `apply`
# (as after a restart of the node's policy; starting 10000 jobs one by one would only time
# process start-up), the matching user's through `slurm-egress job start`, as a Prolog=
# script does.
jobs_variant() {
    local n=$1 i node=$SCRATCH/state/nodes/bench
    ip -n "$W" route add default via "$CLOSED_GW"
    config 'accounts = ["bench"]'
    mkdir -p "$node/jobs" "$node/uids"
    printf '{"node": "bench", "netns": "%s", "boot": "%s"}\n' \
        "$(in_ns "$W" readlink /proc/self/ns/net)" "$(cat /proc/sys/kernel/random/boot_id)" \
        >"$node/node.json"
    if ((n > 1)); then
        (cd "$node/uids" && seq 100001 $((100000 + n - 1)) | xargs mkdir)
    fi
    for ((i = 1; i < n; i++)); do
        printf '{"id": %d, "uid": %d, "reason": "account bench", "started": 0}\n' \
            "$i" $((100000 + i)) >"$node/jobs/$i.json"
        : >"$node/uids/$((100000 + i))/$i"
    done
    in_ns "$W" "$BIN" --config "$SCRATCH/config.toml" apply >/dev/null
    in_ns "$W" "$BIN" --config "$SCRATCH/config.toml" job start --job-id "$n" \
        --uid "$UID_SEL" --account bench --node bench | grep -q 'egress path on' ||
        die "job start did not select the bench job"
    i=$(in_ns "$W" "$BIN" --config "$SCRATCH/config.toml" jobs --node bench | tail -n +2 | wc -l)
    ((i == n)) || die "the ledger holds $i jobs, not $n"
}

# What the cost is made of, each on the baseline's routing (everyone via the router):
# the seed's `ip rule` alone, nothing marked (every route lookup walks the rules); conntrack
# alone (slurm-egress's `ct state new` turns it on in the namespace); every TCP packet marked
# in a filter chain (no re-route) and in a route chain (the kernel routes each packet whose
# mark changed again, as fwmark policy routing needs, here to the same place). Then the
# mechanism itself, without any set or owner match: the main default to the closed gateway
# and every TCP packet marked in a route chain, re-routed to the router (the seed's design);
# and the same decided once per connection through conntrack (slurm-egress's design).
rule_only() {
    ip -n "$W" route add default via "$VIP"
    seed_routing
}

anatomy_nft() {
    ip -n "$W" route add default via "$VIP"
    in_ns "$W" nft "add table inet se_bench
        add chain inet se_bench output { type $1 hook output priority -150; }
        add rule inet se_bench output $2"
}

# (With no rules, no nftables table at all.)
CT_MARKING=("meta l4proto tcp ct state new ct mark set 1" "ct mark 1 meta mark set 1")
mechanism() {
    ip -n "$W" route add default via "$CLOSED_GW"
    seed_routing
    if (($#)); then
        in_ns "$W" nft "add table inet se_bench
            add chain inet se_bench output { type route hook output priority -150; }
            $(for rule in "$@"; do echo "add rule inet se_bench output $rule"; done)"
    fi
}

# One point in namespace $1, as the selected user: prints "GBPS P50_US P99_US".
point() {
    local gbps lat
    gbps=$(as_user "$1" "$USER_SEL" timeout $((SECONDS_PER_POINT + 30)) iperf3 -c "$INTERNET" \
        -p "$IPERF_PORT" -t "$SECONDS_PER_POINT" -O 1 -J --connect-timeout 3000 |
        "$PYTHON" "$NETBENCH" gbps) || die "iperf3 failed in $1"
    lat=$(as_user "$1" "$USER_SEL" timeout 120 "$PYTHON" "$NETBENCH" connect "$INTERNET" \
        "$CONNECT_PORT" "$CONNECTS") || die "connects failed in $1"
    echo "$gbps $lat"
}

# One variant: a fresh worker set up by "$3..." (a function and its arguments), then its
# points alternated with the baseline's. Appends "NAME N VAR_POINT BASE_BEFORE BASE_AFTER"
# per pair to the results.
variant() {
    local name=$1 n=$2 start=$SECONDS before now after i
    shift 2
    worker
    "$@"
    # The anatomy rows (N "-") let everyone out; the rest must not.
    if [[ $n != - ]] && ! as_user "$W" "$USER_OTHER" "$PYTHON" "$NETBENCH" blocked \
        "$INTERNET" "$CONNECT_PORT"; then
        die "$name N=$n: an unselected user got out: the default path is not closed"
    fi
    before=$(point "$BASE")
    for ((i = 0; i < PAIRS; i++)); do
        now=$(point "$W")
        after=$(point "$BASE")
        echo "$name $n $now $before $after" >>"$RESULTS"
        before=$after
    done
    printf '  %-20s N=%-6s %3d s\n' "$name" "$n" $((SECONDS - start)) >&2
}

topology
# The servers answer once the router forwards.
for ((i = 0; i < 50; i++)); do
    as_user "$BASE" "$USER_SEL" "$PYTHON" "$NETBENCH" connect "$INTERNET" "$CONNECT_PORT" 1 \
        >/dev/null 2>&1 && break
    sleep 0.1
done
((i < 50)) || die "the internet host does not answer through the router"

variant rule-only - rule_only
variant conntrack-only - anatomy_nft route "ct state new counter"
variant mark-filter - anatomy_nft filter "meta l4proto tcp meta mark set 1"
variant mark-route - anatomy_nft route "meta l4proto tcp meta mark set 1"
variant reroute-closed - mechanism "meta l4proto tcp meta mark set 1"
variant ct-reroute-closed - mechanism "${CT_MARKING[@]}"
for n in "${SIZES_IPT[@]}"; do
    variant iptables-nft "$n" iptables_variant nft "$n"
    variant iptables-legacy "$n" iptables_variant legacy "$n"
done
for n in "${SIZES_SE[@]}"; do
    variant slurm-egress-users "$n" users_variant "$n"
    variant slurm-egress-jobs "$n" jobs_variant "$n"
done

# What marking the socket when it is created would give (a cgroup BPF program could; see
# benches/README.md): the route is right at the first lookup, so nothing is routed twice.
# iperf3 cannot set SO_MARK, so both sides of these ratios are a Python bulk sender's, run as
# root (SO_MARK needs CAP_NET_ADMIN): with the mark and the seed's routing behind the closed
# default, then also with slurm-egress's conntrack rules (which then change no mark).
bulk() {
    ip netns exec "$1" "$PYTHON" "$NETBENCH" send "$INTERNET" "$SINK_PORT" \
        "$SECONDS_PER_POINT" "$2" || die "the bulk sender failed in $1"
}

bulk_variant() {
    local name=$1 start=$SECONDS before now after i
    shift
    worker
    mechanism "$@"
    before=$(bulk "$BASE" 0)
    for ((i = 0; i < PAIRS; i++)); do
        now=$(bulk "$W" 1)
        after=$(bulk "$BASE" 0)
        echo "$name $now $before $after" >>"$SCRATCH/bulk"
        before=$after
    done
    printf '  %-20s        %3d s\n' "$name" $((SECONDS - start)) >&2
}
bulk_variant sockmark
bulk_variant sockmark-ct "${CT_MARKING[@]}"

echo
echo "data path: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)," \
    "kernel $(uname -r), $(date -u '+%Y-%m-%d %H:%M UTC'); iperf3 ${SECONDS_PER_POINT} s and" \
    "$CONNECTS connects per point, $PAIRS points per variant; offloads at defaults"
echo
"$PYTHON" "$NETBENCH" table "$RESULTS"
echo
echo "marking the socket at creation (SO_MARK before connect; bulk sender against itself):"
"$PYTHON" "$NETBENCH" ratios "$SCRATCH/bulk"
