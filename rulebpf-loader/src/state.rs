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
//! [`crate::instance`]): a crash between the two leaves a record too many,
//! never a kernel the records do not describe. The records carry what the
//! kernel cannot tell (rule texts, file names); the kernel decides what is
//! in force.

use std::{
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    entry::PerTracker,
    hook::PerHook,
    object::{AppBound, Policy, ProgramInfo, Sharing},
    securedir::{SecureDir, SecureDirError},
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
    /// Who asked: `attach`, `run` (which re-attaches a re-created path), or
    /// the OCI hook for a container.
    pub by: AttachedBy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachedBy {
    Attach,
    Run,
    Container { id: String },
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

/// One rule as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleInfo {
    pub line: u32,
    pub text: String,
    /// Its key in the instance's occupancy map (`stats::rule_keys`).
    #[serde(default)]
    pub key: u64,
    /// Ports in its origin range (0: the OS chooses).
    #[serde(default)]
    pub ports: u32,
    /// Its origin range, first and last port (`None`: the OS chooses, or a
    /// record written before ranges were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<(u16, u16)>,
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

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Dir(#[from] SecureDirError),
    #[error("{} is not a rulebpf record", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The file name of rule set `generation`'s record.
pub fn set_file(generation: u64) -> String {
    format!("set-{generation}.json")
}

pub const INSTANCE_FILE: &str = "instance.json";

/// Reads the JSON record `name` in `dir`; `None` when there is none.
pub fn read<T: DeserializeOwned>(dir: &SecureDir, name: &str) -> Result<Option<T>, StateError> {
    let Some(bytes) = dir.read(name)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StateError::Corrupt {
            path: dir.display(name),
            source,
        })
}

/// Replaces the JSON record `name` in `dir` as a whole.
pub fn write<T: Serialize>(dir: &SecureDir, name: &str, record: &T) -> Result<(), StateError> {
    let json = serde_json::to_vec_pretty(record).expect("records serialize");
    Ok(dir.write(name, &json)?)
}

/// Seconds since the Unix epoch (the unit of every time recorded here).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
