#!/usr/bin/env bash
# The whole test suite, from a fresh host (with rustup): installs what is
# missing, then format and lint checks, unit and property tests, and the
# kernel integration tests (real cgroup, real sockets; they need root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy -D warnings"
cargo clippy --release --all-targets -- -D warnings
cargo clippy --release -p rulebpf-ebpf --target bpfel-unknown-none -Zbuild-std=core -- -D warnings
step "cargo test (unit, property, kernel integration)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --release 2>&1 | tee "$log"
step "cargo xtask bench --smoke (the bench still works; figures: BENCHMARKS.md)"
cargo xtask bench --smoke --out target/bench-smoke | tail -n 3
# One closing line for the whole suite (the last cargo line is a doctest run).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
