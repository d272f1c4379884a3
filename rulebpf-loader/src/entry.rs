//! An instance's entry object (`rulebpf-entry`, built from
//! `rulebpf-ebpf/src/entry.rs`): the stable programs and maps of an
//! instance, pinned once in the instance's directory:
//!
//! ```text
//! connect4, connect6             the entry programs (attached to cgroups;
//!                                named by systemd's BPFProgram=)
//! jump-connect4, jump-connect6   their jump maps: slot 0 = the rule set in force
//! bind4, bind6, sock_release,    the bookkeeping programs ([`Tracker`]),
//! sock_ops                       attached beside the entry programs
//! RULEBPF_TUPLES, RULEBPF_SOCKS, the instance maps: live shared sockets,
//! RULEBPF_OCCUPANCY,             their socket-local storage, per-rule
//! RULEBPF_COUNTERS               occupancy, instance counters
//! ```
//!
//! The jump maps must stay pinned: a program array's slots are emptied when
//! the last user reference to the map goes (an entry program's own reference
//! does not count), and the entry would then let every connect() through.
//! https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/arraymap.c#L1133
//!
//! The instance maps are pinned by name: the entry object creates them (the
//! loader points aya at the instance directory), every rule-set object
//! declares them identically and opens the pins ([`map_pin_dir`]), so they
//! outlive rule-set swaps.
//!
//! An instance made before the bookkeeping programs existed gets what it
//! lacks the next time it is opened for a change: the missing pins are added
//! and nothing that exists is replaced (its entry programs may be attached
//! by systemd).

use std::{
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    maps::{Map, MapData, MapError, ProgramArray},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, CgroupSockAddrAttachType,
        CgroupSockAttachType, ProgramError, ProgramFd, SockOps, links::FdLink,
    },
};
use rulebpf_common::{JUMP_SLOT, jump_names, shared_map_names};
use serde::{Deserialize, Serialize};

use crate::{
    bpf,
    hook::{Hook, PerHook},
    object::{ObjectError, ProgramInfo},
    securedir::SecureDir,
};

/// The entry object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rulebpf-entry"));

/// The name of a hook's entry program pin.
pub fn program_pin(hook: Hook) -> &'static str {
    hook.name()
}

pub fn jump_pin(hook: Hook) -> String {
    format!("jump-{}", hook.name())
}

const fn entry_program_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Connect4 => rulebpf_common::PROGRAM_ENTRY4,
        Hook::Connect6 => rulebpf_common::PROGRAM_ENTRY6,
    }
}

pub const fn jump_map_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Connect4 => jump_names::CONNECT4,
        Hook::Connect6 => jump_names::CONNECT6,
    }
}

/// The directory aya opens (or creates and pins) the instance maps in:
/// `dir` through its open descriptor (`/proc/self/fd/N/`), never by a name
/// someone could swap.
pub fn map_pin_dir(dir: &SecureDir) -> PathBuf {
    dir.fd_path("")
}

/// The bookkeeping programs of an instance: they keep the instance maps
/// true for every cgroup the entry programs are attached to, whatever rule
/// set is in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tracker {
    /// `cgroup/bind4`: writes down who chose the port of a socket the
    /// application binds (the application, or the kernel for port 0).
    Bind4,
    /// `cgroup/bind6`: the same for IPv6 sockets.
    Bind6,
    /// `cgroup/sock_release`: gives back a released socket's tuple and its
    /// place in its rule's occupancy.
    SockRelease,
    /// `sockops`: gives back a TCP connection's tuple when the connection
    /// is closed, which comes after its socket's release when it closes
    /// first.
    SockOps,
}

impl Tracker {
    /// In attach order: the release bookkeeping is in place before any
    /// connect is hooked.
    pub const ALL: [Self; 4] = [Self::SockRelease, Self::SockOps, Self::Bind4, Self::Bind6];

    /// Short name, used for pins (program and link) and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Bind4 => "bind4",
            Self::Bind6 => "bind6",
            Self::SockRelease => "sock_release",
            Self::SockOps => "sock_ops",
        }
    }

    const fn program_name(self) -> &'static str {
        match self {
            Self::Bind4 => rulebpf_common::PROGRAM_BIND4,
            Self::Bind6 => rulebpf_common::PROGRAM_BIND6,
            Self::SockRelease => rulebpf_common::PROGRAM_RELEASE,
            Self::SockOps => rulebpf_common::PROGRAM_SOCKOPS,
        }
    }

    /// The kernel's attach type.
    pub const fn attach_type(self) -> u32 {
        match self {
            Self::Bind4 => bpf::BPF_CGROUP_INET4_BIND,
            Self::Bind6 => bpf::BPF_CGROUP_INET6_BIND,
            Self::SockRelease => bpf::BPF_CGROUP_INET_SOCK_RELEASE,
            Self::SockOps => bpf::BPF_CGROUP_SOCK_OPS,
        }
    }
}

/// A value for each [`Tracker`] (a record without one reads its default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerTracker<T: Default> {
    #[serde(default)]
    pub bind4: T,
    #[serde(default)]
    pub bind6: T,
    #[serde(default)]
    pub sock_release: T,
    #[serde(default)]
    pub sock_ops: T,
}

impl<T: Default> PerTracker<T> {
    pub fn get(&self, tracker: Tracker) -> &T {
        match tracker {
            Tracker::Bind4 => &self.bind4,
            Tracker::Bind6 => &self.bind6,
            Tracker::SockRelease => &self.sock_release,
            Tracker::SockOps => &self.sock_ops,
        }
    }

    fn try_from_fn<E>(mut f: impl FnMut(Tracker) -> Result<T, E>) -> Result<Self, E> {
        Ok(Self {
            sock_release: f(Tracker::SockRelease)?,
            sock_ops: f(Tracker::SockOps)?,
            bind4: f(Tracker::Bind4)?,
            bind6: f(Tracker::Bind6)?,
        })
    }
}

/// What the entry object's programs are, once pinned.
#[derive(Clone, Copy, Debug, Default)]
pub struct EntryPrograms {
    pub hooks: PerHook<ProgramInfo>,
    pub trackers: PerTracker<ProgramInfo>,
}

#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("the instance's {hook} jump map")]
    Jump {
        hook: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the instance's {hook} entry program")]
    Program {
        hook: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("reading the instance's {hook} jump slot")]
    Slot {
        hook: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the instance map {map}")]
    SharedMap {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{step} the {tracker} program on {}", cgroup.display())]
    Tracker {
        tracker: &'static str,
        step: &'static str,
        cgroup: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Loads the entry object and pins in `dir` whatever of it is not pinned
/// there yet: programs, jump maps (empty slots: connects pass until a rule
/// set is put in force), the instance maps (`RULEBPF_TUPLES` with room for
/// `tuple_capacity` live shared sockets; an existing map keeps its size).
/// Returns what the kernel says about the pinned programs.
pub fn create(dir: &SecureDir, tuple_capacity: u32) -> Result<EntryPrograms, EntryError> {
    let capacity = tuple_capacity_of(dir)?.unwrap_or(tuple_capacity);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(map_pin_dir(dir))
        .map_max_entries(shared_map_names::TUPLES, capacity.max(1))
        .map_max_entries(shared_map_names::SOURCES, capacity.max(1))
        .load(OBJECT)
        .map_err(ObjectError::CreateMaps)?;
    for hook in Hook::ALL {
        let name = jump_map_name(hook);
        if dir.contains(&jump_pin(hook)) {
            continue;
        }
        let map = ebpf.map(name).ok_or(ObjectError::Missing(name))?;
        let path = dir.fd_path(&jump_pin(hook));
        map.pin(&path)
            .map_err(|source| ObjectError::Pin { path, source })?;
    }
    let hooks = PerHook::try_from_fn(|hook| {
        if dir.contains(program_pin(hook)) {
            return program_info(&program(dir, hook)?.info(), hook.name());
        }
        let name = entry_program_name(hook);
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(ObjectError::Missing(name))?
            .try_into()
            .map_err(|_| ObjectError::ProgramType(name))?;
        program.load().map_err(|source| ObjectError::Load {
            hook: hook.name(),
            source,
        })?;
        let path = dir.fd_path(program_pin(hook));
        program
            .pin(&path)
            .map_err(|source| ObjectError::Pin { path, source })?;
        program_info(&program.info(), hook.name())
    })?;
    let trackers = PerTracker::try_from_fn(|tracker| {
        let pin = tracker.name();
        if !dir.contains(pin) {
            let name = tracker.program_name();
            let program = ebpf.program_mut(name).ok_or(ObjectError::Missing(name))?;
            let path = dir.fd_path(pin);
            // Each program type has its own load and pin.
            macro_rules! load_and_pin {
                ($type:ty) => {{
                    let program: &mut $type = program
                        .try_into()
                        .map_err(|_| ObjectError::ProgramType(name))?;
                    program.load().map_err(|e| verifier_or_load(pin, e))?;
                    program.pin(&path)
                }};
            }
            let pinned = match tracker {
                Tracker::SockRelease => load_and_pin!(CgroupSock),
                Tracker::SockOps => load_and_pin!(SockOps),
                Tracker::Bind4 | Tracker::Bind6 => load_and_pin!(CgroupSockAddr),
            };
            pinned.map_err(|source| ObjectError::Pin { path, source })?;
        }
        tracker_program(dir, tracker)?.info(pin)
    })?;
    Ok(EntryPrograms { hooks, trackers })
}

fn verifier_or_load(hook: &'static str, source: ProgramError) -> ObjectError {
    match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => ObjectError::Verifier {
            hook,
            io_error,
            verifier_log: verifier_log.to_string(),
        },
        source => ObjectError::Load { hook, source },
    }
}

fn program_info(
    info: &Result<aya::programs::ProgramInfo, ProgramError>,
    hook: &'static str,
) -> Result<ProgramInfo, EntryError> {
    match info {
        Ok(info) => Ok(ProgramInfo {
            id: info.id(),
            verified_insns: info.verified_instruction_count(),
        }),
        Err(_) => Err(EntryError::Object(ObjectError::Missing(hook))),
    }
}

/// The capacity of the instance's pinned `RULEBPF_TUPLES`, if it has one:
/// every object that opens the pin must declare that size.
pub fn tuple_capacity_of(dir: &SecureDir) -> Result<Option<u32>, EntryError> {
    let name = shared_map_names::TUPLES;
    if !dir.contains(name) {
        return Ok(None);
    }
    let error = |source| EntryError::SharedMap { map: name, source };
    let map = MapData::from_pin(dir.fd_path(name)).map_err(error)?;
    Ok(Some(map.info().map_err(error)?.max_entries()))
}

/// Whether `dir` holds a complete entry object.
pub fn exists(dir: &SecureDir) -> bool {
    let hooks = Hook::ALL
        .iter()
        .all(|&h| dir.contains(program_pin(h)) && dir.contains(&jump_pin(h)));
    let trackers = Tracker::ALL.iter().all(|t| dir.contains(t.name()));
    let maps = shared_map_names::ALL.iter().all(|m| dir.contains(m));
    hooks && trackers && maps
}

/// The pinned entry program of `hook`, ready to attach.
pub fn program(dir: &SecureDir, hook: Hook) -> Result<CgroupSockAddr, EntryError> {
    CgroupSockAddr::from_pin(dir.fd_path(program_pin(hook)), hook.attach_type()).map_err(|source| {
        EntryError::Program {
            hook: hook.name(),
            source,
        }
    })
}

/// A pinned bookkeeping program, ready to attach.
enum TrackerProgram {
    Sock(CgroupSock),
    SockAddr(CgroupSockAddr),
    SockOps(SockOps),
}

impl TrackerProgram {
    fn info(&self, name: &'static str) -> Result<ProgramInfo, EntryError> {
        match self {
            Self::Sock(p) => program_info(&p.info(), name),
            Self::SockAddr(p) => program_info(&p.info(), name),
            Self::SockOps(p) => program_info(&p.info(), name),
        }
    }

    fn fd(&self) -> Result<&ProgramFd, ProgramError> {
        match self {
            Self::Sock(p) => p.fd(),
            Self::SockAddr(p) => p.fd(),
            Self::SockOps(p) => p.fd(),
        }
    }

    /// Attaches to the cgroup open as `cgroup` with a link.
    fn attach(
        &mut self,
        cgroup: &File,
    ) -> Result<FdLink, Box<dyn std::error::Error + Send + Sync>> {
        // Multi-attach, as the entry programs (see instance.rs).
        Ok(match self {
            Self::Sock(p) => {
                let id = p.attach(cgroup, CgroupAttachMode::Single)?;
                FdLink::try_from(p.take_link(id)?)?
            }
            Self::SockAddr(p) => {
                let id = p.attach(cgroup, CgroupAttachMode::Single)?;
                FdLink::try_from(p.take_link(id)?)?
            }
            Self::SockOps(p) => {
                let id = p.attach(cgroup, CgroupAttachMode::Single)?;
                FdLink::try_from(p.take_link(id)?)?
            }
        })
    }
}

fn tracker_program(dir: &SecureDir, tracker: Tracker) -> Result<TrackerProgram, EntryError> {
    let path = dir.fd_path(tracker.name());
    let error = |source| EntryError::Program {
        hook: tracker.name(),
        source,
    };
    Ok(match tracker {
        Tracker::SockRelease => TrackerProgram::Sock(
            CgroupSock::from_pin(path, CgroupSockAttachType::SockRelease).map_err(error)?,
        ),
        Tracker::SockOps => TrackerProgram::SockOps(SockOps::from_pin(path).map_err(error)?),
        Tracker::Bind4 => TrackerProgram::SockAddr(
            CgroupSockAddr::from_pin(path, CgroupSockAddrAttachType::Bind4).map_err(error)?,
        ),
        Tracker::Bind6 => TrackerProgram::SockAddr(
            CgroupSockAddr::from_pin(path, CgroupSockAddrAttachType::Bind6).map_err(error)?,
        ),
    })
}

/// The name of a tracker's link pin in an attachment directory.
fn tracker_link_pin(tracker: Tracker) -> String {
    format!("link-{}", tracker.name())
}

/// The rulebpf programs attached directly to the cgroup open as `cgroup`
/// for `tracker` (whichever instance).
fn rulebpf_programs_on(cgroup: &File, tracker: Tracker) -> std::io::Result<Vec<u32>> {
    Ok(
        bpf::attached_programs_by_type(cgroup.as_fd(), tracker.attach_type())?
            .into_iter()
            .filter(|&id| {
                bpf::program_name(id).is_ok_and(|n| n.starts_with(rulebpf_common::PROGRAM_PREFIX))
            })
            .collect(),
    )
}

/// The instance's bookkeeping programs not attached to the cgroup open as
/// `cgroup` yet (`programs`: their ids; an id 0 is no program).
pub fn missing_trackers(
    cgroup: &File,
    programs: &PerTracker<ProgramInfo>,
) -> std::io::Result<Vec<Tracker>> {
    let mut missing = Vec::new();
    for tracker in Tracker::ALL {
        let id = programs.get(tracker).id;
        // 0: an instance made before the bookkeeping programs existed, not
        // opened for a change since (which adds them).
        if id != 0 && !rulebpf_programs_on(cgroup, tracker)?.contains(&id) {
            missing.push(tracker);
        }
    }
    Ok(missing)
}

/// How [`attach_trackers`] attaches.
pub enum Attach<'a> {
    /// With links, pinned in this directory (the attachment's, `cg-ID/`).
    Linked(&'a SecureDir),
    /// Without links (`BPF_PROG_ATTACH`, multi), as `rulebpf systemd-attach`
    /// attaches the entry programs: such an attachment lasts as long as the
    /// cgroup.
    Unlinked,
}

/// Attaches the bookkeeping programs `trackers` of the instance pinned in
/// `pins` to the cgroup open as `cgroup` (at `path`).
pub fn attach_trackers(
    pins: &SecureDir,
    cgroup: &File,
    path: &Path,
    trackers: &[Tracker],
    how: Attach<'_>,
) -> Result<(), EntryError> {
    for &tracker in trackers {
        let error = |step| {
            let path = path.to_path_buf();
            move |source| EntryError::Tracker {
                tracker: tracker.name(),
                step,
                cgroup: path,
                source,
            }
        };
        let mut program = tracker_program(pins, tracker)?;
        match how {
            Attach::Linked(link_dir) => {
                let link = program.attach(cgroup).map_err(error("attaching"))?;
                link.pin(link_dir.fd_path(&tracker_link_pin(tracker)))
                    .map_err(|e| error("pinning the link of")(e.into()))?;
            }
            Attach::Unlinked => {
                let fd = program.fd().map_err(|e| error("attaching")(e.into()))?;
                bpf::attach_program_by_type(cgroup.as_fd(), tracker.attach_type(), fd.as_fd())
                    .map_err(|e| error("attaching")(e.into()))?;
            }
        }
    }
    Ok(())
}

/// Removes the link pins of `trackers` from `link_dir` (taking back an
/// attach that could not be completed: an unpinned link detaches when its
/// last descriptor closes).
pub fn unpin_trackers(link_dir: &SecureDir, trackers: &[Tracker]) {
    for &tracker in trackers {
        let _ = link_dir.remove(&tracker_link_pin(tracker));
    }
}

/// Removes the rulebpf bookkeeping programs attached directly to the
/// cgroup open as `cgroup` (id `cgroup_id`) — all, or those of `only` —
/// by their links when they have one, else as attached by `BPF_PROG_ATTACH`.
/// Returns how many were removed.
pub fn clear_trackers(
    cgroup: &File,
    cgroup_id: u64,
    only: Option<&[u32]>,
) -> std::io::Result<usize> {
    let types = Tracker::ALL.map(Tracker::attach_type);
    let links = bpf::cgroup_links(&types)?;
    let mut removed = 0;
    for tracker in Tracker::ALL {
        for program in rulebpf_programs_on(cgroup, tracker)? {
            if only.is_some_and(|only| !only.contains(&program)) {
                continue;
            }
            let link = links.iter().find(|l| {
                l.cgroup_id == cgroup_id
                    && l.attach_type == tracker.attach_type()
                    && l.program_id == program
            });
            let detached = match link {
                Some(link) => bpf::detach_link(link.link_id),
                None => bpf::detach_program_by_type(cgroup.as_fd(), tracker.attach_type(), program),
            };
            match detached {
                Ok(()) => removed += 1,
                // Its link was released meanwhile (a pin just removed).
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// The jump maps of an instance, opened from their pins.
pub struct Jumps {
    /// `Map::ProgramArray`s: typed views are taken per use, so the fd stays
    /// at hand for lookups.
    maps: PerHook<Map>,
}

impl Jumps {
    pub fn open(dir: &SecureDir) -> Result<Self, EntryError> {
        let maps = PerHook::try_from_fn(|hook| {
            let error = |source| EntryError::Jump {
                hook: hook.name(),
                source,
            };
            let data = MapData::from_pin(dir.fd_path(&jump_pin(hook))).map_err(error)?;
            Ok::<_, EntryError>(Map::ProgramArray(data))
        })?;
        Ok(Self { maps })
    }

    /// Puts `program` in `hook`'s slot: from the next connect() on, the
    /// entry program runs it.
    pub fn set(&mut self, hook: Hook, program: &ProgramFd) -> Result<(), EntryError> {
        let error = |source| EntryError::Jump {
            hook: hook.name(),
            source,
        };
        let map = match hook {
            Hook::Connect4 => &mut self.maps.connect4,
            Hook::Connect6 => &mut self.maps.connect6,
        };
        ProgramArray::try_from(map)
            .map_err(error)?
            .set(JUMP_SLOT, program, 0)
            .map_err(error)
    }

    /// The id of the program in `hook`'s slot (`None`: empty).
    pub fn current(&self, hook: Hook) -> Result<Option<u32>, EntryError> {
        let Map::ProgramArray(data) = self.maps.get(hook) else {
            unreachable!("opened as program arrays")
        };
        bpf::jump_slot(data.fd().as_fd(), JUMP_SLOT).map_err(|source| EntryError::Slot {
            hook: hook.name(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _};

    use super::OBJECT;

    /// `call bpf_tail_call` (BPF_JMP | BPF_CALL, helper 12).
    const CALL: u8 = 0x85;
    const BPF_FUNC_TAIL_CALL: i32 = 12;
    /// `rD = imm` (BPF_ALU64 | BPF_MOV | BPF_K) and `wD = imm` (BPF_ALU).
    const MOV_IMM: [u8; 2] = [0xb7, 0xb4];

    /// What last wrote `r3` (the tail call's key) before each
    /// `bpf_tail_call` of a program section: a constant key makes the
    /// verifier turn the call into a direct jump that every swap patches in
    /// kernel text (issue: an int3 oops on 6.12 during a swap).
    fn key_is_constant(section: &str) -> Vec<bool> {
        let file = object::File::parse(OBJECT).unwrap();
        let code = file.section_by_name(section).unwrap().data().unwrap();
        let insns: Vec<&[u8]> = code.chunks_exact(8).collect();
        let mut found = Vec::new();
        for (i, insn) in insns.iter().enumerate() {
            let imm = i32::from_le_bytes(insn[4..8].try_into().unwrap());
            if insn[0] != CALL || imm != BPF_FUNC_TAIL_CALL {
                continue;
            }
            let writer = insns[..i]
                .iter()
                .rev()
                .find(|w| w[1] & 0x0f == 3)
                .expect("r3 is set before the tail call");
            found.push(MOV_IMM.contains(&writer[0]));
        }
        found
    }

    #[test]
    fn the_entry_programs_tail_call_with_a_key_read_at_run_time() {
        for section in ["cgroup/connect4", "cgroup/connect6"] {
            let calls = key_is_constant(section);
            assert_eq!(calls.len(), 1, "{section}: one tail call");
            assert!(!calls[0], "{section}: the tail call's key is a constant");
        }
    }
}
