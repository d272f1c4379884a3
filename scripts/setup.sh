#!/usr/bin/env bash
# Installs what rulebpf needs, idempotently, showing each step and the seconds
# since the start. Two sets:
#
#   demo  what `cargo build` and `cargo xtask demo` need (scripts/demo.sh):
#         a C linker, libLLVM for bpf-linker, the pinned nightly, bpf-linker;
#   test  that, plus what the whole suite needs (scripts/test.sh, .ci/run):
#         podman, qemu, mmdebstrap, nftables, ..., cargo-deb, cargo-fuzz.
#
# Sourced by scripts/demo.sh (`source scripts/setup.sh demo`) and
# scripts/test.sh (`... test`); on its own, `scripts/setup.sh [demo|test]`
# (default: test, everything).
#
# Why these pins: the aya 0.16 crate family needs rustc >= 1.98; the eBPF side is
# built with nightly (build-std for bpfel-unknown-none), and bpf-linker must link
# bitcode from the same LLVM major that rustc uses (nightly-2026-06-15 = LLVM 22).
set -euo pipefail

SETUP_SET=${1:-test}
case $SETUP_SET in
    demo | test) ;;
    *) echo "usage: scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac

TOOLCHAIN=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$(dirname "${BASH_SOURCE[0]}")/../rust-toolchain.toml")
BPF_LINKER_VERSION=0.13.0
# `cargo xtask deb`; keep in step with CARGO_DEB_VERSION in xtask/src/deb.rs.
CARGO_DEB_VERSION=3.8.0
LLVM_MAJOR=22
# `cargo xtask ci` runs the rules' libFuzzer target with `cargo fuzz`.
CARGO_FUZZ_VERSION=0.13.2

# demo: gcc + libc6-dev: the linker cargo uses (`cc`); libllvm22: the libLLVM
# that bpf-linker 0.13 links dynamically (llvm-22-dev, 100 MB more to download,
# adds only the `libLLVM.so` link name, made below, and what bpf-linker does not
# use: static libraries, headers, llvm-config).
APT_DEMO=(gcc libc6-dev libllvm${LLVM_MAJOR})
# test, in addition:
# g++: `cargo fuzz` builds libFuzzer (C++).
# iproute2, nftables: the bench smoke run (network namespaces, nft SNAT), and
# with iptables the kernel suite's firewall tests (a forwarding namespace that
# loads what `rulebpf firewall` exported).
# qemu-system-x86, busybox-static, cpio: `cargo xtask vm-test` (other kernels in qemu).
# mmdebstrap, zstd: `cargo xtask systemd-test` (a Debian 12 guest under systemd).
# podman, crun, runc: the kernel suite's container tests (the OCI hook under
# both runtimes; the image is built locally from busybox-static, no registry).
APT_TEST=(g++ iproute2 nftables iptables qemu-system-x86 busybox-static cpio mmdebstrap zstd
          podman crun runc)

step() { printf '\033[1m==> [%3d s] %s\033[0m\n' "$SECONDS" "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    echo "setup: run this as root (installs apt packages; rulebpf loads BPF programs):" \
         "sudo $0, or from a root shell" >&2
    exit 1
fi
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v rustup >/dev/null; then
    echo "setup: rustup not found for root; install it first (https://rustup.rs)" >&2
    exit 1
fi

# apt and the toolchain are independent: apt runs in the background while
# rustup installs the toolchain.
packages=("${APT_DEMO[@]}")
[[ $SETUP_SET == test ]] && packages+=("${APT_TEST[@]}")
missing=()
apt_pid=
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    step "apt-get install ${missing[*]} (in the background)"
    {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    } &
    apt_pid=$!
else
    step "apt packages present"
fi

if rustup run "$TOOLCHAIN" rustc --version >/dev/null 2>&1 &&
   [[ -d $(rustup run "$TOOLCHAIN" rustc --print sysroot)/lib/rustlib/src/rust ]]; then
    step "toolchain $TOOLCHAIN present"
else
    step "rustup toolchain install $TOOLCHAIN (+rust-src, rustfmt, clippy)"
    if ! rustup toolchain install "$TOOLCHAIN" --profile minimal \
            --component rust-src --component rustfmt --component clippy; then
        [[ -z $apt_pid ]] || wait "$apt_pid" || true   # leave dpkg in one piece
        exit 1
    fi
fi

if [[ -n $apt_pid ]]; then
    wait "$apt_pid" || { echo "setup: apt-get install failed" >&2; exit 1; }
    step "apt packages installed"
fi

if bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    step "bpf-linker $BPF_LINKER_VERSION present"
else
    step "cargo install bpf-linker $BPF_LINKER_VERSION (LLVM $LLVM_MAJOR)"
    # bpf-linker links against LLVM_PREFIX/lib/libLLVM.so: a directory with
    # that one link name, to the library libllvm22 installs, is enough.
    llvm_prefix=$(mktemp -d)
    mkdir "$llvm_prefix/lib"
    ln -s "$(dpkg -L "libllvm${LLVM_MAJOR}" | grep -m1 "/libLLVM\.so\.${LLVM_MAJOR}\.")" \
        "$llvm_prefix/lib/libLLVM.so"
    # Built without optimisation or debug info (bpf-linker's own profile has
    # full debug info): a third of the CPU time. The linking is done by
    # libLLVM, which is optimised; bpf-linker's code only drives it, and the
    # eBPF objects it writes are the same bytes.
    env "LLVM_PREFIX=$llvm_prefix" \
        CARGO_PROFILE_RELEASE_OPT_LEVEL=0 CARGO_PROFILE_RELEASE_DEBUG=0 \
        rustup run "$TOOLCHAIN" cargo install --locked bpf-linker \
        --version "$BPF_LINKER_VERSION" --no-default-features --features llvm-${LLVM_MAJOR}
    rm -r "$llvm_prefix"
fi

if [[ $SETUP_SET == test ]]; then
    if cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
        step "cargo-deb $CARGO_DEB_VERSION present"
    else
        step "cargo install cargo-deb $CARGO_DEB_VERSION (for cargo xtask deb)"
        rustup run "$TOOLCHAIN" cargo install --locked cargo-deb --version "$CARGO_DEB_VERSION"
    fi

    if cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
        step "cargo-fuzz $CARGO_FUZZ_VERSION present"
    else
        step "cargo install cargo-fuzz $CARGO_FUZZ_VERSION (the rules' fuzzer in cargo xtask ci)"
        rustup run "$TOOLCHAIN" cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
    fi
fi

# bpffs is where `rulebpf attach` pins; cgroup v2 must exist somewhere.
if ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts; then
    step "mount bpffs at /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
fi
if ! grep -q ' cgroup2 ' /proc/mounts; then
    echo "setup: no cgroup2 mount in /proc/mounts; rulebpf needs cgroup v2" >&2
    exit 1
fi
