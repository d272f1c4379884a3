//! The port search without `bpf_loop` (kernels before 5.17; forced here with
//! `RULEBPF_ASSUME_NO_LOOP=1`) beside the search of every port: how often a
//! connect fails although a port of its range is free, by range size and
//! occupancy.
//!
//! * Occupancy: a random set of the range's ports (seeded: the same set for
//!   both searches) is held by UDP sockets bound outside the cgroup, by
//!   helper processes (`xtask bench-hold`: one process may not hold 28,000
//!   descriptors under this machine's limit of 20,000).
//! * The measured connects are connected UDP sockets (`rulebpf probe
//!   --protocol udp`), each closed before the next, so the occupancy stays
//!   what it was set to and at least one port is always free: every failed
//!   connect is one that failed although a port was free.
//! * Everything runs in a network namespace of its own (ports are per
//!   namespace), so the ranges can be as large as the question needs
//!   without meeting the port table's other users.
//!
//! With holes at random, a bounded connect fails when its 1,024 candidates
//! are all held: about `(held / size)^1024` of connects (the report prints
//! that beside the measured share).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, ensure};
use rulebpf_common::BOUNDED_CANDIDATES;
use rulebpf_testkit::PortSlot;
use serde_json::{Value, json};

use super::{Bench, Size, capacity::Netns};
use crate::rulebpf::arg;

/// The ranges, in the namespace of their own (see the module doc).
const LARGE: PortSlot = PortSlot::new("28,000 ports", 2000, 29999);
const SMALL: PortSlot = PortSlot::new("1,000 ports", 30000, 30999);
/// The shares of a range held, in parts per thousand, for each range.
const LARGE_HELD: [u32; 4] = [900, 990, 995, 999];
const SMALL_HELD: [u32; 3] = [900, 990, 999];
/// Connects per (range, occupancy, search).
const CONNECTS: u32 = 1_000;
/// Ports one holder process binds at most.
const PER_HOLDER: usize = 15_000;
/// The destination: nothing listens (UDP connect() sends nothing).
const DEST: &str = "127.0.0.2:9";

/// Every row: each range at each occupancy, both searches.
pub(super) fn measure(bench: &Bench, size: Size) -> anyhow::Result<Value> {
    let netns = Netns::fresh("search")?;
    let connects = if size.rounds > 2 { CONNECTS } else { 100 };
    let mut rows = Vec::new();
    let cases = LARGE_HELD
        .iter()
        .map(|&h| (LARGE, h))
        .chain(SMALL_HELD.iter().map(|&h| (SMALL, h)));
    for (range, per_mille) in cases {
        let size = u32::from(range.hi - range.lo) + 1;
        let held = size * per_mille / 1000;
        let holders = Holders::start(&netns, &pick(range, held as usize))?;
        let mut row = json!({
            "range": range.name,
            "size": size,
            "held": held,
            "expected_bounded_failures": expected_failures(size, held),
        });
        let file = bench.rig.write_file(
            "search.ini",
            &format!("127.0.0.2 9 : {}-{} udp\n", range.lo, range.hi),
        )?;
        for (search, env) in [
            ("every_port", &[][..]),
            ("bounded", &[("RULEBPF_ASSUME_NO_LOOP", "1")][..]),
        ] {
            bench.rig.attach_env(&file, &[], env)?;
            let result = probe(bench, &netns, connects);
            bench.rig.detach();
            let (failed, seconds) = result?;
            eprintln!(
                "search {:<12} {held:>5} of {size} held, {search:<10}: {failed:>4} of {connects} failed",
                range.name
            );
            row[search] = json!({
                "connects": connects,
                "failed": failed,
                "us_per_connect": seconds * 1e6 / f64::from(connects),
            });
        }
        drop(holders);
        rows.push(row);
    }
    Ok(json!({
        "candidates": BOUNDED_CANDIDATES,
        "results": rows,
    }))
}

/// `(held / size)^candidates`, the share of connects whose candidates are
/// all held when the holes lie at random.
fn expected_failures(size: u32, held: u32) -> f64 {
    (f64::from(held) / f64::from(size)).powi(BOUNDED_CANDIDATES as i32)
}

/// `held` ports of `range` at random (xorshift, fixed seed).
fn pick(range: PortSlot, held: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = range.range().collect();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..held {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let j = i + (state % (ports.len() - i) as u64) as usize;
        ports.swap(i, j);
    }
    ports.truncate(held);
    ports
}

/// `connects` UDP connects from the bench cgroup in `netns`: how many
/// failed, and the seconds the probe took.
fn probe(bench: &Bench, netns: &Netns, connects: u32) -> anyhow::Result<(u32, f64)> {
    let start = Instant::now();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", netns.0))
        .arg(bench.rig.rulebpf_path())
        .args(["probe", "--json", "--protocol", "udp", "--count"])
        .arg(connects.to_string())
        .args(["--cgroup", arg(bench.rig.cgroup())?, DEST])
        .output()
        .context("running rulebpf probe")?;
    let seconds = start.elapsed().as_secs_f64();
    let probed: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "rulebpf probe: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let results = probed.as_array().context("probe output")?;
    ensure!(
        results.len() == connects as usize,
        "probe made too few connects"
    );
    let failed = results.iter().filter(|r| r.get("errno").is_some()).count();
    Ok((failed as u32, seconds))
}

/// Processes holding ports (UDP, any address) in a namespace, until dropped.
struct Holders(Vec<Child>);

impl Holders {
    fn start(netns: &Netns, ports: &[u16]) -> anyhow::Result<Self> {
        let mut holders = Self(Vec::new());
        for chunk in ports.chunks(PER_HOLDER) {
            let mut child = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", netns.0))
                .arg(std::env::current_exe()?)
                .arg("bench-hold")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting a port holder")?;
            let list: Vec<String> = chunk.iter().map(u16::to_string).collect();
            let mut stdin = child.stdin.take().expect("piped");
            writeln!(stdin, "{}", list.join(" "))?;
            child.stdin = Some(stdin);
            let mut line = String::new();
            BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
            holders.0.push(child);
            ensure!(line.trim() == "ready", "a port holder failed: {line}");
        }
        Ok(holders)
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // End of input: the holder exits and its sockets close.
            drop(child.stdin.take());
            let _ = child.wait();
        }
    }
}

/// `xtask bench-hold`: binds a UDP socket to each port of the first line
/// of stdin, says `ready`, and keeps them until stdin ends.
pub fn hold() -> anyhow::Result<()> {
    raise_open_files()?;
    let mut stdin = std::io::stdin().lock();
    let mut line = String::new();
    stdin.read_line(&mut line)?;
    let mut held = Vec::new();
    for word in line.split_whitespace() {
        let port: u16 = word.parse().context("a port")?;
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
            .with_context(|| format!("holding port {port}"))?;
        held.push(socket);
    }
    println!("ready");
    let _ = stdin.read_to_end(&mut Vec::new());
    drop(held);
    Ok(())
}

/// The soft limit of open files up to the hard one.
fn raise_open_files() -> anyhow::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        ensure!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0);
        limit.rlim_cur = limit.rlim_max;
        ensure!(
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0,
            "setrlimit: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
