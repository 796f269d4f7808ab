#!/usr/bin/env bash
# Job start/end latency: slurm-egress's in-process netlink against `nft`, side by side.
# Needs root; the benchmark runs in a network namespace of its own and leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "benches/run.sh: run as root" >&2; exit 1; }
exec cargo bench --bench job_latency
