//! An instance's entry object (`rulebpf-entry`, built from
//! `rulebpf-ebpf/src/entry.rs`): the two stable entry programs and their jump
//! maps, pinned once in the instance's directory:
//!
//! ```text
//! connect4, connect6             the entry programs (attached to cgroups;
//!                                named by systemd's BPFProgram=)
//! jump-connect4, jump-connect6   their jump maps: slot 0 = the rule set in force
//! ```
//!
//! The jump maps must stay pinned: a program array's slots are emptied when
//! the last user reference to the map goes (an entry program's own reference
//! does not count), and the entry would then let every connect() through.
//! https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/arraymap.c#L1133

use aya::{
    EbpfLoader,
    maps::{Map, MapData, MapError, ProgramArray},
    programs::{CgroupSockAddr, ProgramError, ProgramFd},
};
use rulebpf_common::{JUMP_SLOT, jump_names};

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

fn jump_pin(hook: Hook) -> String {
    format!("jump-{}", hook.name())
}

const fn entry_program_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Connect4 => rulebpf_common::PROGRAM_ENTRY4,
        Hook::Connect6 => rulebpf_common::PROGRAM_ENTRY6,
    }
}

const fn jump_map_name(hook: Hook) -> &'static str {
    match hook {
        Hook::Connect4 => jump_names::CONNECT4,
        Hook::Connect6 => jump_names::CONNECT6,
    }
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
}

/// Loads the entry object and pins its programs and jump maps in `dir`
/// (empty slots: connects pass until a rule set is put in force).
pub fn create(dir: &SecureDir) -> Result<PerHook<ProgramInfo>, EntryError> {
    let mut ebpf = EbpfLoader::new()
        .load(OBJECT)
        .map_err(ObjectError::CreateMaps)?;
    for hook in Hook::ALL {
        let name = jump_map_name(hook);
        let map = ebpf.map(name).ok_or(ObjectError::Missing(name))?;
        let path = dir.fd_path(&jump_pin(hook));
        map.pin(&path)
            .map_err(|source| ObjectError::Pin { path, source })?;
    }
    PerHook::try_from_fn(|hook| {
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
        let info = program.info().map_err(|source| ObjectError::Info {
            hook: hook.name(),
            source,
        })?;
        Ok(ProgramInfo {
            id: info.id(),
            verified_insns: info.verified_instruction_count(),
        })
    })
}

/// Whether `dir` holds a complete entry object.
pub fn exists(dir: &SecureDir) -> bool {
    Hook::ALL
        .iter()
        .all(|&h| dir.contains(program_pin(h)) && dir.contains(&jump_pin(h)))
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
        use std::os::fd::AsFd as _;
        let Map::ProgramArray(data) = self.maps.get(hook) else {
            unreachable!("opened as program arrays")
        };
        bpf::jump_slot(data.fd().as_fd(), JUMP_SLOT).map_err(|source| EntryError::Slot {
            hook: hook.name(),
            source,
        })
    }
}
