//! The eBPF object of one rule set: the connect4/connect6 programs and the
//! maps that hold the compiled rules (layouts: `rulebpf-common`).
//!
//! Every rule set gets its own object, with maps sized exactly for it and
//! written completely before its programs are loaded: the maps of the object
//! in force are never edited, which is what makes the swap in
//! `crate::instance` atomic. This module loads, fills and pins an object;
//! it knows nothing of cgroups, links or instances — only where the
//! instance maps are pinned, which every rule set of an instance shares
//! (`rulebpf_common::shared_map_names`, see [`super::entry`]).

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapError, PerCpuArray, lpm_trie::Key},
    programs::{CgroupSockAddr, ProgramFd},
};
use rulebpf_common::{
    DfaEdge, PortKey, RuleStats, Verdict, global_names, map_names, shared_map_names,
};
use rulebpf_rules::{compile::Compiled, identity, ruleset::RuleSet};

use super::{ObjectError, entry, program};
use crate::{
    model::{
        layout,
        options::{AppBound, LoadOptions, Policy, Sharing},
        program::{Hook, PerHook},
        records::ProgramInfo,
    },
    sys::{btf, features::Support, securedir::SecureDir},
};

/// The connect4/connect6 object built by build.rs from `rulebpf-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rulebpf"));

/// A loaded rule-set object: maps filled, both programs verified, nothing
/// attached yet.
pub struct RuleSetObject {
    ebpf: Ebpf,
    /// Which pair of the object's programs was loaded: the search of every
    /// port (`bpf_loop`, 5.17+) or the bounded one.
    every_port: bool,
}

/// The name in the object file of `hook`'s program: the one that searches
/// every port of a range with `bpf_loop`, or the one for kernels without it.
const fn object_program_name(hook: Hook, every_port: bool) -> &'static str {
    match (hook, every_port) {
        (Hook::Connect4, true) => rulebpf_common::PROGRAM_CONNECT4,
        (Hook::Connect6, true) => rulebpf_common::PROGRAM_CONNECT6,
        (Hook::Connect4, false) => rulebpf_common::PROGRAM_CONNECT4_BOUNDED,
        (Hook::Connect6, false) => rulebpf_common::PROGRAM_CONNECT6_BOUNDED,
    }
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
        let policy = match options.policy {
            Policy::Strict => rulebpf_common::POLICY_STRICT,
            Policy::Fallback => rulebpf_common::POLICY_FALLBACK,
        };
        // Where the kernel cannot set SO_REUSEADDR from the hook (before
        // 6.0) every connect would try and fail: the sockets are bound
        // without sharing from the start (the degradation says so).
        // The bounded search (no bpf_loop, before 5.17) never shares: no
        // kernel without bpf_loop lets the hook set SO_REUSEADDR (6.0).
        let every_port = support.every_port();
        let sharing = u32::from(
            options.sharing == Sharing::On && support.sharing() != Some(false) && every_port,
        );
        let app_bound = match options.app_bound {
            AppBound::Keep => rulebpf_common::APP_BOUND_KEEP,
            AppBound::Refuse => rulebpf_common::APP_BOUND_REFUSE,
        };
        let tuples = entry::tuple_capacity_of(instance)?.unwrap_or(rulebpf_common::TUPLE_CAPACITY);
        // 0 (the substate is not read) unless the helper is there too.
        let tw_substate = if support.timewait_substate() {
            btf::tw_substate()
        } else {
            0
        };
        // For measuring what events cost (`cargo xtask bench`): the set
        // loads with their code removed.
        // And on a kernel that lacks what they need, the set loads without
        // them (the verifier would refuse the helpers).
        let events_on =
            u32::from(support.events() && std::env::var_os(layout::NO_EVENTS_ENV).is_none());
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
            .override_global(global_names::EVENTS_ON, &events_on, true)
            .override_global(aya_log::LEVEL, &log_level, true)
            .load(OBJECT)
            .map_err(ObjectError::CreateMaps)?;
        let mut object = Self { ebpf, every_port };
        object.fill(compiled, &identity::keys_of(&set.rules))?;
        for hook in Hook::ALL {
            let name = object_program_name(hook, every_port);
            let program = object
                .ebpf
                .program_mut(name)
                .ok_or(ObjectError::Missing(name))?;
            program::load(program, hook.name())?;
        }
        Ok(object)
    }

    /// One of the two programs.
    pub fn program(&mut self, hook: Hook) -> Result<&mut CgroupSockAddr, ObjectError> {
        let name = object_program_name(hook, self.every_port);
        self.ebpf
            .program_mut(name)
            .ok_or(ObjectError::Missing(name))?
            .try_into()
            .map_err(|_| ObjectError::ProgramType(name))
    }

    /// The per-rule counters map, for seeding (see [`super::counters`]).
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
                program: hook.name(),
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
            if !name.starts_with('.') && !rulebpf_common::is_instance_map(name) {
                let path = dir.fd_path(name);
                map.pin(&path)
                    .map_err(|source| ObjectError::Pin { path, source })?;
            }
        }
        PerHook::try_from_fn(|hook| {
            let name = object_program_name(hook, self.every_port);
            let program = self
                .ebpf
                .program_mut(name)
                .ok_or(ObjectError::Missing(name))?;
            program::pin(
                program,
                hook.name(),
                dir.fd_path(&layout::set_program_pin(hook)),
            )
        })
    }

    /// Kernel memory charged for the rule set's own maps (`memlock` in
    /// fdinfo; the instance maps are the instance's).
    pub fn map_memlock_bytes(&self) -> u64 {
        self.ebpf
            .maps()
            .filter(|(name, _)| !rulebpf_common::is_instance_map(name))
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
