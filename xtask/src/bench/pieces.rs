//! Each piece of the hook on its own, for IPv4 and IPv6: what a connect
//! costs with nothing attached, with the instance's programs attached but
//! an empty jump slot (the tail call alone, and the bookkeeping programs),
//! with a rule set whose origin is 0 (the lookup only), with an origin
//! range without and with port sharing, and with decision events read.
//! Alternated round after round in a network namespace of their own (the
//! server closes first; TIME_WAIT stays there), connect rates paired per
//! round, and the kernel's run time of each program per connect
//! (`kernel.bpf_stats_enabled`): the entry program (covering the rule set
//! it tail-calls), `sockops` (every TCP callback of every socket of the
//! cgroup) and `sock_release`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rulebpf_testkit::PortSlot;
use serde_json::{Value, json};

use super::{
    Bench, Size,
    bpf::{Program, StatsOn, empty_jump_slot},
    capacity::{Netns, Server},
    config::Rig,
    report::median,
};

/// Origin ranges of the IPv4 and IPv6 rules (the bench's slot).
pub const V4_RANGE: PortSlot = PortSlot::new("bench pieces IPv4", 27000, 27999);
pub const V6_RANGE: PortSlot = PortSlot::new("bench pieces IPv6", 28000, 28999);
const V4_PORT: u16 = 7730;
const V6_PORT: u16 = 7731;

/// One piece, as the report names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    NoHook,
    TailCall,
    Lookup,
    Exclusive,
    Shared,
    SharedMany,
    Listened,
    /// Port sharing on, with the baseline binary (`bench-pieces` only).
    Baseline,
}

impl Piece {
    const ALL: [Self; 7] = [
        Self::NoHook,
        Self::TailCall,
        Self::Lookup,
        Self::Exclusive,
        Self::Shared,
        Self::SharedMany,
        Self::Listened,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::NoHook => "no hook",
            Self::TailCall => "entry, empty jump slot (tail call + bookkeeping)",
            Self::Lookup => "rule set, origin 0 (lookup only)",
            Self::Exclusive => "origin range, --port-sharing off",
            Self::Shared => "origin range, port sharing on",
            Self::SharedMany => "port sharing on, 100,000 rules before it",
            Self::Listened => "port sharing on, events read",
            Self::Baseline => "port sharing on, baseline binary",
        }
    }
}

/// The programs whose run time is read, by pin name (the entry program's
/// pin depends on the family).
const PROGRAMS: [&str; 3] = ["connect", "sock_ops", "sock_release"];

pub fn measure(bench: &Bench, size: Size) -> anyhow::Result<Value> {
    measure_against(bench, size, None)
}

/// [`measure`], plus "port sharing on" with another build of rulebpf
/// (`baseline`) alternated with the others in the same rounds: a change to
/// the hook measured against the code before it, in one run
/// (`xtask bench-pieces --baseline OLD_BINARY`).
pub fn measure_against(bench: &Bench, size: Size, baseline: Option<&Rig>) -> anyhow::Result<Value> {
    let pieces: Vec<Piece> = Piece::ALL
        .into_iter()
        .chain(baseline.map(|_| Piece::Baseline))
        .collect();
    let netns = Netns::fresh("pieces")?;
    let v4 = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    let _server = Server::start(&netns, &[(v4, V4_PORT), (v6, V6_PORT)], false)?;
    let client = bench.client.in_netns(&netns.0);
    let zero = bench.rig.write_file(
        "pieces-zero.ini",
        &format!("{v4} {V4_PORT} : 0\n{v6} {V6_PORT} : 0\n"),
    )?;
    let ranged = bench.rig.write_file(
        "pieces-range.ini",
        &format!("{v4} {V4_PORT} : {V4_RANGE}\n{v6} {V6_PORT} : {V6_RANGE}\n"),
    )?;
    let many = bench.rig.write_file(
        "pieces-range-many.ini",
        &format!(
            "{}{v4} {V4_PORT} : {V4_RANGE}\n{v6} {V6_PORT} : {V6_RANGE}\n",
            filler_rules(MANY_RULES)?
        ),
    )?;
    let _stats = StatsOn::new()?;
    // [piece][family]: rates per counted round; ns and runs per program.
    let families = [(v4, V4_PORT, "connect4"), (v6, V6_PORT, "connect6")];
    let mut rates = vec![vec![Vec::<f64>::new(); 2]; pieces.len()];
    let mut spent = vec![vec![[(0u64, 0u64); PROGRAMS.len()]; 2]; pieces.len()];
    let mut last = vec![[0.0; 2]; pieces.len()];
    for round in 0..=size.cost_rounds {
        for (p, &piece) in pieces.iter().enumerate() {
            let on = match piece {
                Piece::NoHook => Ok(()),
                Piece::TailCall => bench.rig.attach_with(&zero, &[]).map(drop).and_then(|()| {
                    empty_jump_slot(&bench.rig.pin("jump-connect4"))?;
                    empty_jump_slot(&bench.rig.pin("jump-connect6"))
                }),
                Piece::Lookup => bench.rig.attach_with(&zero, &[]).map(drop),
                Piece::Exclusive => bench
                    .rig
                    .attach_with(&ranged, &["--port-sharing", "off"])
                    .map(drop),
                Piece::Shared => bench.rig.attach_with(&ranged, &[]).map(drop),
                Piece::SharedMany => bench.rig.attach_with(&many, &[]).map(drop),
                Piece::Baseline => baseline
                    .expect("only with a baseline")
                    .attach_with(&ranged, &[])
                    .map(drop),
                Piece::Listened => bench
                    .rig
                    .attach_with(&ranged, &[])
                    .and_then(|_| bench.rig.events_reader()),
            };
            let measured = on.and_then(|()| {
                let mut out = Vec::new();
                for (f, &(ip, port, entry)) in families.iter().enumerate() {
                    let programs: Vec<Option<Program>> = PROGRAMS
                        .iter()
                        .map(|name| {
                            let pin = if *name == "connect" { entry } else { name };
                            (piece != Piece::NoHook)
                                .then(|| Program::open(&bench.rig.pin(pin)))
                                .transpose()
                        })
                        .collect::<anyhow::Result<_>>()?;
                    let before = counters(&programs)?;
                    let took = client.connects_to(ip, port, size.cost_connects, 0)?;
                    let after = counters(&programs)?;
                    let rate = f64::from(size.cost_connects) / took.as_secs_f64();
                    out.push((f, rate, before, after));
                }
                anyhow::Ok(out)
            });
            bench.rig.reader_off();
            bench.rig.detach();
            if let Some(baseline) = baseline {
                baseline.detach();
            }
            for (f, rate, before, after) in measured? {
                last[p][f] = rate;
                if round > 0 {
                    rates[p][f].push(rate);
                    for (k, (b, a)) in before.iter().zip(&after).enumerate() {
                        spent[p][f][k].0 += a.0 - b.0;
                        spent[p][f][k].1 += a.1 - b.1;
                    }
                }
            }
        }
        eprintln!(
            "round {round} pieces: {}",
            pieces
                .iter()
                .zip(&last)
                .map(|(piece, r)| format!("{} {:.0}/{:.0}", piece.name(), r[0], r[1]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let paired =
        |a: &[f64], b: &[f64]| median(&a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>());
    let connects = u64::from(size.cost_connects) * size.cost_rounds as u64;
    let rows: Vec<Value> = pieces
        .iter()
        .enumerate()
        .map(|(p, piece)| {
            let family = |f: usize| {
                let programs: serde_json::Map<String, Value> = PROGRAMS
                    .iter()
                    .zip(&spent[p][f])
                    .map(|(name, &(ns, runs))| {
                        (
                            (*name).to_string(),
                            json!({
                                "ns_per_connect": ns as f64 / connects.max(1) as f64,
                                "runs_per_connect": runs as f64 / connects.max(1) as f64,
                            }),
                        )
                    })
                    .collect();
                json!({
                    "connects_per_sec": median(&rates[p][f]),
                    "ratio_to_no_hook": paired(&rates[p][f], &rates[0][f]),
                    "connects_per_sec_rounds": rates[p][f],
                    "programs": programs,
                })
            };
            json!({ "piece": piece.name(), "ipv4": family(0), "ipv6": family(1) })
        })
        .collect();
    Ok(json!({
        "rounds": size.cost_rounds,
        "connects_per_round": size.cost_connects,
        "results": rows,
    }))
}

/// Rules before the measured ones in the [`Piece::SharedMany`] file.
const MANY_RULES: u32 = 100_000;

/// `n` rules that never match the measured destinations, half IPv4 and
/// half IPv6 (documentation prefixes), with their own ports and ranges:
/// both automata and the port tables grow as with a real file of `n` rules.
fn filler_rules(n: u32) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(n as usize * 40);
    for i in 0..n {
        let [_, b, c, d] = (i / 2).to_be_bytes();
        let (port, origin) = (1000 + i % 7, 40000 + i % 13);
        if i % 2 == 0 {
            writeln!(text, "10.{b}.{c}.{d} {port} : {origin}")?;
        } else {
            writeln!(text, "2001:db8::{b:x}:{c:x}:{d:x} {port} : {origin}")?;
        }
    }
    Ok(text)
}

/// `(run_time_ns, run_cnt)` of each program (zeros for none).
fn counters(programs: &[Option<Program>]) -> anyhow::Result<Vec<(u64, u64)>> {
    programs
        .iter()
        .map(|p| p.as_ref().map_or(Ok((0, 0)), Program::counters))
        .collect()
}
