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
//! decide, so it is cut off; nor can a rule whose every port is claimed by
//! earlier rules certain to match (a repeated line). These cuts are what
//! keep the states small. Equal states are shared (hash-consed), and at the
//! end states with identical transitions are merged level by level
//! (minimisation).
//!
//! After the last octet, the surviving rules all match the address; the
//! first-match answer as a function of the port is a list of disjoint
//! intervals, painted by walking those rules in order. Identical tables are
//! shared, across selectors too.
//!
//! The construction is in `automaton` (states, terminal cut, minimisation)
//! and `ports` (port tables and their LPM prefixes); this module runs it for
//! every selector and numbers the result into map entries. `budget` prices
//! what is built as the kernel will charge for it and stops a compile that
//! goes over its [`Budget`] (some shapes of rules multiply each other's
//! states), naming the rules responsible.
//!
//! [`Compiled::lookup`] evaluates the result exactly as the kernel does, and the
//! property test checks it against [`crate::first_match()`].

mod automaton;
mod budget;
mod ports;

use std::{collections::HashMap, net::IpAddr};

use rulebpf_common::{
    DFA_DEAD, DfaEdge, PORT_KEY_BITS, PortKey, Protocol, SELECTORS, Selector, Verdict,
};

use self::{
    automaton::{Builder, Entry, NO_TERMINAL, RuleFacts, Target, Transitions},
    budget::Meter,
    ports::{Tables, port_prefixes},
};
use crate::{
    resolve::{Names, addresses},
    rule::{AddrPattern, Dest, Origin, Rule, canonical, family_of, octets_of},
};

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

pub use self::budget::{
    Budget, Culprits, DEFAULT_MAX_KERNEL_BYTES, DEFAULT_MAX_WORK, KernelMemory, MapSizes, size,
};

/// The rule set is too large or too tangled for the compiler's budget.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// Rules are numbered with `u32` in the maps.
    #[error("too many rules: {count}")]
    TooManyRules { count: usize },
    #[error(
        "rule set too large: its lookup maps would need more than {} of kernel \
         memory (the limit, --max-kernel-memory){culprits}",
        size(*limit)
    )]
    KernelMemory { limit: u64, culprits: Culprits },
    #[error(
        "rule set too complex: compiling it takes more than {limit} steps (the \
         limit on the compiler's time and memory){culprits}"
    )]
    Work { limit: u64, culprits: Culprits },
}

impl Compiled {
    /// The entries of each map this rule set fills.
    pub fn map_sizes(&self) -> MapSizes {
        MapSizes {
            states: self.defaults.len() as u64,
            edges: self.edges.len() as u64,
            port_prefixes: self.ports.len() as u64,
            rules: u64::from(self.rule_count),
        }
    }

    /// The kernel memory its maps will be charged (`memlock`), on a
    /// machine with `possible_cpus` possible CPUs (the per-rule counters
    /// are per CPU).
    pub fn kernel_memory(&self, possible_cpus: u32) -> KernelMemory {
        self.map_sizes().kernel_memory(possible_cpus)
    }

    /// The decision for a connect() to `addr:port` on a `protocol` socket,
    /// computed exactly as the hook computes it.
    pub fn lookup(&self, protocol: Protocol, addr: IpAddr, port: u16) -> Option<Verdict> {
        let addr = canonical(addr);
        let mut state = self.roots[Selector::new(family_of(addr), protocol) as usize];
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

/// Compiles `rules` (file order) with `names` resolving their DNS names,
/// within the default [`Budget`].
pub fn compile(rules: &[Rule], names: &Names) -> Result<Compiled, CompileError> {
    compile_within(rules, names, Budget::default())
}

/// [`compile`] within `budget`.
pub fn compile_within(
    rules: &[Rule],
    names: &Names,
    budget: Budget,
) -> Result<Compiled, CompileError> {
    let rule_count = u32::try_from(rules.len())
        .map_err(|_| CompileError::TooManyRules { count: rules.len() })?;
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
            Dest::Pattern(_) | Dest::Any => false,
        })
        .map(|(i, _)| i)
        .collect();
    let mut compiled = Compiled {
        rule_count,
        unresolved,
        ..Compiled::default()
    };
    let mut tables = Tables::default();
    let mut meter = Meter::new(budget);
    for selector in Selector::ALL {
        let (entries, terminal) = alternatives(rules, names, selector);
        let levels = Builder {
            facts: &facts,
            entries: &entries,
            meter: &mut meter,
        }
        .build(selector.family().octets(), terminal, &mut tables)?;
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
    let family = selector.family();
    let mut entries = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        if !rule.protocols.covers(selector.protocol()) || !rule.covers_family(family) {
            continue;
        }
        let patterns: Vec<AddrPattern> = match &rule.dest {
            Dest::Pattern(p) => vec![*p],
            Dest::Any => vec![AddrPattern::any(family)],
            Dest::Name(name) => {
                let Some(addrs) = addresses(names, name) else {
                    continue; // unresolved: left out (reported by the caller)
                };
                addrs
                    .iter()
                    .map(|&a| AddrPattern::exact(a))
                    .filter(|p| p.family() == family)
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
    match facts.origin {
        Origin::Os => Verdict::new(rule, facts.line, 0, 0),
        Origin::Range(range) => Verdict::new(rule, facts.line, range.lo, range.hi),
        Origin::Deny => Verdict::deny(rule, facts.line),
    }
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
        first_match,
        grammar::parse,
        resolve::NameFailure,
        rule::{OctetRange, PortRange, PortSet, Protocols},
        ruleset::RuleSet,
    };
    use rulebpf_common::Protocol::{Tcp, Udp};

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
        decide_at(set, Tcp, &Ipv4Addr::from(ip).to_string(), port)
    }

    fn decide_at(
        set: &RuleSet,
        protocol: Protocol,
        ip: &str,
        port: u16,
    ) -> Option<(u32, u16, u16)> {
        let addr: IpAddr = ip.parse().unwrap();
        let got = set.compiled.lookup(protocol, addr, port);
        let want = first_match(&set.rules, &set.names, protocol, addr, port);
        assert_eq!(got.map(|v| v.rule as usize), want, "{ip}:{port} {protocol}");
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
        // What `rulebpf attach` reported for them: 19.1 MB on 2 CPUs.
        let memory = set.compiled.kernel_memory(2);
        assert!(
            memory.lookup < 16 << 20 && memory.total() < 24 << 20,
            "{memory:?}"
        );
    }

    /// `x.*.*.* 80 : 1`, `*.x.*.* 81 : 1`, `*.*.x.* 82 : 1`, `*.*.*.x 83 : 1`
    /// for x in 0..n: (n + 1)^4 port tables from 4n lines.
    fn crossed(n: u32) -> Vec<Rule> {
        let mut text = String::new();
        for x in 0..n {
            text.push_str(&format!(
                "{x}.*.*.* 80 : 1\n*.{x}.*.* 81 : 1\n*.*.{x}.* 82 : 1\n*.*.*.{x} 83 : 1\n"
            ));
        }
        parse(&text).unwrap()
    }

    #[test]
    fn a_file_whose_patterns_multiply_is_refused_naming_its_lines() {
        // 80 lines, 194,481 port tables, 48 MB of kernel memory: over a
        // 16 MiB budget. The `*.*.*.x` rules are in every state when the
        // budget runs out; `x.*.*.*` (a prefix) is never named.
        let budget = Budget {
            max_kernel_bytes: 16 << 20,
            ..Budget::default()
        };
        let error = compile_within(&crossed(20), &Names::new(), budget).unwrap_err();
        assert_eq!(
            error,
            CompileError::KernelMemory {
                limit: 16 << 20,
                culprits: Culprits {
                    lines: vec![4, 8, 12, 16, 20],
                    more: 55,
                },
            }
        );
        assert_eq!(
            error.to_string(),
            "rule set too large: its lookup maps would need more than 16 MiB of kernel \
             memory (the limit, --max-kernel-memory); it comes from the address patterns \
             that fix an octet after a `*`, which multiply each other's states: lines 4, \
             8, 12, 16, 20 and 55 more"
        );
    }

    #[test]
    #[cfg_attr(
        debug_assertions,
        ignore = "seconds with optimisations, minutes without"
    )]
    fn the_crossed_file_of_the_issue_is_refused_by_the_default_budget() {
        // 160 lines once took 1.3 GB and 9 s to compile into 712 MB of
        // kernel memory; the budget stops it a quarter of the way.
        let error = compile(&crossed(40), &Names::new()).unwrap_err();
        let CompileError::KernelMemory { limit, culprits } = error else {
            panic!("{error}")
        };
        assert_eq!(limit, DEFAULT_MAX_KERNEL_BYTES);
        assert_eq!(culprits.lines, [4, 8, 12, 16, 20]);
    }

    #[test]
    fn the_work_budget_stops_a_compile_too() {
        let budget = Budget {
            max_work: 1000,
            ..Budget::default()
        };
        let error = compile_within(&crossed(3), &Names::new(), budget).unwrap_err();
        assert!(
            matches!(error, CompileError::Work { limit: 1000, .. }),
            "{error}"
        );
        assert!(compile_within(&crossed(3), &Names::new(), Budget::default()).is_ok());
    }

    #[test]
    fn rules_that_can_no_longer_decide_are_not_carried_along() {
        // 10,000 repeats of a rule under a crossed file: each state used to
        // carry all of them (176 million steps, 1.2 GB); the repeats are
        // shadowed by the first, negated or not.
        let mut rules = crossed(10);
        for (text, line) in [("*.*.*.* 80 : 5", 41), ("! *.*.*.* 81 : 6", 10_042)] {
            let mut repeats = parse(&format!("{text}\n").repeat(10_000)).unwrap();
            for (i, rule) in repeats.iter_mut().enumerate() {
                rule.line = line + i as u32;
            }
            rules.extend(repeats);
        }
        let budget = Budget {
            max_work: 2_000_000,
            ..Budget::default()
        };
        let compiled = compile_within(&rules, &Names::new(), budget).unwrap();
        let names = Names::new();
        for (ip, port, line) in [
            ([1, 2, 3, 4], 80, Some(5)),
            ([11, 12, 13, 4], 83, Some(20)),
            ([11, 12, 13, 14], 80, Some(41)),
            ([11, 12, 13, 14], 81, None),
            ([11, 12, 13, 14], 82, Some(10_042)),
        ] {
            let addr = IpAddr::from(ip);
            let got = compiled.lookup(Tcp, addr, port);
            let want = first_match(&rules, &names, Tcp, addr, port);
            assert_eq!(got.map(|v| v.rule as usize), want, "{addr}:{port}");
            assert_eq!(got.map(|v| v.line), line, "{addr}:{port}");
        }
    }

    #[test]
    fn families_and_protocols_are_separate() {
        let set = build(
            "! 10.*.*.* * : 100\n2001:db8::/32 443 : 200 tcp+udp\n\
             10.0.0.0/8 53 : 300 udp\n10.1.1.3 389,636,3268-3269 : 400\n",
            &[],
        );
        // A negated IPv4 rule says nothing about IPv6 or UDP.
        assert_eq!(decide_at(&set, Tcp, "2001:db9::1", 443), None);
        assert_eq!(decide_at(&set, Udp, "8.8.8.8", 53), None);
        assert_eq!(decide_at(&set, Tcp, "8.8.8.8", 53), Some((1, 100, 100)));
        assert_eq!(
            decide_at(&set, Tcp, "2001:db8::1", 443),
            Some((2, 200, 200))
        );
        assert_eq!(
            decide_at(&set, Udp, "2001:db8:1::", 443),
            Some((2, 200, 200))
        );
        assert_eq!(decide_at(&set, Udp, "10.9.9.9", 53), Some((3, 300, 300)));
        assert_eq!(decide_at(&set, Tcp, "10.9.9.9", 53), None);
        // v4-mapped destinations are IPv4 ones.
        assert_eq!(
            decide_at(&set, Tcp, "::ffff:8.8.8.8", 1),
            Some((1, 100, 100))
        );
        assert_eq!(
            decide_at(&set, Udp, "::ffff:10.0.0.1", 53),
            Some((3, 300, 300))
        );
        // Port lists: the listed ports go to line 4; no rule has the others.
        for (port, line) in [(389, 4), (636, 4), (3268, 4), (3269, 4)] {
            assert_eq!(
                decide_at(&set, Tcp, "10.1.1.3", port).map(|g| g.0),
                Some(line)
            );
        }
        for port in [388, 390, 637, 3267, 3270] {
            assert_eq!(decide_at(&set, Tcp, "10.1.1.3", port), None, "{port}");
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
        assert_eq!(decide_at(&set, Tcp, "192.0.2.1", 1), Some((1, 3000, 3000)));
        assert_eq!(
            decide_at(&set, Udp, "2001:db8::7", 1),
            Some((1, 3000, 3000))
        );
        // Every IPv6 destination is outside a name without AAAA answers.
        assert_eq!(
            decide_at(&set, Tcp, "2001:db8::8", 1),
            Some((2, 4000, 4000))
        );
        assert_eq!(decide_at(&set, Tcp, "192.0.2.9", 1), None);
    }

    #[test]
    fn an_ipv6_prefix_is_the_octet_pattern_it_stands_for() {
        let set = build("2001:db8:8000::/33 * : 1\n", &[]);
        assert_eq!(decide_at(&set, Tcp, "2001:db8:8000::", 9), Some((1, 1, 1)));
        assert_eq!(
            decide_at(&set, Tcp, "2001:db8:ffff:ffff::1", 9),
            Some((1, 1, 1))
        );
        assert_eq!(decide_at(&set, Tcp, "2001:db8:7fff::1", 9), None);
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
            1 => Just(Dest::Any),
        ];
        let protocols =
            prop::sample::select(&[Protocols::TCP, Protocols::UDP, Protocols::BOTH][..]);
        (any::<bool>(), dest, port_set(), 0..4u16, protocols).prop_map(
            |(negated, dest, ports, org, protocols)| Rule {
                line: 0,
                text: String::new(),
                remark: None,
                negated,
                dest,
                dest_ports: ports,
                origin: match org {
                    0 => Origin::Os,
                    3 => Origin::Deny,
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
                    // From a bool, so the saved regression seeds replay as before.
                    any::<bool>().prop_map(|udp| if udp { Udp } else { Tcp }),
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
            for (protocol, ip, port) in probes {
                let got = set.compiled.lookup(protocol, ip, port);
                let want = first_match(&set.rules, &set.names, protocol, ip, port);
                prop_assert_eq!(got.map(|v| v.rule as usize), want, "{}:{} {}", ip, port, protocol);
                if let Some(v) = got {
                    let expect = match set.rules[v.rule as usize].origin {
                        Origin::Os => (0, 0, false),
                        Origin::Range(r) => (r.lo, r.hi, false),
                        Origin::Deny => (0, 0, true),
                    };
                    prop_assert_eq!((v.org_lo, v.org_hi, v.denies()), expect);
                }
            }
        }
    }
}
