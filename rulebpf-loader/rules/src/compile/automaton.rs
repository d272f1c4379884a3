//! The address automaton of one selector: construction level by level (one
//! level per octet), the terminal cut, and bottom-up minimisation. See the
//! parent module for the idea; [`Builder::build`] is the entry point.

use std::collections::{BTreeMap, HashMap};

use rulebpf_common::DFA_DEAD;

use super::{
    CompileError,
    budget::{Culprits, Exceeded, Meter},
    ports::{Painter, PortTable, Tables},
};
use crate::rule::{AddrPattern, Origin, PortRange};

/// Per-rule facts the automaton needs, indexed like the rule list.
pub(super) struct RuleFacts {
    pub(super) line: u32,
    pub(super) negated: bool,
    /// Every port is a destination port of the rule.
    pub(super) ports_any: bool,
    /// The ports for which the rule matches once its address did: its port
    /// set, or for a negated rule the ports outside it.
    pub(super) claims: Vec<PortRange>,
    pub(super) origin: Origin,
}

/// One address alternative of one rule.
pub(super) struct Entry {
    pub(super) rule: u32,
    pub(super) pattern: AddrPattern,
    /// Smallest `k` such that octets `k..` are all `*`.
    pub(super) wild_from: usize,
}

/// A state: surviving entry ids (ascending = rule order) and the terminal rule.
#[derive(Clone, PartialEq, Eq, Hash)]
struct StateKey {
    entries: Vec<u32>,
    terminal: u32,
}

/// No rule is known yet to match every destination below a state.
pub(super) const NO_TERMINAL: u32 = u32::MAX;

/// A transition target inside the construction: a state index in the next
/// level, or dead.
pub(super) type Target = u32;

/// One state's transitions: the default and the octets that differ from it.
pub(super) struct Transitions {
    pub(super) default: Target,
    pub(super) edges: Vec<(u8, Target)>,
}

/// The level being built: its states, hash-consed; after the last octet,
/// the shared port tables and the table of each state instead.
struct Level<'t> {
    index: HashMap<StateKey, u32>,
    tables: Option<(&'t mut Tables, Vec<u32>)>,
}

impl Level<'_> {
    /// The states in the order they were numbered.
    fn into_states(self) -> Vec<StateKey> {
        let mut numbered: Vec<(StateKey, u32)> = self.index.into_iter().collect();
        numbered.sort_unstable_by_key(|&(_, id)| id);
        numbered.into_iter().map(|(key, _)| key).collect()
    }
}

/// Builds one automaton (one [`rulebpf_common::Selector`]) from its entries.
pub(super) struct Builder<'a> {
    pub(super) facts: &'a [RuleFacts],
    pub(super) entries: &'a [Entry],
    /// Shared by every automaton of the rule set: the budget is for all.
    pub(super) meter: &'a mut Meter,
}

impl Builder<'_> {
    /// The minimised automaton over `width` octets, level by level; level 0
    /// holds the root (or nothing when no destination can match). The last
    /// level's targets are ids in `tables`.
    pub(super) fn build(
        mut self,
        width: usize,
        terminal: u32,
        tables: &mut Tables,
    ) -> Result<Vec<Vec<Transitions>>, CompileError> {
        let all: Vec<u32> = (0..self.entries.len() as u32).collect();
        let root = self.settle(all, terminal, 0);
        let mut level_states = vec![root];
        let mut levels: Vec<Vec<Transitions>> = Vec::new();
        // After the last octet each state is a port table (its id, below).
        let mut below: Vec<u32> = Vec::new();
        for k in 0..width {
            let mut next = Level {
                index: HashMap::new(),
                // Tables as the states come, so that a file whose tables
                // multiply stops early.
                tables: (k + 1 == width).then_some((&mut *tables, Vec::new())),
            };
            let mut transitions = Vec::with_capacity(level_states.len());
            for state in &level_states {
                let counted = self.step(state, k, &mut next).and_then(|t| {
                    self.meter.built(0, t.edges.len(), 0)?;
                    Ok(t)
                });
                match counted {
                    Ok(t) => transitions.push(t),
                    Err(exceeded) => return Err(self.refusal(exceeded, &level_states)),
                }
            }
            levels.push(transitions);
            match next.tables {
                Some((_, ids)) => below = ids,
                None => level_states = next.into_states(),
            }
        }

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

    /// The id of the port table of `state`, a state after the last octet.
    fn table(&mut self, state: &StateKey, tables: &mut Tables) -> Result<u32, Exceeded> {
        let table = self.port_table(state);
        self.meter.work(table.len())?;
        let (id, new_prefixes) = tables.intern(table);
        self.meter.built(0, 0, new_prefixes)?;
        Ok(id)
    }

    /// Why the compile stops, naming the rules that multiply among the
    /// `states` being expanded when the budget ran out.
    fn refusal(&self, exceeded: Exceeded, states: &[StateKey]) -> CompileError {
        let culprits = self.culprits(states);
        let budget = self.meter.budget();
        match exceeded {
            Exceeded::KernelMemory => CompileError::KernelMemory {
                limit: budget.max_kernel_bytes,
                culprits,
            },
            Exceeded::Work => CompileError::Work {
                limit: budget.max_work,
                culprits,
            },
        }
    }

    /// The rules of a multiplying shape ([`multiplies`]), those in the most
    /// `states` first.
    fn culprits(&self, states: &[StateKey]) -> Culprits {
        let mut presence: HashMap<u32, usize> = HashMap::new();
        for state in states {
            let mut last = None;
            for &id in &state.entries {
                let entry = &self.entries[id as usize];
                // Entries are in rule order: a rule's alternatives are adjacent.
                if last != Some(entry.rule) && multiplies(&entry.pattern) {
                    *presence.entry(entry.rule).or_default() += 1;
                }
                last = Some(entry.rule);
            }
        }
        let mut ranked: Vec<(usize, u32)> = presence
            .into_iter()
            .map(|(rule, count)| (count, self.facts[rule as usize].line))
            .collect();
        ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let more = ranked.len().saturating_sub(Culprits::SHOWN);
        let mut lines: Vec<u32> = ranked
            .into_iter()
            .take(Culprits::SHOWN)
            .map(|(_, line)| line)
            .collect();
        lines.sort_unstable();
        Culprits { lines, more }
    }

    /// Transitions of `state` on octet position `k`, into `next`.
    fn step(
        &mut self,
        state: &StateKey,
        k: usize,
        next: &mut Level<'_>,
    ) -> Result<Transitions, Exceeded> {
        let mut wild = Vec::new();
        let mut buckets: BTreeMap<u8, Vec<u32>> = BTreeMap::new();
        let mut visits = state.entries.len();
        for &id in &state.entries {
            let range = self.entries[id as usize].pattern.octets()[k];
            if range.is_any() {
                wild.push(id);
            } else {
                visits += range.hi as usize - range.lo as usize + 1;
                for v in range.lo..=range.hi {
                    buckets.entry(v).or_default().push(id);
                }
            }
        }
        self.meter.work(visits)?;
        // Negated rules with no `*` alternative at this octet: an octet none of
        // their alternatives covers makes them match unconditionally.
        let fragile: Vec<u32> = self.fragile_negated(&state.entries, k);

        let default_terminal = state
            .terminal
            .min(fragile.first().copied().unwrap_or(NO_TERMINAL));
        let default_key = self.settle(wild.clone(), default_terminal, k + 1);
        let default = self.intern(default_key, next)?;

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
            let target = self.intern(key, next)?;
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

    /// The target of a transition to the state `key` in `next`: dead, a
    /// state already there, or a new one (metered; after the last octet
    /// its port table is made at once).
    fn intern(&mut self, key: StateKey, next: &mut Level<'_>) -> Result<Target, Exceeded> {
        if key.entries.is_empty() && key.terminal == NO_TERMINAL {
            return Ok(DFA_DEAD);
        }
        self.meter.work(key.entries.len())?;
        if let Some(&id) = next.index.get(&key) {
            return Ok(id);
        }
        let id = next.index.len() as u32;
        match &mut next.tables {
            Some((tables, ids)) => ids.push(self.table(&key, tables)?),
            None => self.meter.built(1, 0, 0)?,
        }
        next.index.insert(key, id);
        Ok(id)
    }

    /// Applies the cuts after `consumed` octets have been read. Two kinds
    /// of rules can no longer decide anything below the state, and go:
    ///
    /// * everything from the *terminal* on: the first rule certain to
    ///   match every destination below, whatever the port (a non-negated
    ///   rule with port `*` whose remaining octets are all `*`);
    /// * a rule whose ports are all claimed by earlier rules certain to
    ///   match (a repeated line, a port under a broader rule): this keeps
    ///   a file of many such rules from carrying them in every state. A
    ///   rule is certain to match once its remaining octets are all `*`;
    ///   then a negated one claims the ports outside its set, like any
    ///   rule. A negated rule that is not certain stays: leaving its
    ///   pattern makes it match every port (see `fragile_negated`). Once
    ///   earlier rules claim every port, nothing after them can decide.
    fn settle(&self, mut entries: Vec<u32>, terminal: u32, consumed: usize) -> StateKey {
        let mut terminal = terminal;
        // Ports claimed by the kept rules certain to match; made when the
        // first such rule comes.
        let mut claimed: Option<Painter> = None;
        entries.retain(|&id| {
            let entry = &self.entries[id as usize];
            if entry.rule >= terminal || claimed.as_ref().is_some_and(Painter::is_full) {
                return false;
            }
            let facts = &self.facts[entry.rule as usize];
            let certain = entry.wild_from <= consumed;
            if facts.negated && !certain {
                return true;
            }
            if let Some(painter) = &claimed
                && facts
                    .claims
                    .iter()
                    .all(|range| painter.is_claimed(range.lo, range.hi))
            {
                return false;
            }
            if certain {
                if !facts.negated && facts.ports_any {
                    terminal = entry.rule;
                    return false;
                }
                let painter = claimed.get_or_insert_with(Painter::new);
                for range in &facts.claims {
                    painter.fill(range.lo, range.hi, entry.rule);
                }
            }
            true
        });
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

/// Whether `pattern` fixes an octet after a free one (`*.5.*.*`,
/// `10.*.5.*`): the automaton must then remember the free octets' values
/// in combination with other rules, and such rules multiply each other's
/// states. Addresses and prefixes (`10.0.0.0/8`, `10.*.*.*`) never do.
fn multiplies(pattern: &AddrPattern) -> bool {
    let octets = pattern.octets();
    let first_free = octets.iter().position(|o| o.lo != o.hi);
    first_free.is_some_and(|k| octets[k + 1..].iter().any(|o| !o.is_any()))
}

/// Two ascending, disjoint id lists as one ascending list (rule order).
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
