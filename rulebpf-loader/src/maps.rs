//! A compiled rule set -> a freshly loaded eBPF object whose maps hold it.
//!
//! Every rule set gets its own object (program + maps, sized exactly): the
//! running program's maps are never edited in place, which is what makes the
//! swap in [`crate::instance`] atomic.

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{CgroupSockAddr, ProgramError},
};
use rulebpf_common::{DfaEdge, PortKey, RuleStats, Verdict, global_names, map_names};

use rulebpf_rules::compile::Compiled;

/// The connect4/connect6 object built by build.rs from `rulebpf-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rulebpf"));

/// What the hook does when no port of a rule's range is free.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// connect() fails with EADDRNOTAVAIL.
    #[default]
    Strict,
    /// The OS chooses the port, as if no rule matched.
    Fallback,
}

impl Policy {
    fn as_global(self) -> u32 {
        match self {
            Self::Strict => rulebpf_common::POLICY_STRICT,
            Self::Fallback => rulebpf_common::POLICY_FALLBACK,
        }
    }
}

/// The two hooks of a rule set: both programs share the object's maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
}

impl Hook {
    pub const ALL: [Self; 2] = [Self::Connect4, Self::Connect6];

    pub const fn program_name(self) -> &'static str {
        match self {
            Self::Connect4 => rulebpf_common::PROGRAM_CONNECT4,
            Self::Connect6 => rulebpf_common::PROGRAM_CONNECT6,
        }
    }

    /// Short name, used for pins and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Connect4 => "connect4",
            Self::Connect6 => "connect6",
        }
    }
}

/// How to load a rule set's object.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub policy: Policy,
    /// Most verbose kernel log level compiled in (`Off` for `attach`, where no
    /// one reads the log: each log call then costs one branch).
    pub kernel_log: log::LevelFilter,
}

/// Loads the object with maps sized for `compiled` and filled with it, and
/// both programs verified by the kernel (not yet attached).
pub fn load(compiled: &Compiled, options: LoadOptions) -> anyhow::Result<Ebpf> {
    use anyhow::Context as _;
    let size = |n: usize| u32::try_from(n.max(1)).unwrap_or(u32::MAX);
    let support = crate::features::Support::get();
    if let Some(missing) = support.missing_required() {
        anyhow::bail!("{missing} (see `rulebpf kernel`)");
    }
    for degradation in support.degradations() {
        log::warn!("{degradation}");
    }
    let set_retval = u32::from(support.set_retval());
    let policy = options.policy.as_global();
    // aya-log levels: Error = 1 .. Trace = 5, as log::LevelFilter; 0 = off.
    let log_level = options.kernel_log as usize as u8;
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map_names::DFA_EDGES, size(compiled.edges.len()))
        .map_max_entries(map_names::DFA_DEFAULT, size(compiled.defaults.len()))
        .map_max_entries(map_names::PORTS, size(compiled.ports.len()))
        .map_max_entries(map_names::STATS, size(compiled.rule_count as usize))
        .map_max_entries(map_names::CURSOR, size(compiled.rule_count as usize))
        .override_global(global_names::POLICY, &policy, true)
        .override_global(global_names::SET_RETVAL, &set_retval, true)
        .override_global(aya_log::LEVEL, &log_level, true)
        .load(OBJECT)
        .context("creating the eBPF maps")?;
    fill(&mut ebpf, compiled).context("writing the rules into the maps")?;
    for hook in Hook::ALL {
        program(&mut ebpf, hook)?
            .load()
            .map_err(explain_verifier)
            .with_context(|| format!("loading the {} program", hook.name()))?;
    }
    Ok(ebpf)
}

/// One program of a loaded object.
pub fn program(ebpf: &mut Ebpf, hook: Hook) -> anyhow::Result<&mut CgroupSockAddr> {
    let name = hook.program_name();
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow::anyhow!("program {name} missing from the object"))?;
    Ok(prog.try_into()?)
}

fn explain_verifier(error: ProgramError) -> anyhow::Error {
    match error {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            anyhow::anyhow!("the kernel refused the program: {io_error}\n{verifier_log}")
        }
        other => other.into(),
    }
}

fn fill(ebpf: &mut Ebpf, compiled: &Compiled) -> anyhow::Result<()> {
    let mut roots: Array<_, u32> = take(ebpf, map_names::ROOTS)?;
    for (selector, root) in compiled.roots.iter().enumerate() {
        roots.set(selector as u32, root, 0)?;
    }
    let mut edges: HashMap<_, DfaEdge, u32> = take(ebpf, map_names::DFA_EDGES)?;
    for (edge, next) in &compiled.edges {
        edges.insert(edge, next, 0)?;
    }
    let mut defaults: Array<_, u32> = take(ebpf, map_names::DFA_DEFAULT)?;
    for (state, next) in compiled.defaults.iter().enumerate() {
        defaults.set(state as u32, next, 0)?;
    }
    let mut ports: LpmTrie<_, PortKey, Verdict> = take(ebpf, map_names::PORTS)?;
    for ((len, key), verdict) in &compiled.ports {
        ports.insert(&Key::new(*len, *key), verdict, 0)?;
    }
    Ok(())
}

/// A map of the object, borrowed mutably as its typed view.
fn take<'a, V>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<V>
where
    V: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| anyhow::anyhow!("map {name} missing from the object"))?;
    Ok(V::try_from(map)?)
}

/// Kernel memory charged for `map`, from the `memlock:` line of its fdinfo
/// (0 when the kernel does not say).
pub fn memlock_bytes(map: &aya::maps::Map) -> u64 {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = match map {
        aya::maps::Map::Array(d)
        | aya::maps::Map::HashMap(d)
        | aya::maps::Map::LpmTrie(d)
        | aya::maps::Map::PerCpuArray(d) => d.fd().as_fd().as_raw_fd(),
        _ => return 0,
    };
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Starts the counters of a freshly loaded object at `seeds`
/// (`(rule index, totals)`), so that counters survive a swap.
pub fn seed_stats(ebpf: &mut Ebpf, seeds: &[(u32, RuleStats)]) -> anyhow::Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    let mut stats: PerCpuArray<_, RuleStats> = take(ebpf, map_names::STATS)?;
    for &(index, totals) in seeds {
        // Totals on CPU 0: readers sum over CPUs anyway.
        let mut values = vec![RuleStats::default(); cpus.get() as usize];
        values[0] = totals;
        stats.set(index, aya::maps::PerCpuValues::try_from(values)?, 0)?;
    }
    Ok(())
}

/// Per-rule counters summed over CPUs, read from a pinned stats map.
pub fn read_stats(stats: MapData, rule_count: u32) -> anyhow::Result<Vec<RuleStats>> {
    let map = aya::maps::Map::PerCpuArray(stats);
    let stats: PerCpuArray<_, RuleStats> = PerCpuArray::try_from(map)?;
    (0..rule_count.min(stats.len()))
        .map(|i| {
            let per_cpu = stats.get(&i, 0)?;
            Ok(per_cpu
                .iter()
                .fold(RuleStats::default(), |sum, s| RuleStats {
                    matched: sum.matched + s.matched,
                    bound: sum.bound + s.bound,
                    exhausted: sum.exhausted + s.exhausted,
                }))
        })
        .collect()
}
