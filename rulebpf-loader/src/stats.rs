//! Per-rule counters: the hook counts in a per-CPU array indexed by rule
//! (`RULEBPF_STATS`, layout in `rulebpf-common`). This module reads them from
//! the pinned map, carries them over to a new rule set (rules whose text did
//! not change keep counting from where they were), seeds them into a new
//! object, and gives `stats`, `status` and the metrics one typed row.

use std::{collections::HashMap, path::Path};

use aya::maps::{MapData, MapError, PerCpuArray, PerCpuValues};
use rulebpf_common::RuleStats;
use serde::Serialize;

use crate::{
    object::{ObjectError, RuleSetObject},
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
    let error = |source| StatsError::Read {
        path: shown.display().to_string(),
        source,
    };
    let map = MapData::from_pin(path).map_err(error)?;
    let stats: PerCpuArray<_, RuleStats> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map)).map_err(error)?;
    let count = u32::try_from(rule_count)
        .unwrap_or(u32::MAX)
        .min(stats.len());
    (0..count)
        .map(|i| {
            let per_cpu = stats.get(&i, 0).map_err(error)?;
            Ok(per_cpu.iter().fold(RuleStats::default(), add))
        })
        .collect()
}

fn add(sum: RuleStats, s: &RuleStats) -> RuleStats {
    RuleStats {
        matched: sum.matched + s.matched,
        bound: sum.bound + s.bound,
        exhausted: sum.exhausted + s.exhausted,
    }
}

/// The rows of a rule set: its rules beside their totals.
pub fn rows(rules: &[RuleInfo], totals: &[RuleStats]) -> Vec<RuleRow> {
    rules
        .iter()
        .zip(totals)
        .map(|(rule, s)| RuleRow {
            line: rule.line,
            text: rule.text.clone(),
            matched: s.matched,
            bound: s.bound,
            exhausted: s.exhausted,
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
}
