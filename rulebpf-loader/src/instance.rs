//! One attached rule set per cgroup: its kernel objects pinned in bpffs, its
//! description in /run, and the atomic swap between rule sets.
//!
//! ```text
//! /sys/fs/bpf/rulebpf/cg-<cgroup id>/link-connect4  the cgroup links (keep the hooks attached)
//! /sys/fs/bpf/rulebpf/cg-<cgroup id>/link-connect6
//! /sys/fs/bpf/rulebpf/cg-<cgroup id>/gen-<N>/prog-connect4  the programs of rule set N
//! /sys/fs/bpf/rulebpf/cg-<cgroup id>/gen-<N>/prog-connect6
//! /sys/fs/bpf/rulebpf/cg-<cgroup id>/gen-<N>/RULEBPF_*  its maps
//! /run/rulebpf/cg-<cgroup id>/state.json            cgroup, file, rules of set N
//! /run/rulebpf/cg-<cgroup id>/lock                  serialises attach/detach
//! ```
//!
//! **Swap.** A new rule set is a new pair of programs with their own, fully
//! written maps; `BPF_LINK_UPDATE` then replaces the program on each link in
//! one step. Each connect() runs either the old program with the old maps or
//! the new one with the new maps, never a mix; the old objects are freed by the
//! kernel once no CPU runs them (RCU). Nothing before the updates touches what
//! is in force, so any failure leaves the old rules as they were (a failed
//! second update puts the first link back). The IPv4 and IPv6 hooks switch a
//! few microseconds apart.
//! https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/cgroup.c#L863

use std::{
    fs::{self, File},
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use aya::programs::{
    CgroupAttachMode, CgroupSockAddr,
    cgroup_sock_addr::CgroupSockAddrLink,
    links::{FdLink, PinnedLink},
};
use rulebpf_common::map_names;
use rulebpf_rules::ruleset::RuleSet;

use crate::{
    cgroup::{Cgroup, CgroupError},
    hook::{Hook, PerHook},
    object::{LoadOptions, ObjectError, ProgramInfo, RuleSetObject},
    state::{self, Reload, RuleInfo, RuleSetRecord, ServiceRecord, State, StateError, unix_now},
    stats::{self, StatsError},
};

/// Where every instance pins its objects.
pub const BPFFS_DIR: &str = "/sys/fs/bpf/rulebpf";
/// Where every instance keeps its description.
pub const RUN_DIR: &str = "/run/rulebpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The rulebpf instance of one cgroup (attached or not).
#[derive(Clone, Debug)]
pub struct Instance {
    pub cgroup_id: u64,
    bpf_dir: PathBuf,
    run_dir: PathBuf,
}

/// Result of [`Instance::apply`].
#[derive(Debug)]
pub struct Applied {
    pub state: State,
    /// True when rules were already attached and have been swapped.
    pub swapped: bool,
}

/// Why an instance could not be changed or read.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("no bpf file system at /sys/fs/bpf: mount it with `mount -t bpf bpf /sys/fs/bpf`")]
    NoBpffs,
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Stats(#[from] StatsError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// A step on a cgroup link failed (attach, pin, swap).
    #[error("{step} ({hook}){}", restore_failed.as_ref().map(|e| format!("; putting the previous rules back on the other hook failed too: {e}")).unwrap_or_default())]
    Link {
        hook: &'static str,
        step: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
        restore_failed: Option<String>,
    },
    #[error("nothing attached to {}", .0.display())]
    NotAttached(PathBuf),
}

impl InstanceError {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::Io { what, path, source }
    }

    fn link(
        hook: Hook,
        step: &'static str,
    ) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> Self {
        move |source| Self::Link {
            hook: hook.name(),
            step,
            source,
            restore_failed: None,
        }
    }
}

/// Holds the per-instance lock until dropped.
struct Lock(#[allow(dead_code)] File);

impl Instance {
    pub fn of(cgroup: &Cgroup) -> Self {
        Self::from_id(cgroup.id)
    }

    fn from_id(cgroup_id: u64) -> Self {
        let name = format!("cg-{cgroup_id}");
        Self {
            cgroup_id,
            bpf_dir: Path::new(BPFFS_DIR).join(&name),
            run_dir: Path::new(RUN_DIR).join(&name),
        }
    }

    /// Every instance with objects pinned in bpffs.
    pub fn all() -> Result<Vec<Self>, InstanceError> {
        let entries = match fs::read_dir(BPFFS_DIR) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(InstanceError::io("listing", Path::new(BPFFS_DIR))(e)),
        };
        let mut out: Vec<Self> = entries
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                let id = name.to_str()?.strip_prefix("cg-")?.parse().ok()?;
                Some(Self::from_id(id))
            })
            .collect();
        out.sort_by_key(|i| i.cgroup_id);
        Ok(out)
    }

    /// The instance of the cgroup `arg` names (absolute, or relative to the
    /// cgroup2 mount): by its id while it exists, else (a deleted cgroup) by
    /// the path recorded when it was attached. `None`: nothing recorded.
    pub fn find(arg: &Path) -> Result<Option<Self>, InstanceError> {
        match Cgroup::resolve(arg) {
            Ok(cgroup) => Ok(Some(Self::of(&cgroup))),
            Err(CgroupError::NotFound { .. }) => Self::by_recorded_path(&Cgroup::path_of(arg)?),
            Err(e) => Err(e.into()),
        }
    }

    fn by_recorded_path(path: &Path) -> Result<Option<Self>, InstanceError> {
        for instance in Self::all()? {
            if instance.state()?.is_some_and(|s| s.cgroup == path) {
                return Ok(Some(instance));
            }
        }
        Ok(None)
    }

    fn link_path(&self, hook: Hook) -> PathBuf {
        self.bpf_dir.join(format!("link-{}", hook.name()))
    }

    fn gen_dir(&self, generation: u64) -> PathBuf {
        self.bpf_dir.join(format!("gen-{generation}"))
    }

    fn state_path(&self) -> PathBuf {
        self.run_dir.join("state.json")
    }

    /// Whether the cgroup links are pinned (the hooks are in force).
    pub fn is_attached(&self) -> bool {
        self.link_path(Hook::Connect4).exists()
    }

    /// The description of the rule set in force, if any.
    pub fn state(&self) -> Result<Option<State>, StateError> {
        state::read(&self.state_path())
    }

    fn lock(&self) -> Result<Lock, InstanceError> {
        fs::create_dir_all(&self.run_dir).map_err(InstanceError::io("creating", &self.run_dir))?;
        let path = self.run_dir.join("lock");
        let file = File::create(&path).map_err(InstanceError::io("creating", &path))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(InstanceError::io("locking", &path)(
                io::Error::last_os_error(),
            ));
        }
        Ok(Lock(file))
    }

    /// Puts `set` in force on `cgroup`: attaches, or swaps atomically when a
    /// rule set is already attached. On error, what was in force stays.
    pub fn apply(
        &self,
        cgroup: &Cgroup,
        set: &RuleSet,
        options: LoadOptions,
    ) -> Result<Applied, InstanceError> {
        ensure_bpffs()?;
        let _lock = self.lock()?;
        let in_force = self.state()?.filter(|_| self.is_attached());
        let generation = in_force.as_ref().map_or(0, |s| s.rule_set.generation) + 1;

        let mut object = RuleSetObject::load(&set.compiled, options)?;
        if let Some(in_force) = &in_force {
            self.carry_stats(in_force, set, &mut object)?;
        }
        let (staged, programs) = self.stage(&mut object, generation)?;
        match &in_force {
            Some(in_force) => self.swap_links(&mut object, in_force.rule_set.generation)?,
            None => self.attach_links(cgroup, &mut object)?,
        }
        staged.keep();

        let state = record(
            cgroup,
            set,
            options,
            generation,
            programs,
            &object,
            in_force.as_ref(),
        );
        state::write(&self.state_path(), &state)?;
        self.remove_generations_except(Some(generation))?;
        Ok(Applied {
            state,
            swapped: in_force.is_some(),
        })
    }

    /// Counters of rules that stay (same text) continue where they were;
    /// increments between this read and the swap are lost.
    fn carry_stats(
        &self,
        in_force: &State,
        set: &RuleSet,
        object: &mut RuleSetObject,
    ) -> Result<(), InstanceError> {
        let totals = self.read_stats(in_force)?;
        let texts: Vec<&str> = set.rules.iter().map(|r| r.text.as_str()).collect();
        let seeds = stats::carry_over(&in_force.rule_set.rules, totals, &texts);
        Ok(stats::seed(object, &seeds)?)
    }

    /// Pins the new rule set's objects under `gen-<generation>`; they are
    /// removed again unless the returned guard is kept.
    fn stage(
        &self,
        object: &mut RuleSetObject,
        generation: u64,
    ) -> Result<(RemoveOnDrop, PerHook<ProgramInfo>), InstanceError> {
        let gen_dir = self.gen_dir(generation);
        let staged = RemoveOnDrop(Some(gen_dir.clone()));
        fs::create_dir_all(&gen_dir).map_err(InstanceError::io("creating", &gen_dir))?;
        let programs = object.pin(&gen_dir)?;
        Ok((staged, programs))
    }

    /// First attach: a link per hook, both pinned only once both attached (a
    /// failure drops the first link, which detaches it).
    fn attach_links(
        &self,
        cgroup: &Cgroup,
        object: &mut RuleSetObject,
    ) -> Result<(), InstanceError> {
        let cgroup_dir =
            File::open(&cgroup.path).map_err(InstanceError::io("opening", &cgroup.path))?;
        let links = PerHook::try_from_fn(|hook| {
            let program = object.program(hook)?;
            // A cgroup link is always multi-attach: other connect programs
            // (systemd's, a CNI's) keep running, and with nested rulebpf
            // instances the innermost binds first and the outer ones see a
            // bound socket. link_create takes no flags (EINVAL otherwise):
            // https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/cgroup.c#L1442
            let id = program
                .attach(&cgroup_dir, CgroupAttachMode::Single)
                .map_err(|e| InstanceError::link(hook, "attaching to the cgroup")(e.into()))?;
            let link = program
                .take_link(id)
                .map_err(|e| InstanceError::link(hook, "taking the link")(e.into()))?;
            FdLink::try_from(link)
                .map_err(|e| InstanceError::link(hook, "taking the link")(e.into()))
        })?;
        for (hook, link) in links.into_pairs() {
            link.pin(self.link_path(hook))
                .map_err(|e| InstanceError::link(hook, "pinning the link")(e.into()))?;
        }
        Ok(())
    }

    /// Moves both pinned links to the programs of `object`. If the second
    /// update fails, the first link gets the program of generation
    /// `previous` back, so that both hooks keep running one rule set.
    fn swap_links(&self, object: &mut RuleSetObject, previous: u64) -> Result<(), InstanceError> {
        for (done, hook) in Hook::ALL.into_iter().enumerate() {
            let swapped = self.pinned_link(hook).and_then(|link| {
                object.program(hook)?.attach_to_link(link).map_err(|e| {
                    InstanceError::link(hook, "swapping the rules on the cgroup link")(e.into())
                })
            });
            if let Err(mut error) = swapped {
                for &undo in &Hook::ALL[..done] {
                    if let Err(e) = self.restore_link(undo, previous)
                        && let InstanceError::Link { restore_failed, .. } = &mut error
                    {
                        *restore_failed = Some(crate::with_causes(&e));
                    }
                }
                return Err(error);
            }
        }
        Ok(())
    }

    fn pinned_link(&self, hook: Hook) -> Result<CgroupSockAddrLink, InstanceError> {
        let pinned = PinnedLink::from_pin(self.link_path(hook))
            .map_err(|e| InstanceError::link(hook, "opening the pinned link")(e.into()))?;
        CgroupSockAddrLink::try_from(FdLink::from(pinned))
            .map_err(|e| InstanceError::link(hook, "opening the pinned link")(e.into()))
    }

    /// Puts the pinned program of `generation` back on `hook`'s link.
    fn restore_link(&self, hook: Hook, generation: u64) -> Result<(), InstanceError> {
        let pin = self
            .gen_dir(generation)
            .join(format!("prog-{}", hook.name()));
        let mut old = CgroupSockAddr::from_pin(pin, hook.attach_type())
            .map_err(|e| InstanceError::link(hook, "opening the previous program")(e.into()))?;
        let link = self.pinned_link(hook)?;
        old.attach_to_link(link)
            .map_err(|e| InstanceError::link(hook, "restoring the previous program")(e.into()))?;
        Ok(())
    }

    /// Removes the hook and every pinned object. Returns false when nothing
    /// was attached.
    pub fn detach(&self) -> Result<bool, InstanceError> {
        let _lock = self.lock()?;
        let had_link = self.is_attached();
        for hook in Hook::ALL {
            // A link is released with its last reference (this pin): the
            // kernel detaches the program then.
            let path = self.link_path(hook);
            match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(InstanceError::io("removing", &path)(e));
                }
                _ => {}
            }
        }
        self.remove_generations_except(None)?;
        let _ = fs::remove_dir(&self.bpf_dir);
        let _ = fs::remove_file(self.state_path());
        Ok(had_link)
    }

    /// The state of the rule set in force, with per-rule counters.
    pub fn stats(&self) -> Result<(State, Vec<stats::RuleRow>), InstanceError> {
        let state = self
            .state()?
            .filter(|_| self.is_attached())
            .ok_or_else(|| InstanceError::NotAttached(self.recorded_path()))?;
        let totals = self.read_stats(&state)?;
        let rows = stats::rows(&state.rule_set.rules, &totals);
        Ok((state, rows))
    }

    /// The cgroup path recorded for this instance, or its name when none is.
    fn recorded_path(&self) -> PathBuf {
        self.state().ok().flatten().map_or_else(
            || PathBuf::from(format!("cg-{}", self.cgroup_id)),
            |s| s.cgroup,
        )
    }

    fn read_stats(&self, state: &State) -> Result<Vec<rulebpf_common::RuleStats>, InstanceError> {
        let path = self
            .gen_dir(state.rule_set.generation)
            .join(map_names::STATS);
        Ok(stats::read(&path, state.rule_set.rules.len())?)
    }

    /// Changes the service's bookkeeping; the rules in force are not touched.
    pub fn update_service(
        &self,
        change: impl FnOnce(&mut ServiceRecord),
    ) -> Result<(), InstanceError> {
        let _lock = self.lock()?;
        if let Some(mut state) = self.state()? {
            change(&mut state.service);
            state::write(&self.state_path(), &state)?;
        }
        Ok(())
    }

    fn remove_generations_except(&self, keep: Option<u64>) -> Result<(), InstanceError> {
        let Ok(entries) = fs::read_dir(&self.bpf_dir) else {
            return Ok(());
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(generation) = name.to_str().and_then(|n| n.strip_prefix("gen-")) else {
                continue;
            };
            if keep.is_some_and(|k| generation == k.to_string()) {
                continue;
            }
            remove_pins(&entry.path())?;
        }
        Ok(())
    }
}

/// The state after `set` was put in force as `generation`.
fn record(
    cgroup: &Cgroup,
    set: &RuleSet,
    options: LoadOptions,
    generation: u64,
    programs: PerHook<ProgramInfo>,
    object: &RuleSetObject,
    in_force: Option<&State>,
) -> State {
    let now = unix_now();
    State {
        cgroup: cgroup.path.clone(),
        cgroup_id: cgroup.id,
        attached_at: in_force.map_or(now, |s| s.attached_at),
        rule_set: RuleSetRecord {
            rules_file: set.path.clone(),
            generation,
            policy: options.policy,
            programs,
            map_memlock_bytes: object.map_memlock_bytes(),
            loaded_at: now,
            rules: set
                .rules
                .iter()
                .map(|r| RuleInfo {
                    line: r.line,
                    text: r.text.clone(),
                })
                .collect(),
            unresolved: set.name_failures.iter().map(|f| f.name.clone()).collect(),
        },
        service: ServiceRecord {
            last_reload: Some(Reload {
                at: now,
                ok: true,
                message: format!("{} rules from {}", set.rules.len(), set.path.display()),
            }),
            ..in_force.map(|s| s.service.clone()).unwrap_or_default()
        },
    }
}

/// Removes a directory of pins (bpffs has no recursive unlink).
fn remove_pins(dir: &Path) -> Result<(), InstanceError> {
    let entries = fs::read_dir(dir).map_err(InstanceError::io("listing", dir))?;
    for entry in entries.flatten() {
        let path = entry.path();
        fs::remove_file(&path).map_err(InstanceError::io("removing", &path))?;
    }
    fs::remove_dir(dir).map_err(InstanceError::io("removing", dir))
}

/// Removes a half-written generation if the apply fails before the swap.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = remove_pins(&dir);
            // The instance directory too, when this was the first attach.
            if let Some(parent) = dir.parent() {
                let _ = fs::remove_dir(parent);
            }
        }
    }
}

/// bpffs must be mounted at /sys/fs/bpf for the pins to outlive the loader.
fn ensure_bpffs() -> Result<(), InstanceError> {
    let c_path = c"/sys/fs/bpf";
    // SAFETY: statfs into a zeroed struct we own.
    let mut fs_info: libc::statfs = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::statfs(c_path.as_ptr(), &mut fs_info) } == 0;
    if !ok || fs_info.f_type as i64 != BPF_FS_MAGIC {
        return Err(InstanceError::NoBpffs);
    }
    fs::create_dir_all(BPFFS_DIR).map_err(InstanceError::io("creating", Path::new(BPFFS_DIR)))
}
