#!/usr/bin/env bash
# The demo: a Slurm cluster in network namespaces (slurmctld, two slurmd with the plugin,
# a normal gateway that drops, a NAT router, an internet host), one selected and one
# unselected job, and where each one's packets went. Installs what it needs, tears
# everything down. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
# rustup installs cargo for root here; a CI shell may not have it on PATH.
export PATH="$HOME/.cargo/bin:$PATH"
tests/setup.sh
cargo build --all-targets --quiet
exec cargo test --quiet --test demo -- --nocapture
