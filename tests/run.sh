#!/usr/bin/env bash
# The test suite: installs what it needs (tests/setup.sh), builds, runs every test. Needs
# root: the integration tests build network namespaces (named se-*, always removed) and run
# a real Slurm, keepalived and conntrackd inside them.
set -euo pipefail
cd "$(dirname "$0")/.."
# rustup installs cargo for root here; a CI shell may not have it on PATH.
export PATH="$HOME/.cargo/bin:$PATH"
tests/setup.sh
# The SPANK plugin (libslurm_egress.so) must exist before the Slurm tests load it.
cargo build --all-targets
exec cargo test "$@"
