#!/usr/bin/env bash
# One command from a fresh host (with rustup) to rulebpf at work: installs
# what the demo needs (scripts/setup.sh demo), builds, and runs the demo
# (cargo xtask demo). Each step shows the seconds since the start.
#
# The build is `cargo build` (dev profile), not `--release`: it compiles in
# about half the CPU time, and the eBPF programs are the same either way
# (rulebpf-loader/build.rs always builds them with --release). For use,
# `cargo build --release` builds target/release/rulebpf.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh demo
step "cargo build"
cargo build
step "cargo xtask demo --debug"
# `cargo build` has built xtask too: run that binary (`cargo xtask`, which
# builds xtask alone, would compile it and a few dependencies again, with
# other features).
"${CARGO_TARGET_DIR:-target}/debug/xtask" demo --debug
step "demo done"
