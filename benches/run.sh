#!/usr/bin/env bash
# The benchmarks (not tests, and not run by CI): `benches/run.sh [control|datapath]`, both
# by default.
#   control   job start and end: slurm-egress's in-process netlink against running `nft`,
#             per operation and in bursts of 1000 jobs (benches/job_latency.rs)
#   datapath  throughput and connect latency through the NAT router, slurm-egress against
#             the seed's iptables owner rules (benches/datapath.sh)
# Needs root; everything runs in network namespaces of its own and leaves nothing behind.
# benches/README.md has the latest tables.
set -euo pipefail
cd "$(dirname "$0")/.."
# rustup installs cargo for root here; a CI shell may not have it on PATH.
export PATH="$HOME/.cargo/bin:$PATH"
[[ $(id -u) == 0 ]] || { echo "benches/run.sh: run as root" >&2; exit 1; }
what=${1:-all}
case $what in
    control | datapath | all) ;;
    *) echo "usage: benches/run.sh [control|datapath]" >&2; exit 2 ;;
esac
command -v cargo >/dev/null || { echo "benches/run.sh: cargo (Rust) is needed" >&2; exit 1; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)," \
    "kernel $(uname -r), $(date -u '+%Y-%m-%d %H:%M UTC')"
if [[ $what != datapath ]]; then
    cargo bench --bench job_latency
fi
if [[ $what != control ]]; then
    cargo build --release --bin slurm-egress
    benches/datapath.sh
fi
