//! The address automaton of one selector: construction level by level (one
//! level per octet), the terminal cut, and bottom-up minimisation. See the
//! parent module for the idea; [`Builder::build`] is the entry point.

use std::collections::{BTreeMap, HashMap};

use rulebpf_common::DFA_DEAD;

use super::{
    CompileError,
    ports::{Painter, PortTable, Tables},
};
use crate::rule::{AddrPattern, Origin, PortRange};

/// Upper bound on automaton states and on entries stored in them, so that a
/// pathological file fails with a message instead of eating the machine.
const MAX_STATES: usize = 4_000_000;
const MAX_STATE_ENTRIES: usize = 200_000_000;

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

/// What every automaton together may still use.
pub(super) struct Limits {
    states: usize,
    entries: usize,
}

impl Limits {
    pub(super) fn new() -> Self {
        Self {
            states: MAX_STATES,
            entries: MAX_STATE_ENTRIES,
        }
    }
}

/// Builds one automaton (one [`rulebpf_common::Selector`]) from its entries.
pub(super) struct Builder<'a> {
    pub(super) facts: &'a [RuleFacts],
    pub(super) entries: &'a [Entry],
    pub(super) limits: &'a mut Limits,
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
                .ok_or(CompileError::TooManyStates { limit: MAX_STATES })?;
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
            this.limits.entries = this.limits.entries.checked_sub(key.entries.len()).ok_or(
                CompileError::TooManyStateEntries {
                    limit: MAX_STATE_ENTRIES,
                },
            )?;
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
