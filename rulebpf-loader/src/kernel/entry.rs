//! An instance's entry object (`rulebpf-entry`, built from
//! `rulebpf-ebpf/src/entry.rs`): the stable programs and maps of an
//! instance, pinned once in the instance's directory:
//!
//! ```text
//! connect4, connect6             the entry programs (attached to cgroups;
//!                                named by systemd's BPFProgram=)
//! jump-connect4, jump-connect6   their jump maps: slot 0 = the rule set in force
//! bind4, bind6, sock_release,    the bookkeeping programs (`model::program::Tracker`),
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

use std::os::fd::AsFd as _;

use aya::{
    EbpfLoader,
    maps::{Map, MapData, ProgramArray},
    programs::ProgramFd,
};
use rulebpf_common::{JUMP_SLOT, global_names, jump_names, shared_map_names};

use super::{ObjectError, program};
use crate::{
    model::{
        layout,
        program::{Hook, PerHook, PerTracker, ProgramKind},
        records::ProgramInfo,
    },
    sys::{bpf, features::Support, securedir::SecureDir},
};

/// The entry object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rulebpf-entry"));

/// The name in the entry object file of the program of `kind`.
const fn object_program_name(kind: ProgramKind) -> &'static str {
    match kind {
        ProgramKind::Hook(Hook::Connect4) => rulebpf_common::PROGRAM_ENTRY4,
        ProgramKind::Hook(Hook::Connect6) => rulebpf_common::PROGRAM_ENTRY6,
        ProgramKind::Tracker(tracker) => tracker.program_name(),
    }
}

/// The name of `hook`'s jump map in the object file (and in the kernel).
pub const fn jump_map_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Connect4 => jump_names::CONNECT4,
        Hook::Connect6 => jump_names::CONNECT6,
    }
}

/// The directory aya opens (or creates and pins) the instance maps in:
/// `dir` through its open descriptor (`/proc/self/fd/N/`), never by a name
/// someone could swap.
pub fn map_pin_dir(dir: &SecureDir) -> std::path::PathBuf {
    dir.fd_path("")
}

/// What the entry object's programs are, once pinned.
#[derive(Clone, Copy, Debug, Default)]
pub struct EntryPrograms {
    pub hooks: PerHook<ProgramInfo>,
    pub trackers: PerTracker<ProgramInfo>,
}

/// Loads the entry object and pins in `dir` whatever of it is not pinned
/// there yet: programs, jump maps (empty slots: connects pass until a rule
/// set is put in force), the instance maps (`RULEBPF_TUPLES` with room for
/// `tuple_capacity` live shared sockets; an existing map keeps its size).
/// Returns what the kernel says about the pinned programs.
pub fn create(dir: &SecureDir, tuple_capacity: u32) -> Result<EntryPrograms, ObjectError> {
    let capacity = tuple_capacity_of(dir)?.unwrap_or(tuple_capacity);
    let sockops_netns = u32::from(Support::get().sockops_netns());
    let mut ebpf = EbpfLoader::new()
        .override_global(global_names::SOCKOPS_NETNS, &sockops_netns, true)
        .default_map_pin_directory(map_pin_dir(dir))
        .map_max_entries(shared_map_names::TUPLES, capacity.max(1))
        .map_max_entries(shared_map_names::SOURCES, capacity.max(1))
        .load(OBJECT)
        .map_err(ObjectError::CreateMaps)?;
    for hook in Hook::ALL {
        let name = jump_map_name(hook);
        if dir.contains(&layout::jump_pin(hook)) {
            continue;
        }
        let map = ebpf.map(name).ok_or(ObjectError::Missing(name))?;
        let path = dir.fd_path(&layout::jump_pin(hook));
        map.pin(&path)
            .map_err(|source| ObjectError::Pin { path, source })?;
    }
    let mut pinned = |kind: ProgramKind| {
        let pin = layout::program_pin(kind);
        let path = dir.fd_path(pin);
        if dir.contains(pin) {
            return program::Pinned::open(path, kind)?.info(kind.name());
        }
        let name = object_program_name(kind);
        let object_program = ebpf.program_mut(name).ok_or(ObjectError::Missing(name))?;
        program::load(object_program, kind.name())?;
        program::pin(object_program, kind.name(), path)
    };
    let hooks = PerHook::try_from_fn(|hook| pinned(hook.into()))?;
    let trackers = PerTracker::try_from_fn(|tracker| pinned(tracker.into()))?;
    Ok(EntryPrograms { hooks, trackers })
}

/// The capacity of the instance's pinned `RULEBPF_TUPLES`, if it has one:
/// every object that opens the pin must declare that size.
pub fn tuple_capacity_of(dir: &SecureDir) -> Result<Option<u32>, ObjectError> {
    let name = shared_map_names::TUPLES;
    if !dir.contains(name) {
        return Ok(None);
    }
    let error = |source| ObjectError::SharedMap { map: name, source };
    let map = MapData::from_pin(dir.fd_path(name)).map_err(error)?;
    Ok(Some(map.info().map_err(error)?.max_entries()))
}

/// Whether `dir` holds a complete entry object.
pub fn exists(dir: &SecureDir) -> bool {
    let programs = ProgramKind::ALL
        .iter()
        .all(|&kind| dir.contains(layout::program_pin(kind)));
    let jumps = Hook::ALL
        .iter()
        .all(|&h| dir.contains(&layout::jump_pin(h)));
    let maps = shared_map_names::ALL.iter().all(|m| dir.contains(m));
    programs && jumps && maps
}

/// The pinned entry or bookkeeping program of `kind`, ready to attach.
pub fn program(dir: &SecureDir, kind: ProgramKind) -> Result<program::Pinned, ObjectError> {
    program::Pinned::open(dir.fd_path(layout::program_pin(kind)), kind)
}

/// The jump maps of an instance, opened from their pins.
pub struct Jumps {
    /// `Map::ProgramArray`s: typed views are taken per use, so the fd stays
    /// at hand for lookups.
    maps: PerHook<Map>,
}

impl Jumps {
    pub fn open(dir: &SecureDir) -> Result<Self, ObjectError> {
        let maps = PerHook::try_from_fn(|hook| {
            let error = |source| ObjectError::Jump {
                hook: hook.name(),
                source,
            };
            let data = MapData::from_pin(dir.fd_path(&layout::jump_pin(hook))).map_err(error)?;
            Ok::<_, ObjectError>(Map::ProgramArray(data))
        })?;
        Ok(Self { maps })
    }

    /// Puts `program` in `hook`'s slot: from the next connect() on, the
    /// entry program runs it.
    pub fn set(&mut self, hook: Hook, program: &ProgramFd) -> Result<(), ObjectError> {
        let error = |source| ObjectError::Jump {
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
    pub fn current(&self, hook: Hook) -> Result<Option<u32>, ObjectError> {
        let Map::ProgramArray(data) = self.maps.get(hook) else {
            unreachable!("opened as program arrays")
        };
        bpf::jump_slot(data.fd().as_fd(), JUMP_SLOT).map_err(|source| ObjectError::Slot {
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
