//! One attach path and one detach path for every program kind an instance
//! puts on a cgroup (as Cilium's `pkg/socketlb/cgroup.go` does with one
//! table of attach types): the entry programs and the bookkeeping programs
//! alike.
//!
//! The kernel decides what is attached: what rulebpf has on a cgroup is
//! queried (`BPF_PROG_QUERY`), never assumed from pins; detaching removes
//! every rulebpf program found, by its link when it has one (whoever holds
//! it), else as attached without a link (systemd's `BPFProgram=`).

use std::{
    fs::File,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use super::{ObjectError, entry};
use crate::{
    model::{layout, program::ProgramKind},
    sys::{bpf, cgroup::Cgroup, securedir::SecureDir},
};

/// Why programs could not be attached to, or removed from, a cgroup.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("{step} the {program} program on {}", cgroup.display())]
    Step {
        program: &'static str,
        step: &'static str,
        cgroup: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what} {}", cgroup.display())]
    Query {
        what: &'static str,
        cgroup: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "rulebpf programs are still attached to {} after detaching: {programs:?}",
        cgroup.display()
    )]
    LeftBehind { cgroup: PathBuf, programs: Vec<u32> },
}

impl AttachError {
    /// The kernel's refusal underneath, if that is what it is.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Self::Query { source, .. } => Some(source),
            Self::Step { source, .. } => source.downcast_ref(),
            _ => None,
        }
    }
}

/// A cgroup directory, open, and where it is (for messages).
pub struct OpenCgroup<'a> {
    pub dir: &'a File,
    pub path: &'a Path,
    pub id: u64,
}

impl<'a> OpenCgroup<'a> {
    /// `cgroup`, open as `dir`.
    pub fn new(dir: &'a File, cgroup: &'a Cgroup) -> Self {
        Self {
            dir,
            path: &cgroup.path,
            id: cgroup.id,
        }
    }
}

/// The rulebpf programs (whichever instance's) attached directly to the
/// cgroup as `kind`.
pub fn ours_on(cgroup: &OpenCgroup<'_>, kind: ProgramKind) -> Result<Vec<u32>, AttachError> {
    let ids =
        bpf::attached_programs(cgroup.dir.as_fd(), kind).map_err(|source| AttachError::Query {
            what: "querying the programs of",
            cgroup: cgroup.path.to_path_buf(),
            source,
        })?;
    Ok(ids
        .into_iter()
        .filter(|&id| {
            bpf::program_name(id).is_ok_and(|n| n.starts_with(rulebpf_common::PROGRAM_PREFIX))
        })
        .collect())
}

/// How [`attach`] attaches.
#[derive(Clone, Copy)]
pub enum How<'a> {
    /// With links, pinned in this directory (the attachment's, `cg-ID/`):
    /// the attachment lasts until the pins go.
    Linked(&'a SecureDir),
    /// Without links (`BPF_PROG_ATTACH`, multi), as systemd's
    /// `BPFProgram=` attaches: such an attachment lasts as long as the
    /// cgroup.
    Unlinked,
}

/// Attaches the programs of `kinds` pinned in `pins` (an instance's
/// directory) to the cgroup, in the order given. With links, every link is
/// pinned only once all attached: a failure drops the links made so far,
/// which detaches them, and the cgroup is as it was.
pub fn attach(
    pins: &SecureDir,
    cgroup: &OpenCgroup<'_>,
    kinds: &[ProgramKind],
    how: How<'_>,
) -> Result<(), AttachError> {
    let error = |kind: ProgramKind, step| {
        let cgroup = cgroup.path.to_path_buf();
        move |source| AttachError::Step {
            program: kind.name(),
            step,
            cgroup,
            source,
        }
    };
    let mut links = Vec::new();
    for &kind in kinds {
        let mut program = entry::program(pins, kind)?;
        match how {
            How::Linked(_) => {
                let link = program
                    .attach_link(cgroup.dir)
                    .map_err(error(kind, "attaching"))?;
                links.push((kind, link));
            }
            How::Unlinked => {
                let fd = program
                    .fd()
                    .map_err(|e| error(kind, "attaching")(e.into()))?;
                bpf::attach_program(cgroup.dir.as_fd(), kind, fd.as_fd())
                    .map_err(|e| error(kind, "attaching")(e.into()))?;
            }
        }
    }
    if let How::Linked(link_dir) = how {
        for (i, (kind, link)) in links.into_iter().enumerate() {
            if let Err(e) = link.pin(link_dir.fd_path(&layout::link_pin(kind))) {
                // The links not pinned yet drop with the iterator; the ones
                // pinned before this go with their pins.
                unpin_links(link_dir, &kinds[..i]);
                return Err(error(kind, "pinning the link of")(e.into()));
            }
        }
    }
    Ok(())
}

/// Removes the link pins of `kinds` from `link_dir` (taking back an
/// attach: an unpinned link detaches when its last descriptor closes).
pub fn unpin_links(link_dir: &SecureDir, kinds: &[ProgramKind]) {
    for &kind in kinds {
        let _ = link_dir.remove(&layout::link_pin(kind));
    }
}

/// Of `programs` (a kind and the instance's program id of it; id 0: an
/// instance made before that program existed), those not attached
/// directly to the cgroup.
pub fn missing(
    cgroup: &OpenCgroup<'_>,
    programs: &[(ProgramKind, u32)],
) -> Result<Vec<ProgramKind>, AttachError> {
    let mut missing = Vec::new();
    for &(kind, id) in programs {
        if id != 0 && !ours_on(cgroup, kind)?.contains(&id) {
            missing.push(kind);
        }
    }
    Ok(missing)
}

/// Removes the rulebpf programs attached directly to the cgroup — all of
/// them, or `only` those — the connect programs first, checked gone, then
/// the bookkeeping programs (sockets released until then were still given
/// back). Returns how many were removed.
pub fn clear(cgroup: &OpenCgroup<'_>, only: Option<&[u32]>) -> Result<usize, AttachError> {
    let wanted = |id: &u32| only.is_none_or(|only| only.contains(id));
    let links = bpf::cgroup_links().map_err(|source| AttachError::Query {
        what: "listing the cgroup links for",
        cgroup: cgroup.path.to_path_buf(),
        source,
    })?;
    let (hooks, trackers): (Vec<ProgramKind>, Vec<ProgramKind>) = ProgramKind::ALL
        .into_iter()
        .partition(|k| matches!(k, ProgramKind::Hook(_)));
    let mut removed = 0;
    for kinds in [hooks, trackers] {
        for &kind in &kinds {
            for program in ours_on(cgroup, kind)?.into_iter().filter(wanted) {
                let link = links.iter().find(|l| l.is(cgroup.id, kind, program));
                let result = match link {
                    Some(link) => bpf::detach_link(link.link_id),
                    None => bpf::detach_program(cgroup.dir.as_fd(), kind, program),
                };
                match result {
                    Ok(()) => removed += 1,
                    // Its link was released between the query and now (a
                    // pin just removed): gone already, which the check
                    // below sees.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => {
                        return Err(AttachError::Step {
                            program: kind.name(),
                            step: "detaching",
                            cgroup: cgroup.path.to_path_buf(),
                            source: e.into(),
                        });
                    }
                }
            }
        }
        wait_until_gone(cgroup, &kinds, &wanted)?;
    }
    Ok(removed)
}

/// A released link leaves its cgroup a moment later: asked again for up to
/// 100 ms before anything left is an error.
fn wait_until_gone(
    cgroup: &OpenCgroup<'_>,
    kinds: &[ProgramKind],
    wanted: &impl Fn(&u32) -> bool,
) -> Result<(), AttachError> {
    let left = || -> Result<Vec<u32>, AttachError> {
        let mut left = Vec::new();
        for &kind in kinds {
            left.extend(ours_on(cgroup, kind)?.into_iter().filter(wanted));
        }
        Ok(left)
    };
    let mut programs = left()?;
    for _ in 0..20 {
        if programs.is_empty() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        programs = left()?;
    }
    if programs.is_empty() {
        return Ok(());
    }
    Err(AttachError::LeftBehind {
        cgroup: cgroup.path.to_path_buf(),
        programs,
    })
}
