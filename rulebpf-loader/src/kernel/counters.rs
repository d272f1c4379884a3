//! The hook's counters, read from the instance's pinned maps (layouts in
//! `rulebpf-common`): per-rule totals (`RULEBPF_STATS`, a per-CPU array
//! indexed by rule), occupancy by rule key, the ports and tuples in use,
//! the instance counters; and the seeding of a new rule set's counters
//! before it is swapped in.

use std::{collections::HashMap, path::Path};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuValues};
use rulebpf_common::{Counter, Occupancy, PortUse, RuleStats, TupleKey};
use rulebpf_rules::identity::RuleInfo;

use super::{ObjectError, rule_set::RuleSetObject};
use crate::sys::securedir::SecureDir;

#[derive(Debug, thiserror::Error)]
pub enum CountersError {
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
pub fn read(path: &Path, shown: &Path, rule_count: usize) -> Result<Vec<RuleStats>, CountersError> {
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
fn read_error(shown: &Path) -> impl Fn(MapError) -> CountersError + '_ {
    move |source| CountersError::Read {
        path: shown.display().to_string(),
        source,
    }
}

/// The pinned per-CPU array at `path` (`shown` in messages).
fn open_per_cpu<V: aya::Pod>(
    path: &Path,
    shown: &Path,
) -> Result<PerCpuArray<MapData, V>, CountersError> {
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
        denied: sum.denied + s.denied,
    }
}

/// The instance's occupancy map at `path` (`shown` in messages): every
/// rule that bound a socket, by key.
pub fn read_occupancy(path: &Path, shown: &Path) -> Result<HashMap<u64, Occupancy>, CountersError> {
    let error = read_error(shown);
    let map = MapData::from_pin(path).map_err(&error)?;
    let map: BpfHashMap<_, u64, Occupancy> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(map)).map_err(error)?;
    // An entry deleted during the walk ends it early: the rest reads as 0.
    Ok(map.iter().filter_map(Result::ok).collect())
}

/// Every key of the pinned `RULEBPF_PORT_USE` with its sockets.
pub fn read_port_use(path: &Path, shown: &Path) -> Result<Vec<(PortUse, u64)>, CountersError> {
    let error = read_error(shown);
    let map = MapData::from_pin(path).map_err(&error)?;
    let map: BpfHashMap<_, PortUse, u64> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(map)).map_err(error)?;
    Ok(map.iter().filter_map(Result::ok).collect())
}

/// Every key of the pinned `RULEBPF_TUPLES` (the busy tuples).
pub fn read_tuples(path: &Path, shown: &Path) -> Result<Vec<TupleKey>, CountersError> {
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
pub fn read_counters(path: &Path, shown: &Path) -> Result<Vec<(Counter, u64)>, CountersError> {
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

/// Starts the counters of a freshly loaded object at `seeds`
/// (`(rule index, totals)`), before it is swapped in.
pub fn seed(object: &mut RuleSetObject, seeds: &[(u32, RuleStats)]) -> Result<(), CountersError> {
    let cpus =
        aya::util::nr_cpus().map_err(|(what, e)| CountersError::Cpus(format!("{what}: {e}")))?;
    let mut stats = object.stats_map()?;
    for &(index, totals) in seeds {
        // Totals on CPU 0: readers sum over CPUs anyway.
        let mut values = vec![RuleStats::default(); cpus.get() as usize];
        values[0] = totals;
        let values = PerCpuValues::try_from(values).map_err(|e| CountersError::Seed(e.into()))?;
        stats.set(index, values, 0).map_err(CountersError::Seed)?;
    }
    Ok(())
}
