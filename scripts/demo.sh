#!/usr/bin/env bash
# One command from a fresh host (with rustup) to rulebpf at work:
# installs what is missing, builds, and runs the demo (cargo xtask demo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
step "cargo build --release"
cargo build --release
step "cargo xtask demo"
cargo xtask demo
