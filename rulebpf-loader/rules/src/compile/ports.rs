//! Port tables: what a state left after the last octet decides, per port.
//! The first rule claiming a port gets it ([`Painter`]); equal tables are
//! shared ([`Tables`]); each interval becomes aligned LPM prefixes
//! ([`port_prefixes`]) so the kernel's trie finds it with one lookup.

use std::collections::{BTreeMap, HashMap};

use rulebpf_common::{DFA_DEAD, PORT_KEY_BITS};

/// A port table: `(first port, last port, rule)`, sorted and disjoint.
pub(super) type PortTable = Vec<(u16, u16, u32)>;

/// Port tables shared by every automaton, numbered in creation order.
#[derive(Default)]
pub(super) struct Tables {
    index: HashMap<PortTable, u32>,
    pub(super) list: Vec<PortTable>,
}

impl Tables {
    /// The id of `table` (shared with an equal one already here), or
    /// `DFA_DEAD` for an empty table: no port matches. With it, the number
    /// of LPM prefixes the table adds to the map (0 when it was here).
    pub(super) fn intern(&mut self, table: PortTable) -> (u32, usize) {
        if table.is_empty() {
            return (DFA_DEAD, 0);
        }
        if let Some(&id) = self.index.get(&table) {
            return (id, 0);
        }
        let prefixes = table
            .iter()
            .map(|&(lo, hi, _)| port_prefixes(lo, hi).len())
            .sum();
        let id = self.list.len() as u32;
        self.index.insert(table.clone(), id);
        self.list.push(table);
        (id, prefixes)
    }
}

/// Assigns each port to the first rule that claims it.
pub(super) struct Painter {
    /// Unclaimed intervals, `lo -> hi`.
    free: BTreeMap<u16, u16>,
    claimed: Vec<(u16, u16, u32)>,
}

impl Painter {
    pub(super) fn new() -> Self {
        Self {
            free: BTreeMap::from([(0, u16::MAX)]),
            claimed: Vec::new(),
        }
    }

    pub(super) fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// Whether every port of `[lo, hi]` is claimed: the last free interval
    /// starting at or before `hi` ends before `lo` (free intervals are
    /// disjoint and sorted, so no earlier one reaches further).
    pub(super) fn is_claimed(&self, lo: u16, hi: u16) -> bool {
        self.free
            .range(..=hi)
            .next_back()
            .is_none_or(|(_, &end)| end < lo)
    }

    pub(super) fn fill(&mut self, lo: u16, hi: u16, rule: u32) {
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
    pub(super) fn into_intervals(mut self) -> Vec<(u16, u16, u32)> {
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
pub(super) fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u32)> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
