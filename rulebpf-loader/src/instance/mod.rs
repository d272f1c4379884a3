//! Instances: a name, one rule set in force, and the cgroups it is attached
//! to (where each piece lives: `crate::model::layout`).
//!
//! ```text
//! lock         the change lock every command takes; `run`'s owner lock
//! store        the records and the rule-set generations
//! swap         stage, swap, reconcile over the kernel operations they need
//!              (a trait: unit-tested against a fake kernel that fails or dies)
//! rule_sets    the swap on the real kernel: which rule set is in force
//! readings     counters, occupancy, instance counters of the set in force
//! attachments  attach (linked, or for a systemd unit), detach, gc
//! events       the decision-event ring and its reader's lock and socket
//! legacy       instances of the previous layout, replaced without a gap
//! ```
//!
//! **Swap.** A new rule set is its own pair of programs with its own, fully
//! written maps; putting it in force writes each program into its hook's jump
//! slot (`bpf_map_update_elem` on a program array, one step per hook). Each
//! connect() runs the old set or the new one, never a mix; the connect4 and
//! connect6 slots switch microseconds apart. Nothing attached changes, so a
//! cgroup attached by systemd or an OCI hook follows every swap.
//!
//! **Crashes.** The set's record is written before the swap, and what is in
//! force is read back from the kernel (the program a jump slot holds), never
//! assumed from the records. Every command that changes an instance first
//! reconciles: an interrupted swap is completed, sets not in force are
//! removed. Whatever the moment of a `kill -9`, the next command shows what
//! the kernel enforces, and the next attach works.
//!
//! **The kernel decides what is attached.** Before attaching, the cgroup's
//! programs are queried: rulebpf never stacks a second pair of its own
//! hooks on one cgroup; `detach` removes every rulebpf program it finds on
//! the cgroup and checks that none is left.

mod attachments;
pub mod events;
pub mod legacy;
mod lock;
mod readings;
mod rule_sets;
mod store;
mod swap;

use std::{io, path::PathBuf};

pub use attachments::clear_cgroup;
pub use lock::{CommandLock, Owner};
pub use rule_sets::{Applied, InForce};
pub use store::StoreError;

use crate::{
    kernel::{ObjectError, attach::AttachError, counters::CountersError, entry, integrity},
    model::{
        layout,
        name::{InstanceName, NameError},
        program::Hook,
        records::InstanceRecord,
    },
    sys::{
        cgroup::CgroupError,
        securedir::{SecureDir, SecureDirError},
        time::unix_now,
    },
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Why an instance could not be changed or read.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("no bpf file system at /sys/fs/bpf: mount it with `mount -t bpf bpf /sys/fs/bpf`")]
    NoBpffs,
    #[error(
        "changing rules needs root (CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN): {0} refused access"
    )]
    Privilege(String),
    #[error(transparent)]
    Dir(#[from] SecureDirError),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Counters(#[from] CountersError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{what}")]
    Kernel {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("nothing attached to {0}")]
    NotAttached(String),
    #[error("no instance named {0}")]
    NoInstance(InstanceName),
    #[error(
        "instance {name} is managed by `rulebpf run` (pid {pid}); change its rules file \
         instead, or stop that service (--force overrides, and the service will notice)"
    )]
    Managed { name: InstanceName, pid: u32 },
    #[error(
        "{} already has rulebpf hooks ({hook} program {program}{}); rulebpf never stacks \
         two rule sets on one cgroup: `rulebpf detach --cgroup {}` first",
        cgroup.display(),
        owner.as_ref().map(|o| format!(", instance {o}")).unwrap_or_default(),
        cgroup.display()
    )]
    Stacked {
        cgroup: PathBuf,
        hook: &'static str,
        program: u32,
        owner: Option<InstanceName>,
    },
    #[error("instance {0} has no rule set in force")]
    NoRules(InstanceName),
    #[error(
        "another rulebpf command has been changing instance {name} for {waited:?}; \
         nothing was changed"
    )]
    Busy {
        name: InstanceName,
        waited: std::time::Duration,
    },
}

impl InstanceError {
    fn kernel(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| {
            if source.kind() == io::ErrorKind::PermissionDenied {
                Self::Privilege(what)
            } else {
                Self::Kernel { what, source }
            }
        }
    }
}

/// The two top directories, each root's and verified.
struct Tops {
    pins: SecureDir,
    records: SecureDir,
}

impl Tops {
    /// For commands that change things: created when missing.
    fn create() -> Result<Self, InstanceError> {
        ensure_bpffs()?;
        Ok(Self {
            pins: SecureDir::open_top(&layout::pin_dir())?,
            records: SecureDir::open_top(&layout::run_dir())?,
        })
    }

    /// For commands that only look: `None` when rulebpf never ran here.
    fn existing() -> Result<Option<Self>, InstanceError> {
        let Some(pins) = SecureDir::open_existing(&layout::pin_dir())? else {
            return Ok(None);
        };
        let records = SecureDir::open_top(&layout::run_dir())?;
        Ok(Some(Self { pins, records }))
    }
}

/// A named instance, opened.
#[derive(Debug)]
pub struct Instance {
    name: InstanceName,
    pins: SecureDir,
    records: SecureDir,
}

/// How an attachment stands, as the kernel and the cgroup file system say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// The cgroup is there, with the same id, and the entry programs are
    /// attached to it.
    InForce,
    /// The cgroup directory no longer exists.
    CgroupGone,
    /// A cgroup exists at the path, but it is another one (re-created): the
    /// rules are not attached to it.
    Recreated { id: u64 },
    /// The cgroup is there but the entry programs are not attached.
    Detached,
}

impl Instance {
    /// Opens instance `name`, creating it (directories and entry programs)
    /// when it does not exist yet.
    pub fn create(name: &InstanceName) -> Result<Self, InstanceError> {
        Self::create_with(name, rulebpf_common::TUPLE_CAPACITY)
    }

    /// [`Self::create`], a new instance's tuple table sized for
    /// `tuple_capacity` live shared sockets (an existing one keeps its size).
    pub fn create_with(name: &InstanceName, tuple_capacity: u32) -> Result<Self, InstanceError> {
        let tops = Tops::create()?;
        let pins = tops.pins.subdir(name.as_str(), true)?.expect("created");
        let records = tops.records.subdir(name.as_str(), true)?.expect("created");
        let instance = Self {
            name: name.clone(),
            pins,
            records,
        };
        let _lock = instance.lock()?;
        // A pin removed or replaced by hand would otherwise be replaced by
        // a fresh, empty copy that the bookkeeping programs never see.
        // An unreadable record is reported where it is needed; the maps are
        // still checked against the pinned programs.
        let record = instance.record().unwrap_or_default();
        let repaired = integrity::repair(&instance.pins, &record)
            .map_err(InstanceError::kernel(format!("repairing instance {name}")))?;
        for line in repaired {
            log::warn!("instance {name}: {line}");
        }
        if !entry::exists(&instance.pins) {
            // New, or made before some of the entry object existed: what
            // is pinned stays, what is missing is added.
            let programs = entry::create(&instance.pins, tuple_capacity)?;
            let old = instance.record()?;
            let record = InstanceRecord {
                entry: programs.hooks,
                trackers: programs.trackers,
                created_at: if old.created_at == 0 {
                    unix_now()
                } else {
                    old.created_at
                },
                ..old
            };
            instance.write_record(&record)?;
        }
        Ok(instance)
    }

    /// Opens instance `name` if it exists.
    pub fn open(name: &InstanceName) -> Result<Option<Self>, InstanceError> {
        let Some(tops) = Tops::existing()? else {
            return Ok(None);
        };
        let Some(pins) = tops.pins.subdir(name.as_str(), false)? else {
            return Ok(None);
        };
        let records = tops.records.subdir(name.as_str(), true)?.expect("created");
        Ok(Some(Self {
            name: name.clone(),
            pins,
            records,
        }))
    }

    /// Every instance, by name.
    pub fn all() -> Result<Vec<Self>, InstanceError> {
        let Some(tops) = Tops::existing()? else {
            return Ok(vec![]);
        };
        let mut out = Vec::new();
        for (name, _) in tops.pins.entries()? {
            // The previous layout's instances are not instances of this one.
            let Ok(name) = InstanceName::new(&name) else {
                continue;
            };
            if let Some(instance) = Self::open(&name)? {
                out.push(instance);
            }
        }
        Ok(out)
    }

    pub fn name(&self) -> &InstanceName {
        &self.name
    }

    /// Pins that do not hold what the instance's programs use
    /// ([`integrity`]); empty when the record cannot be read.
    pub fn damage(&self) -> Vec<integrity::Damage> {
        self.record()
            .map(|record| integrity::check(&self.pins, &record))
            .unwrap_or_default()
    }

    /// The pinned entry program of `hook` (what systemd's BPFProgram= names).
    pub fn entry_pin(&self, hook: Hook) -> PathBuf {
        self.pins.display(layout::program_pin(hook))
    }
}

/// The pods' guard's pin directory (`rulebpf nri --guard`), created
/// root-only like every directory of rulebpf's.
pub fn guard_dir() -> Result<SecureDir, InstanceError> {
    let tops = Tops::create()?;
    Ok(tops
        .pins
        .subdir(layout::GUARD_DIR, true)?
        .expect("created when missing"))
}

/// Removes the pods' guard's pins (its maps), once its programs are off
/// every cgroup.
pub fn remove_guard_dir() -> Result<bool, InstanceError> {
    let tops = Tops::create()?;
    Ok(tops.pins.remove_tree(layout::GUARD_DIR)?)
}

/// Removes record directories that have no pins (left by a crash, or by
/// the previous layout's detach); returns their names.
pub fn collect_orphan_records() -> Result<Vec<String>, InstanceError> {
    let Some(tops) = Tops::existing()? else {
        return Ok(vec![]);
    };
    let mut removed = Vec::new();
    for (name, _) in tops.records.entries()? {
        // Dot files are no instances (`.kernel`: what the kernel offers).
        if !tops.pins.contains(&name) && !name.starts_with('.') {
            tops.records.remove_tree(&name)?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// bpffs must be mounted at /sys/fs/bpf for the pins to outlive the loader.
fn ensure_bpffs() -> Result<(), InstanceError> {
    match rustix::fs::statfs(layout::BPFFS_MOUNT) {
        Ok(fs) if fs.f_type == BPF_FS_MAGIC => Ok(()),
        _ => Err(InstanceError::NoBpffs),
    }
}
