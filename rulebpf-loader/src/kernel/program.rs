//! A program of any kind an instance pins, as aya types it: one place that
//! maps a [`ProgramKind`] to aya's program type and attach type, opens a
//! pin, loads (turning a verifier refusal into its log), reads the kernel's
//! info, and attaches with a link (as aya's `programs/` dispatch once over
//! their `Program` enum).

use std::{fs::File, path::PathBuf};

use aya::programs::{
    CgroupAttachMode, CgroupSock, CgroupSockAddr, CgroupSockAddrAttachType, CgroupSockAttachType,
    Program, ProgramError, ProgramFd, SockOps, links::FdLink,
};

use super::ObjectError;
use crate::model::{
    program::{Hook, ProgramKind, Tracker},
    records::ProgramInfo,
};

/// A program of one of the three aya types rulebpf uses.
pub enum Pinned {
    SockAddr(CgroupSockAddr),
    Sock(CgroupSock),
    SockOps(SockOps),
}

/// The aya attach type of a sock_addr program of `kind`.
const fn sock_addr_attach_type(kind: ProgramKind) -> Option<CgroupSockAddrAttachType> {
    match kind {
        ProgramKind::Hook(Hook::Connect4) => Some(CgroupSockAddrAttachType::Connect4),
        ProgramKind::Hook(Hook::Connect6) => Some(CgroupSockAddrAttachType::Connect6),
        ProgramKind::Tracker(Tracker::Bind4) => Some(CgroupSockAddrAttachType::Bind4),
        ProgramKind::Tracker(Tracker::Bind6) => Some(CgroupSockAddrAttachType::Bind6),
        ProgramKind::Tracker(Tracker::SockRelease | Tracker::SockOps) => None,
    }
}

impl Pinned {
    /// The program of `kind` pinned at `path`.
    pub fn open(path: PathBuf, kind: ProgramKind) -> Result<Self, ObjectError> {
        let error = |source| ObjectError::Program {
            program: kind.name(),
            source,
        };
        Ok(match (kind, sock_addr_attach_type(kind)) {
            (_, Some(attach)) => {
                Self::SockAddr(CgroupSockAddr::from_pin(path, attach).map_err(error)?)
            }
            (ProgramKind::Tracker(Tracker::SockOps), None) => {
                Self::SockOps(SockOps::from_pin(path).map_err(error)?)
            }
            (_, None) => Self::Sock(
                CgroupSock::from_pin(path, CgroupSockAttachType::SockRelease).map_err(error)?,
            ),
        })
    }

    /// What the kernel says about it.
    pub fn info(&self, name: &'static str) -> Result<ProgramInfo, ObjectError> {
        let info = match self {
            Self::SockAddr(p) => p.info(),
            Self::Sock(p) => p.info(),
            Self::SockOps(p) => p.info(),
        };
        info_of(info, name)
    }

    /// Its file descriptor (for `BPF_PROG_ATTACH` or a jump slot).
    pub fn fd(&self) -> Result<&ProgramFd, ProgramError> {
        match self {
            Self::SockAddr(p) => p.fd(),
            Self::Sock(p) => p.fd(),
            Self::SockOps(p) => p.fd(),
        }
    }

    /// Attaches it to the cgroup open as `cgroup` with a link. A cgroup
    /// link is always multi-attach: other programs of the same kind
    /// (systemd's, a CNI's) keep running, and with nested rulebpf instances
    /// the innermost binds first and the outer ones see a bound socket.
    /// link_create takes no flags (EINVAL otherwise):
    /// https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/cgroup.c#L1442
    pub fn attach_link(
        &mut self,
        cgroup: &File,
    ) -> Result<FdLink, Box<dyn std::error::Error + Send + Sync>> {
        Ok(match self {
            Self::SockAddr(p) => {
                let id = p.attach(cgroup, CgroupAttachMode::Single)?;
                FdLink::try_from(p.take_link(id)?)?
            }
            Self::Sock(p) => {
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

/// Loads `program` (named `name` in errors): the verifier's refusal comes
/// back with its log.
pub fn load(program: &mut Program, name: &'static str) -> Result<(), ObjectError> {
    let loaded = match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSock(p) => p.load(),
        Program::SockOps(p) => p.load(),
        _ => return Err(ObjectError::ProgramType(name)),
    };
    loaded.map_err(|e| match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => ObjectError::Verifier {
            program: name,
            io_error,
            verifier_log: verifier_log.to_string(),
        },
        source => ObjectError::Load {
            program: name,
            source,
        },
    })
}

/// Pins a loaded `program` at `path` and returns what the kernel says
/// about it.
pub fn pin(
    program: &mut Program,
    name: &'static str,
    path: PathBuf,
) -> Result<ProgramInfo, ObjectError> {
    let (pinned, info) = match program {
        Program::CgroupSockAddr(p) => (p.pin(&path), p.info()),
        Program::CgroupSock(p) => (p.pin(&path), p.info()),
        Program::SockOps(p) => (p.pin(&path), p.info()),
        _ => return Err(ObjectError::ProgramType(name)),
    };
    pinned.map_err(|source| ObjectError::Pin { path, source })?;
    info_of(info, name)
}

fn info_of(
    info: Result<aya::programs::ProgramInfo, ProgramError>,
    name: &'static str,
) -> Result<ProgramInfo, ObjectError> {
    let info = info.map_err(|source| ObjectError::Info {
        program: name,
        source,
    })?;
    Ok(ProgramInfo {
        id: info.id(),
        verified_insns: info.verified_instruction_count(),
    })
}
