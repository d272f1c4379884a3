//! The state file of an instance (`/run/rulebpf/<instance>/state.json`):
//! what `status`, `stats` and the metrics know about an attached rule set
//! without asking the kernel for things it cannot tell (the rule texts, the
//! file they came from).
//!
//! It keeps apart the **rule set**, a description of what the kernel enforces
//! (written by every attach or swap, never otherwise), and the **service**'s
//! bookkeeping (reload results, DNS counters, the pid of `rulebpf run`), which
//! changes without touching the kernel.

use std::{
    fs::{self, File},
    io::{self, Write as _},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    hook::PerHook,
    object::{Policy, ProgramInfo},
};

/// Everything recorded about an attached instance.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    /// The cgroup directory the hooks are attached to.
    pub cgroup: PathBuf,
    /// Its id (inode number) when attached.
    pub cgroup_id: u64,
    /// Seconds since the Unix epoch.
    pub attached_at: u64,
    pub rule_set: RuleSetRecord,
    pub service: ServiceRecord,
}

/// The rule set in force: changes only when the kernel's does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleSetRecord {
    pub rules_file: PathBuf,
    /// Rule sets attached to this cgroup so far; names the `gen-<N>` pins.
    pub generation: u64,
    pub policy: Policy,
    pub programs: PerHook<ProgramInfo>,
    /// Kernel memory charged for the rule set's maps (`memlock` in fdinfo).
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
}

/// What `rulebpf run` (or the last `attach`) records beside the rules.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The last attempt to change the rules.
    pub last_reload: Option<Reload>,
    /// Set while `rulebpf run` manages this instance.
    pub pid: Option<u32>,
    pub dns_refreshes: u64,
    pub dns_failures: u64,
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
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a rulebpf state file", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Reads the state at `path`; `None` when there is none.
pub fn read(path: &Path) -> Result<Option<State>, StateError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Read {
                path: path.into(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StateError::Corrupt {
            path: path.into(),
            source,
        })
}

/// Replaces the state at `path` as a whole: written beside it, flushed to
/// disk, then renamed over it, so a reader sees the old or the new file.
pub fn write(path: &Path, state: &State) -> Result<(), StateError> {
    let error = |source| StateError::Write {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(state)
        .map_err(io::Error::other)
        .map_err(error)?;
    let mut file = File::create(&tmp).map_err(error)?;
    file.write_all(&json).map_err(error)?;
    file.sync_all().map_err(error)?;
    fs::rename(&tmp, path).map_err(error)
}

/// Seconds since the Unix epoch (the unit of every time in [`State`]).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
