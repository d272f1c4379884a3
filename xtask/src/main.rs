//! `cargo xtask`: everything that is not plain cargo.
//!
//! * `demo`  — attach examples/tcpoport.ini to a demo cgroup, connect from
//!   inside it to a loopback listener, print the origin ports it saw, clean up.
//! * `bench` — connects/s and bulk throughput with no hook, rulebpf (1 to
//!   100,000 rules) and nftables SNAT, interleaved; attach time and memory.
//! * `vm-test` — the kernel integration suite on Linux 6.1 and 6.12 in qemu.

mod bench;
mod demo;
mod vm;

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show rulebpf at work on this machine (needs root), then clean up.
    Demo,
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
        /// Which kernels: 6.1, 6.12 or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Only tests whose name contains this (as for cargo test).
        filter: Option<String>,
    },
    /// The bench's client (runs inside the bench cgroup).
    #[command(hide = true)]
    BenchClient {
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long)]
        bulk: Option<u64>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo => demo::run(),
        Command::Bench { smoke, out } => {
            let size = if smoke {
                bench::Size::SMOKE
            } else {
                bench::Size::FULL
            };
            bench::run(size, &workspace().join(out))
        }
        Command::VmTest { kernel, filter } => {
            vm::run(&vm::Series::parse(&kernel)?, filter.as_deref())
        }
        Command::BenchClient {
            cgroup,
            port,
            count,
            bulk,
        } => bench::client(&cgroup, port, count, bulk),
    }
}

/// The workspace root (xtask's parent directory).
pub fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
}

/// The program `name` as found on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
}

/// The cgroup2 mount point, from /proc/mounts (hybrid hosts included).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    fs::read_to_string("/proc/mounts")?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .context("no cgroup2 mount in /proc/mounts")
}
