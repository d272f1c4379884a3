//! The pods' guard (`rulebpf-ebpf/src/guard.rs`): connect hooks on the
//! parent cgroup of a node's pods that refuse the connects of a pod the NRI
//! plugin has not seen, attached with `BPF_F_ALLOW_OVERRIDE` so that a pod
//! with its instance's own hooks never runs them. Its map of admitted pod
//! cgroups is pinned (in the guard's directory): pods admitted stay
//! admitted while the plugin is down; new ones are refused until it is
//! back.

use std::{collections::HashSet, os::fd::AsFd as _, path::Path};

use aya::{
    EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::CgroupSockAddr,
};

use super::ObjectError;
use crate::{
    model::program::{Hook, ProgramKind},
    sys::{bpf, cgroup::Cgroup, securedir::SecureDir},
};

/// The guard object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rulebpf-guard"));

const PODS: &str = "RULEBPF_GUARD_PODS";
const REFUSED: &str = "RULEBPF_GUARD_REFUSED";
const LEVEL: &str = "RULEBPF_GUARD_LEVEL";
/// The guard's programs, by hook, as the object names them.
const PROGRAMS: [(Hook, &str); 2] = [
    (Hook::Connect4, "rulebpf_guard4"),
    (Hook::Connect6, "rulebpf_guard6"),
];

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("attaching the pods' guard ({hook}) to {cgroup}: {source}")]
    Attach {
        hook: &'static str,
        cgroup: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the pods' guard map: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// The guard's programs are named so (the kernel keeps 15 characters).
const PROGRAM_PREFIX: &str = "rulebpf_guard";

/// Takes the guard off `cgroup` (its programs only, whatever else is
/// attached there); returns how many programs were detached.
pub fn remove(cgroup: &Cgroup) -> Result<usize, GuardError> {
    let error = |source| GuardError::Attach {
        hook: "detaching",
        cgroup: cgroup.path.clone(),
        source,
    };
    let dir = std::fs::File::open(&cgroup.path).map_err(error)?;
    let mut removed = 0;
    for hook in Hook::ALL {
        let kind = ProgramKind::Hook(hook);
        for id in bpf::attached_programs(dir.as_fd(), kind).map_err(error)? {
            if bpf::program_name(id).is_ok_and(|n| n.starts_with(PROGRAM_PREFIX)) {
                bpf::detach_program(dir.as_fd(), kind, id).map_err(error)?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// The guard for a cgroup, and its pinned maps.
pub struct Guard {
    ebpf: aya::Ebpf,
    cgroup: Cgroup,
    attached: bool,
    pods: HashMap<MapData, u64, u8>,
    refused: PerCpuArray<MapData, u64>,
}

impl Guard {
    /// Loads the guard for `cgroup` (its level below `mount`) with its maps
    /// pinned in `dir` (reused when there: pods admitted before stay
    /// admitted). Nothing is attached yet: see [`Guard::attach`].
    pub fn load(dir: &SecureDir, cgroup: &Cgroup, mount: &Path) -> Result<Self, GuardError> {
        let level = cgroup
            .path
            .strip_prefix(mount)
            .map_or(0, |p| p.components().count()) as u32;
        let mut ebpf = EbpfLoader::new()
            .override_global(LEVEL, &level, true)
            .default_map_pin_directory(dir.fd_path(""))
            .load(OBJECT)
            .map_err(ObjectError::CreateMaps)?;
        for name in PROGRAMS.map(|(_, name)| name) {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(ObjectError::Missing(name))?
                .try_into()
                .map_err(|_| ObjectError::ProgramType(name))?;
            program.load().map_err(|source| ObjectError::Load {
                program: name,
                source,
            })?;
        }
        let pods = HashMap::try_from(ebpf.take_map(PODS).ok_or(ObjectError::Missing(PODS))?)?;
        let refused = PerCpuArray::try_from(
            ebpf.take_map(REFUSED)
                .ok_or(ObjectError::Missing(REFUSED))?,
        )?;
        Ok(Self {
            ebpf,
            cgroup: cgroup.clone(),
            attached: false,
            pods,
            refused,
        })
    }

    /// Attaches the guard, replacing the one attached there before (if
    /// any) without a gap. Done once the pods already running are admitted:
    /// a guard attached before would refuse their connects meanwhile.
    pub fn attach(&mut self) -> Result<(), GuardError> {
        if self.attached {
            return Ok(());
        }
        let error = |hook: &'static str| {
            let cgroup = self.cgroup.path.clone();
            move |source| GuardError::Attach {
                hook,
                cgroup,
                source,
            }
        };
        let dir = std::fs::File::open(&self.cgroup.path).map_err(error("opening the cgroup"))?;
        for (hook, name) in PROGRAMS {
            let program: &CgroupSockAddr = self
                .ebpf
                .program(name)
                .ok_or(ObjectError::Missing(name))?
                .try_into()
                .map_err(|_| ObjectError::ProgramType(name))?;
            let fd = program.fd().map_err(|source| ObjectError::Load {
                program: name,
                source,
            })?;
            bpf::attach_overridable(dir.as_fd(), ProgramKind::Hook(hook), fd.as_fd())
                .map_err(error(hook.name()))?;
        }
        self.attached = true;
        Ok(())
    }

    /// The guarded cgroup.
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// Lets the pod whose cgroup is `cgroup_id` through.
    pub fn admit(&mut self, cgroup_id: u64) -> Result<(), GuardError> {
        Ok(self.pods.insert(&cgroup_id, &0, 0)?)
    }

    /// Forgets a removed pod.
    pub fn forget(&mut self, cgroup_id: u64) {
        let _ = self.pods.remove(&cgroup_id);
    }

    /// Forgets every pod but those of `keep` (after the runtime listed the
    /// pods there are: entries of pods removed while the plugin was down).
    pub fn retain(&mut self, keep: &HashSet<u64>) {
        let gone: Vec<u64> = self
            .pods
            .keys()
            .flatten()
            .filter(|id| !keep.contains(id))
            .collect();
        for id in gone {
            self.forget(id);
        }
    }

    /// Connects refused so far (since the map was created).
    pub fn refused(&self) -> u64 {
        self.refused
            .get(&0, 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }
}
