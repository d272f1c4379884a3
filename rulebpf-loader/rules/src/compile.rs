//! Ordered rules -> the lookup structures the hooks walk (layout documented
//! in `rulebpf-common`): one automaton per [`Selector`] (address family x
//! protocol) over the destination's octets, then a port-interval table per
//! address class.
//!
//! # How first match and negation become a fixed-cost lookup
//!
//! For one selector, only the rules for its protocol and address family take
//! part (a name's addresses of that family; a negated rule is negated within
//! its family and protocol, never across). Each rule's address is a list of
//! *alternatives* (one pattern, or one per resolved address of a DNS name). A
//! **state** of the automaton is the ordered list of alternatives that still
//! agree with the octets read so far, plus the earliest rule already known to
//! match whatever comes next (the *terminal*): a non-negated rule whose port
//! set is `*` once the rest of its pattern is all `*`, or a negated rule once
//! none of its alternatives survive. Nothing after the terminal can ever
//! decide, so it is cut off; this is what keeps the states small. Equal states
//! are shared (hash-consed), and at the end states with identical transitions
//! are merged level by level (minimisation).
//!
//! After the last octet, the surviving rules all match the address; the
//! first-match answer as a function of the port is a list of disjoint
//! intervals, painted by walking those rules in order. Identical tables are
//! shared, across selectors too.
//!
//! [`Compiled::lookup`] evaluates the result exactly as the kernel does, and the
//! property tests check it against [`crate::grammar::first_match`].

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
};

use rulebpf_common::{DFA_DEAD, DfaEdge, PORT_KEY_BITS, PortKey, SELECTORS, Selector, Verdict};

use crate::grammar::{AddrPattern, Dest, Origin, PortRange, Rule, canonical, octets_of};

/// Addresses of the DNS names the rules use (IPv4 and IPv6); a name absent
/// here (or with no address) matches nothing.
pub type Names = HashMap<String, Vec<IpAddr>>;

/// The addresses of `name`, or `None` when it has none: such a name is
/// unresolved, and its rule is left out (the compiler and the reference
/// first match agree on this through this one function).
pub fn addresses<'a>(names: &'a Names, name: &str) -> Option<&'a [IpAddr]> {
    names.get(name).map(Vec::as_slice).filter(|a| !a.is_empty())
}

/// The compiled rule set, ready to be written into the maps.
#[derive(Debug)]
pub struct Compiled {
    /// `RULEBPF_ROOTS`: the start state per [`Selector`], or `DFA_DEAD`.
    pub roots: [u32; SELECTORS as usize],
    /// `RULEBPF_DFA_EDGES`: transitions that differ from the state's default.
    pub edges: HashMap<DfaEdge, u32>,
    /// `RULEBPF_DFA_DEFAULT`, indexed by state.
    pub defaults: Vec<u32>,
    /// `RULEBPF_PORTS`: `(prefix length, key) -> verdict`, disjoint prefixes.
    pub ports: HashMap<(u32, PortKey), Verdict>,
    /// Number of rules in the input: the size of the per-rule maps.
    pub rule_count: u32,
    /// Indexes of rules left out because their DNS name has no address.
    pub unresolved: Vec<usize>,
    /// Number of distinct port tables.
    pub tables: u32,
}

impl Default for Compiled {
    fn default() -> Self {
        Self {
            roots: [DFA_DEAD; SELECTORS as usize],
            edges: HashMap::new(),
            defaults: Vec::new(),
            ports: HashMap::new(),
            rule_count: 0,
            unresolved: Vec::new(),
            tables: 0,
        }
    }
}

/// The rule set is too large or too tangled for the limits below.
#[derive(Debug, PartialEq, Eq)]
pub struct CompileError(pub String);

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CompileError {}

/// Upper bound on automaton states and on entries stored in them, so that a
/// pathological file fails with a message instead of eating the machine.
const MAX_STATES: usize = 4_000_000;
const MAX_STATE_ENTRIES: usize = 200_000_000;

impl Compiled {
    /// The decision for a connect() to `addr:port` on a TCP (or, with `udp`,
    /// a UDP) socket, computed exactly as the hook computes it.
    pub fn lookup(&self, udp: bool, addr: IpAddr, port: u16) -> Option<Verdict> {
        let addr = canonical(addr);
        let mut state = self.roots[Selector::new(addr.is_ipv6(), udp) as usize];
        if state == DFA_DEAD {
            return None;
        }
        for octet in octets_of(addr) {
            let edge = DfaEdge {
                state,
                octet: octet.into(),
            };
            state = match self.edges.get(&edge) {
                Some(&next) => next,
                None => *self.defaults.get(state as usize)?,
            };
            if state == DFA_DEAD {
                return None;
            }
        }
        // Longest prefix first, as the LPM trie does.
        (32..=PORT_KEY_BITS).rev().find_map(|len| {
            let host_bits = PORT_KEY_BITS - len;
            let masked = if host_bits == 16 {
                0
            } else {
                port & (u16::MAX << host_bits)
            };
            self.ports.get(&(len, PortKey::new(state, masked))).copied()
        })
    }

    /// Numbers the states of one automaton after those already here and
    /// writes its transitions; returns its root (or `DFA_DEAD`).
    fn append(&mut self, levels: &[Vec<Transitions>]) -> u32 {
        if levels[0].is_empty() {
            return DFA_DEAD;
        }
        let root = self.defaults.len() as u32;
        let last = levels.len() - 1;
        let mut offset = root;
        for (k, level) in levels.iter().enumerate() {
            let next_offset = offset + level.len() as u32;
            let global = |target: Target| {
                if target == DFA_DEAD || k == last {
                    target // dead, or a table id after the last octet
                } else {
                    target + next_offset
                }
            };
            for (local, t) in level.iter().enumerate() {
                let state = offset + local as u32;
                self.defaults.push(global(t.default));
                for &(octet, target) in &t.edges {
                    let edge = DfaEdge {
                        state,
                        octet: octet.into(),
                    };
                    self.edges.insert(edge, global(target));
                }
            }
            offset = next_offset;
        }
        root
    }
}

/// Per-rule facts the automaton needs, indexed like the rule list.
struct RuleFacts {
    line: u32,
    negated: bool,
    /// Every port is a destination port of the rule.
    ports_any: bool,
    /// The ports for which the rule matches once its address did: its port
    /// set, or for a negated rule the ports outside it.
    claims: Vec<PortRange>,
    origin: Origin,
}

/// One address alternative of one rule.
struct Entry {
    rule: u32,
    pattern: AddrPattern,
    /// Smallest `k` such that octets `k..` are all `*`.
    wild_from: usize,
}

/// A state: surviving entry ids (ascending = rule order) and the terminal rule.
#[derive(Clone, PartialEq, Eq, Hash)]
struct StateKey {
    entries: Vec<u32>,
    terminal: u32,
}

const NO_TERMINAL: u32 = u32::MAX;

/// A transition target inside the construction: a state index in the next
/// level, or dead.
type Target = u32;

/// One state's transitions: the default and the octets that differ from it.
struct Transitions {
    default: Target,
    edges: Vec<(u8, Target)>,
}

/// A port table: `(first port, last port, rule)`, sorted and disjoint.
type PortTable = Vec<(u16, u16, u32)>;

/// Port tables shared by every automaton, numbered in creation order.
#[derive(Default)]
struct Tables {
    index: HashMap<PortTable, u32>,
    list: Vec<PortTable>,
}

impl Tables {
    fn intern(&mut self, table: PortTable) -> u32 {
        if table.is_empty() {
            return DFA_DEAD;
        }
        *self.index.entry(table.clone()).or_insert_with(|| {
            self.list.push(table);
            self.list.len() as u32 - 1
        })
    }
}

/// What every automaton together may still use.
struct Limits {
    states: usize,
    entries: usize,
}

/// Compiles `rules` (file order) with `names` resolving their DNS names.
pub fn compile(rules: &[Rule], names: &Names) -> Result<Compiled, CompileError> {
    let rule_count = u32::try_from(rules.len())
        .map_err(|_| CompileError(format!("too many rules: {}", rules.len())))?;
    let facts: Vec<RuleFacts> = rules
        .iter()
        .map(|r| RuleFacts {
            line: r.line,
            negated: r.negated,
            ports_any: r.dest_ports.is_any(),
            claims: if r.negated {
                r.dest_ports.complement()
            } else {
                r.dest_ports.normalized()
            },
            origin: r.origin,
        })
        .collect();
    let unresolved: Vec<usize> = rules
        .iter()
        .enumerate()
        .filter(|(_, r)| match &r.dest {
            Dest::Name(name) => addresses(names, name).is_none(),
            Dest::Pattern(_) => false,
        })
        .map(|(i, _)| i)
        .collect();
    let mut compiled = Compiled {
        rule_count,
        unresolved,
        ..Compiled::default()
    };
    let mut tables = Tables::default();
    let mut limits = Limits {
        states: MAX_STATES,
        entries: MAX_STATE_ENTRIES,
    };
    for selector in Selector::ALL {
        let (entries, terminal) = alternatives(rules, names, selector);
        let levels = Builder {
            facts: &facts,
            entries: &entries,
            limits: &mut limits,
        }
        .build(selector.width(), terminal, &mut tables)?;
        compiled.roots[selector as usize] = compiled.append(&levels);
    }
    compiled.tables = tables.list.len() as u32;
    for (table, intervals) in tables.list.iter().enumerate() {
        for &(lo, hi, rule) in intervals {
            let verdict = verdict(&facts[rule as usize], rule);
            for (start, len) in port_prefixes(lo, hi) {
                compiled
                    .ports
                    .insert((len, PortKey::new(table as u32, start)), verdict);
            }
        }
    }
    Ok(compiled)
}

/// The address alternatives of the rules taking part in `selector`'s
/// automaton, and the first rule that matches every destination of it
/// outright (a negated name without an address of this family), if any.
fn alternatives(rules: &[Rule], names: &Names, selector: Selector) -> (Vec<Entry>, u32) {
    let ipv6 = selector.is_ipv6();
    let mut entries = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        if !rule.protocols.covers(selector.is_udp()) || !rule.covers_family(ipv6) {
            continue;
        }
        let patterns: Vec<AddrPattern> = match &rule.dest {
            Dest::Pattern(p) => vec![*p],
            Dest::Name(name) => {
                let Some(addrs) = addresses(names, name) else {
                    continue; // unresolved: left out (reported by the caller)
                };
                addrs
                    .iter()
                    .map(|&a| AddrPattern::exact(a))
                    .filter(|p| p.is_ipv6() == ipv6)
                    .collect()
            }
        };
        if patterns.is_empty() && rule.negated {
            // No address of this family is the name's: every destination
            // is outside it, so the rule decides everything from here on.
            return (entries, index as u32);
        }
        for pattern in patterns {
            let octets = pattern.octets();
            let wild_from = octets.len() - octets.iter().rev().take_while(|o| o.is_any()).count();
            entries.push(Entry {
                rule: index as u32,
                pattern,
                wild_from,
            });
        }
    }
    (entries, NO_TERMINAL)
}

fn verdict(facts: &RuleFacts, rule: u32) -> Verdict {
    let (org_lo, org_hi) = match facts.origin {
        Origin::Os => (0, 0),
        Origin::Range(range) => (range.lo, range.hi),
    };
    Verdict {
        rule,
        line: facts.line,
        org_lo,
        org_hi,
    }
}

struct Builder<'a> {
    facts: &'a [RuleFacts],
    entries: &'a [Entry],
    limits: &'a mut Limits,
}

impl Builder<'_> {
    /// The minimised automaton over `width` octets, level by level; level 0
    /// holds the root (or nothing when no destination can match). The last
    /// level's targets are ids in `tables`.
    fn build(
        mut self,
        width: usize,
        terminal: u32,
        tables: &mut Tables,
    ) -> Result<Vec<Vec<Transitions>>, CompileError> {
        let all: Vec<u32> = (0..self.entries.len() as u32).collect();
        let root = self.settle(all, terminal, 0);
        let mut level_states = vec![root];
        let mut levels: Vec<Vec<Transitions>> = Vec::new();
        for k in 0..width {
            let mut next_index: HashMap<StateKey, u32> = HashMap::new();
            let mut next_states: Vec<StateKey> = Vec::new();
            let mut transitions = Vec::with_capacity(level_states.len());
            for state in &level_states {
                transitions.push(self.step(state, k, &mut next_index, &mut next_states)?);
            }
            self.limits.states = self
                .limits
                .states
                .checked_sub(next_states.len())
                .ok_or_else(|| {
                    CompileError(format!(
                        "rule set too complex: more than {MAX_STATES} automaton states"
                    ))
                })?;
            levels.push(transitions);
            level_states = next_states;
        }

        // After the last octet each surviving state becomes a port table.
        let mut below: Vec<u32> = level_states
            .iter()
            .map(|state| tables.intern(self.port_table(state)))
            .collect();

        // Minimise bottom-up: states with equal transitions are one state.
        let mut canonical_levels: Vec<Vec<Transitions>> = Vec::new();
        for transitions in levels.into_iter().rev() {
            let mut index: HashMap<(Target, Vec<(u8, Target)>), u32> = HashMap::new();
            let mut canonical: Vec<Transitions> = Vec::new();
            let mut map = Vec::with_capacity(transitions.len());
            for t in transitions {
                let resolve = |target: Target| {
                    if target == DFA_DEAD {
                        DFA_DEAD
                    } else {
                        below[target as usize]
                    }
                };
                let default = resolve(t.default);
                let mut edges: Vec<(u8, Target)> = t
                    .edges
                    .iter()
                    .map(|&(octet, target)| (octet, resolve(target)))
                    .filter(|&(_, target)| target != default)
                    .collect();
                edges.sort_unstable();
                if default == DFA_DEAD && edges.is_empty() {
                    map.push(DFA_DEAD);
                    continue;
                }
                let id = *index.entry((default, edges.clone())).or_insert_with(|| {
                    canonical.push(Transitions { default, edges });
                    canonical.len() as u32 - 1
                });
                map.push(id);
            }
            canonical_levels.push(canonical);
            below = map;
        }
        canonical_levels.reverse();
        Ok(canonical_levels)
    }

    /// Transitions of `state` on octet position `k`.
    fn step(
        &mut self,
        state: &StateKey,
        k: usize,
        next_index: &mut HashMap<StateKey, u32>,
        next_states: &mut Vec<StateKey>,
    ) -> Result<Transitions, CompileError> {
        let mut wild = Vec::new();
        let mut buckets: BTreeMap<u8, Vec<u32>> = BTreeMap::new();
        for &id in &state.entries {
            let range = self.entries[id as usize].pattern.octets()[k];
            if range.is_any() {
                wild.push(id);
            } else {
                for v in range.lo..=range.hi {
                    buckets.entry(v).or_default().push(id);
                }
            }
        }
        // Negated rules with no `*` alternative at this octet: an octet none of
        // their alternatives covers makes them match unconditionally.
        let fragile: Vec<u32> = self.fragile_negated(&state.entries, k);

        let mut intern = |this: &mut Self, key: StateKey| -> Result<Target, CompileError> {
            if key.entries.is_empty() && key.terminal == NO_TERMINAL {
                return Ok(DFA_DEAD);
            }
            this.limits.entries = this
                .limits
                .entries
                .checked_sub(key.entries.len())
                .ok_or_else(|| {
                    CompileError(format!(
                        "rule set too complex: automaton would hold more than \
                         {MAX_STATE_ENTRIES} rule references"
                    ))
                })?;
            Ok(*next_index.entry(key).or_insert_with_key(|key| {
                next_states.push(key.clone());
                next_states.len() as u32 - 1
            }))
        };
        let default_terminal = state
            .terminal
            .min(fragile.first().copied().unwrap_or(NO_TERMINAL));
        let default_key = self.settle(wild.clone(), default_terminal, k + 1);
        let default = intern(self, default_key)?;

        let mut edges = Vec::new();
        for (octet, bucket) in buckets {
            let covered_rules: Vec<u32> = bucket
                .iter()
                .map(|&id| self.entries[id as usize].rule)
                .collect();
            let died = fragile
                .iter()
                .copied()
                .find(|r| covered_rules.binary_search(r).is_err())
                .unwrap_or(NO_TERMINAL);
            let merged = merge_sorted(&bucket, &wild);
            let key = self.settle(merged, state.terminal.min(died), k + 1);
            let target = intern(self, key)?;
            if target != default {
                edges.push((octet, target));
            }
        }
        Ok(Transitions { default, edges })
    }

    /// Rules (ascending) that are negated and have entries in `entries`, none
    /// of which is `*` at octet `k`.
    fn fragile_negated(&self, entries: &[u32], k: usize) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        let mut has_wild: Vec<u32> = Vec::new();
        for &id in entries {
            let entry = &self.entries[id as usize];
            if !self.facts[entry.rule as usize].negated {
                continue;
            }
            if entry.pattern.octets()[k].is_any() {
                has_wild.push(entry.rule);
            } else if out.last() != Some(&entry.rule) {
                out.push(entry.rule);
            }
        }
        out.retain(|r| has_wild.binary_search(r).is_err());
        out
    }

    /// Applies the terminal cut after `consumed` octets have been read.
    fn settle(&self, mut entries: Vec<u32>, terminal: u32, consumed: usize) -> StateKey {
        let mut terminal = terminal;
        for &id in &entries {
            let entry = &self.entries[id as usize];
            if entry.rule >= terminal {
                break;
            }
            let facts = &self.facts[entry.rule as usize];
            if !facts.negated && facts.ports_any && entry.wild_from <= consumed {
                terminal = entry.rule;
                break;
            }
        }
        entries.retain(|&id| self.entries[id as usize].rule < terminal);
        StateKey { entries, terminal }
    }

    /// First-match port intervals for a state after the last octet: every
    /// surviving entry's rule matches the address.
    fn port_table(&self, state: &StateKey) -> PortTable {
        let mut paint = Painter::new();
        let mut last_rule = None;
        for &id in &state.entries {
            let rule = self.entries[id as usize].rule;
            if last_rule == Some(rule) {
                continue;
            }
            last_rule = Some(rule);
            for range in &self.facts[rule as usize].claims {
                paint.fill(range.lo, range.hi, rule);
            }
            if paint.is_full() {
                return paint.into_intervals();
            }
        }
        if state.terminal != NO_TERMINAL {
            paint.fill(0, u16::MAX, state.terminal);
        }
        paint.into_intervals()
    }
}

/// Assigns each port to the first rule that claims it.
struct Painter {
    /// Unclaimed intervals, `lo -> hi`.
    free: BTreeMap<u16, u16>,
    claimed: Vec<(u16, u16, u32)>,
}

impl Painter {
    fn new() -> Self {
        Self {
            free: BTreeMap::from([(0, u16::MAX)]),
            claimed: Vec::new(),
        }
    }

    fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    fn fill(&mut self, lo: u16, hi: u16, rule: u32) {
        // Free intervals overlapping [lo, hi]: the one starting at or before lo,
        // and every one starting inside.
        let first = self
            .free
            .range(..=lo)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(lo);
        let overlapping: Vec<(u16, u16)> = self
            .free
            .range(first..=hi)
            .map(|(&s, &e)| (s, e))
            .filter(|&(_, e)| e >= lo)
            .collect();
        for (s, e) in overlapping {
            self.free.remove(&s);
            let (a, b) = (s.max(lo), e.min(hi));
            self.claimed.push((a, b, rule));
            if s < a {
                self.free.insert(s, a - 1);
            }
            if e > b {
                self.free.insert(b + 1, e);
            }
        }
    }

    /// Claimed intervals sorted, with adjacent ones of the same rule merged.
    fn into_intervals(mut self) -> Vec<(u16, u16, u32)> {
        self.claimed.sort_unstable();
        let mut out: Vec<(u16, u16, u32)> = Vec::with_capacity(self.claimed.len());
        for (lo, hi, rule) in self.claimed {
            match out.last_mut() {
                Some(last) if last.2 == rule && u32::from(last.1) + 1 == u32::from(lo) => {
                    last.1 = hi
                }
                _ => out.push((lo, hi, rule)),
            }
        }
        out
    }
}

/// `[lo, hi]` as the fewest aligned blocks: `(first port, LPM prefix length)`.
fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        // Largest power-of-two block aligned at `lo` that fits.
        let mut bits = if lo == 0 {
            16
        } else {
            lo.trailing_zeros().min(16)
        };
        while lo + (1 << bits) - 1 > hi {
            bits -= 1;
        }
        out.push((lo as u16, PORT_KEY_BITS - bits));
        lo += 1 << bits;
    }
    out
}

fn merge_sorted(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i] < b[j] {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        path::Path,
    };

    use proptest::prelude::*;

    use super::*;
    use crate::{
        resolve::NameFailure,
        grammar::{OctetRange, PortSet, Protocols, parse},
        ruleset::RuleSet,
    };

    fn build(text: &str, names: &[(&str, &[&str])]) -> RuleSet {
        let rules = parse(text).unwrap();
        let names = names
            .iter()
            .map(|(n, a)| {
                (
                    n.to_string(),
                    a.iter().map(|a| a.parse().unwrap()).collect(),
                )
            })
            .collect();
        RuleSet::from_parts(Path::new("t.ini"), rules, names, vec![]).unwrap()
    }

    /// The compiled answer for a TCP connect as `(line, origin)`, checked
    /// against first match.
    fn decide(set: &RuleSet, ip: [u8; 4], port: u16) -> Option<(u32, u16, u16)> {
        decide_at(set, false, &Ipv4Addr::from(ip).to_string(), port)
    }

    fn decide_at(set: &RuleSet, udp: bool, ip: &str, port: u16) -> Option<(u32, u16, u16)> {
        let addr: IpAddr = ip.parse().unwrap();
        let got = set.compiled.lookup(udp, addr, port);
        let want = set.first_match(udp, addr, port);
        assert_eq!(got.map(|v| v.rule as usize), want, "{ip}:{port} udp={udp}");
        got.map(|v| (set.rules[v.rule as usize].line, v.org_lo, v.org_hi))
    }

    #[test]
    fn seed_examples() {
        let set = build(
            "! 10.*.*.*  *:  42000-43000\n10.*.*.*  *:  64000-64100\n",
            &[],
        );
        assert_eq!(decide(&set, [8, 8, 8, 8], 443), Some((1, 42000, 43000)));
        assert_eq!(decide(&set, [10, 1, 2, 3], 21), Some((2, 64000, 64100)));
    }

    #[test]
    fn first_match_wins_and_zero_means_os() {
        let set = build("10.1.1.1 21 : 0\n10.*.*.* * : 5000-5009\n", &[]);
        assert_eq!(decide(&set, [10, 1, 1, 1], 21), Some((1, 0, 0)));
        assert_eq!(decide(&set, [10, 1, 1, 1], 22), Some((2, 5000, 5009)));
        assert_eq!(decide(&set, [11, 1, 1, 1], 22), None);
    }

    #[test]
    fn negation_covers_the_port_part() {
        let set = build("! 127.0.0.2 7000-7009 : 6000\n", &[]);
        assert_eq!(decide(&set, [127, 0, 0, 2], 7005), None);
        assert_eq!(decide(&set, [127, 0, 0, 2], 7010), Some((1, 6000, 6000)));
        assert_eq!(decide(&set, [127, 0, 0, 3], 7005), Some((1, 6000, 6000)));
    }

    #[test]
    fn middle_wildcards() {
        let set = build("10.*.5.* 80 : 1000\n*.*.*.9 * : 2000\n", &[]);
        assert_eq!(decide(&set, [10, 77, 5, 1], 80), Some((1, 1000, 1000)));
        assert_eq!(decide(&set, [10, 77, 6, 9], 80), Some((2, 2000, 2000)));
        assert_eq!(decide(&set, [10, 77, 5, 9], 81), Some((2, 2000, 2000)));
        assert_eq!(decide(&set, [10, 77, 6, 8], 80), None);
    }

    #[test]
    fn names_cover_every_address_and_unresolved_names_match_nothing() {
        let set = build(
            "gw.example * : 3000\n! gone.example * : 4000\n",
            &[("gw.example", &["192.0.2.1", "192.0.2.7"])],
        );
        assert_eq!(decide(&set, [192, 0, 2, 7], 1), Some((1, 3000, 3000)));
        assert_eq!(decide(&set, [192, 0, 2, 1], 1), Some((1, 3000, 3000)));
        assert_eq!(decide(&set, [192, 0, 2, 2], 1), None);
        assert_eq!(set.compiled.unresolved, vec![1]);
    }

    #[test]
    fn empty_rule_set_matches_nothing() {
        let set = build("# nothing\n", &[]);
        assert_eq!(decide(&set, [1, 2, 3, 4], 5), None);
        assert_eq!(set.compiled.roots, [DFA_DEAD; 4]);
        assert!(set.compiled.defaults.is_empty());
    }

    #[test]
    fn port_prefixes_tile_the_interval() {
        for (lo, hi) in [(0, 65535), (0, 0), (65535, 65535), (2200, 2300), (1, 65534)] {
            let blocks = port_prefixes(lo, hi);
            let mut next = u32::from(lo);
            for (start, len) in blocks {
                assert_eq!(u32::from(start), next);
                let size = 1u32 << (PORT_KEY_BITS - len);
                assert_eq!(u32::from(start) % size, 0, "aligned");
                next += size;
            }
            assert_eq!(next, u32::from(hi) + 1);
        }
    }

    #[test]
    fn hundred_thousand_rules_compile_quickly() {
        let mut text = String::new();
        for i in 0..100_000u32 {
            let [_, b, c, d] = i.to_be_bytes();
            text.push_str(&format!(
                "10.{b}.{c}.{d} {} : {}\n",
                1000 + i % 7,
                40000 + i % 13
            ));
        }
        text.push_str("127.0.0.2 * : 7000-7099\n");
        let start = std::time::Instant::now();
        let set = build(&text, &[]);
        let took = start.elapsed();
        eprintln!(
            "100k rules: {took:?}, {} states, {} edges",
            set.compiled.defaults.len(),
            set.compiled.edges.len()
        );
        assert_eq!(decide(&set, [127, 0, 0, 2], 9), Some((100_001, 7000, 7099)));
        // The last 10/8 rule: i = 99_999 = 0x01869F, on line 100_000.
        let (port, org) = ((1000 + 99_999 % 7) as u16, (40000 + 99_999 % 13) as u16);
        assert_eq!(
            decide(&set, [10, 1, 134, 159], port),
            Some((100_000, org, org))
        );
        assert_eq!(decide(&set, [10, 1, 134, 159], port + 1), None);
    }

    #[test]
    fn families_and_protocols_are_separate() {
        let set = build(
            "! 10.*.*.* * : 100\n2001:db8::/32 443 : 200 tcp+udp\n\
             10.0.0.0/8 53 : 300 udp\n10.1.1.3 389,636,3268-3269 : 400\n",
            &[],
        );
        // A negated IPv4 rule says nothing about IPv6 or UDP.
        assert_eq!(decide_at(&set, false, "2001:db9::1", 443), None);
        assert_eq!(decide_at(&set, true, "8.8.8.8", 53), None);
        assert_eq!(decide_at(&set, false, "8.8.8.8", 53), Some((1, 100, 100)));
        assert_eq!(
            decide_at(&set, false, "2001:db8::1", 443),
            Some((2, 200, 200))
        );
        assert_eq!(
            decide_at(&set, true, "2001:db8:1::", 443),
            Some((2, 200, 200))
        );
        assert_eq!(decide_at(&set, true, "10.9.9.9", 53), Some((3, 300, 300)));
        assert_eq!(decide_at(&set, false, "10.9.9.9", 53), None);
        // v4-mapped destinations are IPv4 ones.
        assert_eq!(
            decide_at(&set, false, "::ffff:8.8.8.8", 1),
            Some((1, 100, 100))
        );
        assert_eq!(
            decide_at(&set, true, "::ffff:10.0.0.1", 53),
            Some((3, 300, 300))
        );
        // Port lists: the listed ports go to line 4; no rule has the others.
        for (port, line) in [(389, 4), (636, 4), (3268, 4), (3269, 4)] {
            assert_eq!(
                decide_at(&set, false, "10.1.1.3", port).map(|g| g.0),
                Some(line)
            );
        }
        for port in [388, 390, 637, 3267, 3270] {
            assert_eq!(decide_at(&set, false, "10.1.1.3", port), None, "{port}");
        }
    }

    #[test]
    fn names_cover_both_families() {
        let set = build(
            "gw.example * : 3000 tcp+udp\n! v4only.example * : 4000\n",
            &[
                ("gw.example", &["192.0.2.1", "2001:db8::7"]),
                ("v4only.example", &["192.0.2.9"]),
            ],
        );
        assert_eq!(
            decide_at(&set, false, "192.0.2.1", 1),
            Some((1, 3000, 3000))
        );
        assert_eq!(
            decide_at(&set, true, "2001:db8::7", 1),
            Some((1, 3000, 3000))
        );
        // Every IPv6 destination is outside a name without AAAA answers.
        assert_eq!(
            decide_at(&set, false, "2001:db8::8", 1),
            Some((2, 4000, 4000))
        );
        assert_eq!(decide_at(&set, false, "192.0.2.9", 1), None);
    }

    #[test]
    fn an_ipv6_prefix_is_the_octet_pattern_it_stands_for() {
        let set = build("2001:db8:8000::/33 * : 1\n", &[]);
        assert_eq!(
            decide_at(&set, false, "2001:db8:8000::", 9),
            Some((1, 1, 1))
        );
        assert_eq!(
            decide_at(&set, false, "2001:db8:ffff:ffff::1", 9),
            Some((1, 1, 1))
        );
        assert_eq!(decide_at(&set, false, "2001:db8:7fff::1", 9), None);
    }

    // ---- property test: compiled lookup == first match -------------------

    /// A small value universe so that random rules overlap a lot.
    const OCTETS: [u8; 4] = [0, 1, 2, 255];
    const PORTS: [u16; 6] = [0, 1, 21, 22, 1000, 65535];
    const PREFIXES_V4: [u8; 7] = [0, 7, 8, 9, 24, 31, 32];
    const PREFIXES_V6: [u8; 8] = [0, 8, 12, 16, 64, 120, 127, 128];

    fn octet() -> impl Strategy<Value = OctetRange> {
        prop_oneof![
            2 => Just(OctetRange::ANY),
            3 => prop::sample::select(&OCTETS[..]).prop_map(OctetRange::exact),
        ]
    }

    fn port_range() -> impl Strategy<Value = PortRange> {
        prop_oneof![
            Just(PortRange::ANY),
            prop::sample::select(&PORTS[..]).prop_map(|p| PortRange { lo: p, hi: p }),
            (
                prop::sample::select(&PORTS[..]),
                prop::sample::select(&PORTS[..])
            )
                .prop_map(|(a, b)| PortRange {
                    lo: a.min(b),
                    hi: a.max(b)
                }),
        ]
    }

    fn port_set() -> impl Strategy<Value = PortSet> {
        prop::collection::vec(port_range(), 1..4).prop_map(|r| PortSet::new(r).unwrap())
    }

    fn address_v4() -> impl Strategy<Value = Ipv4Addr> {
        prop_oneof![
            3 => prop::array::uniform4(prop::sample::select(&OCTETS[..])).prop_map(Ipv4Addr::from),
            1 => any::<[u8; 4]>().prop_map(Ipv4Addr::from),
        ]
    }

    /// IPv6 addresses that differ in the first, a middle and the last octets.
    fn address_v6() -> impl Strategy<Value = Ipv6Addr> {
        prop_oneof![
            3 => prop::array::uniform3(prop::sample::select(&OCTETS[..])).prop_map(|[a, b, c]| {
                let mut o = [0u8; 16];
                (o[0], o[7], o[15]) = (a, b, c);
                Ipv6Addr::from(o)
            }),
            1 => any::<[u8; 16]>().prop_map(Ipv6Addr::from),
        ]
    }

    /// Destinations: IPv4, IPv6, and IPv4-mapped IPv6.
    fn address() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            4 => address_v4().prop_map(IpAddr::V4),
            3 => address_v6().prop_map(IpAddr::V6),
            1 => address_v4().prop_map(|a| IpAddr::V6(a.to_ipv6_mapped())),
        ]
    }

    fn pattern() -> impl Strategy<Value = AddrPattern> {
        prop_oneof![
            3 => prop::array::uniform4(octet()).prop_map(AddrPattern::V4),
            2 => (address_v4(), prop::sample::select(&PREFIXES_V4[..]))
                .prop_map(|(a, len)| AddrPattern::prefix(IpAddr::V4(a), len)),
            3 => (address_v6(), prop::sample::select(&PREFIXES_V6[..]))
                .prop_map(|(a, len)| AddrPattern::prefix(IpAddr::V6(a), len)),
        ]
    }

    fn rule() -> impl Strategy<Value = Rule> {
        let dest = prop_oneof![
            5 => pattern().prop_map(Dest::Pattern),
            2 => (0..5u8).prop_map(|n| Dest::Name(format!("n{n}.example"))),
        ];
        let protocols =
            prop::sample::select(&[Protocols::TCP, Protocols::UDP, Protocols::BOTH][..]);
        (any::<bool>(), dest, port_set(), 0..3u16, protocols).prop_map(
            |(negated, dest, ports, org, protocols)| Rule {
                line: 0,
                text: String::new(),
                negated,
                dest,
                dest_ports: ports,
                origin: match org {
                    0 => Origin::Os,
                    n => Origin::Range(PortRange {
                        lo: 100 * n,
                        hi: 100 * n + 9,
                    }),
                },
                protocols,
            },
        )
    }

    fn names() -> impl Strategy<Value = Names> {
        // n0..n3 resolve to 1-3 addresses of the universe (of either family,
        // v4-mapped answers too); n4 never resolves.
        prop::collection::vec(prop::collection::vec(address(), 1..4), 4).prop_map(|lists| {
            lists
                .into_iter()
                .enumerate()
                .map(|(i, l)| (format!("n{i}.example"), l))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn compiled_lookup_equals_first_match(
            mut rules in prop::collection::vec(rule(), 0..12),
            names in names(),
            probes in prop::collection::vec(
                (
                    any::<bool>(),
                    address(),
                    prop_oneof![prop::sample::select(&PORTS[..]), any::<u16>()],
                ),
                48,
            ),
        ) {
            for (i, r) in rules.iter_mut().enumerate() {
                r.line = i as u32 + 1;
            }
            let failures = vec![NameFailure { name: "n4.example".into(), reason: "test".into() }];
            let set = RuleSet::from_parts(Path::new("p.ini"), rules, names, failures).unwrap();
            for (udp, ip, port) in probes {
                let got = set.compiled.lookup(udp, ip, port);
                let want = set.first_match(udp, ip, port);
                prop_assert_eq!(got.map(|v| v.rule as usize), want, "{}:{} udp={}", ip, port, udp);
                if let Some(v) = got {
                    let expect = match set.rules[v.rule as usize].origin {
                        Origin::Os => (0, 0),
                        Origin::Range(r) => (r.lo, r.hi),
                    };
                    prop_assert_eq!((v.org_lo, v.org_hi), expect);
                }
            }
        }
    }
}
