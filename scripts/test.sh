#!/usr/bin/env bash
# The whole test suite, from a fresh host (with rustup): installs what is
# missing, then format and lint checks, unit and property tests, the kernel
# integration tests (real cgroup, real sockets; they need root) on this host's
# kernel, and the same kernel suite on Linux 6.1 and 6.12 in qemu.
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
step "cargo xtask vm-test --kernel all (the kernel suite on Linux 6.1 and 6.12, in qemu)"
vm_start=$SECONDS
cargo xtask vm-test --kernel all | grep -v ' \.\.\. ok$'
echo "vm-test wall time: $((SECONDS - vm_start)) s"
# Closing lines: per kernel, then the whole suite (the host log holds unit,
# property, kernel tests and doctests; target/vm/totals the guests' kernel tests).
read -r vm_passed vm_failed < target/vm/totals
awk -v k="$(uname -r)" -v vp="$vm_passed" -v vf="$vm_failed" '
    /^test result:/ { p += $4; f += $6 }
    END {
        printf "host %s: %d passed, %d failed\n", k, p, f
        printf "tests: %d passed, %d failed\n", p + vp, f + vf
    }' "$log"
