#!/usr/bin/env bash
# The whole test suite, from a fresh host (with rustup): installs what is
# missing (scripts/setup.sh test: the demo's set and the suite's), then runs
# `cargo xtask ci` (xtask/src/ci.rs):
# format and lint checks, unit and property tests, the kernel integration
# tests (real cgroup, real sockets; they need root) on this host's kernel, the
# bench in smoke mode, the same kernel suite on Linux 6.1 and 6.12 in qemu,
# and the passed/failed totals. Arguments go to `cargo xtask ci`
# (`--skip-bench`, `--skip-vm` for a quicker run by hand).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh test
exec cargo xtask ci "$@"
