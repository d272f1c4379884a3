//! What the running kernel offers that the hooks rely on, probed by loading
//! tiny programs (aya's feature probes) rather than guessed from the version:
//! distribution kernels backport, and a version says nothing about what was
//! configured.
//!
//! `rulebpf kernel` prints the table; loading refuses early, with the missing
//! pieces named, when a needed feature is absent; and where a missing feature
//! has a fallback the loader says what changes (see [`Support::set_retval`],
//! [`Support::sharing`]).
//!
//! One feature is no helper but an option of one: whether a connect hook
//! may set `SO_REUSEADDR`/`SO_REUSEPORT` with `bpf_setsockopt()` (6.0+). It
//! is probed by running a probe program ([`probe_sharing`]) on a UDP
//! connect() from a throw-away cgroup, once per boot: the answer is kept in
//! `/run/rulebpf/.kernel` with the boot's id (it only decides whether the
//! loader warns and whether the hook tries; a wrong one costs nothing more).

use std::{ffi::CString, fs, os::fd::AsFd as _};

use aya::{
    EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramType},
    sys::{BpfHelper, is_helper_supported, is_program_supported},
};

use super::securedir::SecureDir;
use crate::model::layout;

/// One kernel feature the hooks use.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Feature {
    pub name: &'static str,
    /// Upstream kernel version that introduced it.
    pub since: &'static str,
    /// What rulebpf does with it.
    pub role: &'static str,
    /// `None` when the probe itself failed (no permission, no BPF at all).
    pub present: Option<bool>,
    /// Whether rulebpf cannot work without it.
    pub required: bool,
}

/// The probed features.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Support {
    pub features: Vec<Feature>,
}

/// Set to `1` to act as if `bpf_set_retval` were missing (tests the
/// fallback on kernels that have it).
pub const ASSUME_NO_SET_RETVAL: &str = "RULEBPF_ASSUME_NO_SET_RETVAL";
/// Set to `1` to act as if `bpf_loop` were missing (Linux < 5.17): the
/// bounded search runs, and ports are bound without sharing.
pub const ASSUME_NO_LOOP: &str = "RULEBPF_ASSUME_NO_LOOP";
/// Set to `1` to act as if a connect hook could not set `SO_REUSEADDR`
/// (Linux < 6.0): ports are then bound without sharing.
pub const ASSUME_NO_SHARING: &str = "RULEBPF_ASSUME_NO_SHARING";

/// The feature-probe object built by build.rs.
static PROBE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rulebpf-probe"));

const SHARING: &str = "SO_REUSEADDR/SO_REUSEPORT from a connect hook";
const TIMEWAIT_SUBSTATE: &str = "bpf_skc_to_tcp_timewait_sock + kernel BTF";
const EVENTS: &str = "ring buffer + task helpers in connect hooks";
const EVERY_PORT: &str = "bpf_loop";
const SOCKOPS_NETNS: &str = "bpf_get_netns_cookie in sock_ops";

impl Support {
    /// The probed support of the running kernel, probed once per process:
    /// the kernel does not change under a running service, and each probe
    /// loads programs.
    pub fn get() -> &'static Self {
        static SUPPORT: std::sync::OnceLock<Support> = std::sync::OnceLock::new();
        SUPPORT.get_or_init(Self::probe)
    }

    fn probe() -> Self {
        let helper = |h| is_helper_supported(ProgramType::CgroupSockAddr, h).ok();
        let assumed = |var| std::env::var_os(var).is_some_and(|v| v == "1");
        let mut set_retval = helper(BpfHelper::BPF_FUNC_set_retval);
        if assumed(ASSUME_NO_SET_RETVAL) {
            set_retval = Some(false);
        }
        let mut every_port = helper(BpfHelper::BPF_FUNC_loop);
        if assumed(ASSUME_NO_LOOP) {
            every_port = Some(false);
        }
        let sharing = if assumed(ASSUME_NO_SHARING) {
            Some(false)
        } else {
            cached_sharing()
        };
        Self {
            features: vec![
                Feature {
                    name: "cgroup/connect4, cgroup/connect6 programs",
                    since: "4.17",
                    role: "the hooks",
                    present: is_program_supported(ProgramType::CgroupSockAddr).ok(),
                    required: true,
                },
                Feature {
                    name: "bpf_bind",
                    since: "4.17",
                    role: "binds the socket to an origin port",
                    present: helper(BpfHelper::BPF_FUNC_bind),
                    required: true,
                },
                Feature {
                    name: EVERY_PORT,
                    since: "5.17",
                    role: "tries every port of a range in one connect() (without it: at most \
                           1024 ports from the rule's cursor, so a connect can fail while a \
                           port of a larger range is free elsewhere)",
                    present: every_port,
                    required: false,
                },
                Feature {
                    name: "bpf_set_retval",
                    since: "5.18",
                    role: "connect() fails with EADDRNOTAVAIL when a range is exhausted \
                           (without it: EPERM)",
                    present: set_retval,
                    required: false,
                },
                Feature {
                    name: TIMEWAIT_SUBSTATE,
                    since: "5.9",
                    role: "tells a peer that still holds a connection this side closed from \
                           one that closed too (without it: such a tuple stays busy until its \
                           timewait socket ends)",
                    present: helper(BpfHelper::BPF_FUNC_skc_to_tcp_timewait_sock)
                        .map(|h| h && super::btf::tw_substate() != 0),
                    required: false,
                },
                Feature {
                    name: EVENTS,
                    since: "5.8",
                    role: "decision events, `rulebpf events` (ring buffer 5.8; the \
                           connecting task's pid, uid and name in connect hooks: 5.10 has \
                           them; without them: no events, the rules work the same)",
                    present: [
                        BpfHelper::BPF_FUNC_ringbuf_reserve,
                        BpfHelper::BPF_FUNC_ringbuf_query,
                        BpfHelper::BPF_FUNC_get_current_pid_tgid,
                        BpfHelper::BPF_FUNC_get_current_uid_gid,
                        BpfHelper::BPF_FUNC_get_current_comm,
                        BpfHelper::BPF_FUNC_get_current_cgroup_id,
                    ]
                    .into_iter()
                    .map(helper)
                    .try_fold(true, |all, h| h.map(|h| all && h)),
                    required: false,
                },
                Feature {
                    name: SOCKOPS_NETNS,
                    since: "5.15",
                    role: "names the network namespace of a shared port's connection, so a \
                           connect can take back a tuple whose close went unseen (without it: \
                           such a tuple stays busy until its socket is released)",
                    present: is_helper_supported(
                        ProgramType::SockOps,
                        BpfHelper::BPF_FUNC_get_netns_cookie,
                    )
                    .ok(),
                    required: false,
                },
                Feature {
                    name: SHARING,
                    since: "6.0",
                    role: "origin ports shared among destinations (bpf_setsockopt; \
                           without it: one socket per port)",
                    present: sharing,
                    required: false,
                },
            ],
        }
    }

    /// Whether the hook can share ports (`None`: the probe could not run).
    pub fn sharing(&self) -> Option<bool> {
        self.features
            .iter()
            .find(|f| f.name == SHARING)
            .and_then(|f| f.present)
    }

    /// Whether the hook can read a timewait socket's substate.
    pub fn timewait_substate(&self) -> bool {
        self.present(TIMEWAIT_SUBSTATE)
    }

    /// Whether the hooks can make decision events.
    pub fn events(&self) -> bool {
        self.present(EVENTS)
    }

    /// Whether one connect can try every port of a range (`bpf_loop`).
    pub fn every_port(&self) -> bool {
        self.present(EVERY_PORT)
    }

    /// Whether sock_ops programs can name a connection's namespace.
    pub fn sockops_netns(&self) -> bool {
        self.present(SOCKOPS_NETNS)
    }

    fn present(&self, name: &str) -> bool {
        self.features
            .iter()
            .any(|f| f.name == name && f.present == Some(true))
    }

    /// Whether the hook may call `bpf_set_retval`.
    pub fn set_retval(&self) -> bool {
        self.present("bpf_set_retval")
    }

    /// The required features this kernel lacks, as one sentence, if any.
    pub fn missing_required(&self) -> Option<String> {
        let missing: Vec<String> = self
            .features
            .iter()
            .filter(|f| f.required && f.present == Some(false))
            .map(|f| format!("{} (Linux {}: {})", f.name, f.since, f.role))
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "this kernel lacks {}; rulebpf needs Linux 5.10 or later",
                missing.join(", ")
            )
        })
    }

    /// What works differently on this kernel, one line each.
    pub fn degradations(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.every_port() {
            out.push(format!(
                "this kernel has no bpf_loop (Linux 5.17): a connect tries at most {} ports of \
                 a range, from the rule's cursor on; a range of more ports can refuse a \
                 connect while a port is free elsewhere in it (the next connects go on \
                 from there); origin ports are not shared among destinations",
                rulebpf_common::BOUNDED_CANDIDATES
            ));
        }
        if !self.set_retval() {
            out.push(
                "this kernel cannot set connect()'s errno from BPF (bpf_set_retval, Linux \
                 5.18): with --policy strict an exhausted range fails connect() with EPERM \
                 instead of EADDRNOTAVAIL"
                    .to_string(),
            );
        }
        if !self.events() {
            out.push(
                "this kernel does not give connect hooks a ring buffer and the connecting \
                 task's pid, uid and name (Linux 5.8): no decision events (`rulebpf events` \
                 stays silent); the rules work the same"
                    .to_string(),
            );
        }
        if self.sharing() == Some(false) {
            out.push(
                "this kernel does not let a connect hook set SO_REUSEADDR (Linux 6.0): origin \
                 ports are not shared among destinations; a range of N ports carries N \
                 connections at once"
                    .to_string(),
            );
        }
        out
    }
}

/// [`probe_sharing`]'s answer for this boot: read from the cache, or
/// probed and cached.
fn cached_sharing() -> Option<bool> {
    const CACHE: &str = layout::KERNEL_CACHE;
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let dir = SecureDir::open_top(&layout::run_dir()).ok();
    let cached = dir
        .as_ref()
        .and_then(|d| d.read(CACHE).ok().flatten())
        .and_then(|bytes| {
            let text = String::from_utf8(bytes).ok()?;
            let (id, answer) = text.trim().split_once(' ')?;
            (id == boot.trim()).then(|| answer == "sharing")
        });
    if cached.is_some() {
        return cached;
    }
    let probed = probe_sharing()?;
    if let Some(dir) = dir {
        let answer = if probed { "sharing" } else { "exclusive" };
        let _ = dir.write(CACHE, format!("{} {answer}\n", boot.trim()).as_bytes());
    }
    Some(probed)
}

/// Runs the probe program of `rulebpf-ebpf/src/probe.rs`: attached to a
/// throw-away cgroup, it answers a UDP connect() from there (no packet is
/// sent) with success when both options could be set. `None` when the
/// probe could not run (no cgroup2, no permission).
fn probe_sharing() -> Option<bool> {
    let root = super::cgroup::cgroup2_mount().ok()?;
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let cgroup = root.join(format!("rulebpf-probe-{}-{unique}", std::process::id()));
    fs::create_dir(&cgroup).ok()?;
    let answer = run_probe(&cgroup);
    let _ = fs::remove_dir(&cgroup);
    answer
}

fn run_probe(cgroup: &std::path::Path) -> Option<bool> {
    let mut ebpf = EbpfLoader::new().load(PROBE_OBJECT).ok()?;
    let program: &mut CgroupSockAddr = ebpf.program_mut("rulebpf_probe")?.try_into().ok()?;
    program.load().ok()?;
    let dir = fs::File::open(cgroup).ok()?;
    // Detached when `ebpf` drops, before the cgroup is removed.
    program.attach(dir.as_fd(), CgroupAttachMode::Single).ok()?;
    let procs = CString::new(
        cgroup
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .ok()?;
    // SAFETY: the child only makes system calls (async-signal-safe) and
    // ends with _exit: nothing of this process's state is used after fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above.
        unsafe { libc::_exit(probe_child(&procs)) }
    }
    if pid < 0 {
        return None;
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid || !libc::WIFEXITED(status) {
        return None;
    }
    match libc::WEXITSTATUS(status) {
        0 => Some(true),
        1 => Some(false),
        _ => None,
    }
}

/// In the forked child: join the cgroup, connect a UDP socket to
/// 127.0.0.1:9. Exit status 0: connected; 1: refused with EPERM; 2: the
/// probe itself failed.
fn probe_child(procs: &CString) -> i32 {
    // SAFETY: plain system calls on values prepared before fork.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
        if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
            return 2;
        }
        libc::close(fd);
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if socket < 0 {
            return 2;
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 9u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        let ret = libc::connect(
            socket,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if ret == 0 {
            0
        } else if *libc::__errno_location() == libc::EPERM {
            1
        } else {
            2
        }
    }
}
