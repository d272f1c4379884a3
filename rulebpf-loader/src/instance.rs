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
    io::Write as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use aya::{
    maps::MapData,
    programs::{
        CgroupAttachMode,
        cgroup_sock_addr::CgroupSockAddrLink,
        links::{FdLink, PinnedLink},
    },
};
use rulebpf_common::{RuleStats, map_names};
use serde::{Deserialize, Serialize};

use rulebpf_rules::ruleset::RuleSet;

use crate::{
    cgroup::{self, Cgroup},
    maps::{self, Hook, LoadOptions, Policy},
};

/// Where every instance pins its objects.
pub const BPFFS_DIR: &str = "/sys/fs/bpf/rulebpf";
/// Where every instance keeps its description.
pub const RUN_DIR: &str = "/run/rulebpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What `status` and `stats` know about an attached rule set.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub rules_file: PathBuf,
    /// Rule sets attached to this cgroup so far; names the `gen-<N>` pins.
    pub generation: u64,
    /// The connect4 program (its log ring buffer is shared with connect6).
    pub program_id: u32,
    pub policy: Policy,
    /// Instructions the verifier processed for connect4 (kernel 5.16+).
    pub verified_insns: Option<u32>,
    #[serde(default)]
    pub connect6_program_id: u32,
    /// Instructions the verifier processed for connect6 (kernel 5.16+).
    #[serde(default)]
    pub connect6_verified_insns: Option<u32>,
    /// Kernel memory charged for the rule set's maps (`memlock` in fdinfo).
    #[serde(default)]
    pub map_memlock_bytes: u64,
    /// Seconds since the Unix epoch.
    pub attached_at: u64,
    pub updated_at: u64,
    /// In compiled order: `RULEBPF_STATS[i]` counts `rules[i]`.
    pub rules: Vec<RuleInfo>,
    /// Names that did not resolve when the set was compiled.
    pub unresolved: Vec<String>,
    /// The last attempt to change the rules (by `attach` or `run`).
    #[serde(default)]
    pub last_reload: Option<Reload>,
    /// Set while `rulebpf run` manages this instance.
    #[serde(default)]
    pub service_pid: Option<u32>,
    #[serde(default)]
    pub dns_refreshes: u64,
    #[serde(default)]
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

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RuleInfo {
    pub line: u32,
    pub text: String,
}

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
    pub fn all() -> anyhow::Result<Vec<Self>> {
        let entries = match fs::read_dir(BPFFS_DIR) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e).context(BPFFS_DIR),
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

    /// The instance whose recorded cgroup path is `path` (for a cgroup that
    /// no longer exists, so has no id to look up).
    pub fn by_recorded_path(path: &Path) -> anyhow::Result<Option<Self>> {
        let root = cgroup::cgroup2_mount()?;
        let wanted = if path.is_absolute() {
            path.to_path_buf()
        } else {
            root.join(path)
        };
        for instance in Self::all()? {
            if instance.state()?.is_some_and(|s| s.cgroup == wanted) {
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
    pub fn state(&self) -> anyhow::Result<Option<State>> {
        match fs::read(self.state_path()) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                    self.state_path().display().to_string()
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context(self.state_path().display().to_string()),
        }
    }

    fn lock(&self) -> anyhow::Result<Lock> {
        fs::create_dir_all(&self.run_dir).with_context(|| self.run_dir.display().to_string())?;
        let file = File::create(self.run_dir.join("lock"))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).context("locking the instance");
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
    ) -> anyhow::Result<Applied> {
        ensure_bpffs()?;
        let _lock = self.lock()?;
        let previous = self.state()?;
        let attached = self.is_attached();
        let generation = previous.as_ref().map_or(0, |s| s.generation) + 1;

        let mut ebpf = maps::load(&set.compiled, options)?;
        if let Some(previous) = previous.as_ref().filter(|_| attached) {
            // Counters of rules that stay (same text) continue where they were;
            // increments between this read and the swap below are lost.
            let seeds = self.carried_stats(previous, set).unwrap_or_default();
            maps::seed_stats(&mut ebpf, &seeds)?;
        }
        let map_memlock_bytes = ebpf.maps().map(|(_, map)| maps::memlock_bytes(map)).sum();
        let gen_dir = self.gen_dir(generation);
        let cleanup = RemoveOnDrop(Some(gen_dir.clone()));
        fs::create_dir_all(&gen_dir).with_context(|| gen_dir.display().to_string())?;
        for (name, map) in ebpf.maps() {
            if !name.starts_with('.') {
                map.pin(gen_dir.join(name))
                    .with_context(|| format!("pinning map {name}"))?;
            }
        }
        let mut infos = Vec::new();
        for hook in Hook::ALL {
            let program = maps::program(&mut ebpf, hook)?;
            program
                .pin(gen_dir.join(format!("prog-{}", hook.name())))
                .context("pinning the program")?;
            infos.push(program.info()?);
        }

        if attached {
            self.swap_links(&mut ebpf, previous.as_ref().map(|s| s.generation))?;
        } else {
            let cgroup_dir =
                File::open(&cgroup.path).with_context(|| cgroup.path.display().to_string())?;
            // Both links are pinned only once both attached: a failure drops
            // the first link, which detaches it.
            let mut links = Vec::new();
            for hook in Hook::ALL {
                let program = maps::program(&mut ebpf, hook)?;
                // A cgroup link is always multi-attach: other connect programs
                // (systemd's, a CNI's) keep running, and with nested rulebpf
                // instances the innermost binds first and the outer ones see a
                // bound socket. link_create takes no flags (EINVAL otherwise):
                // https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/cgroup.c#L1442
                let id = program
                    .attach(&cgroup_dir, CgroupAttachMode::Single)
                    .with_context(|| format!("attaching {} to the cgroup", hook.name()))?;
                let link: FdLink = program.take_link(id)?.try_into()?;
                links.push((hook, link));
            }
            for (hook, link) in links {
                link.pin(self.link_path(hook)).context("pinning the link")?;
            }
        }
        cleanup.keep();

        let now = unix_now();
        let state = State {
            cgroup: cgroup.path.clone(),
            cgroup_id: cgroup.id,
            rules_file: set.path.clone(),
            generation,
            program_id: infos[0].id(),
            policy: options.policy,
            verified_insns: infos[0].verified_instruction_count(),
            connect6_program_id: infos[1].id(),
            connect6_verified_insns: infos[1].verified_instruction_count(),
            map_memlock_bytes,
            attached_at: previous
                .as_ref()
                .filter(|_| attached)
                .map_or(now, |s| s.attached_at),
            updated_at: now,
            rules: set
                .rules
                .iter()
                .map(|r| RuleInfo {
                    line: r.line,
                    text: r.text.clone(),
                })
                .collect(),
            unresolved: set.name_failures.iter().map(|f| f.name.clone()).collect(),
            last_reload: Some(Reload {
                at: now,
                ok: true,
                message: format!("{} rules from {}", set.rules.len(), set.path.display()),
            }),
            service_pid: previous.as_ref().and_then(|s| s.service_pid),
            dns_refreshes: previous.as_ref().map_or(0, |s| s.dns_refreshes),
            dns_failures: previous.as_ref().map_or(0, |s| s.dns_failures),
        };
        self.write_state(&state)?;
        self.remove_generations_except(Some(generation))?;
        Ok(Applied {
            state,
            swapped: attached,
        })
    }

    /// Removes the hook and every pinned object. Returns false when nothing
    /// was attached.
    pub fn detach(&self) -> anyhow::Result<bool> {
        let _lock = self.lock()?;
        let had_link = self.is_attached();
        for hook in Hook::ALL {
            // A link is released with its last reference (this pin): the
            // kernel detaches the program then.
            match fs::remove_file(self.link_path(hook)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).context("removing the pinned link");
                }
                _ => {}
            }
        }
        self.remove_generations_except(None)?;
        let _ = fs::remove_dir(&self.bpf_dir);
        let _ = fs::remove_file(self.state_path());
        Ok(had_link)
    }

    /// Moves both pinned links to the programs of `ebpf`. If the second
    /// update fails, the first link gets the program of generation
    /// `previous` back, so that both hooks keep running one rule set.
    fn swap_links(&self, ebpf: &mut aya::Ebpf, previous: Option<u64>) -> anyhow::Result<()> {
        let mut done: Vec<Hook> = Vec::new();
        for hook in Hook::ALL {
            let result = PinnedLink::from_pin(self.link_path(hook))
                .context("opening the pinned link")
                .and_then(|pinned| Ok(CgroupSockAddrLink::try_from(FdLink::from(pinned))?))
                .and_then(|link| {
                    maps::program(ebpf, hook)?
                        .attach_to_link(link)
                        .with_context(|| format!("swapping {} on the cgroup link", hook.name()))
                });
            if let Err(error) = result {
                for &undo in &done {
                    if let Some(generation) = previous
                        && let Err(e) = self.restore_link(undo, generation)
                    {
                        return Err(
                            error.context(format!("and restoring {} failed: {e:#}", undo.name()))
                        );
                    }
                }
                return Err(error);
            }
            done.push(hook);
        }
        Ok(())
    }

    /// Puts the pinned program of `generation` back on `hook`'s link.
    fn restore_link(&self, hook: Hook, generation: u64) -> anyhow::Result<()> {
        let attach_type = match hook {
            Hook::Connect4 => aya::programs::CgroupSockAddrAttachType::Connect4,
            Hook::Connect6 => aya::programs::CgroupSockAddrAttachType::Connect6,
        };
        let pin = self
            .gen_dir(generation)
            .join(format!("prog-{}", hook.name()));
        let mut old = aya::programs::CgroupSockAddr::from_pin(pin, attach_type)?;
        let pinned = PinnedLink::from_pin(self.link_path(hook))?;
        old.attach_to_link(CgroupSockAddrLink::try_from(FdLink::from(pinned))?)?;
        Ok(())
    }

    /// Per-rule counters of the rule set in force, with its description.
    pub fn stats(&self) -> anyhow::Result<(State, Vec<RuleStats>)> {
        let state = self
            .state()?
            .with_context(|| format!("instance cg-{} has no state", self.cgroup_id))?;
        let path = self.gen_dir(state.generation).join(map_names::STATS);
        let map = MapData::from_pin(&path).with_context(|| path.display().to_string())?;
        let stats = maps::read_stats(map, state.rules.len() as u32)?;
        Ok((state, stats))
    }

    /// Changes the recorded state (service bookkeeping: failed reloads, DNS
    /// counters); the rules in force are not touched.
    pub fn update_state(&self, change: impl FnOnce(&mut State)) -> anyhow::Result<()> {
        let _lock = self.lock()?;
        if let Some(mut state) = self.state()? {
            change(&mut state);
            self.write_state(&state)?;
        }
        Ok(())
    }

    /// Totals of the rule set in force, re-indexed for `set`: a rule keeps
    /// its counters when a rule with the same text (and occurrence) stays.
    fn carried_stats(
        &self,
        previous: &State,
        set: &RuleSet,
    ) -> anyhow::Result<Vec<(u32, RuleStats)>> {
        let (_, totals) = self.stats()?;
        let mut by_text: std::collections::HashMap<&str, Vec<RuleStats>> = Default::default();
        for (rule, stats) in previous.rules.iter().zip(totals).rev() {
            by_text.entry(rule.text.as_str()).or_default().push(stats);
        }
        Ok(set
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| {
                let stats = by_text.get_mut(rule.text.as_str())?.pop()?;
                Some((i as u32, stats))
            })
            .collect())
    }

    fn write_state(&self, state: &State) -> anyhow::Result<()> {
        let tmp = self.run_dir.join("state.json.tmp");
        let mut file = File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(state)?)?;
        file.sync_all()?;
        fs::rename(&tmp, self.state_path())?;
        Ok(())
    }

    fn remove_generations_except(&self, keep: Option<u64>) -> anyhow::Result<()> {
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

/// Removes a directory of pins (bpffs has no recursive unlink).
fn remove_pins(dir: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir)?.flatten() {
        fs::remove_file(entry.path()).with_context(|| entry.path().display().to_string())?;
    }
    fs::remove_dir(dir).with_context(|| dir.display().to_string())
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
fn ensure_bpffs() -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    let c_path = std::ffi::CString::new("/sys/fs/bpf").expect("no NUL");
    // SAFETY: statfs into a zeroed struct we own.
    let mut fs_info: libc::statfs = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::statfs(c_path.as_ptr(), &mut fs_info) } == 0;
    if !ok || fs_info.f_type as i64 != BPF_FS_MAGIC {
        bail!(
            "no bpf file system at {}: mount it with `mount -t bpf bpf /sys/fs/bpf`",
            root.display()
        );
    }
    fs::create_dir_all(BPFFS_DIR).with_context(|| BPFFS_DIR.to_string())?;
    Ok(())
}

/// Seconds since the Unix epoch (the unit of every time in [`State`]).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
