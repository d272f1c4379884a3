//! Ordered rules -> the lookup structures the hook walks (layout documented in
//! `rulebpf-common`): a 4-step automaton over the destination's octets, then a
//! port-interval table per address class.
//!
//! # How first match and negation become a fixed-cost lookup
//!
//! Each rule's address is a list of *alternatives* (one octet pattern, or one
//! per resolved address of a DNS name). A **state** of the automaton is the
//! ordered list of alternatives that still agree with the octets read so far,
//! plus the earliest rule already known to match whatever comes next (the
//! *terminal*): a non-negated rule whose port set is `*` once the rest of its
//! pattern is all `*`, or a negated rule once none of its alternatives survive.
//! Nothing after the terminal can ever decide, so it is cut off; this is what
//! keeps the states small. Equal states are shared (hash-consed), and at the end
//! states with identical transitions are merged level by level (minimisation).
//!
//! After four octets, the surviving rules all match the address; the first-match
//! answer as a function of the port is a list of disjoint intervals, painted by
//! walking those rules in order. Identical tables are shared too.
//!
//! [`Compiled::lookup`] evaluates the result exactly as the kernel does, and the
//! property tests check it against [`crate::rules::first_match`].

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::Ipv4Addr,
};

use rulebpf_common::{DFA_DEAD, DFA_ROOT, DfaEdge, PORT_KEY_BITS, PortKey, Verdict};

use crate::rules::{Dest, Ipv4Pattern, Origin, PortRange, Rule};

/// Addresses of the DNS names the rules use; a name absent here (or with no
/// address) matches nothing.
pub type Names = HashMap<String, Vec<Ipv4Addr>>;

/// The compiled rule set, ready to be written into the maps.
#[derive(Debug, Default)]
pub struct Compiled {
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
    /// The decision for `addr:port`, computed exactly as the hook computes it.
    pub fn lookup(&self, addr: Ipv4Addr, port: u16) -> Option<Verdict> {
        let mut state = DFA_ROOT;
        for octet in addr.octets() {
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
}

/// Per-rule facts the automaton needs, indexed like the rule list.
struct RuleFacts {
    line: u32,
    negated: bool,
    ports: PortRange,
    origin: Origin,
}

/// One address alternative of one rule.
struct Entry {
    rule: u32,
    pattern: Ipv4Pattern,
    /// Smallest `k` such that octets `k..4` are all `*`.
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

/// Compiles `rules` (file order) with `names` resolving their DNS names.
pub fn compile(rules: &[Rule], names: &Names) -> Result<Compiled, CompileError> {
    let rule_count = u32::try_from(rules.len())
        .map_err(|_| CompileError(format!("too many rules: {}", rules.len())))?;
    let facts: Vec<RuleFacts> = rules
        .iter()
        .map(|r| RuleFacts {
            line: r.line,
            negated: r.negated,
            ports: r.dest_ports,
            origin: r.origin,
        })
        .collect();
    let mut unresolved = Vec::new();
    let mut entries = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        let patterns: Vec<Ipv4Pattern> = match &rule.dest {
            Dest::Pattern(p) => vec![*p],
            Dest::Name(name) => names
                .get(name)
                .map(|addrs| addrs.iter().map(|a| Ipv4Pattern::exact(*a)).collect())
                .unwrap_or_default(),
        };
        if patterns.is_empty() {
            unresolved.push(index);
        }
        for pattern in patterns {
            let wild_from = (0..=4)
                .rev()
                .take_while(|&k| k == 4 || pattern.octets[k].is_any())
                .last()
                .unwrap_or(4);
            entries.push(Entry {
                rule: index as u32,
                pattern,
                wild_from,
            });
        }
    }
    Builder {
        facts: &facts,
        entries: &entries,
        budget: MAX_STATE_ENTRIES,
    }
    .build(rule_count, unresolved)
}

struct Builder<'a> {
    facts: &'a [RuleFacts],
    entries: &'a [Entry],
    budget: usize,
}

impl Builder<'_> {
    fn build(mut self, rule_count: u32, unresolved: Vec<usize>) -> Result<Compiled, CompileError> {
        let all: Vec<u32> = (0..self.entries.len() as u32).collect();
        let root = self.settle(all, NO_TERMINAL, 0);
        let mut level_states = vec![root];
        let mut levels: Vec<Vec<Transitions>> = Vec::new();
        let mut total_states = 1;
        for k in 0..4 {
            let mut next_index: HashMap<StateKey, u32> = HashMap::new();
            let mut next_states: Vec<StateKey> = Vec::new();
            let mut transitions = Vec::with_capacity(level_states.len());
            for state in &level_states {
                transitions.push(self.step(state, k, &mut next_index, &mut next_states)?);
            }
            total_states += next_states.len();
            if total_states > MAX_STATES {
                return Err(CompileError(format!(
                    "rule set too complex: more than {MAX_STATES} automaton states"
                )));
            }
            levels.push(transitions);
            level_states = next_states;
        }

        // Level 4: each surviving state becomes a port table (shared when equal).
        let mut table_index: HashMap<Vec<(u16, u16, u32)>, u32> = HashMap::new();
        let mut tables: Vec<Vec<(u16, u16, u32)>> = Vec::new();
        let mut below: Vec<u32> = level_states
            .iter()
            .map(|state| {
                let table = self.port_table(state);
                if table.is_empty() {
                    return DFA_DEAD;
                }
                *table_index.entry(table.clone()).or_insert_with(|| {
                    tables.push(table);
                    tables.len() as u32 - 1
                })
            })
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

        // Global numbering: level 0 (the root) first, then each level in turn.
        let mut compiled = Compiled {
            rule_count,
            unresolved,
            tables: tables.len() as u32,
            ..Compiled::default()
        };
        if canonical_levels[0].is_empty() {
            // Nothing can ever match: a root whose every transition is dead.
            compiled.defaults.push(DFA_DEAD);
        }
        let mut offset = 0u32;
        for (k, level) in canonical_levels.iter().enumerate() {
            let next_offset = offset + level.len() as u32;
            let global = |target: Target| {
                if target == DFA_DEAD || k == 3 {
                    target // dead, or a table id after the last octet
                } else {
                    target + next_offset
                }
            };
            for (local, t) in level.iter().enumerate() {
                let state = offset + local as u32;
                compiled.defaults.push(global(t.default));
                for &(octet, target) in &t.edges {
                    let edge = DfaEdge {
                        state,
                        octet: octet.into(),
                    };
                    compiled.edges.insert(edge, global(target));
                }
            }
            offset = next_offset;
        }
        for (table, intervals) in tables.iter().enumerate() {
            for &(lo, hi, rule) in intervals {
                let verdict = self.verdict(rule);
                for (start, len) in port_prefixes(lo, hi) {
                    compiled
                        .ports
                        .insert((len, PortKey::new(table as u32, start)), verdict);
                }
            }
        }
        Ok(compiled)
    }

    fn verdict(&self, rule: u32) -> Verdict {
        let (org_lo, org_hi) = match self.facts[rule as usize].origin {
            Origin::Os => (0, 0),
            Origin::Range(range) => (range.lo, range.hi),
        };
        Verdict {
            rule,
            line: self.facts[rule as usize].line,
            org_lo,
            org_hi,
        }
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
            let range = self.entries[id as usize].pattern.octets[k];
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
            this.budget = this.budget.checked_sub(key.entries.len()).ok_or_else(|| {
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
            if entry.pattern.octets[k].is_any() {
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
            if !facts.negated && facts.ports.is_any() && entry.wild_from <= consumed {
                terminal = entry.rule;
                break;
            }
        }
        entries.retain(|&id| self.entries[id as usize].rule < terminal);
        StateKey { entries, terminal }
    }

    /// First-match port intervals for a state after the last octet: every
    /// surviving entry's rule matches the address.
    fn port_table(&self, state: &StateKey) -> Vec<(u16, u16, u32)> {
        let mut paint = Painter::new();
        let mut last_rule = None;
        for &id in &state.entries {
            let rule = self.entries[id as usize].rule;
            if last_rule == Some(rule) {
                continue;
            }
            last_rule = Some(rule);
            let facts = &self.facts[rule as usize];
            if facts.negated {
                // Address matched: the rule matches only ports outside its set.
                let PortRange { lo, hi } = facts.ports;
                if lo > 0 {
                    paint.fill(0, lo - 1, rule);
                }
                if hi < u16::MAX {
                    paint.fill(hi + 1, u16::MAX, rule);
                }
            } else {
                paint.fill(facts.ports.lo, facts.ports.hi, rule);
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
    use std::path::Path;

    use proptest::prelude::*;

    use super::*;
    use crate::{
        resolve::NameFailure,
        rules::{OctetRange, parse},
        ruleset::RuleSet,
    };

    fn build(text: &str, names: &[(&str, &[[u8; 4]])]) -> RuleSet {
        let rules = parse(text).unwrap();
        let names = names
            .iter()
            .map(|(n, a)| {
                (
                    n.to_string(),
                    a.iter().map(|&o| Ipv4Addr::from(o)).collect(),
                )
            })
            .collect();
        RuleSet::from_parts(Path::new("t.ini"), rules, names, vec![]).unwrap()
    }

    /// The compiled answer as `(line, origin)`, checked against first match.
    fn decide(set: &RuleSet, ip: [u8; 4], port: u16) -> Option<(u32, u16, u16)> {
        let got = set.compiled.lookup(ip.into(), port);
        let want = set.first_match(ip.into(), port);
        assert_eq!(got.map(|v| v.rule as usize), want, "{ip:?}:{port}");
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
            &[("gw.example", &[[192, 0, 2, 1], [192, 0, 2, 7]])],
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
        assert_eq!(set.compiled.defaults, vec![DFA_DEAD]);
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

    // ---- property test: compiled lookup == first match -------------------

    /// A small value universe so that random rules overlap a lot.
    const OCTETS: [u8; 4] = [0, 1, 2, 255];
    const PORTS: [u16; 6] = [0, 1, 21, 22, 1000, 65535];

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

    fn rule() -> impl Strategy<Value = Rule> {
        let dest = prop_oneof![
            4 => prop::array::uniform4(octet())
                .prop_map(|octets| Dest::Pattern(Ipv4Pattern { octets })),
            1 => (0..4u8).prop_map(|n| Dest::Name(format!("n{n}.example"))),
        ];
        (any::<bool>(), dest, port_range(), 0..3u16).prop_map(|(negated, dest, ports, org)| Rule {
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
        })
    }

    fn address() -> impl Strategy<Value = [u8; 4]> {
        prop_oneof![
            3 => prop::array::uniform4(prop::sample::select(&OCTETS[..])),
            1 => any::<[u8; 4]>(),
        ]
    }

    fn names() -> impl Strategy<Value = Names> {
        // n0..n2 resolve to 1-3 addresses of the universe; n3 never resolves.
        prop::collection::vec(prop::collection::vec(address(), 1..4), 3).prop_map(|lists| {
            lists
                .into_iter()
                .enumerate()
                .map(|(i, l)| {
                    (
                        format!("n{i}.example"),
                        l.into_iter().map(Ipv4Addr::from).collect(),
                    )
                })
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
                (address(), prop_oneof![prop::sample::select(&PORTS[..]), any::<u16>()]),
                32,
            ),
        ) {
            for (i, r) in rules.iter_mut().enumerate() {
                r.line = i as u32 + 1;
            }
            let failures = vec![NameFailure { name: "n3.example".into(), reason: "test".into() }];
            let set = RuleSet::from_parts(Path::new("p.ini"), rules, names, failures).unwrap();
            for (ip, port) in probes {
                let got = set.compiled.lookup(ip.into(), port);
                let want = set.first_match(ip.into(), port);
                prop_assert_eq!(got.map(|v| v.rule as usize), want, "{:?}:{}", ip, port);
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
