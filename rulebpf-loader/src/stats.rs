//! Per-rule counters: the hook counts in a per-CPU array indexed by rule
//! (`RULEBPF_STATS`, layout in `rulebpf-common`). This module reads them from
//! the pinned map, carries them over to a new rule set (rules whose text did
//! not change keep counting from where they were), seeds them into a new
//! object, and gives `stats`, `status` and the metrics one typed row.
//!
//! A rule's identity across rule sets is its text and which occurrence of
//! that text it is (the n-th `* * : 42000-43000` of the file): the same
//! identity carries counters over, and, as a 64-bit [`rule_keys`], keys the
//! instance's occupancy map (`RULEBPF_OCCUPANCY`, ports in use and their
//! high-water mark), which the hook and the socket releases update under
//! that key whatever rule set is in force.

use std::{collections::HashMap, path::Path};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuValues};
use rulebpf_common::{Counter, Occupancy, PortUse, RuleStats, TupleKey};
use rulebpf_rules::{rule::Origin, ruleset::RuleSet};
use serde::Serialize;

use crate::{
    object::{ObjectError, RuleSetObject},
    securedir::SecureDir,
    state::RuleInfo,
};

/// One rule and its counters: what `rulebpf stats` prints and the metrics
/// export.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleRow {
    pub line: u32,
    pub text: String,
    /// connect() calls this rule decided.
    pub matched: u64,
    /// Sockets bound to an origin port of the rule's range.
    pub bound: u64,
    /// connect() calls for which no port of the range could be bound.
    pub exhausted: u64,
    /// Sockets the application had bound to a port it chose.
    pub app_chose: u64,
    /// Sockets bound before connect() to a port the kernel chose
    /// (`bind(addr, 0)`, or a UDP socket that sent before connecting).
    pub kernel_chose: u64,
    /// Sockets bound under the rule and still open.
    pub in_use: u64,
    /// The most `in_use` has been since the instance was created.
    pub high_water: u64,
    /// Live sockets the hook bound under the rule (with port sharing, up
    /// to one per port and destination).
    pub sockets: u64,
    /// Ports in the rule's origin range (0: the OS chooses).
    pub ports: u32,
    /// The rule's identity across rule sets ([`rule_keys`]).
    #[serde(skip)]
    pub key: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("reading the counters at {path}")]
    Read {
        path: String,
        #[source]
        source: MapError,
    },
    #[error("the number of CPUs: {0}")]
    Cpus(String),
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("seeding the counters")]
    Seed(#[source] MapError),
}

/// Per-rule totals (summed over CPUs) from the pinned stats map at `path`
/// (`shown` in messages), for the first `rule_count` rules.
pub fn read(path: &Path, shown: &Path, rule_count: usize) -> Result<Vec<RuleStats>, StatsError> {
    let error = read_error(shown);
    let stats: PerCpuArray<_, RuleStats> = open_per_cpu(path, shown)?;
    let count = u32::try_from(rule_count)
        .unwrap_or(u32::MAX)
        .min(stats.len());
    (0..count)
        .map(|i| {
            let per_cpu = stats.get(&i, 0).map_err(&error)?;
            Ok(per_cpu.iter().fold(RuleStats::default(), add))
        })
        .collect()
}

/// How a failed read of the map at `shown` is reported.
fn read_error(shown: &Path) -> impl Fn(MapError) -> StatsError + '_ {
    move |source| StatsError::Read {
        path: shown.display().to_string(),
        source,
    }
}

/// The pinned per-CPU array at `path` (`shown` in messages).
fn open_per_cpu<V: aya::Pod>(
    path: &Path,
    shown: &Path,
) -> Result<PerCpuArray<MapData, V>, StatsError> {
    let error = read_error(shown);
    let map = MapData::from_pin(path).map_err(&error)?;
    PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map)).map_err(error)
}

fn add(sum: RuleStats, s: &RuleStats) -> RuleStats {
    RuleStats {
        matched: sum.matched + s.matched,
        bound: sum.bound + s.bound,
        exhausted: sum.exhausted + s.exhausted,
        app_chose: sum.app_chose + s.app_chose,
        kernel_chose: sum.kernel_chose + s.kernel_chose,
    }
}

/// The rows of a rule set: its rules beside their totals and their
/// occupancy (by rule key; absent: nothing bound yet).
pub fn rows(
    rules: &[RuleInfo],
    totals: &[RuleStats],
    occupancy: &HashMap<u64, Occupancy>,
) -> Vec<RuleRow> {
    rules
        .iter()
        .zip(totals)
        .map(|(rule, s)| {
            let o = occupancy.get(&rule.key).copied().unwrap_or_default();
            RuleRow {
                line: rule.line,
                text: rule.text.clone(),
                matched: s.matched,
                bound: s.bound,
                exhausted: s.exhausted,
                app_chose: s.app_chose,
                kernel_chose: s.kernel_chose,
                in_use: below_zero_as_zero(o.in_use),
                high_water: o.high_water,
                sockets: below_zero_as_zero(o.sockets),
                ports: rule.ports,
                key: rule.key,
            }
        })
        .collect()
}

/// A count the kernel lowers with wrapping adds, read as 0 when it wrapped
/// below zero (a release the hook did not count for): never billions.
fn below_zero_as_zero(count: u64) -> u64 {
    if count > u64::from(u32::MAX) {
        0
    } else {
        count
    }
}

/// One rule's occupancy, for `status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OccupancyRow {
    pub line: u32,
    pub text: String,
    pub in_use: u64,
    pub high_water: u64,
    pub sockets: u64,
    pub ports: u32,
}

/// The rules of `rules` that bound a socket, busiest first.
pub fn occupied(rules: &[RuleInfo], occupancy: &HashMap<u64, Occupancy>) -> Vec<OccupancyRow> {
    let mut rows: Vec<OccupancyRow> = rules
        .iter()
        .filter_map(|rule| {
            let o = occupancy.get(&rule.key)?;
            Some(OccupancyRow {
                line: rule.line,
                text: rule.text.clone(),
                in_use: below_zero_as_zero(o.in_use),
                high_water: o.high_water,
                sockets: below_zero_as_zero(o.sockets),
                ports: rule.ports,
            })
        })
        .collect();
    rows.sort_by_key(|r| {
        (
            std::cmp::Reverse(r.in_use),
            std::cmp::Reverse(r.high_water),
            r.line,
        )
    });
    rows
}

/// The stable key of each rule: a 64-bit FNV-1a hash of its text and of
/// which occurrence of that text it is (0 for the first). The same rule
/// keeps its key in every rule set, so sockets bound under one set are
/// released against the same occupancy under the next.
pub fn rule_keys(texts: &[&str]) -> Vec<u64> {
    let mut seen: HashMap<&str, u64> = HashMap::new();
    texts
        .iter()
        .map(|text| {
            let occurrence = seen.entry(text).or_default();
            let key = fnv1a(text.as_bytes(), *occurrence);
            *occurrence += 1;
            key
        })
        .collect()
}

fn fnv1a(text: &[u8], occurrence: u64) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    text.iter()
        .chain(&[0xff])
        .chain(&occurrence.to_le_bytes())
        .fold(OFFSET, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        })
}

/// What a rule set's record keeps of each rule: line, text, key, range size.
pub fn rule_infos(set: &RuleSet) -> Vec<RuleInfo> {
    let texts: Vec<&str> = set.rules.iter().map(|r| r.text.as_str()).collect();
    set.rules
        .iter()
        .zip(rule_keys(&texts))
        .map(|(rule, key)| RuleInfo {
            line: rule.line,
            text: rule.text.clone(),
            key,
            ports: match rule.origin {
                Origin::Os => 0,
                Origin::Range(r) => u32::from(r.hi) - u32::from(r.lo) + 1,
            },
            origin: match rule.origin {
                Origin::Os => None,
                Origin::Range(r) => Some((r.lo, r.hi)),
            },
        })
        .collect()
}

/// The instance's occupancy map at `path` (`shown` in messages): every
/// rule that bound a socket, by key.
pub fn read_occupancy(path: &Path, shown: &Path) -> Result<HashMap<u64, Occupancy>, StatsError> {
    let error = read_error(shown);
    let map = MapData::from_pin(path).map_err(&error)?;
    let map: BpfHashMap<_, u64, Occupancy> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(map)).map_err(error)?;
    // An entry deleted during the walk ends it early: the rest reads as 0.
    Ok(map.iter().filter_map(Result::ok).collect())
}

/// Each rule's occupancy as its ports tell it, whatever rule bound them: a
/// port of the rule's range counts as in use when a live socket of the
/// instance holds it (`RULEBPF_PORT_USE`, under any rule key: a rule whose
/// text changed keeps its live sockets under its old key) or, with port
/// sharing, as many ports as are busy toward the busiest destination
/// (`RULEBPF_TUPLES`: a connection closing after its socket's release still
/// holds its tuple, and a destination is refused when all of its tuples are
/// busy). Rules whose ranges overlap count the same ports. The kernel's
/// per-key counts are a floor; the high-water mark follows.
pub fn by_ports(
    rules: &[RuleInfo],
    kernel: &HashMap<u64, Occupancy>,
    port_use: &[(PortUse, u64)],
    tuples: &[TupleKey],
) -> HashMap<u64, Occupancy> {
    use std::collections::{BTreeMap, BTreeSet, HashSet};
    // Once per call, by port: keys read from a map that changes meanwhile
    // may come twice.
    let with_socket: BTreeSet<u16> = port_use
        .iter()
        .filter(|(_, sockets)| *sockets > 0)
        .map(|(key, _)| key.port)
        .collect();
    let distinct: HashSet<&TupleKey> = tuples.iter().collect();
    let mut by_port: BTreeMap<u16, Vec<&TupleKey>> = BTreeMap::new();
    for t in distinct {
        by_port.entry(t.origin_port).or_default().push(t);
    }
    let mut out = kernel.clone();
    for rule in rules {
        let Some((lo, hi)) = rule.origin else {
            continue;
        };
        let sockets = with_socket.range(lo..=hi).count() as u64;
        let mut per_destination: HashMap<(u8, u8, u16, [u32; 4]), u64> = HashMap::new();
        for t in by_port.range(lo..=hi).flat_map(|(_, ts)| ts) {
            *per_destination
                .entry((t.family, t.protocol, t.dest_port, t.dest_addr))
                .or_default() += 1;
        }
        let busiest = per_destination.values().copied().max().unwrap_or(0);
        let entry = out.entry(rule.key).or_default();
        let in_use = below_zero_as_zero(entry.in_use)
            .max(sockets)
            .max(busiest)
            .min(u64::from(rule.ports));
        entry.in_use = in_use;
        entry.high_water = entry.high_water.max(in_use);
    }
    out
}

/// Every key of the pinned `RULEBPF_PORT_USE` with its sockets.
pub fn read_port_use(path: &Path, shown: &Path) -> Result<Vec<(PortUse, u64)>, StatsError> {
    let error = read_error(shown);
    let map = MapData::from_pin(path).map_err(&error)?;
    let map: BpfHashMap<_, PortUse, u64> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(map)).map_err(error)?;
    Ok(map.iter().filter_map(Result::ok).collect())
}

/// Every key of the pinned `RULEBPF_TUPLES` (the busy tuples).
pub fn read_tuples(path: &Path, shown: &Path) -> Result<Vec<TupleKey>, StatsError> {
    let error = read_error(shown);
    let map = MapData::from_pin(path).map_err(&error)?;
    let map: BpfHashMap<_, TupleKey, u64> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(map)).map_err(error)?;
    Ok(map.keys().filter_map(Result::ok).collect())
}

/// Forgets the occupancy of rules not among `rules` that hold no socket
/// (their high-water mark goes with them), in the instance pinned in
/// `instance`. Best effort: a leftover entry only costs a slot.
pub fn prune_occupancy(instance: &SecureDir, rules: &[RuleInfo]) {
    let name = rulebpf_common::shared_map_names::OCCUPANCY;
    let Ok(map) = MapData::from_pin(instance.fd_path(name)) else {
        return;
    };
    let Ok(mut map) = BpfHashMap::<_, u64, Occupancy>::try_from(aya::maps::Map::HashMap(map))
    else {
        return;
    };
    let keep: std::collections::HashSet<u64> = rules.iter().map(|r| r.key).collect();
    let stale: Vec<u64> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, o)| !keep.contains(key) && o.in_use == 0)
        .map(|(key, _)| key)
        .collect();
    for key in stale {
        let _ = map.remove(&key);
    }
}

/// The instance counters at `path` (`shown` in messages), summed over CPUs.
pub fn read_counters(path: &Path, shown: &Path) -> Result<Vec<(Counter, u64)>, StatsError> {
    let error = read_error(shown);
    let counters: PerCpuArray<_, u64> = open_per_cpu(path, shown)?;
    Counter::ALL
        .iter()
        .map(|&c| {
            let per_cpu = counters.get(&(c as u32), 0).map_err(&error)?;
            Ok((c, per_cpu.iter().sum()))
        })
        .collect()
}

/// The totals of the rule set in force (`previous` rules, `totals`)
/// re-indexed for the `next` rules: a rule keeps its counters when a rule
/// with the same text stays (the n-th occurrence of a text takes the n-th
/// one's counters). Returns `(index in next, totals)`.
pub fn carry_over(
    previous: &[RuleInfo],
    totals: Vec<RuleStats>,
    next: &[&str],
) -> Vec<(u32, RuleStats)> {
    let mut by_text: HashMap<&str, Vec<RuleStats>> = HashMap::new();
    for (rule, stats) in previous.iter().zip(totals).rev() {
        by_text.entry(rule.text.as_str()).or_default().push(stats);
    }
    next.iter()
        .enumerate()
        .filter_map(|(i, text)| Some((i as u32, by_text.get_mut(text)?.pop()?)))
        .collect()
}

/// Starts the counters of a freshly loaded object at `seeds`
/// (`(rule index, totals)`), before it is swapped in.
pub fn seed(object: &mut RuleSetObject, seeds: &[(u32, RuleStats)]) -> Result<(), StatsError> {
    let cpus =
        aya::util::nr_cpus().map_err(|(what, e)| StatsError::Cpus(format!("{what}: {e}")))?;
    let mut stats = object.stats_map()?;
    for &(index, totals) in seeds {
        // Totals on CPU 0: readers sum over CPUs anyway.
        let mut values = vec![RuleStats::default(); cpus.get() as usize];
        values[0] = totals;
        let values = PerCpuValues::try_from(values).map_err(|e| StatsError::Seed(e.into()))?;
        stats.set(index, values, 0).map_err(StatsError::Seed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(line: u32, text: &str) -> RuleInfo {
        RuleInfo {
            line,
            text: text.into(),
            key: 0,
            ports: 0,
            origin: None,
        }
    }

    fn counted(matched: u64) -> RuleStats {
        RuleStats {
            matched,
            ..RuleStats::default()
        }
    }

    #[test]
    fn counters_follow_the_rule_text_not_its_position() {
        let previous = [rule(1, "a"), rule(2, "b"), rule(3, "a")];
        let totals = vec![counted(1), counted(2), counted(3)];
        let seeds = carry_over(&previous, totals, &["b", "new", "a", "a", "a"]);
        // "b" moved to index 0; the two "a" keep their counters in order;
        // the third "a" and "new" start at zero.
        assert_eq!(seeds, [(0, counted(2)), (2, counted(1)), (3, counted(3))]);
    }

    #[test]
    fn a_rule_keeps_its_key_by_text_and_occurrence() {
        let before = rule_keys(&["a", "b", "a"]);
        let after = rule_keys(&["b", "new", "a", "a", "a"]);
        // Same identities as carry_over: "b", then the 1st and 2nd "a".
        assert_eq!(after[0], before[1]);
        assert_eq!(after[2], before[0]);
        assert_eq!(after[3], before[2]);
        let mut all = after.clone();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 5, "distinct rules, distinct keys");
        // Stable across builds and versions: a fixed function, not std's hasher.
        assert_eq!(rule_keys(&["a"]), [fnv1a(b"a", 0)]);
        assert_eq!(fnv1a(b"", 0), 0x2032_dd64_3620_252e);
    }

    #[test]
    fn occupancy_follows_the_ports_whatever_key_bound_them() {
        let mut r = rule(1, "10.0.0.1 22 : 100-109");
        r.key = 7;
        r.origin = Some((100, 109));
        r.ports = 10;
        // Live sockets under an old key (the rule's text changed).
        let port_use: Vec<(PortUse, u64)> = (100..104)
            .map(|port| {
                let key = PortUse {
                    rule_key: 99,
                    port,
                    pad: [0; 3],
                };
                (key, 1)
            })
            .collect();
        let got = by_ports(std::slice::from_ref(&r), &HashMap::new(), &port_use, &[]);
        assert_eq!(got[&7].in_use, 4);
        assert_eq!(got[&7].high_water, 4);

        // Busy tuples after their sockets' release: the busiest destination
        // counts; ports outside the range and other destinations do not add.
        let tuple = |port: u16, dest: u32| TupleKey {
            family: 4,
            protocol: 6,
            origin_port: port,
            dest_port: 22,
            pad: 0,
            dest_addr: [dest, 0, 0, 0],
        };
        let mut tuples: Vec<TupleKey> = (100..110).map(|p| tuple(p, 1)).collect();
        tuples.extend((100..103).map(|p| tuple(p, 2)));
        tuples.push(tuple(200, 1));
        // Read twice (a map walk that restarted): counted once.
        tuples.extend((100..110).map(|p| tuple(p, 1)));
        let kernel = HashMap::from([(
            7,
            Occupancy {
                in_use: 1,
                high_water: 12,
                sockets: 1,
            },
        )]);
        let got = by_ports(std::slice::from_ref(&r), &kernel, &[], &tuples);
        assert_eq!(got[&7].in_use, 10);
        assert_eq!(got[&7].high_water, 12);
    }
}
