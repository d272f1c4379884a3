//! The cgroup paths `rulebpf run` follows. systemd removes a unit's cgroup
//! and creates a new one at the same path on every restart; a container
//! engine makes a new cgroup for every container. A path is therefore
//! watched, not a cgroup: when the directory goes, its attachment is
//! removed (no pins of gone cgroups are left behind); when a directory
//! appears at the path again, the instance is attached to it at once.
//!
//! Each path's parent directory is watched with inotify (cgroupfs reports
//! mkdir and rmdir like any file system: `vfs_mkdir` -> `fsnotify_mkdir`),
//! and `run` also calls [`Followed::check`] once a second, for parents that
//! did not exist yet or events that were missed.
//! https://github.com/torvalds/linux/blob/v6.12/fs/namei.c#L4118

use std::path::PathBuf;

use log::{info, warn};
use notify::Watcher as _;
use tokio::sync::mpsc;

use crate::{instance::Instance, model::records::AttachedBy, sys::cgroup::Cgroup};

/// One followed path.
#[derive(Debug)]
struct Target {
    path: PathBuf,
    /// The id of the cgroup the instance is attached to there, if any.
    attached: Option<u64>,
    /// Whether a cgroup at this path was attached before (so the next one
    /// is a re-attach).
    seen: bool,
}

/// The paths `run` follows, and the watcher of their parents.
pub struct Followed {
    paths: Vec<Target>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl Followed {
    /// Follows `paths`; `changed` gets a message when something happens in
    /// one of their parent directories.
    pub fn new(paths: Vec<PathBuf>, changed: mpsc::Sender<()>) -> Self {
        let names: Vec<PathBuf> = paths.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event
                && event.paths.iter().any(|p| names.iter().any(|n| n == p))
            {
                let _ = changed.try_send(());
            }
        });
        let watcher = match watcher {
            Ok(mut watcher) => {
                for parent in paths.iter().filter_map(|p| p.parent()) {
                    if let Err(e) = watcher.watch(parent, notify::RecursiveMode::NonRecursive) {
                        warn!(
                            "cannot watch {} ({e}); checking it once a second",
                            parent.display()
                        );
                    }
                }
                Some(watcher)
            }
            Err(e) => {
                warn!("no inotify ({e}); checking the cgroup paths once a second");
                None
            }
        };
        Self {
            paths: paths
                .into_iter()
                .map(|path| Target {
                    path,
                    attached: None,
                    seen: false,
                })
                .collect(),
            _watcher: watcher,
        }
    }

    /// Attaches the instance where a cgroup (re)appeared and removes the
    /// attachments of cgroups that went. Returns the number of re-attaches.
    pub fn check(&mut self, instance: &Instance) -> u64 {
        let mut reattached = 0;
        let recorded: Vec<u64> = instance
            .record()
            .map(|r| r.attachments.iter().map(|a| a.cgroup_id).collect())
            .unwrap_or_default();
        for followed in &mut self.paths {
            // Detached by another command (`detach --force`): that decision
            // stands; this service stops following the path.
            if let Some(id) = followed.attached
                && !recorded.contains(&id)
                && Cgroup::resolve(&followed.path).is_ok_and(|cg| cg.id == id)
            {
                warn!(
                    "{} was detached by another command; no longer following it",
                    followed.path.display()
                );
                followed.attached = None;
                followed.seen = false;
                followed.path = PathBuf::new();
                continue;
            }
            if followed.path.as_os_str().is_empty() {
                continue;
            }
            match Cgroup::resolve(&followed.path) {
                Ok(cgroup) if followed.attached == Some(cgroup.id) => {}
                Ok(cgroup) => {
                    if let Some(old) = followed.attached.take() {
                        let _ = instance.detach_id(old);
                    }
                    match instance.attach(&cgroup, AttachedBy::Run) {
                        Ok(_) => {
                            if followed.seen {
                                reattached += 1;
                                info!(
                                    "{} is back (cgroup id {}): rules attached again",
                                    cgroup.path.display(),
                                    cgroup.id
                                );
                            } else {
                                info!(
                                    "attached to {} (cgroup id {})",
                                    cgroup.path.display(),
                                    cgroup.id
                                );
                            }
                            followed.attached = Some(cgroup.id);
                            followed.seen = true;
                        }
                        Err(e) => warn!(
                            "attaching to {}: {}",
                            cgroup.path.display(),
                            crate::with_causes(&e)
                        ),
                    }
                }
                Err(_) => {
                    if let Some(old) = followed.attached.take() {
                        info!(
                            "{} is gone; waiting for it to come back",
                            followed.path.display()
                        );
                        let _ = instance.detach_id(old);
                    }
                }
            }
        }
        reattached
    }
}
