//! The eBPF object of one rule set: the connect4/connect6 programs and the
//! maps that hold the compiled rules (layouts: `rulebpf-common`).
//!
//! Every rule set gets its own object, with maps sized exactly for it and
//! written completely before its programs are loaded: the maps of the object
//! in force are never edited, which is what makes the swap in
//! [`crate::instance`] atomic. This module loads, fills and pins an object;
//! it knows nothing of cgroups, links or instances — only where the
//! instance maps are pinned, which every rule set of an instance shares
//! (`rulebpf_common::shared_map_names`, see [`crate::entry`]).

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapError, PerCpuArray, lpm_trie::Key},
    pin::PinError,
    programs::{CgroupSockAddr, ProgramError, ProgramFd},
};
use rulebpf_common::{
    DfaEdge, PortKey, RuleStats, Verdict, global_names, map_names, shared_map_names,
};
use rulebpf_rules::{compile::Compiled, ruleset::RuleSet};
use serde::{Deserialize, Serialize};

use crate::{
    entry::{self, EntryError},
    features::Support,
    hook::{Hook, PerHook},
    securedir::SecureDir,
    stats,
};

/// The name of a rule set's program pin in its directory.
pub fn program_pin(hook: Hook) -> String {
    format!("prog-{}", hook.name())
}

/// The connect4/connect6 object built by build.rs from `rulebpf-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rulebpf"));

/// What the hook does when no port of a rule's range is free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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

/// Whether an origin port carries one socket per destination (the kernel's
/// own connect() allocator does so) or one socket in all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    /// `SO_REUSEADDR` (TCP) / `SO_REUSEPORT` (UDP) and the instance's tuple
    /// table: a port is busy only toward the destinations it is connected to.
    #[default]
    On,
    /// One socket per origin port, as `bind()` before `connect()` in the
    /// application.
    Off,
}

/// What happens to a socket the application bound itself, outside the
/// matching rule's range.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AppBound {
    /// It keeps its port (counted, logged at info).
    #[default]
    Keep,
    /// connect() fails with EPERM (logged at warn, naming the rule).
    Refuse,
}

/// The port options of `attach` and `run`.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct PortArgs {
    /// on: an origin port carries one connection per destination, as the
    /// kernel's own connect() allocator does; off: one socket per port (a
    /// range of N ports carries N connections, TIME_WAIT included).
    #[arg(long, value_enum, default_value_t = Sharing::On)]
    pub port_sharing: Sharing,
    /// A socket the application bound itself (bind() before connect())
    /// outside the matching rule's range: keep its port (counted, logged at
    /// info), or refuse its connect() with EPERM (logged, naming the rule).
    #[arg(long, value_enum, default_value_t = AppBound::Keep)]
    pub app_bound: AppBound,
    /// Add the rules' origin ranges to net.ipv4.ip_local_reserved_ports, so
    /// that no process gets them as ephemeral ports; detach takes back
    /// exactly the ports it added.
    #[arg(long)]
    pub reserve_ports: bool,
    /// Live shared sockets a new instance can track at once (its tuple
    /// table); beyond that, sockets are bound without sharing (counted).
    #[arg(long, default_value_t = rulebpf_common::TUPLE_CAPACITY)]
    pub tuple_capacity: u32,
}

/// How to load a rule set's object.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub policy: Policy,
    /// Most verbose kernel log level compiled in (`Off` for `attach`, where no
    /// one reads the log: each log call then costs one branch).
    pub kernel_log: log::LevelFilter,
    pub sharing: Sharing,
    pub app_bound: AppBound,
}

/// What the kernel says about a loaded program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramInfo {
    /// The kernel's program id (`bpftool prog show id N`).
    pub id: u32,
    /// Instructions the verifier processed (kernel 5.16+).
    pub verified_insns: Option<u32>,
}

/// Why an object could not be loaded or pinned. Never the user's rules: those
/// were checked when they compiled.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("{0} (see `rulebpf kernel`)")]
    KernelLacks(String),
    #[error("creating the eBPF maps")]
    CreateMaps(#[source] EbpfError),
    #[error("writing the rules into map {map}")]
    Fill {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the kernel refused the {hook} program: {io_error}\n{verifier_log}")]
    Verifier {
        hook: &'static str,
        io_error: std::io::Error,
        verifier_log: String,
    },
    #[error("loading the {hook} program")]
    Load {
        hook: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("{0} is missing from the eBPF object (a build problem)")]
    Missing(&'static str),
    #[error("the {0} program has an unexpected type (a build problem)")]
    ProgramType(&'static str),
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("pinning {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("reading the {hook} program's info")]
    Info {
        hook: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(transparent)]
    Instance(Box<EntryError>),
}

/// A loaded rule-set object: maps filled, both programs verified, nothing
/// attached yet.
pub struct RuleSetObject {
    ebpf: Ebpf,
}

impl RuleSetObject {
    /// Loads the object with maps sized for `set` and filled with it, and
    /// both programs verified by the kernel. The instance maps are the ones
    /// pinned in `instance` (its directory).
    pub fn load(
        set: &RuleSet,
        options: LoadOptions,
        instance: &SecureDir,
    ) -> Result<Self, ObjectError> {
        let compiled = &set.compiled;
        let support = Support::get();
        if let Some(missing) = support.missing_required() {
            return Err(ObjectError::KernelLacks(missing));
        }
        for degradation in support.degradations() {
            log::warn!("{degradation}");
        }
        let size = |n: usize| u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        let set_retval = u32::from(support.set_retval());
        let policy = options.policy.as_global();
        // Where the kernel cannot set SO_REUSEADDR from the hook (before
        // 6.0) every connect would try and fail: the sockets are bound
        // without sharing from the start (the degradation says so).
        let sharing = u32::from(options.sharing == Sharing::On && support.sharing() != Some(false));
        let app_bound = match options.app_bound {
            AppBound::Keep => rulebpf_common::APP_BOUND_KEEP,
            AppBound::Refuse => rulebpf_common::APP_BOUND_REFUSE,
        };
        let tuples = entry::tuple_capacity_of(instance)
            .map_err(|e| ObjectError::Instance(Box::new(e)))?
            .unwrap_or(rulebpf_common::TUPLE_CAPACITY);
        // 0 (the substate is not read) unless the helper is there too.
        let tw_substate = if support.timewait_substate() {
            crate::btf::tw_substate()
        } else {
            0
        };
        // aya-log levels: Error = 1 .. Trace = 5, as log::LevelFilter; 0 = off.
        let log_level = options.kernel_log as usize as u8;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(entry::map_pin_dir(instance))
            .map_max_entries(shared_map_names::TUPLES, tuples)
            .map_max_entries(shared_map_names::SOURCES, tuples)
            .map_max_entries(map_names::DFA_EDGES, size(compiled.edges.len()))
            .map_max_entries(map_names::DFA_DEFAULT, size(compiled.defaults.len()))
            .map_max_entries(map_names::PORTS, size(compiled.ports.len()))
            .map_max_entries(map_names::STATS, size(compiled.rule_count as usize))
            .map_max_entries(map_names::CURSOR, size(compiled.rule_count as usize))
            .override_global(global_names::POLICY, &policy, true)
            .override_global(global_names::SET_RETVAL, &set_retval, true)
            .override_global(global_names::SHARING, &sharing, true)
            .override_global(global_names::APP_BOUND, &app_bound, true)
            .override_global(global_names::TW_SUBSTATE, &tw_substate, true)
            .override_global(aya_log::LEVEL, &log_level, true)
            .load(OBJECT)
            .map_err(ObjectError::CreateMaps)?;
        let mut object = Self { ebpf };
        let texts: Vec<&str> = set.rules.iter().map(|r| r.text.as_str()).collect();
        object.fill(compiled, &stats::rule_keys(&texts))?;
        for hook in Hook::ALL {
            object.program(hook)?.load().map_err(|e| match e {
                ProgramError::LoadError {
                    io_error,
                    verifier_log,
                } => ObjectError::Verifier {
                    hook: hook.name(),
                    io_error,
                    verifier_log: verifier_log.to_string(),
                },
                source => ObjectError::Load {
                    hook: hook.name(),
                    source,
                },
            })?;
        }
        Ok(object)
    }

    /// One of the two programs.
    pub fn program(&mut self, hook: Hook) -> Result<&mut CgroupSockAddr, ObjectError> {
        let name = hook.program_name();
        self.ebpf
            .program_mut(name)
            .ok_or(ObjectError::Missing(name))?
            .try_into()
            .map_err(|_| ObjectError::ProgramType(name))
    }

    /// The per-rule counters map, for seeding (see [`crate::stats`]).
    pub fn stats_map(
        &mut self,
    ) -> Result<PerCpuArray<&mut aya::maps::MapData, RuleStats>, ObjectError> {
        self.typed_map(map_names::STATS)
    }

    /// The file descriptor of one of the two programs (for a jump slot).
    pub fn program_fd(&mut self, hook: Hook) -> Result<&ProgramFd, ObjectError> {
        self.program(hook)?
            .fd()
            .map_err(|source| ObjectError::Load {
                hook: hook.name(),
                source,
            })
    }

    /// Pins every map of the rule set and both programs in `dir` and
    /// returns what the kernel says about the programs.
    pub fn pin(&mut self, dir: &SecureDir) -> Result<PerHook<ProgramInfo>, ObjectError> {
        for (name, map) in self.ebpf.maps() {
            // `.rodata`/`.bss` globals are frozen into the programs; only the
            // named maps are read back later (stats) or kept alive. The
            // instance maps are pinned in the instance's directory already.
            if !name.starts_with('.') && !shared_map_names::ALL.contains(&name) {
                let path = dir.fd_path(name);
                map.pin(&path)
                    .map_err(|source| ObjectError::Pin { path, source })?;
            }
        }
        PerHook::try_from_fn(|hook| {
            let program = self.program(hook)?;
            let path = dir.fd_path(&program_pin(hook));
            program
                .pin(&path)
                .map_err(|source| ObjectError::Pin { path, source })?;
            let info = program.info().map_err(|source| ObjectError::Info {
                hook: hook.name(),
                source,
            })?;
            Ok(ProgramInfo {
                id: info.id(),
                verified_insns: info.verified_instruction_count(),
            })
        })
    }

    /// Kernel memory charged for the rule set's own maps (`memlock` in
    /// fdinfo; the instance maps are the instance's).
    pub fn map_memlock_bytes(&self) -> u64 {
        self.ebpf
            .maps()
            .filter(|(name, _)| !shared_map_names::ALL.contains(name))
            .map(|(_, map)| memlock_bytes(map))
            .sum()
    }

    /// `keys`: the stable key of each rule, by rule index.
    fn fill(&mut self, compiled: &Compiled, keys: &[u64]) -> Result<(), ObjectError> {
        let fill = |map| move |source| ObjectError::Fill { map, source };
        let mut roots: Array<_, u32> = self.typed_map(map_names::ROOTS)?;
        for (selector, root) in compiled.roots.iter().enumerate() {
            roots
                .set(selector as u32, root, 0)
                .map_err(fill(map_names::ROOTS))?;
        }
        let mut edges: HashMap<_, DfaEdge, u32> = self.typed_map(map_names::DFA_EDGES)?;
        for (edge, next) in &compiled.edges {
            edges
                .insert(edge, next, 0)
                .map_err(fill(map_names::DFA_EDGES))?;
        }
        let mut defaults: Array<_, u32> = self.typed_map(map_names::DFA_DEFAULT)?;
        for (state, next) in compiled.defaults.iter().enumerate() {
            defaults
                .set(state as u32, next, 0)
                .map_err(fill(map_names::DFA_DEFAULT))?;
        }
        let mut ports: LpmTrie<_, PortKey, Verdict> = self.typed_map(map_names::PORTS)?;
        for ((len, key), verdict) in &compiled.ports {
            let verdict = Verdict {
                key: keys.get(verdict.rule as usize).copied().unwrap_or(0),
                ..*verdict
            };
            ports
                .insert(&Key::new(*len, *key), &verdict, 0)
                .map_err(fill(map_names::PORTS))?;
        }
        Ok(())
    }

    /// A map of the object, borrowed mutably as its typed view.
    fn typed_map<'a, V>(&'a mut self, name: &'static str) -> Result<V, ObjectError>
    where
        V: TryFrom<&'a mut Map, Error = MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(ObjectError::Missing(name))?;
        V::try_from(map).map_err(|source| ObjectError::Map { map: name, source })
    }
}

/// Kernel memory charged for `map`, from the `memlock:` line of its fdinfo
/// (0 when the kernel does not say).
fn memlock_bytes(map: &Map) -> u64 {
    let fd = match map {
        Map::Array(d) | Map::HashMap(d) | Map::LpmTrie(d) | Map::PerCpuArray(d) => {
            d.fd().as_fd().as_raw_fd()
        }
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
