#!/usr/bin/env bash
# Job start/end latency: slurm-egress's in-process netlink against `nft`, side by side.
# Needs root; the benchmark runs in a network namespace of its own and leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."
# rustup installs cargo for root here; a CI shell may not have it on PATH.
export PATH="$HOME/.cargo/bin:$PATH"
[[ $(id -u) == 0 ]] || { echo "benches/run.sh: run as root" >&2; exit 1; }
exec cargo bench --bench job_latency
