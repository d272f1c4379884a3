//! Who may change an instance, and when: the command lock every command
//! that changes instances holds from start to end ([`CommandLock`]: one
//! command's steps never interleave with another's, so none fails on a
//! half-done neighbour), the instance's own lock each change takes, and
//! the owner lock `rulebpf run` holds for as long as it manages the
//! instance (`owner`, with its pid).

use std::{
    fs::File,
    io,
    time::{Duration, Instant},
};

use super::{Instance, InstanceError};
use crate::{
    model::{layout, name::InstanceName},
    sys::securedir::SecureDir,
};

/// How long a command waits for another to finish before it gives up.
pub const COMMAND_LOCK_PATIENCE: Duration = Duration::from_secs(60);

/// Held by a command that changes instance NAME, for as long as it runs
/// (`/run/rulebpf/.lock.NAME`: outside the instance's directories, which
/// `detach` removes; `rulebpf run` holds it for each reload and each
/// attach it makes). Lock files stay: removing one while another command
/// waits on it would let a third in beside the second.
pub struct CommandLock(#[allow(dead_code)] File);

impl CommandLock {
    /// Waits (at most [`COMMAND_LOCK_PATIENCE`]) until no other command
    /// changes instance `name`.
    pub fn acquire(name: &InstanceName) -> Result<Self, InstanceError> {
        let file = Self::file(name)?;
        let started = Instant::now();
        loop {
            match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => return Ok(Self(file)),
                Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                    if started.elapsed() >= COMMAND_LOCK_PATIENCE {
                        return Err(InstanceError::Busy {
                            name: name.clone(),
                            waited: started.elapsed(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(InstanceError::kernel("taking the command lock")(e)),
            }
        }
    }

    /// The lock if no other command holds it now.
    pub fn try_acquire(name: &InstanceName) -> Option<Self> {
        let file = Self::file(name).ok()?;
        flock(&file, libc::LOCK_EX | libc::LOCK_NB).ok()?;
        Some(Self(file))
    }

    fn file(name: &InstanceName) -> Result<File, InstanceError> {
        let top = SecureDir::open_top(&layout::run_dir())?;
        Ok(top.lock_file(&layout::command_lock(name.as_str()))?)
    }
}

/// Holds the instance's change lock until dropped.
pub(super) struct Lock(#[allow(dead_code)] File);

/// Held by `rulebpf run` for as long as it manages the instance.
pub struct Owner(#[allow(dead_code)] File);

impl Instance {
    pub(super) fn lock(&self) -> Result<Lock, InstanceError> {
        let file = self.records.lock_file(layout::LOCK_FILE)?;
        flock(&file, libc::LOCK_EX).map_err(InstanceError::kernel(format!(
            "locking instance {}",
            self.name
        )))?;
        Ok(Lock(file))
    }

    /// The pid of the `rulebpf run` that manages this instance, if one does.
    pub fn managed_by(&self) -> Result<Option<u32>, InstanceError> {
        // A reader creates nothing (`status` beside a `detach` would put a
        // file back into the directory being removed): no owner file, no
        // owner.
        let Some(file) = self.records.existing_lock_file(layout::OWNER_FILE)? else {
            return Ok(None);
        };
        match flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
            Ok(()) => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                let pid = self
                    .records
                    .read(layout::OWNER_FILE)?
                    .and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok())
                    .unwrap_or(0);
                Ok(Some(pid))
            }
            Err(e) => Err(InstanceError::kernel("reading the owner lock")(e)),
        }
    }

    /// Refuses when a `rulebpf run` manages the instance, unless `force`.
    pub fn check_unmanaged(&self, force: bool) -> Result<(), InstanceError> {
        match self.managed_by()? {
            Some(pid) if !force => Err(InstanceError::Managed {
                name: self.name.clone(),
                pid,
            }),
            _ => Ok(()),
        }
    }

    /// Makes this process the instance's one owner (`rulebpf run`), for as
    /// long as the returned guard lives; refused while another holds it.
    pub fn take_ownership(&self) -> Result<Owner, InstanceError> {
        let mut file = self.records.lock_file(layout::OWNER_FILE)?;
        if let Err(e) = flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let pid = self.managed_by()?.unwrap_or(0);
                return Err(InstanceError::Managed {
                    name: self.name.clone(),
                    pid,
                });
            }
            return Err(InstanceError::kernel("taking the owner lock")(e));
        }
        use std::io::{Seek as _, Write as _};
        let pid = std::process::id().to_string();
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()));
        written.map_err(InstanceError::kernel("recording the owner's pid"))?;
        Ok(Owner(file))
    }
}

pub(super) fn flock(file: &File, operation: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
