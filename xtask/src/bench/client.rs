//! The bench's client, and how the bench runs it.
//!
//! The client is a process of its own (`xtask bench-client`, hidden from
//! `--help`) because joining a cgroup moves the whole process: only the
//! client sits in the bench cgroup, so the hook and nft's cgroup match see
//! the measured connections and nothing else, while the bench itself (its
//! server, its `rulebpf` calls) stays outside. It connects as fast as it can
//! and reports what it did as one JSON object on stdout (`seconds`, and for
//! the capacity runs the connects, the failures by errno and the origin
//! ports used).
//!
//! In a network namespace of its own (the capacity scenario) it is started
//! with `nsenter --net=/run/netns/NAME`: the network namespace changes, the
//! mount namespace does not, so the cgroup path stays reachable.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
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
    /// The server's port.
    #[arg(long)]
    port: u16,
    /// The server's address.
    #[arg(long, default_value_t = IpAddr::V4(SERVER_IP))]
    ip: IpAddr,
    /// How many connections, one after the other.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Instead: one connection sending this many bytes.
    #[arg(long)]
    bulk: Option<u64>,
    /// First open this many connections to the server and keep them open
    /// while the `count` connections are timed.
    #[arg(long, default_value_t = 0)]
    hold: u32,
    /// Instead: for this many seconds, connect to each of `dests` in turn,
    /// the client closing first (then waiting for the server's close).
    #[arg(long)]
    capacity: Option<f64>,
    /// The capacity run's destinations (the server's port each).
    #[arg(long, value_delimiter = ',')]
    dests: Vec<IpAddr>,
}

/// The client: joins the cgroup, then runs what `args` say. Prints one
/// JSON object with `seconds`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    fs::write(
        args.cgroup.join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .context("joining the bench cgroup")?;
    let dest = SocketAddr::new(args.ip, args.port);
    if let Some(seconds) = args.capacity {
        let dests: Vec<SocketAddr> = args
            .dests
            .iter()
            .map(|&ip| SocketAddr::new(ip, args.port))
            .collect();
        println!("{}", capacity(&dests, Duration::from_secs_f64(seconds)));
        return Ok(());
    }
    let held: Vec<TcpStream> = (0..args.hold)
        .map(|_| TcpStream::connect(dest))
        .collect::<Result<_, _>>()
        .context("opening the held connections")?;
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
    let seconds = start.elapsed().as_secs_f64();
    drop(held);
    println!("{}", json!({ "seconds": seconds }));
    Ok(())
}

/// Connects to `dests` in turn for `length`, each connection closed by the
/// client first (its FIN first, so TIME_WAIT lands on the origin port)
/// then by the server; failures are counted, not fatal.
fn capacity(dests: &[SocketAddr], length: Duration) -> Value {
    let mut connects = 0u64;
    let mut errnos: BTreeMap<String, u64> = BTreeMap::new();
    let mut ports = BTreeSet::new();
    let start = Instant::now();
    let mut buf = [0u8; 1];
    'run: loop {
        for &dest in dests {
            if start.elapsed() >= length {
                break 'run;
            }
            // A connect the kernel cannot make at once (nft SNAT out of
            // tuples drops the SYN and retries) ends with the run.
            let left = length.saturating_sub(start.elapsed());
            match TcpStream::connect_timeout(&dest, left.max(Duration::from_millis(1))) {
                Ok(mut stream) => {
                    connects += 1;
                    if let Ok(local) = stream.local_addr() {
                        ports.insert(local.port());
                    }
                    let _ = stream.shutdown(Shutdown::Write);
                    let _ = stream.read(&mut buf);
                }
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(0).to_string();
                    *errnos.entry(errno).or_default() += 1;
                }
            }
        }
    }
    json!({
        "seconds": start.elapsed().as_secs_f64(),
        "connects": connects,
        "errnos": errnos,
        "origin_ports": ports.len(),
        "ports_lo": ports.first(),
        "ports_hi": ports.last(),
    })
}

/// Runs the client in one cgroup (and, optionally, one network namespace).
pub struct Client {
    cgroup: PathBuf,
    netns: Option<String>,
}

impl Client {
    pub fn new(cgroup: PathBuf) -> Self {
        Self {
            cgroup,
            netns: None,
        }
    }

    /// The same client, run in network namespace `netns`.
    pub fn in_netns(&self, netns: &str) -> Self {
        Self {
            cgroup: self.cgroup.clone(),
            netns: Some(netns.to_string()),
        }
    }

    /// `count` connections to `port`, one after the other: how long they took.
    pub fn connects(&self, port: u16, count: u32) -> anyhow::Result<Duration> {
        self.connects_to(IpAddr::V4(SERVER_IP), port, count, 0)
    }

    /// `count` connections to `ip:port`, one after the other, while `hold`
    /// others stay open: how long they took.
    pub fn connects_to(
        &self,
        ip: IpAddr,
        port: u16,
        count: u32,
        hold: u32,
    ) -> anyhow::Result<Duration> {
        self.time(&[
            "--ip",
            &ip.to_string(),
            "--port",
            &port.to_string(),
            "--count",
            &count.to_string(),
            "--hold",
            &hold.to_string(),
        ])
    }

    /// One connection to `port` sending `bytes`: how long it took.
    pub fn bulk(&self, port: u16, bytes: u64) -> anyhow::Result<Duration> {
        self.time(&["--port", &port.to_string(), "--bulk", &bytes.to_string()])
    }

    /// Runs `xtask bench-client --cgroup CG ARGS`; returns the time it reports.
    pub fn time(&self, args: &[&str]) -> anyhow::Result<Duration> {
        let report = self.report(args)?;
        let seconds = report["seconds"].as_f64().context("client output")?;
        Ok(Duration::from_secs_f64(seconds))
    }

    /// Runs `xtask bench-client --cgroup CG ARGS`; returns what it reports.
    pub fn report(&self, args: &[&str]) -> anyhow::Result<Value> {
        let exe = std::env::current_exe()?;
        let mut command = match &self.netns {
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{netns}")).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let out = command
            .arg("bench-client")
            .arg("--cgroup")
            .arg(&self.cgroup)
            .args(args)
            .stderr(Stdio::inherit())
            .output()?;
        ensure!(out.status.success(), "bench client failed");
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}
