#!/usr/bin/env bash
# Installs what building slurm-egress and running its tests and demo need, on Debian 12.
# Idempotent: only what is missing is installed. Needs root.
#
# Keeps /usr/sbin/policy-rc.d in place (creating it if missing) so that apt starts no
# daemon (munged, slurmd, keepalived, conntrackd) in the machine's own namespace: the tests
# start their own, inside their network namespaces.
set -euo pipefail
[[ $(id -u) == 0 ]] || { echo "tests/setup.sh: run as root" >&2; exit 1; }

packages=(
    # build: bindgen needs libclang, the plugin needs Slurm's headers, nftnl needs libnftnl
    build-essential pkg-config libclang-dev libslurm-dev libnftnl-dev libmnl-dev
    # a real Slurm and its authentication
    slurm-wlm slurm-client munge
    # the network: namespaces, nftables (to observe), routing, VRRP and state sync
    iproute2 nftables iptables keepalived conntrackd conntrack
    # test hosts and tools
    python3 util-linux procps passwd
    # `systemd-analyze verify` of the units
    systemd
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\n# no daemon starts from package installs\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
    fi
    echo "tests/setup.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
PATH="$HOME/.cargo/bin:$PATH" command -v cargo >/dev/null || { echo "tests/setup.sh: cargo (Rust) is needed" >&2; exit 1; }
