//! The BPF objects the bench reads or pokes through their pins: the
//! kernel's own account of a program's cost, and a jump slot emptied.
//!
//! With
//! `kernel.bpf_stats_enabled` on, every run adds its duration to the
//! program's `run_time_ns` and one to `run_cnt`, shown in the fdinfo of a
//! descriptor of the program. A hook's nanoseconds per connect, free of
//! the round-to-round drift of a connect rate. (Stats cost two clock reads
//! per run themselves, the same for every configuration measured.)
//! https://github.com/torvalds/linux/blob/v6.12/include/linux/filter.h (__bpf_prog_run: bpf_stats_enabled_key)
//! https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/syscall.c (bpf_prog_show_fdinfo)

use std::{
    ffi::CString,
    fs,
    os::fd::{FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use anyhow::{Context as _, ensure};

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_GET: libc::c_long = 7;

/// bpf(2) with `cmd` and its part of `union bpf_attr` as `attr`; the
/// kernel's answer, or the error, naming `what` was done to `pin`.
fn bpf(cmd: libc::c_long, attr: &mut [u64], what: &str, pin: &Path) -> anyhow::Result<i64> {
    // SAFETY: bpf(2) with an attr the size it reads; what its words point
    // to outlives the call (the caller's locals).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            size_of_val(attr) as u32,
        )
    };
    ensure!(
        ret >= 0,
        "{what} {}: {}",
        pin.display(),
        std::io::Error::last_os_error()
    );
    Ok(ret)
}

/// A descriptor of the object pinned at `pin` (`BPF_OBJ_GET`).
fn open_pin(pin: &Path) -> anyhow::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_encoded_bytes())?;
    // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags.
    let mut attr = [path.as_ptr() as u64, 0];
    let fd = bpf(BPF_OBJ_GET, &mut attr, "opening", pin)?;
    // SAFETY: a descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Empties slot 0 of the program array pinned at `pin`: the entry program
/// then tail-calls nothing and falls through (what an instance without a
/// rule set does).
pub fn empty_jump_slot(pin: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let map = open_pin(pin)?;
    let key: u32 = 0;
    // union bpf_attr for BPF_MAP_*_ELEM: map_fd, pad, key, value, flags.
    let mut attr = [map.as_raw_fd() as u64, (&raw const key) as u64, 0, 0];
    bpf(BPF_MAP_DELETE_ELEM, &mut attr, "emptying", pin)?;
    Ok(())
}

/// Stats on while it lives; what was there before comes back after.
pub struct StatsOn {
    before: String,
}

impl StatsOn {
    pub fn new() -> anyhow::Result<Self> {
        let before = fs::read_to_string(STATS_SYSCTL).context(STATS_SYSCTL)?;
        fs::write(STATS_SYSCTL, "1").context(STATS_SYSCTL)?;
        Ok(Self { before })
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        let _ = fs::write(STATS_SYSCTL, self.before.trim());
    }
}

/// A pinned program, held open to read its counters.
pub struct Program(OwnedFd);

impl Program {
    pub fn open(pin: &Path) -> anyhow::Result<Self> {
        open_pin(pin).map(Self)
    }

    /// `(run_time_ns, run_cnt)` so far.
    pub fn counters(&self) -> anyhow::Result<(u64, u64)> {
        use std::os::fd::AsRawFd as _;
        let text = fs::read_to_string(format!("/proc/self/fdinfo/{}", self.0.as_raw_fd()))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                .with_context(|| format!("no {name} in the program's fdinfo"))
        };
        Ok((field("run_time_ns:")?, field("run_cnt:")?))
    }
}
