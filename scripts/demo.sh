#!/usr/bin/env bash
# One command from a fresh host (with rustup) to rulebpf at work:
# installs what the demo needs (scripts/setup.sh demo), builds, and runs the
# demo (cargo xtask demo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh demo
step "cargo build --release"
cargo build --release
step "cargo xtask demo"
cargo xtask demo
