//! Telling `rulebpf run` when its rule file changed, whatever the path goes
//! through. Editors write a new file and rename it over the old one, so a
//! path's directory is watched, not its inode. And a path may go through
//! symlinks, which are swapped rather than the file written: Kubernetes
//! mounts a ConfigMap as
//!
//! ```text
//! rules.ini -> ..data/rules.ini
//! ..data    -> ..2026_11_21_10_00_00.123   (renamed over atomically on update)
//! ..2026_11_21_10_00_00.123/rules.ini
//! ```
//!
//! so nothing happens in the directory of the file itself; only `..data` is
//! replaced. The watcher therefore resolves the path one component at a
//! time ([`resolve`]), watches the directory holding every symlink it met
//! and the one holding the file, and after every event resolves again:
//! when the symlinks read differently, or the file is another one (device,
//! inode) or was written (size, mtime, ctime), the rules changed. The
//! directories are re-watched after each change, since the symlinks may
//! now lead elsewhere.
//!
//! inotify(7) reports events per directory entry; the watcher runs the
//! resolution on a thread of its own, because notify's callback runs on
//! the inotify thread, which a `watch()` call from it would deadlock.
//!
//! Only whole files are reported. A file written in place (`> rules.ini`,
//! configuration management, a template step) is truncated and written in
//! pieces, and a read in between sees a valid but shorter rule list: a
//! reload then would put part of the rules in force. So a write to the file
//! (`IN_MODIFY`, `IN_CREATE`) holds the report back until its writer closes
//! it (`IN_CLOSE_WRITE`: the last close of the open file, so a shell
//! redirection counts as one writer however many commands write through
//! it) or the file is replaced (a rename: a new inode, whole), and then
//! until the file has stayed unchanged for [`SETTLE`]. A writer that keeps
//! the file open is waited for up to [`WRITER_PATIENCE`] after its last
//! write (SIGHUP reloads the file as it is at once).

use std::{
    collections::{BTreeSet, VecDeque},
    ffi::OsString,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
    sync::mpsc as std_mpsc,
    thread,
    time::{Duration, Instant},
};

use log::{debug, warn};
use notify::{
    EventKind, Watcher as _,
    event::{AccessKind, AccessMode, ModifyKind},
};
use tokio::sync::mpsc;

/// Symlinks followed at most, as the kernel's path walk (`MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

/// How long a changed file must stay unchanged (and closed by its writer)
/// before it is reported.
pub const SETTLE: Duration = Duration::from_millis(200);

/// How long after its last write a file whose close never came is waited
/// for.
pub const WRITER_PATIENCE: Duration = Duration::from_secs(30);

/// Why a rule file cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("watching {} for changes", path.display())]
    Notify {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("watching {} for changes: starting the watcher thread", path.display())]
    Thread {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Keeps the rule file watched; dropping it stops the watching.
pub struct RulesWatcher {
    messages: std_mpsc::Sender<Message>,
}

impl Drop for RulesWatcher {
    fn drop(&mut self) {
        // The thread drops the notify watcher (and its inotify fd) and ends.
        let _ = self.messages.send(Message::Stop);
    }
}

enum Message {
    Event(notify::Result<notify::Event>),
    Stop,
}

/// Watches what `path` resolves to; `changed` gets a message each time the
/// rules behind it may have changed.
pub fn watch(path: &Path, changed: mpsc::Sender<()>) -> Result<RulesWatcher, WatchError> {
    let notify_error = |source| WatchError::Notify {
        path: path.to_path_buf(),
        source,
    };
    let absolute = std::path::absolute(path).map_err(|e| notify_error(e.into()))?;
    let (messages, inbox) = std_mpsc::channel();
    let events = messages.clone();
    let watcher = notify::recommended_watcher(move |event| {
        let _ = events.send(Message::Event(event));
    })
    .map_err(notify_error)?;
    let mut state = State {
        path: absolute,
        watcher,
        watched: BTreeSet::new(),
        last: None,
    };
    state.refresh();
    if state.watched.is_empty() {
        // Not even the directory of the path: nothing would ever be seen.
        let dir = state.path.parent().unwrap_or(&state.path).to_path_buf();
        let source = state
            .watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .err()
            .unwrap_or_else(notify::Error::path_not_found);
        return Err(notify_error(source));
    }
    thread::Builder::new()
        .name("rules-watch".into())
        .spawn(move || state.run(&inbox, &changed))
        .map_err(|source| WatchError::Thread {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(RulesWatcher { messages })
}

/// The watcher thread's state.
struct State {
    path: PathBuf,
    watcher: notify::RecommendedWatcher,
    watched: BTreeSet<PathBuf>,
    last: Option<Resolution>,
}

impl State {
    fn run(mut self, inbox: &std_mpsc::Receiver<Message>, changed: &mpsc::Sender<()>) {
        // A change not reported yet; since when the file has been still
        // (events of other files in the directories do not count); the file
        // (device, inode) a writer still has open, and its last write.
        let mut unreported = false;
        let mut still_since = Instant::now();
        let mut writing: Option<(u64, u64)> = None;
        let mut last_write = Instant::now();
        loop {
            let message = if unreported {
                inbox.recv_timeout(SETTLE.saturating_sub(still_since.elapsed()))
            } else {
                inbox
                    .recv()
                    .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected)
            };
            let event = match message {
                Ok(Message::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                Ok(Message::Event(event)) => event,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    if writing.is_some() && last_write.elapsed() >= WRITER_PATIENCE {
                        // A close lost, or a writer that never closes (a
                        // truncate(2) by path): read it as it is now.
                        warn!(
                            "{} was written {}s ago and not closed since: reading it as it is",
                            self.path.display(),
                            WRITER_PATIENCE.as_secs()
                        );
                        writing = None;
                    }
                    // Open for writing still, or changed meanwhile: wait on.
                    if writing.is_some() || self.refresh() {
                        still_since = Instant::now();
                    } else {
                        // Closed and unchanged for SETTLE. Full: a reload
                        // is pending already, and it reads the file then.
                        unreported = false;
                        let _ = changed.try_send(());
                    }
                    continue;
                }
            };
            match &event {
                // An overflowed queue may have lost the writer's close.
                Ok(e) if e.need_rescan() => writing = None,
                // Opens and reads (ours too) change nothing.
                Ok(e) if e.kind.is_access() && !is_close_write(&e.kind) => continue,
                Ok(_) => {}
                Err(e) => {
                    debug!("watching {}: {e}", self.path.display());
                    writing = None;
                }
            }
            if self.refresh() {
                unreported = true;
                still_since = Instant::now();
            }
            let file = self.last.as_ref().and_then(|r| r.file.as_ref());
            let identity = file.map(FileState::identity);
            match event.as_ref().map(|e| Write::of(e, file)) {
                Ok(Write::Started) => {
                    if writing.is_none() {
                        debug!(
                            "{} is being written; waiting for its writer to close it",
                            self.path.display()
                        );
                    }
                    writing = identity;
                    last_write = Instant::now();
                    still_since = Instant::now();
                }
                Ok(Write::Closed) => {
                    writing = None;
                    still_since = Instant::now();
                }
                _ => {}
            }
            if writing.is_some() && identity != writing {
                // Renamed over or removed: the open file is not ours any more.
                writing = None;
            }
        }
    }

    /// Resolves the path again and watches the directories that now decide
    /// it; true when the resolution differs from the last one.
    fn refresh(&mut self) -> bool {
        let now = resolve(&self.path);
        let dirs = &now.dirs;
        for dir in self.watched.difference(dirs) {
            // Gone directories (an old ConfigMap version) fail: no matter.
            let _ = self.watcher.unwatch(dir);
        }
        for dir in dirs.difference(&self.watched.clone()) {
            match self.watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watched.insert(dir.clone());
                }
                Err(e) => warn!("cannot watch {} for rule changes: {e}", dir.display()),
            }
        }
        self.watched.retain(|dir| dirs.contains(dir));
        let differs = self.last.as_ref() != Some(&now);
        self.last = Some(now);
        differs
    }
}

/// What an event says of a write to the file the path resolves to.
#[derive(Debug, PartialEq, Eq)]
enum Write {
    /// Written, truncated or created: a writer has it open.
    Started,
    /// Its writer closed it.
    Closed,
    /// Anything else, or another file.
    Other,
}

fn is_close_write(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
    )
}

impl Write {
    fn of(event: &notify::Event, file: Option<&FileState>) -> Self {
        let Some(file) = file else {
            return Self::Other;
        };
        if !event.paths.contains(&file.path) {
            return Self::Other;
        }
        match event.kind {
            EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                Self::Started
            }
            ref kind if is_close_write(kind) => Self::Closed,
            _ => Self::Other,
        }
    }
}

/// What a path resolved to, and what decided it.
#[derive(Debug, PartialEq, Eq)]
struct Resolution {
    /// The directories holding each symlink met and the file (or the
    /// component that is missing): where a change would show.
    dirs: BTreeSet<PathBuf>,
    /// Each symlink met and what it read.
    links: Vec<(PathBuf, PathBuf)>,
    /// The file reached, if it was.
    file: Option<FileState>,
}

/// Which file, and which version of it.
#[derive(Debug, PartialEq, Eq)]
struct FileState {
    /// Where it was reached (the last symlink resolved).
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileState {
    /// The file itself, whatever its contents: (device, inode).
    fn identity(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }
}

/// Resolves `path` (absolute) one component at a time, as the kernel's
/// path walk does, noting every symlink and the directory holding it.
fn resolve(path: &Path) -> Resolution {
    let mut resolution = Resolution {
        dirs: BTreeSet::new(),
        links: Vec::new(),
        file: None,
    };
    let mut at = PathBuf::from("/");
    let mut rest: VecDeque<OsString> = components(path);
    let mut hops = 0;
    while let Some(name) = rest.pop_front() {
        if name == ".." {
            at.pop();
            continue;
        }
        let entry = at.join(&name);
        let metadata = std::fs::symlink_metadata(&entry);
        let is_last = rest.is_empty();
        let is_link = matches!(&metadata, Ok(m) if m.file_type().is_symlink());
        if is_link || is_last || metadata.is_err() {
            // The entries of `at` decide this component.
            resolution.dirs.insert(at.clone());
        }
        match metadata {
            Ok(_) if is_link && hops < MAX_SYMLINKS => {
                hops += 1;
                let Ok(target) = std::fs::read_link(&entry) else {
                    return resolution;
                };
                if target.is_absolute() {
                    at = PathBuf::from("/");
                }
                for component in components(&target).into_iter().rev() {
                    rest.push_front(component);
                }
                resolution.links.push((entry, target));
            }
            Ok(metadata) if is_last && !is_link => {
                resolution.file = Some(FileState {
                    path: entry,
                    dev: metadata.dev(),
                    ino: metadata.ino(),
                    size: metadata.size(),
                    mtime: (metadata.mtime(), metadata.mtime_nsec()),
                    ctime: (metadata.ctime(), metadata.ctime_nsec()),
                });
            }
            Ok(_) if !is_link => at = entry,
            // Missing, a loop, unreadable: watched as far as it went.
            _ => return resolution,
        }
    }
    resolution
}

/// The names of `path`'s components (`.` dropped, `..` kept).
fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|component| match component {
            Component::Normal(name) => Some(name.to_owned()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink, time::Duration};

    use super::*;

    /// The kubelet's layout of a ConfigMap in `dir`: the file is reached
    /// through two symlinks, `r.ini -> ..data/r.ini` and `..data -> ..v1`.
    fn configmap(dir: &Path) {
        fs::create_dir(dir.join("..v1")).unwrap();
        fs::write(dir.join("..v1/r.ini"), "1.2.3.4 * : 5\n").unwrap();
        symlink("..v1", dir.join("..data")).unwrap();
        symlink("..data/r.ini", dir.join("r.ini")).unwrap();
    }

    /// Waits for a change; the guard only keeps a broken watcher from
    /// hanging the test.
    async fn changed(rx: &mut mpsc::Receiver<()>) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(20), rx.recv()).await,
            Ok(Some(()))
        )
    }

    #[tokio::test]
    async fn a_configmap_update_is_seen_through_its_symlinks() {
        // An update renames a new `..data` symlink over the old one.
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        configmap(d);
        let (tx, mut rx) = mpsc::channel(8);
        let _watcher = watch(&d.join("r.ini"), tx).unwrap();

        fs::create_dir(d.join("..v2")).unwrap();
        fs::write(d.join("..v2/r.ini"), "1.2.3.4 * : 6\n").unwrap();
        symlink("..v2", d.join("..data_tmp")).unwrap();
        fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        fs::remove_dir_all(d.join("..v1")).unwrap();
        assert!(changed(&mut rx).await, "the swap of ..data");
        while rx.try_recv().is_ok() {}

        // The new version's directory is watched now.
        fs::write(d.join("..v2/r.ini"), "1.2.3.4 * : 7\n").unwrap();
        assert!(changed(&mut rx).await, "a write to the new version");
    }

    #[tokio::test]
    async fn an_editor_renaming_a_new_file_over_the_old_one_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("r.ini");
        fs::write(&file, "1.2.3.4 * : 5\n").unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let _watcher = watch(&file, tx).unwrap();
        fs::write(dir.path().join(".r.ini.swp"), "1.2.3.4 * : 6\n").unwrap();
        fs::rename(dir.path().join(".r.ini.swp"), &file).unwrap();
        assert!(changed(&mut rx).await);
    }

    /// Issue 17, item 2: `run` put a half-written file in force.
    #[tokio::test]
    async fn a_file_written_in_place_is_reported_once_its_writer_closes_it() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("r.ini");
        fs::write(&file, "1.2.3.4 * : 5\n").unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let _watcher = watch(&file, tx).unwrap();

        // Truncated and written in two pieces, the writer open in between.
        let mut writer = fs::File::create(&file).unwrap();
        writer.write_all(b"1.2.3.4 * : 6\n").unwrap();
        let early = tokio::time::timeout(SETTLE * 4, rx.recv()).await;
        assert!(early.is_err(), "reported while its writer had it open");
        writer.write_all(b"1.2.3.5 * : 7\n").unwrap();
        drop(writer);
        assert!(changed(&mut rx).await, "the close");

        // A file created in place (it did not exist): the same.
        fs::remove_file(&file).unwrap();
        let _ = tokio::time::timeout(SETTLE * 3, rx.recv()).await;
        let mut writer = fs::File::create(&file).unwrap();
        writer.write_all(b"1.2.3.4 * : 8\n").unwrap();
        let early = tokio::time::timeout(SETTLE * 4, rx.recv()).await;
        assert!(early.is_err(), "reported while its creator had it open");
        drop(writer);
        assert!(changed(&mut rx).await, "the close of the new file");
    }

    /// Other files of a busy directory (/etc: every exec opens
    /// ld.so.cache) never hold a report back.
    #[tokio::test]
    async fn a_busy_directory_does_not_delay_the_report() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("r.ini");
        let other = dir.path().join("ld.so.cache");
        fs::write(&file, "1.2.3.4 * : 5\n").unwrap();
        fs::write(&other, "x").unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let _watcher = watch(&file, tx).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = fs::read(&other);
                    std::thread::sleep(SETTLE / 10);
                }
            })
        };
        fs::write(&file, "1.2.3.4 * : 6\n").unwrap();
        let reported = tokio::time::timeout(SETTLE * 10, rx.recv()).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        busy.join().unwrap();
        assert!(
            matches!(reported, Ok(Some(()))),
            "no report within {:?}",
            SETTLE * 10
        );
    }

    #[test]
    fn resolution_notes_every_symlink_and_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        // Canonical: the resolution is of real directories.
        let d = &dir.path().canonicalize().unwrap();
        fs::create_dir(d.join("a")).unwrap();
        configmap(&d.join("a"));
        // An absolute link from another directory, and a `..` in the path.
        fs::create_dir(d.join("b")).unwrap();
        symlink(d.join("a/r.ini"), d.join("b/rules")).unwrap();
        let got = resolve(&d.join("b/../b/rules"));
        let dirs: Vec<PathBuf> = got.dirs.into_iter().collect();
        assert_eq!(dirs, [d.join("a"), d.join("a/..v1"), d.join("b")]);
        let links: Vec<&Path> = got.links.iter().map(|(l, _)| l.as_path()).collect();
        assert_eq!(
            links,
            [d.join("b/rules"), d.join("a/r.ini"), d.join("a/..data")]
        );
        assert!(got.file.is_some());

        // A loop ends the walk; the directory is still watched.
        symlink("loop", d.join("loop")).unwrap();
        let got = resolve(&d.join("loop"));
        assert_eq!(got.dirs, BTreeSet::from([d.clone()]));
        assert!(got.file.is_none());
    }
}
