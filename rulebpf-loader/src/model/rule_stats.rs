//! Per-rule counters and occupancy as the reports show them: the hook's
//! totals beside the rules they count (one [`RuleRow`] that `stats`,
//! `status` and the metrics render), the counters a rule keeps across a
//! rule-set swap ([`carry_over`]), and each rule's occupancy as its ports
//! tell it ([`by_ports`]). Pure: the kernel's maps are read by
//! `crate::kernel::counters`.

use std::collections::HashMap;

use rulebpf_common::{Occupancy, PortUse, RuleStats, TupleKey};
use rulebpf_rules::identity::RuleInfo;
use serde::Serialize;

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
    /// connect() calls refused because the rule says `deny`.
    pub denied: u64,
    /// The comment after the rule on its line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remark: Option<String>,
    /// Sockets bound under the rule and still open.
    pub in_use: u64,
    /// The most `in_use` has been since the instance was created.
    pub high_water: u64,
    /// Live sockets the hook bound under the rule (with port sharing, up
    /// to one per port and destination).
    pub sockets: u64,
    /// Ports in the rule's origin range (0: the OS chooses).
    pub ports: u32,
    /// The rule's identity across rule sets (`rulebpf_rules::identity`).
    #[serde(skip)]
    pub key: u64,
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
                denied: s.denied,
                remark: rule.remark.clone(),
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remark: Option<String>,
}

/// The rules of `rules` that bound a socket, busiest first.
pub fn occupied(rules: &[RuleInfo], occupancy: &HashMap<u64, Occupancy>) -> Vec<OccupancyRow> {
    let mut rows: Vec<OccupancyRow> = rules
        .iter()
        .filter_map(|rule| {
            let o = occupancy.get(&rule.key)?;
            Some(OccupancyRow {
                remark: rule.remark.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(line: u32, text: &str) -> RuleInfo {
        RuleInfo {
            line,
            text: text.into(),
            key: 0,
            ports: 0,
            deny: false,
            remark: None,
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
