//! What rulebpf records about an instance in `/run/rulebpf/NAME/`, beside
//! what the kernel holds in `/sys/fs/bpf/rulebpf/NAME/`:
//!
//! ```text
//! instance.json   the instance: its entry programs, its attachments (cgroup
//!                 path and id), the service's bookkeeping
//! set-N.json      rule set N: the file, the rules as written, its programs
//! ```
//!
//! A rule set's record is written **before** the set is put in force, and
//! the set in force is whatever program the kernel's jump slot holds (see
//! `crate::instance`): a crash between the two leaves a record too many,
//! never a kernel the records do not describe. The records carry what the
//! kernel cannot tell (rule texts, file names); the kernel decides what is
//! in force.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use rulebpf_rules::identity::RuleInfo;

use super::{
    options::{AppBound, Policy, Sharing},
    program::{PerHook, PerTracker, ProgramKind},
};

/// The instance's own record (`instance.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The stable entry programs (what cgroups and systemd attach).
    pub entry: PerHook<ProgramInfo>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// Cgroups rulebpf attached the instance to, in attach order.
    pub attachments: Vec<Attachment>,
    pub service: ServiceRecord,
    /// The bookkeeping programs (attached beside the entry programs).
    #[serde(default)]
    pub trackers: PerTracker<ProgramInfo>,
    /// Port ranges this instance added to `net.ipv4.ip_local_reserved_ports`
    /// (`--reserve-ports`), and only those: what detach takes back.
    #[serde(default)]
    pub reserved_ports: Vec<(u16, u16)>,
}

impl InstanceRecord {
    /// Every program of the instance with its id (0: never made, as in an
    /// instance older than that program), in attach order.
    pub fn programs(&self) -> Vec<(ProgramKind, u32)> {
        ProgramKind::ALL
            .into_iter()
            .map(|kind| {
                let id = match kind {
                    ProgramKind::Hook(hook) => self.entry.get(hook).id,
                    ProgramKind::Tracker(tracker) => self.trackers.get(tracker).id,
                };
                (kind, id)
            })
            .collect()
    }

    /// The ids of [`Self::programs`] that exist.
    pub fn program_ids(&self) -> Vec<u32> {
        self.programs()
            .into_iter()
            .map(|(_, id)| id)
            .filter(|&id| id != 0)
            .collect()
    }
}

/// One cgroup the instance's entry programs are attached to by rulebpf (a
/// pinned link per hook under `cg-<id>/`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The cgroup directory, as it was when attached.
    pub cgroup: PathBuf,
    /// Its id (the directory's inode number) then: a cgroup re-created at
    /// the same path is another cgroup, with another id.
    pub cgroup_id: u64,
    /// Seconds since the Unix epoch.
    pub attached_at: u64,
    /// Who asked: `attach`, `run` (which re-attaches a re-created path),
    /// the OCI hook for a container, or `rulebpf nri` for a pod.
    pub by: AttachedBy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachedBy {
    Attach,
    Run,
    Container {
        id: String,
    },
    /// The pod's sandbox id, as the runtime names it.
    Pod {
        id: String,
    },
}

/// A rule set (`set-N.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleSetRecord {
    /// N: rule sets of this instance are numbered from 1.
    pub generation: u64,
    pub rules_file: PathBuf,
    pub policy: Policy,
    /// The set's programs; the jump slots hold these ids while it is in force.
    pub programs: PerHook<ProgramInfo>,
    /// Origin ports shared among destinations, or one socket per port.
    #[serde(default)]
    pub sharing: Sharing,
    /// What happens to sockets the application bound outside their rule's
    /// range.
    #[serde(default)]
    pub app_bound: AppBound,
    /// Kernel memory charged for the set's maps (`memlock` in fdinfo).
    pub map_memlock_bytes: u64,
    /// Seconds since the Unix epoch.
    pub loaded_at: u64,
    /// In compiled order: `RULEBPF_STATS[i]` counts `rules[i]`.
    pub rules: Vec<RuleInfo>,
    /// Names that did not resolve when the set was compiled.
    pub unresolved: Vec<String>,
}

/// What `rulebpf run` (or the last `attach`) records beside the rules.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The last attempt to change the rules.
    pub last_reload: Option<Reload>,
    pub dns_refreshes: u64,
    pub dns_failures: u64,
    /// Cgroups `run` attached again after they were re-created.
    #[serde(default)]
    pub reattaches: u64,
}

/// When the rules were last (re)loaded, and how it went.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reload {
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub ok: bool,
    /// What changed, or every error (`file:line:col: message`).
    pub message: String,
}

/// What the kernel says about a loaded program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramInfo {
    /// The kernel's program id (`bpftool prog show id N`).
    pub id: u32,
    /// Instructions the verifier processed (kernel 5.16+).
    pub verified_insns: Option<u32>,
}
