//! The bench's client, and how the bench runs it.
//!
//! The client is a process of its own (`xtask bench-client`, hidden from
//! `--help`) because joining a cgroup moves the whole process: only the
//! client sits in the bench cgroup, so the hook and nft's cgroup match see
//! the measured connections and nothing else, while the bench itself (its
//! server, its `rulebpf` calls) stays outside. It connects as fast as it can
//! and reports the time it took as `{"seconds": ...}` on stdout.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};

use super::SERVER_IP;

/// `xtask bench-client`'s arguments.
#[derive(clap::Args)]
pub struct Args {
    /// The cgroup to join first.
    #[arg(long)]
    cgroup: PathBuf,
    /// The server's port on 127.0.0.2.
    #[arg(long)]
    port: u16,
    /// How many connections, one after the other.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Instead: one connection sending this many bytes.
    #[arg(long)]
    bulk: Option<u64>,
}

/// The client: joins the cgroup, then connects `count` times (waiting for
/// the server's close each time) or sends `bulk` bytes over one connection.
/// Prints `{"seconds": ...}`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    fs::write(
        args.cgroup.join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .context("joining the bench cgroup")?;
    let dest = SocketAddrV4::new(SERVER_IP, args.port);
    let start = Instant::now();
    if let Some(bytes) = args.bulk {
        let mut stream = TcpStream::connect(dest)?;
        // The length first: the server reads that much, then closes first.
        stream.write_all(&bytes.to_be_bytes())?;
        let chunk = vec![0x5au8; 1 << 18];
        let mut sent = 0u64;
        while sent < bytes {
            let n = chunk.len().min((bytes - sent) as usize);
            stream.write_all(&chunk[..n])?;
            sent += n as u64;
        }
        // Wait for the server's close.
        let _ = stream.read(&mut [0u8; 1]);
    } else {
        let mut buf = [0u8; 1];
        for _ in 0..args.count {
            let mut stream = TcpStream::connect(dest)?;
            let _ = stream.read(&mut buf);
        }
    }
    println!("{}", json!({ "seconds": start.elapsed().as_secs_f64() }));
    Ok(())
}

/// Runs the client in one cgroup.
pub struct Client {
    cgroup: PathBuf,
}

impl Client {
    pub fn new(cgroup: PathBuf) -> Self {
        Self { cgroup }
    }

    /// `count` connections to `port`, one after the other: how long they took.
    pub fn connects(&self, port: u16, count: u32) -> anyhow::Result<Duration> {
        self.time(&["--port", &port.to_string(), "--count", &count.to_string()])
    }

    /// One connection to `port` sending `bytes`: how long it took.
    pub fn bulk(&self, port: u16, bytes: u64) -> anyhow::Result<Duration> {
        self.time(&["--port", &port.to_string(), "--bulk", &bytes.to_string()])
    }

    /// Runs `xtask bench-client --cgroup CG ARGS`; returns the time it reports.
    fn time(&self, args: &[&str]) -> anyhow::Result<Duration> {
        let out = Command::new(std::env::current_exe()?)
            .arg("bench-client")
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(args)
            .stderr(Stdio::inherit())
            .output()?;
        ensure!(out.status.success(), "bench client failed");
        let report: Value = serde_json::from_slice(&out.stdout)?;
        let seconds = report["seconds"].as_f64().context("client output")?;
        Ok(Duration::from_secs_f64(seconds))
    }
}
