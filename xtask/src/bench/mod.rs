//! `cargo xtask bench`: the cost of rulebpf per connect, measured side by side
//! with no hook (the limit) and with nftables SNAT scoped to the same cgroup
//! (what operators use today), in one run.
//!
//! * A tight client (this binary, `bench-client`, moved into the bench
//!   cgroup) connects to a loopback server that accepts and closes first.
//! * Configurations run interleaved, round after round (A B C ... A B C ...),
//!   and each round uses a fresh destination port, so conntrack TIME_WAIT
//!   entries of one round never block the SNAT range of the next (see
//!   [`nft`]). The report gives medians over rounds and ratios.
//! * Before timing, each configuration proves it works: the server must see
//!   origin ports in the configured range (ephemeral ports for "no hook").
//! * Then what a range carries and what a busy range costs ([`capacity`]):
//!   a 100-port range, the client closing first, 50 destinations and 1, for
//!   no hook, rulebpf with and without port sharing, and nft SNAT, each in a
//!   fresh network namespace; the connect cost with 90 % of a 1,000-port
//!   range held; the IPv6 connect rate against no hook.
//! * Last, what decision events cost ([`events`]), each piece of the hook
//!   on its own ([`pieces`]), in rounds of their own, and how often the
//!   port search without `bpf_loop` fails while a port is free
//!   ([`search`]).
//!
//! | module | its one job |
//! |---|---|
//! | this one | the run: attach cost per rule count, the rounds, then capacity and costs |
//! | [`capacity`] | the capacity scenario, the busy range, the IPv6 row (network namespaces) |
//! | [`config`] | the configurations, switching each on and off, the rule files |
//! | [`events`] | what decision events cost: compiled out, nobody listening, read, logged |
//! | [`bpf`] | pinned BPF objects: a program's run time (`kernel.bpf_stats_enabled`), a jump slot emptied |
//! | [`pieces`] | each piece of the hook on its own, IPv4 and IPv6, with the ns of each program |
//! | [`search`] | the bounded search (no `bpf_loop`) beside the search of every port, by occupancy |
//! | [`nft`] | the nft SNAT peer: its ruleset and why it is set up that way |
//! | [`server`] | the loopback server: a port-recording listener per destination port (and `bench-server`, in a namespace) |
//! | [`client`] | the client process inside the bench cgroup, and running it |
//! | [`report`] | medians and ratios, written as BENCHMARKS.json, .md and .svg |
//!
//! Addresses: the server listens on 127.0.0.2, ports 7400-7598 (a fresh one
//! per timed round) and 7599 (bulk). Origin ports come from the bench's slot
//! of the port table, [`ports::BENCH`] (24000-31999): below the ephemeral
//! range, so "no hook" is told apart by the port alone, and apart from the
//! ranges of the demo and the kernel tests, which CI runs just before.

mod bpf;
mod capacity;
pub mod client;
mod config;
mod events;
mod nft;
mod pieces;
mod report;
pub mod search;
pub mod server;

use std::{collections::BTreeMap, fs, net::Ipv4Addr, path::Path, time::Instant};

use anyhow::{Context as _, ensure};
use rulebpf_testkit::{
    PortSlot,
    listener::TAKE_TIMEOUT,
    ports::{self, OS_EPHEMERAL},
};

use self::{client::Client, config::Config, config::Rig, report::Report, server::Server};
use crate::{rulebpf::Rulebpf, target_dir, which};

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Destination ports: one fresh port per (round, configuration); bulk last.
const FIRST_PORT: u16 = 7400;
const BULK_PORT: u16 = 7599;
/// Origin range of the rules and of SNAT.
const ORIGIN: PortSlot = ports::BENCH;
/// The bench cgroup, directly under the cgroup2 root (nft's `level 1`).
const CGROUP: &str = "rulebpf-bench";
const RULE_COUNTS: [u32; 4] = [1, 1_000, 10_000, 100_000];
/// The paths of the allow-list row (its last rule denies every other one).
const ALLOW_LIST_PATHS: u32 = 1_000;
/// Connections per proof of a configuration.
const PROOF_CONNECTS: u32 = 50;

/// How much to measure.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub rounds: usize,
    pub connects: u32,
    pub bulk_bytes: u64,
    /// Each capacity run ([`capacity`]), and how many rounds of them.
    pub capacity_seconds: f64,
    pub capacity_rounds: usize,
    /// Rounds and connects per round of the busy-range and IPv6 rows.
    pub cost_rounds: usize,
    pub cost_connects: u32,
}

impl Size {
    pub const FULL: Self = Self {
        rounds: 7,
        connects: 4000,
        bulk_bytes: 2 << 30,
        capacity_seconds: 3.0,
        capacity_rounds: 3,
        cost_rounds: 7,
        cost_connects: 3000,
    };
    pub const SMOKE: Self = Self {
        rounds: 2,
        connects: 300,
        bulk_bytes: 64 << 20,
        capacity_seconds: 0.5,
        capacity_rounds: 1,
        cost_rounds: 1,
        cost_connects: 200,
    };

    pub const fn pick(smoke: bool) -> Self {
        if smoke { Self::SMOKE } else { Self::FULL }
    }
}

/// What the bench prints on stdout once the files are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// BENCHMARKS.md, then where the files went.
    Report,
    /// Only where the files went (CI: the figures of a smoke run mean nothing).
    Paths,
}

pub fn run(size: Size, out_dir: &Path, echo: Echo) -> anyhow::Result<()> {
    ensure!(
        which("nft").is_some(),
        "nft not found: apt-get install nftables"
    );
    fs::create_dir_all(out_dir)?;
    with_bench(|bench, _| bench.run_all(size).and_then(|r| r.write(out_dir, echo)))
}

/// The pieces section alone, printed as BENCHMARKS.md would show it.
pub fn run_pieces(rounds: usize, connects: u32, baseline: Option<&Path>) -> anyhow::Result<()> {
    let size = Size {
        cost_rounds: rounds,
        cost_connects: connects,
        ..Size::FULL
    };
    let pieces = with_bench(|bench, cgroup| {
        let baseline = baseline.map(|path| {
            Rig::new(
                Rulebpf::at(path.to_path_buf()),
                cgroup.to_path_buf(),
                target_dir().join("bench-rules"),
            )
        });
        pieces::measure_against(bench, size, baseline.as_ref())
    })?;
    print!(
        "{}",
        report::markdown::pieces_section(&serde_json::json!({ "pieces": pieces }))?
    );
    Ok(())
}

/// Runs `measure` with the bench's cgroup, rig, client and server, then
/// takes everything down, whatever `measure` answered.
fn with_bench<T>(measure: impl FnOnce(&Bench, &Path) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let rulebpf = Rulebpf::built()?;
    let cgroup = rulebpf.cgroup2_mount()?.join(CGROUP);
    fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let bench = Bench {
        // Generated rule files are inputs, not results: keep them out of the tree.
        rig: Rig::new(rulebpf, cgroup.clone(), target_dir().join("bench-rules")),
        client: Client::new(cgroup.clone()),
        server: Server::start()?,
    };
    let result = measure(&bench, &cgroup);
    bench.rig.all_off();
    let _ = fs::remove_dir(&cgroup);
    result
}

struct Bench {
    rig: Rig,
    client: Client,
    server: Server,
}

/// What one configuration measured, one value per counted round.
#[derive(Default)]
struct Measured {
    connects_per_sec: Vec<f64>,
    bulk_gbit: Vec<f64>,
}

impl Bench {
    fn run_all(&self, size: Size) -> anyhow::Result<Report> {
        let configs = Config::all();
        let attach = self.attach_costs()?;
        let measured = self.rounds(size, &configs)?;
        let capacity = capacity::capacity(
            &self.rig,
            &self.client,
            size.capacity_seconds,
            size.capacity_rounds,
        )?;
        let costs = capacity::costs(&self.rig, &self.client, size)?;
        let events = events::measure(self, size)?;
        let pieces = pieces::measure(self, size)?;
        let search = search::measure(self, size)?;
        Ok(Report::new(size, &configs, &measured, attach)
            .with(capacity, costs)
            .with_events(events)
            .with_pieces(pieces)
            .with_search(search))
    }

    /// Attach cost and footprint per rule count; writes the rule files the
    /// rounds attach later.
    fn attach_costs(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let mut attach = Vec::new();
        for &n in &RULE_COUNTS {
            let file = self.rig.write_rules(n)?;
            let start = Instant::now();
            let state = self.rig.attach(&file)?;
            let seconds = start.elapsed().as_secs_f64();
            attach.push(serde_json::json!({
                "rules": n,
                "attach_seconds": seconds,
                "map_memlock_bytes": state["map_memlock_bytes"],
                // What the verifier walked, per hook (the rule set's programs).
                "verified_insns": state["programs"]["connect4"]["verified_insns"],
                "verified_insns_connect6": state["programs"]["connect6"]["verified_insns"],
                "compile_seconds": state["summary"]["compile_seconds"],
            }));
            self.rig.detach();
            eprintln!("attach {n:>6} rules: {seconds:.3} s");
        }
        self.rig.write_allow_list(ALLOW_LIST_PATHS)?;
        Ok(attach)
    }

    /// Every configuration, round after round. Round 0 proves every
    /// configuration and warms caches up; it is not counted.
    fn rounds(&self, size: Size, configs: &[Config]) -> anyhow::Result<BTreeMap<usize, Measured>> {
        let mut measured: BTreeMap<usize, Measured> = BTreeMap::new();
        let mut port = FIRST_PORT;
        for round in 0..=size.rounds {
            for (i, config) in configs.iter().enumerate() {
                self.rig.on(config)?;
                let outcome = (|| {
                    if round == 0 {
                        self.prove(config, port)?;
                        port += 1;
                    }
                    let rate = self.connect_rate(port, size.connects)?;
                    port += 1;
                    let gbit = self.bulk(size.bulk_bytes)?;
                    anyhow::Ok((rate, gbit))
                })();
                self.rig.off(config);
                let (rate, gbit) = outcome.with_context(|| config.name())?;
                eprintln!(
                    "round {round} {:<20} {rate:>9.0} connects/s {gbit:>7.2} Gbit/s",
                    config.name()
                );
                if round > 0 {
                    let m = measured.entry(i).or_default();
                    m.connects_per_sec.push(rate);
                    m.bulk_gbit.push(gbit);
                }
                ensure!(port < BULK_PORT, "out of fresh destination ports");
            }
        }
        Ok(measured)
    }

    /// The server must see origin ports where the configuration puts them:
    /// in [`ORIGIN`] when hooked or translated, elsewhere (the OS's
    /// ephemeral ports) without a hook.
    fn prove(&self, config: &Config, port: u16) -> anyhow::Result<()> {
        let listener = self.server.at(port);
        listener.record(true);
        self.client.connects(port, PROOF_CONNECTS)?;
        // The client waited for each close, and the listener records before
        // it closes: every connection is already written down.
        let seen = listener.take_within(PROOF_CONNECTS as usize, TAKE_TIMEOUT);
        listener.record(false);
        let ok = match config {
            Config::NoHook => seen.iter().all(|&p| !ORIGIN.contains(p)),
            _ => seen.iter().all(|&p| ORIGIN.contains(p)),
        };
        ensure!(
            ok && seen.len() == PROOF_CONNECTS as usize,
            "{}: the server saw origin ports {:?}",
            config.name(),
            &seen[..seen.len().min(8)]
        );
        Ok(())
    }

    fn connect_rate(&self, port: u16, count: u32) -> anyhow::Result<f64> {
        let took = self.client.connects(port, count)?;
        Ok(f64::from(count) / took.as_secs_f64())
    }

    fn bulk(&self, bytes: u64) -> anyhow::Result<f64> {
        let took = self.client.bulk(BULK_PORT, bytes)?;
        Ok(bytes as f64 * 8.0 / took.as_secs_f64() / 1e9)
    }
}

/// The bench's origin range must never be where the OS picks ports: "no
/// hook" is proved by the ports falling outside it.
const _: () = assert!(!ORIGIN.overlaps(&OS_EPHEMERAL));
/// The capacity and cost ranges are the bench's too.
const _: () = {
    const fn inside(r: PortSlot) -> bool {
        ORIGIN.lo <= r.lo && r.hi <= ORIGIN.hi
    }
    assert!(inside(capacity::RANGE) && inside(capacity::WIDE) && inside(capacity::V6));
    assert!(inside(pieces::V4_RANGE) && inside(pieces::V6_RANGE));
};
