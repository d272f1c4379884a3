//! Instances: a name, one rule set in force, and the cgroups it is attached
//! to.
//!
//! ```text
//! /sys/fs/bpf/rulebpf/NAME/connect4, connect6    stable entry programs
//! /sys/fs/bpf/rulebpf/NAME/jump-connect4, -6     slot 0: the rule set in force
//! /sys/fs/bpf/rulebpf/NAME/set-N/                rule set N: programs + maps
//! /sys/fs/bpf/rulebpf/NAME/cg-ID/link-connect4   an attachment (a pinned link
//! /sys/fs/bpf/rulebpf/NAME/cg-ID/link-connect6     per hook) to cgroup ID
//! /run/rulebpf/NAME/instance.json, set-N.json    records (crate::state)
//! /run/rulebpf/NAME/lock                         serialises changes
//! /run/rulebpf/NAME/owner                        held by `rulebpf run`
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

use std::{
    fs::File,
    io,
    os::fd::AsFd as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};
use rulebpf_common::{PROGRAM_PREFIX, RuleStats, map_names};
use rulebpf_rules::ruleset::RuleSet;

use crate::{
    bpf,
    cgroup::{Cgroup, CgroupError},
    entry::{self, EntryError, Jumps},
    ephemeral,
    hook::{Hook, PerHook},
    legacy,
    name::{InstanceName, NameError},
    object::{self, LoadOptions, ObjectError, ProgramInfo, RuleSetObject},
    securedir::{SecureDir, SecureDirError},
    state::{
        self, AttachedBy, Attachment, INSTANCE_FILE, InstanceRecord, Reload, RuleSetRecord,
        ServiceRecord, StateError, unix_now,
    },
    stats::{self, RuleRow, StatsError},
};

/// Where every instance pins its objects.
pub const BPFFS_DIR: &str = "/sys/fs/bpf/rulebpf";
/// Where every instance keeps its records.
pub const RUN_DIR: &str = "/run/rulebpf";
/// Environment variables that move the two directories (the tests run a
/// second, independent rulebpf beside the first; the pin directory must
/// still be on bpffs and meets the same checks).
pub const PIN_DIR_ENV: &str = "RULEBPF_PIN_DIR";
pub const RUN_DIR_ENV: &str = "RULEBPF_RUN_DIR";

fn dir_from_env(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
}
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
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
    Entry(#[from] EntryError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Stats(#[from] StatsError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// A step on a cgroup link failed.
    #[error("{step} ({hook}) on {}", cgroup.display())]
    Link {
        hook: &'static str,
        step: &'static str,
        cgroup: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
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
    #[error(
        "rulebpf programs are still attached to {} after detaching: {programs:?}",
        cgroup.display()
    )]
    LeftBehind { cgroup: PathBuf, programs: Vec<u32> },
    #[error("instance {0} has no rule set in force")]
    NoRules(InstanceName),
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

    fn link(
        hook: Hook,
        step: &'static str,
        cgroup: &Path,
    ) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> Self {
        let cgroup = cgroup.to_path_buf();
        move |source| Self::Link {
            hook: hook.name(),
            step,
            cgroup,
            source,
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
            pins: SecureDir::open_top(&dir_from_env(PIN_DIR_ENV, BPFFS_DIR))?,
            records: SecureDir::open_top(&dir_from_env(RUN_DIR_ENV, RUN_DIR))?,
        })
    }

    /// For commands that only look: `None` when rulebpf never ran here.
    fn existing() -> Result<Option<Self>, InstanceError> {
        let Some(pins) = SecureDir::open_existing(&dir_from_env(PIN_DIR_ENV, BPFFS_DIR))? else {
            return Ok(None);
        };
        let records = SecureDir::open_top(&dir_from_env(RUN_DIR_ENV, RUN_DIR))?;
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

/// Holds the instance's change lock until dropped.
struct Lock(#[allow(dead_code)] File);

/// Held by `rulebpf run` for as long as it manages the instance.
pub struct Owner(#[allow(dead_code)] File);

/// What `apply` did.
#[derive(Debug)]
pub struct Applied {
    pub record: RuleSetRecord,
    /// True when a rule set was in force before and has been replaced.
    pub swapped: bool,
}

/// The rule set in force, as the kernel's jump slots say.
#[derive(Debug, Default)]
pub struct InForce {
    /// The program each jump slot holds.
    pub programs: PerHook<Option<u32>>,
    /// The record of the set whose connect4 program is in force.
    pub set: Option<RuleSetRecord>,
    /// The two slots hold programs of different sets (an interrupted swap,
    /// completed by the next command that changes the instance).
    pub mixed: bool,
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
        let repaired = crate::integrity::repair(&instance.pins, &record)
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
    /// ([`crate::integrity`]); empty when the record cannot be read.
    pub fn damage(&self) -> Vec<crate::integrity::Damage> {
        self.record()
            .map(|record| crate::integrity::check(&self.pins, &record))
            .unwrap_or_default()
    }

    /// The pinned entry program of `hook` (what systemd's BPFProgram= names).
    pub fn entry_pin(&self, hook: Hook) -> PathBuf {
        self.pins.display(entry::program_pin(hook))
    }

    fn lock(&self) -> Result<Lock, InstanceError> {
        let file = self.records.lock_file("lock")?;
        flock(&file, libc::LOCK_EX).map_err(InstanceError::kernel(format!(
            "locking instance {}",
            self.name
        )))?;
        Ok(Lock(file))
    }

    /// The pid of the `rulebpf run` that manages this instance, if one does.
    pub fn managed_by(&self) -> Result<Option<u32>, InstanceError> {
        let file = self.records.lock_file("owner")?;
        match flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
            Ok(()) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                let pid = self
                    .records
                    .read("owner")?
                    .and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok())
                    .unwrap_or(0);
                Ok(Some(pid))
            }
            Err(e) => Err(InstanceError::kernel("reading the owner lock")(e)),
        }
    }

    /// Refuses when a `rulebpf run` manages the instance, unless `force`.
    pub fn check_unmanaged(&self, force: bool) -> Result<(), InstanceError> {
        match self.managed_by()? {
            Some(pid) if !force => Err(InstanceError::Managed {
                name: self.name.clone(),
                pid,
            }),
            _ => Ok(()),
        }
    }

    /// Makes this process the instance's one owner (`rulebpf run`), for as
    /// long as the returned guard lives; refused while another holds it.
    pub fn take_ownership(&self) -> Result<Owner, InstanceError> {
        let mut file = self.records.lock_file("owner")?;
        if let Err(e) = flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let pid = self.managed_by()?.unwrap_or(0);
                return Err(InstanceError::Managed {
                    name: self.name.clone(),
                    pid,
                });
            }
            return Err(InstanceError::kernel("taking the owner lock")(e));
        }
        use std::io::{Seek as _, Write as _};
        let pid = std::process::id().to_string();
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()));
        written.map_err(InstanceError::kernel("recording the owner's pid"))?;
        Ok(Owner(file))
    }

    /// The instance's record (empty when there is none yet).
    pub fn record(&self) -> Result<InstanceRecord, InstanceError> {
        Ok(state::read(&self.records, INSTANCE_FILE)?.unwrap_or_default())
    }

    fn write_record(&self, record: &InstanceRecord) -> Result<(), InstanceError> {
        Ok(state::write(&self.records, INSTANCE_FILE, record)?)
    }

    /// Changes the instance's record under the lock.
    fn update(&self, change: impl FnOnce(&mut InstanceRecord)) -> Result<(), InstanceError> {
        let _lock = self.lock()?;
        let mut record = self.record()?;
        change(&mut record);
        self.write_record(&record)
    }

    /// `--reserve-ports`: makes `net.ipv4.ip_local_reserved_ports` hold the
    /// origin ranges of `set` (`reserve`), or none of the ports this
    /// instance added before (not `reserve`), and records what it added.
    /// Returns the ranges this instance holds reserved now.
    pub fn reserve_ports(
        &self,
        set: &RuleSet,
        reserve: bool,
    ) -> Result<Vec<(u16, u16)>, InstanceError> {
        let _lock = self.lock()?;
        let mut record = self.record()?;
        let wanted = if reserve {
            ephemeral::wanted(set)
        } else {
            vec![]
        };
        if wanted.is_empty() && record.reserved_ports.is_empty() {
            return Ok(vec![]);
        }
        record.reserved_ports = ephemeral::reconcile(&wanted, &record.reserved_ports).map_err(
            InstanceError::kernel(format!("changing {}", ephemeral::RESERVED_PORTS)),
        )?;
        self.write_record(&record)?;
        Ok(record.reserved_ports)
    }

    /// Changes the service's bookkeeping; the rules in force are not touched.
    pub fn update_service(
        &self,
        change: impl FnOnce(&mut ServiceRecord),
    ) -> Result<(), InstanceError> {
        self.update(|r| change(&mut r.service))
    }

    /// The rule set records present, by generation.
    fn set_records(&self) -> Result<Vec<RuleSetRecord>, InstanceError> {
        let mut out = Vec::new();
        for (name, _) in self.records.entries()? {
            let is_set = name.starts_with("set-") && name.ends_with(".json");
            if is_set && let Some(record) = state::read::<RuleSetRecord>(&self.records, &name)? {
                out.push(record);
            }
        }
        out.sort_by_key(|r| r.generation);
        Ok(out)
    }

    /// What the kernel has in force, with the matching record.
    pub fn in_force(&self) -> Result<InForce, InstanceError> {
        if !entry::exists(&self.pins) {
            return Ok(InForce::default());
        }
        let jumps = Jumps::open(&self.pins)?;
        let programs = PerHook::try_from_fn(|hook| jumps.current(hook))?;
        let records = self.set_records()?;
        let owner = |hook: Hook, id: Option<u32>| {
            records
                .iter()
                .find(|r| id.is_some_and(|id| r.programs.get(hook).id == id))
                .cloned()
        };
        let set4 = owner(Hook::Connect4, programs.connect4);
        let set6 = owner(Hook::Connect6, programs.connect6);
        let mixed = set4.as_ref().map(|s| s.generation) != set6.as_ref().map(|s| s.generation);
        Ok(InForce {
            programs,
            set: set4.or(set6),
            mixed,
        })
    }

    /// Makes the pins and records agree with the kernel: completes an
    /// interrupted swap, removes rule sets that are not in force.
    fn reconcile(&self, jumps: &mut Jumps) -> Result<InForce, InstanceError> {
        let mut in_force = self.in_force()?;
        if in_force.mixed
            && let Some(set) = &in_force.set
        {
            // connect4 is always swapped first: the set it holds is the newer.
            let set_dir = self.set_dir(set.generation, false)?;
            if let Some(set_dir) = set_dir {
                let program = pinned_set_program(&set_dir, Hook::Connect6)?;
                jumps.set(Hook::Connect6, program_fd(&program, Hook::Connect6)?)?;
                in_force = self.in_force()?;
            }
        }
        let keep = in_force.set.as_ref().map(|s| s.generation);
        self.remove_sets_except(keep)?;
        Ok(in_force)
    }

    fn set_dir(&self, generation: u64, create: bool) -> Result<Option<SecureDir>, InstanceError> {
        Ok(self.pins.subdir(&format!("set-{generation}"), create)?)
    }

    /// Removes every rule set (pins and record) but `keep`.
    fn remove_sets_except(&self, keep: Option<u64>) -> Result<(), InstanceError> {
        for (name, _) in self.pins.entries()? {
            if let Some(generation) = name
                .strip_prefix("set-")
                .and_then(|g| g.parse::<u64>().ok())
                && Some(generation) != keep
            {
                self.pins.remove_tree(&name)?;
            }
        }
        for (name, _) in self.records.entries()? {
            if let Some(generation) = name
                .strip_prefix("set-")
                .and_then(|g| g.strip_suffix(".json"))
                .and_then(|g| g.parse::<u64>().ok())
                && Some(generation) != keep
            {
                self.records.remove(&name)?;
            }
        }
        Ok(())
    }

    /// The next rule set number: above every set pinned or recorded.
    fn next_generation(&self) -> Result<u64, InstanceError> {
        let mut highest = 0;
        for (name, _) in self
            .pins
            .entries()?
            .into_iter()
            .chain(self.records.entries()?)
        {
            if let Some(g) = name
                .strip_prefix("set-")
                .map(|g| g.trim_end_matches(".json"))
                .and_then(|g| g.parse::<u64>().ok())
            {
                highest = highest.max(g);
            }
        }
        Ok(highest + 1)
    }

    /// Puts `set` in force: loads it, records it, swaps it into the jump
    /// slots. On error, what was in force stays.
    pub fn apply(&self, set: &RuleSet, options: LoadOptions) -> Result<Applied, InstanceError> {
        let _lock = self.lock()?;
        let mut jumps = Jumps::open(&self.pins)?;
        let in_force = self.reconcile(&mut jumps)?;
        let generation = self.next_generation()?;

        let mut object = RuleSetObject::load(set, options, &self.pins)?;
        if let Some(old) = &in_force.set {
            self.carry_stats(old, set, &mut object)?;
        }
        // Staged: pinned and recorded before anything in force changes.
        let set_dir = self.set_dir(generation, true)?.expect("created");
        let staged = Staged {
            instance: self,
            generation,
            keep: false,
        };
        let programs = object.pin(&set_dir)?;
        let record = rule_set_record(set, options, generation, programs, &object);
        state::write(&self.records, &state::set_file(generation), &record)?;

        self.swap(&mut jumps, &mut object, in_force.set.as_ref())?;
        let mut staged = staged;
        staged.keep = true;
        drop(staged);
        self.remove_sets_except(Some(generation))?;
        // Occupancy of rules that are gone and hold no socket: forgotten.
        stats::prune_occupancy(&self.pins, &record.rules);

        let now = unix_now();
        let mut instance = self.record()?;
        instance.service.last_reload = Some(Reload {
            at: now,
            ok: true,
            message: format!(
                "{} rule{} from {} (rule set {generation})",
                set.rules.len(),
                if set.rules.len() == 1 { "" } else { "s" },
                set.path.display()
            ),
        });
        self.write_record(&instance)?;
        Ok(Applied {
            record,
            swapped: in_force.set.is_some(),
        })
    }

    /// Writes the new programs into the jump slots, connect4 first. If the
    /// second write fails, connect4 gets the old program back.
    fn swap(
        &self,
        jumps: &mut Jumps,
        object: &mut RuleSetObject,
        old: Option<&RuleSetRecord>,
    ) -> Result<(), InstanceError> {
        jumps.set(Hook::Connect4, object.program_fd(Hook::Connect4)?)?;
        if let Err(error) = jumps.set(Hook::Connect6, object.program_fd(Hook::Connect6)?) {
            if let Some(old) = old
                && let Some(dir) = self.set_dir(old.generation, false)?
                && let Ok(program) = pinned_set_program(&dir, Hook::Connect4)
                && let Ok(fd) = program_fd(&program, Hook::Connect4)
            {
                let _ = jumps.set(Hook::Connect4, fd);
            }
            return Err(error.into());
        }
        Ok(())
    }

    /// Counters of rules that stay (same text) continue where they were;
    /// increments between this read and the swap are lost.
    fn carry_stats(
        &self,
        old: &RuleSetRecord,
        set: &RuleSet,
        object: &mut RuleSetObject,
    ) -> Result<(), InstanceError> {
        let totals = self.read_stats(old)?;
        let texts: Vec<&str> = set.rules.iter().map(|r| r.text.as_str()).collect();
        let seeds = stats::carry_over(&old.rules, totals, &texts);
        Ok(stats::seed(object, &seeds)?)
    }

    fn read_stats(&self, set: &RuleSetRecord) -> Result<Vec<RuleStats>, InstanceError> {
        let Some(dir) = self.set_dir(set.generation, false)? else {
            return Ok(vec![]);
        };
        Ok(stats::read(
            &dir.fd_path(map_names::STATS),
            &dir.display(map_names::STATS),
            set.rules.len(),
        )?)
    }

    /// The rule set in force with per-rule counters.
    pub fn stats(&self) -> Result<(RuleSetRecord, Vec<RuleRow>), InstanceError> {
        let set = self
            .in_force()?
            .set
            .ok_or_else(|| InstanceError::NoRules(self.name.clone()))?;
        let totals = self.read_stats(&set)?;
        let occupancy = self.occupancy()?;
        let rows = stats::rows(&set.rules, &totals, &occupancy);
        Ok((set, rows))
    }

    /// Every rule's occupancy (ports in use, high-water mark), by rule key
    /// (empty for an instance made before occupancy was kept); for the
    /// rules in force, as their ports tell it ([`stats::by_ports`]).
    pub fn occupancy(
        &self,
    ) -> Result<std::collections::HashMap<u64, rulebpf_common::Occupancy>, InstanceError> {
        use rulebpf_common::shared_map_names::{OCCUPANCY, PORT_USE, TUPLES};
        if !self.pins.contains(OCCUPANCY) {
            return Ok(Default::default());
        }
        let kernel =
            stats::read_occupancy(&self.pins.fd_path(OCCUPANCY), &self.pins.display(OCCUPANCY))?;
        let Some(set) = self.in_force()?.set else {
            return Ok(kernel);
        };
        let port_use = if self.pins.contains(PORT_USE) {
            stats::read_port_use(&self.pins.fd_path(PORT_USE), &self.pins.display(PORT_USE))?
        } else {
            vec![]
        };
        let tuples = if self.pins.contains(TUPLES) {
            stats::read_tuples(&self.pins.fd_path(TUPLES), &self.pins.display(TUPLES))?
        } else {
            vec![]
        };
        Ok(stats::by_ports(&set.rules, &kernel, &port_use, &tuples))
    }

    /// The instance counters (empty for an instance made before them).
    pub fn counters(&self) -> Result<Vec<(rulebpf_common::Counter, u64)>, InstanceError> {
        let name = rulebpf_common::shared_map_names::COUNTERS;
        if !self.pins.contains(name) {
            return Ok(vec![]);
        }
        Ok(stats::read_counters(
            &self.pins.fd_path(name),
            &self.pins.display(name),
        )?)
    }

    /// Attaches the instance's entry programs to `cgroup` (idempotent).
    /// Refused when the cgroup carries another rulebpf instance's hooks; an
    /// instance of the previous layout on it is replaced without a gap.
    /// Returns false when it was attached already.
    pub fn attach(&self, cgroup: &Cgroup, by: AttachedBy) -> Result<bool, InstanceError> {
        let _lock = self.lock()?;
        let record = self.record()?;
        let dir = File::open(&cgroup.path)
            .map_err(|e| InstanceError::kernel(format!("opening {}", cgroup.path.display()))(e))?;
        let legacy_programs = self.legacy_programs(cgroup.id)?;
        let mut missing = Vec::new();
        for hook in Hook::ALL {
            let ours = record.entry.get(hook).id;
            let present = ours_on(&dir, hook, &cgroup.path)?;
            if present.contains(&ours) {
                continue;
            }
            if let Some(&other) = present.iter().find(|id| !legacy_programs.contains(id)) {
                return Err(InstanceError::Stacked {
                    cgroup: cgroup.path.clone(),
                    hook: hook.name(),
                    program: other,
                    owner: owner_of(other),
                });
            }
            missing.push(hook);
        }
        // The bookkeeping programs too: also where systemd's BPFProgram=
        // attached the entry programs (it cannot attach sock_release).
        let trackers =
            entry::missing_trackers(&dir, &record.trackers).map_err(InstanceError::kernel(
                format!("querying the programs of {}", cgroup.path.display()),
            ))?;
        let recorded = record.attachments.iter().any(|a| a.cgroup_id == cgroup.id);
        if missing.is_empty() && trackers.is_empty() && recorded {
            return Ok(false);
        }
        // Recorded first, so that status never shows rules in force on a
        // cgroup it does not list (it checks the kernel for each record);
        // a failure below takes the record back.
        let mut record = self.record()?;
        let before = record.clone();
        record.attachments.retain(|a| a.cgroup_id != cgroup.id);
        record.attachments.push(Attachment {
            cgroup: cgroup.path.clone(),
            cgroup_id: cgroup.id,
            attached_at: unix_now(),
            by,
        });
        self.write_record(&record)?;
        // The release bookkeeping first, so that every socket the hooks bind
        // is released against the instance maps.
        let link_dir = self
            .pins
            .subdir(&attachment_dir(cgroup.id), true)?
            .expect("created");
        let how = entry::Attach::Linked(&link_dir);
        let attached = entry::attach_trackers(&self.pins, &dir, &cgroup.path, &trackers, how)
            .map_err(InstanceError::from)
            .and_then(|()| self.attach_links(&dir, cgroup, &missing));
        if let Err(e) = attached {
            entry::unpin_trackers(&link_dir, &trackers);
            let _ = self.write_record(&before);
            return Err(e);
        }
        // Only now that ours run: the previous layout's links go.
        if !legacy_programs.is_empty() {
            let tops = Tops::create()?;
            legacy::remove(&tops.pins, Some(&tops.records), cgroup.id)?;
        }
        Ok(true)
    }

    /// Attaches the entry programs to `cgroup` without links, unless they
    /// are attached already (systemd's `BPFProgram=` may have done it): for
    /// `rulebpf systemd-attach`, run by a unit's `ExecStartPre=` in its new
    /// cgroup. The attachment lives as long as the cgroup, so it is not
    /// recorded. The same no-stacking check as [`Instance::attach`].
    pub fn attach_for_unit(&self, cgroup: &Cgroup) -> Result<usize, InstanceError> {
        let _lock = self.lock()?;
        let record = self.record()?;
        let dir = File::open(&cgroup.path)
            .map_err(|e| InstanceError::kernel(format!("opening {}", cgroup.path.display()))(e))?;
        let mut attached = 0;
        // The bookkeeping programs first (systemd's BPFProgram= cannot
        // attach sock_release), without links as the entry programs below.
        let trackers =
            entry::missing_trackers(&dir, &record.trackers).map_err(InstanceError::kernel(
                format!("querying the programs of {}", cgroup.path.display()),
            ))?;
        let how = entry::Attach::Unlinked;
        entry::attach_trackers(&self.pins, &dir, &cgroup.path, &trackers, how)?;
        attached += trackers.len();
        for hook in Hook::ALL {
            let ours = record.entry.get(hook).id;
            let present = ours_on(&dir, hook, &cgroup.path)?;
            if present.contains(&ours) {
                continue;
            }
            if let Some(&other) = present.first() {
                return Err(InstanceError::Stacked {
                    cgroup: cgroup.path.clone(),
                    hook: hook.name(),
                    program: other,
                    owner: owner_of(other),
                });
            }
            let program = entry::program(&self.pins, hook)?;
            let fd = program_fd(&program, hook)?;
            bpf::attach_program(dir.as_fd(), hook, fd.as_fd()).map_err(InstanceError::kernel(
                format!("attaching {} to {}", hook.name(), cgroup.path.display()),
            ))?;
            attached += 1;
        }
        Ok(attached)
    }

    /// Attaches the entry programs of `hooks` to the cgroup open as `dir`
    /// and pins the links; both are pinned only once both attached (a
    /// failure drops the first link, which detaches it).
    fn attach_links(
        &self,
        dir: &File,
        cgroup: &Cgroup,
        hooks: &[Hook],
    ) -> Result<(), InstanceError> {
        let link_dir = self
            .pins
            .subdir(&attachment_dir(cgroup.id), true)?
            .expect("created");
        let mut links = Vec::new();
        for &hook in hooks {
            let mut program = entry::program(&self.pins, hook)?;
            let attaching = |e: Box<dyn std::error::Error + Send + Sync>| {
                InstanceError::link(hook, "attaching", &cgroup.path)(e)
            };
            // A cgroup link is always multi-attach: other connect programs
            // (systemd's, a CNI's) keep running, and with nested rulebpf
            // instances the innermost binds first and the outer ones see a
            // bound socket. link_create takes no flags (EINVAL otherwise):
            // https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/cgroup.c#L1442
            let id = program
                .attach(dir, CgroupAttachMode::Single)
                .map_err(|e| attaching(e.into()))?;
            let link = program.take_link(id).map_err(|e| attaching(e.into()))?;
            links.push((
                hook,
                FdLink::try_from(link).map_err(|e| attaching(e.into()))?,
            ));
        }
        for (hook, link) in links {
            link.pin(link_dir.fd_path(&link_pin(hook))).map_err(|e| {
                InstanceError::link(hook, "pinning the link", &cgroup.path)(e.into())
            })?;
        }
        Ok(())
    }

    /// Program ids of a previous-layout instance's links on cgroup `id`.
    fn legacy_programs(&self, cgroup_id: u64) -> Result<Vec<u32>, InstanceError> {
        let Some(tops) = Tops::existing()? else {
            return Ok(vec![]);
        };
        let Some(dir) = tops.pins.subdir(&legacy::dir_name(cgroup_id), false)? else {
            return Ok(vec![]);
        };
        let mut out = Vec::new();
        for hook in Hook::ALL {
            if let Ok(link) =
                aya::programs::links::PinnedLink::from_pin(dir.fd_path(&link_pin(hook)))
                && let Ok(info) = FdLink::from(link).info()
            {
                out.push(info.program_id());
            }
        }
        Ok(out)
    }

    /// Removes the attachments recorded for the cgroup at `path` (also a
    /// gone or re-created one), then every rulebpf program still attached
    /// to the cgroup now at `path`. Returns whether anything was removed.
    pub fn detach_cgroup(&self, path: &Path) -> Result<bool, InstanceError> {
        let _lock = self.lock()?;
        let mut record = self.record()?;
        let (gone, kept): (Vec<_>, Vec<_>) = record
            .attachments
            .into_iter()
            .partition(|a| a.cgroup == path);
        record.attachments = kept;
        for attachment in &gone {
            self.pins
                .remove_tree(&attachment_dir(attachment.cgroup_id))?;
        }
        self.write_record(&record)?;
        Ok(!gone.is_empty())
    }

    /// Removes the attachment to cgroup `id` (pins and record).
    pub fn detach_id(&self, cgroup_id: u64) -> Result<bool, InstanceError> {
        let _lock = self.lock()?;
        let mut record = self.record()?;
        let before = record.attachments.len();
        record.attachments.retain(|a| a.cgroup_id != cgroup_id);
        let removed_pins = self.pins.remove_tree(&attachment_dir(cgroup_id))?;
        let removed = removed_pins || record.attachments.len() != before;
        self.write_record(&record)?;
        Ok(removed)
    }

    /// Removes the whole instance: attachments, rule sets, entry programs,
    /// records. Programs attached by others (systemd) lose their rules: the
    /// entry's jump slots go with the pins.
    pub fn remove(self) -> Result<Vec<Attachment>, InstanceError> {
        let record = {
            let _lock = self.lock()?;
            self.record()?
        };
        // The reserved ports it added go first: a failure leaves the
        // instance (and its record of them) for the next attempt.
        if !record.reserved_ports.is_empty() {
            ephemeral::reconcile(&[], &record.reserved_ports).map_err(InstanceError::kernel(
                format!("changing {}", ephemeral::RESERVED_PORTS),
            ))?;
        }
        let tops = Tops::create()?;
        tops.pins.remove_tree(self.name.as_str())?;
        tops.records.remove_tree(self.name.as_str())?;
        // A link someone else still holds open outlives its pin: the kernel
        // is asked what is left of this instance on its cgroups.
        let t = &record.trackers;
        let entry = [
            record.entry.connect4.id,
            record.entry.connect6.id,
            t.bind4.id,
            t.bind6.id,
            t.sock_release.id,
            t.sock_ops.id,
        ];
        for attachment in &record.attachments {
            if let Ok(cgroup) = Cgroup::resolve(&attachment.cgroup)
                && cgroup.id == attachment.cgroup_id
            {
                clear_cgroup(&cgroup, Some(&entry))?;
            }
        }
        Ok(record.attachments)
    }

    /// How `attachment` stands now.
    pub fn standing(&self, attachment: &Attachment) -> Standing {
        let Ok(meta) = std::fs::metadata(&attachment.cgroup) else {
            return Standing::CgroupGone;
        };
        if meta.ino() != attachment.cgroup_id {
            return Standing::Recreated { id: meta.ino() };
        }
        let Ok(record) = self.record() else {
            return Standing::Detached;
        };
        let Ok(dir) = File::open(&attachment.cgroup) else {
            return Standing::CgroupGone;
        };
        let attached = Hook::ALL.iter().all(|&hook| {
            bpf::attached_programs(dir.as_fd(), hook)
                .is_ok_and(|ids| ids.contains(&record.entry.get(hook).id))
        });
        if attached {
            Standing::InForce
        } else {
            Standing::Detached
        }
    }

    /// Removes the attachments of cgroups that are gone or were re-created
    /// (their links no longer hold anything). Returns what was removed.
    pub fn collect_garbage(&self) -> Result<Vec<Attachment>, InstanceError> {
        let stale: Vec<Attachment> = self
            .record()?
            .attachments
            .into_iter()
            .filter(|a| {
                matches!(
                    self.standing(a),
                    Standing::CgroupGone | Standing::Recreated { .. }
                )
            })
            .collect();
        for attachment in &stale {
            self.detach_id(attachment.cgroup_id)?;
        }
        Ok(stale)
    }
}

/// A rule set pinned and recorded but not (yet) in force: removed on drop
/// unless kept.
struct Staged<'a> {
    instance: &'a Instance,
    generation: u64,
    keep: bool,
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if !self.keep {
            let name = format!("set-{}", self.generation);
            let _ = self.instance.pins.remove_tree(&name);
            let _ = self
                .instance
                .records
                .remove(&state::set_file(self.generation));
        }
    }
}

fn rule_set_record(
    set: &RuleSet,
    options: LoadOptions,
    generation: u64,
    programs: PerHook<ProgramInfo>,
    object: &RuleSetObject,
) -> RuleSetRecord {
    RuleSetRecord {
        generation,
        rules_file: set.path.clone(),
        policy: options.policy,
        programs,
        sharing: options.sharing,
        app_bound: options.app_bound,
        map_memlock_bytes: object.map_memlock_bytes(),
        loaded_at: unix_now(),
        rules: stats::rule_infos(set),
        unresolved: set.name_failures.iter().map(|f| f.name.clone()).collect(),
    }
}

/// A pinned program of a rule set, loaded back from its pin.
fn pinned_set_program(dir: &SecureDir, hook: Hook) -> Result<CgroupSockAddr, EntryError> {
    CgroupSockAddr::from_pin(dir.fd_path(&object::program_pin(hook)), hook.attach_type()).map_err(
        |source| EntryError::Program {
            hook: hook.name(),
            source,
        },
    )
}

fn program_fd(
    program: &CgroupSockAddr,
    hook: Hook,
) -> Result<&aya::programs::ProgramFd, EntryError> {
    program.fd().map_err(|source| EntryError::Program {
        hook: hook.name(),
        source,
    })
}

fn attachment_dir(cgroup_id: u64) -> String {
    format!("cg-{cgroup_id}")
}

fn link_pin(hook: Hook) -> String {
    format!("link-{}", hook.name())
}

fn flock(file: &File, operation: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The rulebpf programs attached directly to the cgroup open as `dir`.
fn ours_on(dir: &File, hook: Hook, path: &Path) -> Result<Vec<u32>, InstanceError> {
    let ids = bpf::attached_programs(dir.as_fd(), hook).map_err(InstanceError::kernel(format!(
        "querying the {} programs of {}",
        hook.name(),
        path.display()
    )))?;
    Ok(ids
        .into_iter()
        .filter(|&id| bpf::program_name(id).is_ok_and(|n| n.starts_with(PROGRAM_PREFIX)))
        .collect())
}

/// The instance whose entry program is `program`, if any.
fn owner_of(program: u32) -> Option<InstanceName> {
    Instance::all().ok()?.into_iter().find_map(|instance| {
        let record = instance.record().ok()?;
        Hook::ALL
            .iter()
            .any(|&h| record.entry.get(h).id == program)
            .then(|| instance.name.clone())
    })
}

/// Removes the rulebpf programs attached directly to `cgroup` (links by
/// anyone, and programs attached without a link, as systemd does) — all of
/// them, or `only` those — then checks that none is left. Returns how many
/// were removed.
pub fn clear_cgroup(cgroup: &Cgroup, only: Option<&[u32]>) -> Result<usize, InstanceError> {
    let wanted = |id: &u32| only.is_none_or(|only| only.contains(id));
    let dir = File::open(&cgroup.path)
        .map_err(|e| InstanceError::kernel(format!("opening {}", cgroup.path.display()))(e))?;
    let links = bpf::connect_links().map_err(InstanceError::kernel("listing cgroup links"))?;
    let mut removed = 0;
    for hook in Hook::ALL {
        for program in ours_on(&dir, hook, &cgroup.path)?
            .into_iter()
            .filter(wanted)
        {
            let link = links.iter().find(|l| {
                l.cgroup_id == cgroup.id
                    && l.attach_type == bpf::attach_type(hook)
                    && l.program_id == program
            });
            let result = match link {
                Some(link) => bpf::detach_link(link.link_id),
                None => bpf::detach_program(dir.as_fd(), hook, program),
            };
            match result {
                Ok(()) => removed += 1,
                // Its link was released between the query and now (a pin
                // just removed): gone already, which the check below sees.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => {
                    return Err(InstanceError::kernel(format!(
                        "detaching program {program} from {}",
                        cgroup.path.display()
                    ))(e));
                }
            }
        }
    }
    let ours_left = || -> Result<Vec<u32>, InstanceError> {
        Ok(Hook::ALL
            .iter()
            .map(|&hook| ours_on(&dir, hook, &cgroup.path))
            .collect::<Result<Vec<_>, _>>()?
            .concat()
            .into_iter()
            .filter(wanted)
            .collect())
    };
    // A released link leaves its cgroup a moment later: asked again for
    // up to 100 ms.
    let mut left = ours_left()?;
    for _ in 0..20 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        left = ours_left()?;
    }
    if !left.is_empty() {
        return Err(InstanceError::LeftBehind {
            cgroup: cgroup.path.clone(),
            programs: left,
        });
    }
    // The bookkeeping programs last: sockets released until now were still
    // given back.
    removed +=
        entry::clear_trackers(&dir, cgroup.id, only).map_err(InstanceError::kernel(format!(
            "detaching the bookkeeping programs from {}",
            cgroup.path.display()
        )))?;
    Ok(removed)
}

/// Removes the previous layout's instance of cgroup `id`, if any.
pub fn remove_legacy(cgroup_id: u64) -> Result<bool, InstanceError> {
    let Some(tops) = Tops::existing()? else {
        return Ok(false);
    };
    Ok(legacy::remove(&tops.pins, Some(&tops.records), cgroup_id)?)
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

/// The records' top directory (`/run/rulebpf`), created when missing.
pub fn records_dir() -> Result<SecureDir, InstanceError> {
    Ok(SecureDir::open_top(&dir_from_env(RUN_DIR_ENV, RUN_DIR))?)
}

/// Removes the previous layout's instances whose cgroup is gone, and
/// returns their cgroup ids (`rulebpf gc`).
pub fn collect_legacy_garbage(live: impl Fn(u64) -> bool) -> Result<Vec<u64>, InstanceError> {
    let Some(tops) = Tops::existing()? else {
        return Ok(vec![]);
    };
    let mut removed = Vec::new();
    for id in legacy::all(&tops.pins)? {
        if !live(id) {
            legacy::remove(&tops.pins, Some(&tops.records), id)?;
            removed.push(id);
        }
    }
    Ok(removed)
}

/// bpffs must be mounted at /sys/fs/bpf for the pins to outlive the loader.
fn ensure_bpffs() -> Result<(), InstanceError> {
    match rustix::fs::statfs(BPFFS_MOUNT) {
        Ok(fs) if fs.f_type == BPF_FS_MAGIC => Ok(()),
        _ => Err(InstanceError::NoBpffs),
    }
}
