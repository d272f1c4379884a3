//! The instance's decision-event maps, opened from its pins, and the locks
//! and socket that let one reader serve every listener
//! (`crate::service::events`).

use std::{fs::File, path::PathBuf};

use super::{Instance, InstanceError, lock::flock};
use crate::{
    kernel::events::{self, EventMapsError, EventRing},
    model::{layout, name::InstanceName},
    sys::securedir::SecureDir,
};

impl Instance {
    /// The ring buffer the hooks write decisions to.
    pub fn event_ring(&self) -> Result<EventRing, EventMapsError> {
        EventRing::open(&self.pins)
    }

    /// Events written and dropped by the hooks (`None`: no event maps yet).
    pub fn event_counts(&self) -> Result<Option<(u64, u64)>, EventMapsError> {
        events::counts(&self.pins)
    }
}

/// Held by the one process that reads instance NAME's ring buffer.
pub struct ReaderLock(#[allow(dead_code)] File);

impl ReaderLock {
    /// The reader's lock when no other process reads the events now.
    pub fn try_acquire(name: &InstanceName) -> Result<Option<Self>, InstanceError> {
        let top = SecureDir::open_top(&layout::run_dir())?;
        let file = top.lock_file(&layout::events_lock(name.as_str()))?;
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Some(Self(file))),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
            Err(e) => Err(InstanceError::kernel("taking the events reader lock")(e)),
        }
    }
}

/// Where the reader of instance `name` serves the other listeners (the
/// path through the record directory's descriptor: no link is followed),
/// and the directory, to remove a stale socket.
pub fn events_socket(name: &InstanceName) -> Result<(SecureDir, String, PathBuf), InstanceError> {
    let top = SecureDir::open_top(&layout::run_dir())?;
    let file = layout::events_socket(name.as_str());
    let path = top.fd_path(&file);
    Ok((top, file, path))
}
