//! The hook's log lines (aya-log's ring buffer of the rule set in force),
//! printed through `log` at `--log-level`.

use aya_log::EbpfLogger;
use log::warn;
use tokio::io::unix::{AsyncFd, AsyncFdReadyMutGuard};

/// The reader of the hook's aya-log ring buffer, printing through `log`.
pub type KernelLog = EbpfLogger<&'static dyn log::Log>;

/// A reader of the log of the rule set whose connect4 program is
/// `program_id` (the ring buffer is one map shared by both programs of a
/// set); `None`, said once, when it cannot be had.
pub fn open(program_id: u32) -> Option<AsyncFd<KernelLog>> {
    let logger = match EbpfLogger::init_from_id(program_id) {
        Ok(logger) => logger,
        Err(e) => {
            warn!("kernel log unavailable: {e}");
            return None;
        }
    };
    // SAFETY: the logger owns its ring buffer fd and keeps it open for as
    // long as the AsyncFd that owns the logger lives.
    match unsafe { AsyncFd::register(logger) } {
        Ok(fd) => Some(fd),
        Err(e) => {
            warn!("kernel log unavailable: {e}");
            None
        }
    }
}

/// Waits until the kernel log has lines (forever when there is no log).
pub async fn readable(
    logger: &mut Option<AsyncFd<KernelLog>>,
) -> std::io::Result<AsyncFdReadyMutGuard<'_, KernelLog>> {
    match logger {
        Some(fd) => fd.readable_mut().await,
        None => std::future::pending().await,
    }
}
