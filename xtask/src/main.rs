//! `cargo xtask`: everything that is not plain cargo.
//!
//! * `demo`  — attach examples/tcpoport.ini to a demo cgroup, connect from
//!   inside it to a loopback listener, print the origin ports it saw, clean up.
//! * `bench` — connects/s and bulk throughput with no hook, rulebpf (1 to
//!   100,000 rules) and nftables SNAT, interleaved; attach time and memory.
//! * `vm-test` — the kernel integration suite on Linux 5.10, 6.1 and 6.12 in qemu.
//! * `deb` — the Debian package (cargo-deb): binary, `rulebpf@.service`,
//!   examples, OCI hooks.
//! * `systemd-test` — that package on Debian 12 under systemd, in qemu: the
//!   `rulebpf systemd-dropin` drop-in gives a service its rules at every
//!   restart.
//! * `ci` — the whole CI sequence (fmt, clippy, tests, bench smoke, vm-test)
//!   that `scripts/test.sh` runs.
//!
//! The demo and the bench drive the built `rulebpf` binary ([`rulebpf`]);
//! the listener they read origin ports from and the table of origin-port
//! ranges are `rulebpf-testkit`'s, shared with the kernel tests.

mod apt;
mod bench;
mod ci;
mod cri;
mod deb;
mod demo;
mod libtest;
mod rulebpf;
mod vm;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show rulebpf at work on this machine (needs root), then clean up.
    Demo {
        /// Run target/debug/rulebpf (`cargo build`, as scripts/demo.sh
        /// builds it: the quickest build; its eBPF programs are the
        /// release build's) instead of target/release/rulebpf.
        #[arg(long)]
        debug: bool,
    },
    /// Measure rulebpf against no hook and nftables SNAT (needs root, nft).
    Bench {
        /// A short run that only checks the bench works (CI).
        #[arg(long)]
        smoke: bool,
        /// Where BENCHMARKS.md, .json and .svg go (relative to the workspace).
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Run the kernel integration suite on other kernels in qemu (needs
    /// qemu-system-x86, busybox-static, cpio; apt for the kernels).
    VmTest {
        /// Which kernels: 5.10, 6.1, 6.12 or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Only tests whose name contains this (as for cargo test).
        filter: Option<String>,
    },
    /// Build the Debian package (target/debian/rulebpf_*.deb) with cargo-deb.
    Deb,
    /// Install the package on Debian 12 in qemu and restart a service with
    /// the rulebpf drop-in N times: every first connect must get the rule's
    /// origin port (needs mmdebstrap, qemu-system-x86, zstd, cpio).
    SystemdTest(vm::systemd::Options),
    /// rulebpf's NRI plugin under a real containerd (Debian trixie's,
    /// fetched with apt), driven through its CRI socket as the kubelet
    /// drives it: annotated pods' first connects must leave from the
    /// rule's range, others from OS ports; the plugin is restarted halfway;
    /// removed pods leave nothing (needs root, runc, busybox-static).
    CriTest {
        /// The Debian suite whose containerd runs: trixie (1.7) or sid (2.x).
        #[arg(long, default_value = cri::DEFAULT_SUITE)]
        suite: String,
    },
    /// The CI sequence (scripts/test.sh runs it after installing what is
    /// missing): fmt, clippy, cargo test, bench smoke, vm-test, totals.
    Ci(ci::Options),
    /// The bench's client (runs inside the bench cgroup).
    #[command(hide = true)]
    BenchClient(bench::client::Args),
    /// The bench's server in another network namespace (capacity scenario).
    #[command(hide = true)]
    BenchServer(bench::server::Args),
    /// Holds the ports listed on stdin until stdin ends (search scenario).
    #[command(hide = true)]
    BenchHold,
    /// Only the pieces of the hook (the bench's section), printed: to
    /// measure one change to the hook on its own.
    #[command(hide = true)]
    BenchPieces {
        /// Counted rounds (one uncounted warm-up round comes first).
        #[arg(long, default_value_t = 7)]
        rounds: usize,
        /// Connects per round and family.
        #[arg(long, default_value_t = 3000)]
        connects: u32,
        /// Another rulebpf binary, measured with port sharing on beside
        /// this build (a change against the code before it).
        #[arg(long)]
        baseline: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo { debug } => demo::run(if debug {
            rulebpf::Profile::Debug
        } else {
            rulebpf::Profile::Release
        }),
        Command::Bench { smoke, out } => bench::run(
            bench::Size::pick(smoke),
            &workspace().join(out),
            bench::Echo::Report,
        ),
        Command::VmTest { kernel, filter } => {
            let series = vm::Series::parse(&kernel)?;
            vm::run(&series, filter.as_deref(), vm::Console::All)?.verdict()
        }
        Command::Deb => deb::run(),
        Command::SystemdTest(options) => vm::systemd::verdict(vm::systemd::run(&options)?),
        Command::Ci(options) => ci::run(&options),
        Command::BenchClient(args) => bench::client::run(&args),
        Command::BenchServer(args) => bench::server::run(&args),
        Command::BenchHold => bench::search::hold(),
        Command::CriTest { suite } => cri::run(&suite),
        Command::BenchPieces {
            rounds,
            connects,
            baseline,
        } => bench::run_pieces(rounds, connects, baseline.as_deref()),
    }
}

/// The workspace root (xtask's parent directory).
pub fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set (a relative one
/// taken from the current directory, as cargo does), else `target` in the
/// workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => std::path::absolute(&dir).unwrap_or_else(|_| dir.into()),
        None => workspace().join("target"),
    }
}

/// A command of the cargo that runs xtask (`CARGO`, so the pinned toolchain's
/// cargo), in the workspace, building into [`target_dir`] (made absolute: the
/// child's current directory is the workspace, not ours).
pub fn cargo() -> std::process::Command {
    let mut command =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace());
    if std::env::var_os("CARGO_TARGET_DIR").is_some() {
        command.env("CARGO_TARGET_DIR", target_dir());
    }
    command
}

/// A step header, as scripts/setup.sh's `step` prints it (bold, stderr).
pub fn step(what: &str) {
    eprintln!("\x1b[1m==> {what}\x1b[0m");
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The program `name` as found on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}
