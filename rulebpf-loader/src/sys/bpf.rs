//! The few `bpf(2)` commands rulebpf needs that aya does not expose: what is
//! attached to a cgroup (the kernel is the source of truth for what rulebpf
//! has there, not the pin directory), which program a jump slot holds, and
//! detaching what a pin no longer holds.
//!
//! Each command takes its own small `repr(C)` attribute struct: the kernel
//! accepts an attribute shorter than its `union bpf_attr` and reads the rest
//! as zero (`bpf_check_uarg_tail_zero`).
//! https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/syscall.c#L5735

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd, BorrowedFd, FromRawFd as _, OwnedFd},
};

use crate::model::program::{Hook, ProgramKind, Tracker};

// Commands and attach types from include/uapi/linux/bpf.h.
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_INET4_BIND: u32 = 8;
const BPF_CGROUP_INET6_BIND: u32 = 9;
const BPF_CGROUP_INET_SOCK_RELEASE: u32 = 34;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// The kernel's attach type of a program kind (`enum bpf_attach_type`).
pub const fn attach_type(kind: ProgramKind) -> u32 {
    match kind {
        ProgramKind::Hook(Hook::Connect4) => BPF_CGROUP_INET4_CONNECT,
        ProgramKind::Hook(Hook::Connect6) => BPF_CGROUP_INET6_CONNECT,
        ProgramKind::Tracker(Tracker::Bind4) => BPF_CGROUP_INET4_BIND,
        ProgramKind::Tracker(Tracker::Bind6) => BPF_CGROUP_INET6_BIND,
        ProgramKind::Tracker(Tracker::SockRelease) => BPF_CGROUP_INET_SOCK_RELEASE,
        ProgramKind::Tracker(Tracker::SockOps) => BPF_CGROUP_SOCK_OPS,
    }
}

/// # Safety
/// `attr` must be the attribute layout the kernel expects for `cmd`.
unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller passes the layout for `cmd`; the kernel reads at
    // most `size_of::<T>()` bytes and writes only fields of that layout.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Ids of the programs of `kind` attached directly to the cgroup `cgroup`
/// (not inherited ones), in the order they run.
pub fn attached_programs(cgroup: BorrowedFd<'_>, kind: ProgramKind) -> io::Result<Vec<u32>> {
    #[repr(C)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    // A cgroup holds at most 64 programs per attach type (BPF_CGROUP_MAX_PROGS).
    let mut ids = vec![0u32; 64];
    let mut attr = Query {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: attach_type(kind),
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    // SAFETY: `Query` is the BPF_PROG_QUERY layout; `ids` outlives the call.
    unsafe { sys_bpf(BPF_PROG_QUERY, &mut attr) }?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

/// A kernel object's fd, by id (`BPF_PROG_GET_FD_BY_ID`, `BPF_LINK_GET_FD_BY_ID`).
fn fd_by_id(cmd: libc::c_long, id: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = ById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: `ById` is the GET_FD_BY_ID layout; the result is a new fd.
    let fd = unsafe { sys_bpf(cmd, &mut attr) }?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info` (a prefix of the kernel's info struct).
fn info_by_fd<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    #[repr(C)]
    struct Info {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = Info {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<T>() as u32,
        info: (info as *mut T) as u64,
    };
    // SAFETY: `Info` is the layout; the kernel writes at most `info_len` bytes.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.map(drop)
}

/// The name the kernel keeps for program `id` (its first 15 bytes).
pub fn program_name(id: u32) -> io::Result<String> {
    // The start of `struct bpf_prog_info`, up to `name`.
    #[repr(C)]
    #[derive(Default)]
    struct ProgInfo {
        type_: u32,
        id: u32,
        tag: [u8; 8],
        jited_prog_len: u32,
        xlated_prog_len: u32,
        jited_prog_insns: u64,
        xlated_prog_insns: u64,
        load_time: u64,
        created_by_uid: u32,
        nr_map_ids: u32,
        map_ids: u64,
        name: [u8; 16],
    }
    let fd = fd_by_id(BPF_PROG_GET_FD_BY_ID, id)?;
    let mut info = ProgInfo::default();
    info_by_fd(fd.as_fd(), &mut info)?;
    let len = info.name.iter().position(|&b| b == 0).unwrap_or(16);
    Ok(String::from_utf8_lossy(&info.name[..len]).into_owned())
}

/// Pins program `id` at `path` (a path through an open directory: see
/// `SecureDir::fd_path`). Fails when the program is gone or `path` exists.
pub fn pin_program_by_id(id: u32, path: &std::path::Path) -> io::Result<()> {
    #[repr(C)]
    struct Pin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let fd = fd_by_id(BPF_PROG_GET_FD_BY_ID, id)?;
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut attr = Pin {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: `Pin` is the BPF_OBJ_PIN layout; `path` outlives the call.
    unsafe { sys_bpf(BPF_OBJ_PIN, &mut attr) }.map(drop)
}

/// A cgroup link the kernel holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLink {
    pub link_id: u32,
    pub program_id: u32,
    pub cgroup_id: u64,
    /// The kernel's attach type (see [`attach_type`]).
    pub attach_type: u32,
}

impl CgroupLink {
    /// Whether this link attaches `program_id` as `kind` to cgroup `cgroup_id`.
    pub fn is(&self, cgroup_id: u64, kind: ProgramKind, program_id: u32) -> bool {
        self.cgroup_id == cgroup_id
            && self.attach_type == attach_type(kind)
            && self.program_id == program_id
    }
}

/// Every live cgroup link of a program kind rulebpf attaches, whoever made
/// it.
pub fn cgroup_links() -> io::Result<Vec<CgroupLink>> {
    let types = ProgramKind::ALL.map(attach_type);
    // The start of `struct bpf_link_info` with its `cgroup` member.
    #[repr(C)]
    #[derive(Default)]
    struct LinkInfo {
        type_: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        cgroup_id: u64,
        attach_type: u32,
        _pad2: u32,
    }
    #[repr(C)]
    struct NextId {
        start_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut out = Vec::new();
    let mut attr = NextId {
        start_id: 0,
        next_id: 0,
        open_flags: 0,
    };
    loop {
        // SAFETY: `NextId` is the BPF_LINK_GET_NEXT_ID layout.
        match unsafe { sys_bpf(BPF_LINK_GET_NEXT_ID, &mut attr) } {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        attr.start_id = attr.next_id;
        // A link may go away between the two calls.
        let Ok(fd) = fd_by_id(BPF_LINK_GET_FD_BY_ID, attr.next_id) else {
            continue;
        };
        let mut info = LinkInfo::default();
        if info_by_fd(fd.as_fd(), &mut info).is_err() || info.type_ != BPF_LINK_TYPE_CGROUP {
            continue;
        }
        if !types.contains(&info.attach_type) {
            continue;
        }
        out.push(CgroupLink {
            link_id: info.id,
            program_id: info.prog_id,
            cgroup_id: info.cgroup_id,
            attach_type: info.attach_type,
        });
    }
}

/// Detaches link `link_id` from its cgroup, whoever holds it (5.9+).
pub fn detach_link(link_id: u32) -> io::Result<()> {
    #[repr(C)]
    struct Detach {
        link_fd: u32,
    }
    let fd = fd_by_id(BPF_LINK_GET_FD_BY_ID, link_id)?;
    let mut attr = Detach {
        link_fd: fd.as_raw_fd() as u32,
    };
    // SAFETY: `Detach` is the BPF_LINK_DETACH layout.
    unsafe { sys_bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// Attaches program `program` of `kind` to `cgroup` without a link
/// (`BPF_PROG_ATTACH` with `BPF_F_ALLOW_MULTI`, as systemd's `BPFProgram=`
/// does): it stays attached until the cgroup goes, whoever holds the fd.
pub fn attach_program(
    cgroup: BorrowedFd<'_>,
    kind: ProgramKind,
    program: BorrowedFd<'_>,
) -> io::Result<()> {
    const BPF_F_ALLOW_MULTI: u32 = 1 << 1;
    prog_attach(cgroup, kind, program, BPF_F_ALLOW_MULTI)
}

/// Attaches `program` of `kind` to `cgroup` with `BPF_F_ALLOW_OVERRIDE`
/// (no link): it runs for every descendant cgroup that has no program of
/// its own for that hook, and replaces the program attached so before (an
/// atomic swap, no gap). The pods' guard attaches so.
/// https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/cgroup.c (__cgroup_bpf_attach, compute_effective_progs)
pub fn attach_overridable(
    cgroup: BorrowedFd<'_>,
    kind: ProgramKind,
    program: BorrowedFd<'_>,
) -> io::Result<()> {
    const BPF_F_ALLOW_OVERRIDE: u32 = 1 << 0;
    prog_attach(cgroup, kind, program, BPF_F_ALLOW_OVERRIDE)
}

/// `BPF_PROG_ATTACH` of `program` to `cgroup` with `flags`.
fn prog_attach(
    cgroup: BorrowedFd<'_>,
    kind: ProgramKind,
    program: BorrowedFd<'_>,
    flags: u32,
) -> io::Result<()> {
    const BPF_PROG_ATTACH: libc::c_long = 8;
    #[repr(C)]
    struct Attach {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
    }
    let mut attr = Attach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: program.as_raw_fd() as u32,
        attach_type: attach_type(kind),
        attach_flags: flags,
    };
    // SAFETY: `Attach` is the BPF_PROG_ATTACH layout.
    unsafe { sys_bpf(BPF_PROG_ATTACH, &mut attr) }.map(drop)
}

/// Detaches program `program_id` of `kind` from `cgroup` where it was
/// attached without a link (`BPF_PROG_ATTACH`, as systemd's `BPFProgram=`
/// does).
pub fn detach_program(
    cgroup: BorrowedFd<'_>,
    kind: ProgramKind,
    program_id: u32,
) -> io::Result<()> {
    #[repr(C)]
    struct Detach {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
    }
    let prog = fd_by_id(BPF_PROG_GET_FD_BY_ID, program_id)?;
    let mut attr = Detach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: attach_type(kind),
        attach_flags: 0,
    };
    // SAFETY: `Detach` is the BPF_PROG_DETACH layout.
    unsafe { sys_bpf(BPF_PROG_DETACH, &mut attr) }.map(drop)
}

/// The id of the program in slot `slot` of the program array `map`, or
/// `None` when the slot is empty (a syscall lookup of a program array
/// answers the program's id).
/// https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/arraymap.c#L893
pub fn jump_slot(map: BorrowedFd<'_>, slot: u32) -> io::Result<Option<u32>> {
    #[repr(C)]
    struct Lookup {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let key = slot;
    let mut value = 0u32;
    let mut attr = Lookup {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: (&key as *const u32) as u64,
        value: (&mut value as *mut u32) as u64,
        flags: 0,
    };
    // SAFETY: `Lookup` is the BPF_MAP_LOOKUP_ELEM layout; key and value live
    // across the call and have the map's sizes (4 bytes each).
    match unsafe { sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}
