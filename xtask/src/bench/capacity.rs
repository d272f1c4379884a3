//! What a range of origin ports carries, and what a busy range costs:
//!
//! * **Capacity.** A 100-port origin range ([`RANGE`]), the client closing
//!   every connection first (TIME_WAIT lands on the origin ports, as on a
//!   gateway that ends its own connections), connecting as fast as it can
//!   for a few seconds to 50 destinations in turn, then to 1 destination;
//!   for no hook (the kernel's own ephemeral ports), rulebpf with port
//!   sharing, rulebpf without (one socket per port), and nft SNAT to the
//!   same 100 ports, round after round (interleaved, medians). Every run is
//!   in a **fresh network
//!   namespace** (`ip netns add`, `lo` up: 127.0.0.0/8 and ::1 are there):
//!   TIME_WAIT sockets are per namespace, and one run's 90,000 of them would
//!   otherwise block or flatter the next one; nor can a run pass
//!   `net.ipv4.tcp_max_tw_buckets` (131,072 here), beyond which the kernel
//!   stops keeping TIME_WAIT and every configuration looks better. The
//!   client and the server enter the namespace with `nsenter --net`
//!   (`ip netns exec` would remount /sys, where the cgroup is).
//! * **A busy range.** The cost of a connect when 900 of a 1,000-port range
//!   ([`WIDE`]) are held by live connections to the same destination,
//!   against the same range empty (the server closes first here: only the
//!   search is measured), interleaved round by round.
//! * **IPv6.** The connect rate to `[::1]` with rulebpf (a rule with a range
//!   of [`V6`]) against no hook, interleaved round by round.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, ensure};
use rulebpf_testkit::PortSlot;
use serde_json::{Value, json};

use super::{Size, client::Client, config::Rig, nft, report::median};

/// The capacity scenario's origin range: 100 ports of the bench's slot.
pub const RANGE: PortSlot = PortSlot::new("bench capacity", 24000, 24099);
/// The busy-range measurement's origin range: 1,000 ports.
pub const WIDE: PortSlot = PortSlot::new("bench busy range", 25000, 25999);
/// The IPv6 row's origin range.
pub const V6: PortSlot = PortSlot::new("bench IPv6", 26000, 26999);
/// The destination port of every capacity destination.
const CAPACITY_PORT: u16 = 7700;
/// The busy-range and IPv6 servers' ports.
const BUSY_PORT: u16 = 7710;
const V6_PORT: u16 = 7720;
/// Destinations of the "many" scenario: 127.0.1.1 to 127.0.1.50.
const MANY: u8 = 50;
/// Connections held in the busy range: 90 %.
const HELD: u32 = 900;

/// How many destinations the client connects to.
#[derive(Clone, Copy, Debug)]
enum Scenario {
    Many,
    One,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Many => "50 destinations",
            Self::One => "1 destination",
        }
    }

    fn dests(self) -> Vec<IpAddr> {
        let n = match self {
            Self::Many => MANY,
            Self::One => 1,
        };
        (1..=n)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)))
            .collect()
    }
}

/// Who picks the origin port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    NoHook,
    Sharing,
    Exclusive,
    NftSnat,
}

impl Peer {
    pub const ALL: [Self; 4] = [Self::NoHook, Self::Sharing, Self::Exclusive, Self::NftSnat];

    pub fn name(self) -> &'static str {
        match self {
            Self::NoHook => "no hook",
            Self::Sharing => "rulebpf, port sharing",
            Self::Exclusive => "rulebpf, --port-sharing off",
            Self::NftSnat => "nft SNAT",
        }
    }
}

/// A network namespace of its own, deleted on drop (its sockets go when
/// the last process in it ends).
pub struct Netns(pub String);

impl Netns {
    pub fn fresh(tag: &str) -> anyhow::Result<Self> {
        let name = format!("rulebpf-bench-{}-{tag}", std::process::id());
        let ip = |args: &[&str]| -> anyhow::Result<()> {
            let status = Command::new("ip").args(args).status().context("ip")?;
            ensure!(status.success(), "ip {}", args.join(" "));
            Ok(())
        };
        ip(&["netns", "add", &name])?;
        let netns = Self(name);
        ip(&["-n", &netns.0, "link", "set", "lo", "up"])?;
        Ok(netns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `xtask bench-server` in a network namespace, until dropped.
pub struct Server(Child);

impl Server {
    pub fn start(
        netns: &Netns,
        listen: &[(IpAddr, u16)],
        client_closes: bool,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", netns.0))
            .arg(std::env::current_exe()?)
            .arg("bench-server");
        for (ip, port) in listen {
            command
                .arg("--listen")
                .arg(std::net::SocketAddr::new(*ip, *port).to_string());
        }
        if client_closes {
            command.arg("--client-closes");
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the bench server")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let server = Self(child);
        ensure!(line.trim() == "ready", "the bench server did not start");
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Its stdin closes: it ends.
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// What one capacity run measured.
struct Run {
    rate: f64,
    connects: u64,
    errors: u64,
    /// Distinct origin ports of the client's sockets, and whether all lay
    /// in [`RANGE`].
    ports: u64,
    in_range: bool,
}

/// Every (scenario, peer) for `seconds` each, `rounds` times, interleaved
/// (each run in a fresh network namespace); one JSON row per (scenario,
/// peer): median rate, failures over all rounds, and for rulebpf the
/// medians of its per-round ratios to no hook and to nft SNAT.
pub fn capacity(rig: &Rig, client: &Client, seconds: f64, rounds: usize) -> anyhow::Result<Value> {
    let rules = rig.write_file(
        "capacity.ini",
        &format!("127.0.1.0/24 {CAPACITY_PORT} : {RANGE}\n"),
    )?;
    let scenarios = [Scenario::Many, Scenario::One];
    // runs[scenario][peer]: one Run per round.
    let mut runs: Vec<Vec<Vec<Run>>> = scenarios
        .iter()
        .map(|_| Peer::ALL.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 0..rounds {
        for (s, &scenario) in scenarios.iter().enumerate() {
            for (p, &peer) in Peer::ALL.iter().enumerate() {
                let run = capacity_run(rig, client, &rules, scenario, peer, seconds)?;
                eprintln!(
                    "capacity round {round} {:<16} {:<28} {:>9.0} connects/s, {} failed",
                    scenario.name(),
                    peer.name(),
                    run.rate,
                    run.errors
                );
                runs[s][p].push(run);
            }
        }
    }
    let rates = |runs: &[Run]| runs.iter().map(|r| r.rate).collect::<Vec<_>>();
    let ratio = |a: &[Run], b: &[Run]| {
        median(
            &a.iter()
                .zip(b)
                .map(|(x, y)| x.rate / y.rate.max(1e-9))
                .collect::<Vec<_>>(),
        )
    };
    let mut rows = Vec::new();
    for (s, scenario) in scenarios.iter().enumerate() {
        let of = |peer: Peer| &runs[s][Peer::ALL.iter().position(|&p| p == peer).unwrap()];
        for (p, &peer) in Peer::ALL.iter().enumerate() {
            let these = &runs[s][p];
            // Only rulebpf's sockets have their origin port: NAT rewrites
            // packets, not the client's socket.
            let rulebpf = matches!(peer, Peer::Sharing | Peer::Exclusive);
            rows.push(json!({
                "scenario": scenario.name(),
                "config": peer.name(),
                "connects_per_sec": median(&rates(these)),
                "connects_per_sec_rounds": rates(these),
                "connects": these.iter().map(|r| r.connects).sum::<u64>(),
                "errors": these.iter().map(|r| r.errors).sum::<u64>(),
                "origin_ports": rulebpf.then(|| these.iter().map(|r| r.ports).min()),
                "origin_ports_in_range": rulebpf.then(|| these.iter().all(|r| r.in_range)),
                "ratio_to_no_hook": rulebpf.then(|| ratio(these, of(Peer::NoHook))),
                "ratio_to_nft": rulebpf.then(|| ratio(these, of(Peer::NftSnat))),
            }));
        }
    }
    Ok(json!({
        "seconds": seconds,
        "rounds": rounds,
        "range": RANGE.to_string(),
        "range_ports": RANGE.hi - RANGE.lo + 1,
        "rows": rows,
    }))
}

/// One capacity run: a fresh network namespace with the scenario's
/// servers, `peer` switched on, the client for `seconds`.
fn capacity_run(
    rig: &Rig,
    client: &Client,
    rules: &std::path::Path,
    scenario: Scenario,
    peer: Peer,
    seconds: f64,
) -> anyhow::Result<Run> {
    let dests = scenario.dests();
    let netns = Netns::fresh("capacity")?;
    let listen: Vec<_> = dests.iter().map(|&ip| (ip, CAPACITY_PORT)).collect();
    let _server = Server::start(&netns, &listen, true)?;
    match peer {
        Peer::NoHook => {}
        Peer::Sharing => drop(rig.attach_with(rules, &[])?),
        Peer::Exclusive => drop(rig.attach_with(rules, &["--port-sharing", "off"])?),
        Peer::NftSnat => nft::add_in(
            &netns.0,
            &nft::ruleset_for("127.0.1.0/24", &CAPACITY_PORT.to_string(), RANGE),
        )?,
    }
    let list: Vec<String> = dests.iter().map(IpAddr::to_string).collect();
    let report = client.in_netns(&netns.0).report(&[
        "--port",
        &CAPACITY_PORT.to_string(),
        "--capacity",
        &seconds.to_string(),
        "--dests",
        &list.join(","),
    ]);
    if matches!(peer, Peer::Sharing | Peer::Exclusive) {
        rig.detach();
    }
    let report = report.with_context(|| format!("{} {}", scenario.name(), peer.name()))?;
    let connects = report["connects"].as_u64().unwrap_or(0);
    let in_range = report["ports_lo"]
        .as_u64()
        .is_some_and(|lo| lo >= RANGE.lo.into())
        && report["ports_hi"]
            .as_u64()
            .is_some_and(|hi| hi <= RANGE.hi.into());
    Ok(Run {
        rate: connects as f64 / report["seconds"].as_f64().unwrap_or(1.0),
        connects,
        errors: report["errnos"]
            .as_object()
            .map_or(0, |e| e.values().filter_map(Value::as_u64).sum()),
        ports: report["origin_ports"].as_u64().unwrap_or(0),
        in_range,
    })
}

/// The busy range (held connections against none) and the IPv6 row
/// (rulebpf against no hook), interleaved over `size.cost_rounds` rounds
/// after one uncounted warm-up round.
pub fn costs(rig: &Rig, client: &Client, size: Size) -> anyhow::Result<Value> {
    let netns = Netns::fresh("costs")?;
    let v4 = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let _server = Server::start(&netns, &[(v4, BUSY_PORT), (v6, V6_PORT)], false)?;
    let client = client.in_netns(&netns.0);
    let rules = rig.write_file(
        "costs.ini",
        &format!("{v4} {BUSY_PORT} : {WIDE}\n{v6} {V6_PORT} : {V6}\n"),
    )?;
    let rate = |ip: IpAddr, port: u16, hold: u32| -> anyhow::Result<f64> {
        let took = client.connects_to(ip, port, size.cost_connects, hold)?;
        Ok(f64::from(size.cost_connects) / took.as_secs_f64())
    };
    let (mut empty, mut busy, mut v6_hook, mut v6_none) = (vec![], vec![], vec![], vec![]);
    for round in 0..=size.cost_rounds {
        rig.attach_with(&rules, &[])?;
        let hooked = (|| {
            let e = rate(v4, BUSY_PORT, 0)?;
            let b = rate(v4, BUSY_PORT, HELD)?;
            let h = rate(v6, V6_PORT, 0)?;
            if round == 0 {
                prove(rig, size.cost_connects)?;
            }
            anyhow::Ok((e, b, h))
        })();
        rig.detach();
        let (e, b, h) = hooked?;
        let n = rate(v6, V6_PORT, 0)?;
        eprintln!(
            "round {round} busy range: empty {e:>8.0}/s, 90 % held {b:>8.0}/s; \
             IPv6: rulebpf {h:>8.0}/s, no hook {n:>8.0}/s"
        );
        if round > 0 {
            empty.push(e);
            busy.push(b);
            v6_hook.push(h);
            v6_none.push(n);
        }
    }
    let ratio =
        |a: &[f64], b: &[f64]| median(&a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>());
    Ok(json!({
        "busy_range": {
            "range": WIDE.to_string(),
            "held": HELD,
            "connects_per_round": size.cost_connects,
            "empty_connects_per_sec": median(&empty),
            "busy_connects_per_sec": median(&busy),
            // Cost per connect, busy against empty: the inverse of the rates.
            "cost_ratio": ratio(&empty, &busy),
            "empty_rounds": empty,
            "busy_rounds": busy,
        },
        "ipv6": {
            "range": V6.to_string(),
            "connects_per_round": size.cost_connects,
            "rulebpf_connects_per_sec": median(&v6_hook),
            "no_hook_connects_per_sec": median(&v6_none),
            "ratio_to_no_hook": ratio(&v6_hook, &v6_none),
            "rulebpf_rounds": v6_hook,
            "no_hook_rounds": v6_none,
        },
    }))
}

/// The warm-up round's connections went through the rules: the busy-range
/// rule bound its connects (and the held ones), the IPv6 rule its own.
fn prove(rig: &Rig, count: u32) -> anyhow::Result<()> {
    let stats = rig.stats()?;
    let bound = |i: usize| stats[0]["rules"][i]["bound"].as_u64().unwrap_or(0);
    ensure!(
        bound(0) >= u64::from(2 * count + HELD) && bound(1) >= u64::from(count),
        "the rules did not bind the measured connections: {stats}"
    );
    Ok(())
}
