//! From a raw [`Event`] to the [`DecisionRecord`] listeners see: the wall
//! clock, the cgroup's path, the rule's remark.

use std::{
    borrow::Cow,
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use rulebpf_common::Event;

use crate::{
    instance::Instance,
    model::event::{self, DecisionRecord},
};

/// How often an unknown cgroup id may send the resolver walking the whole
/// cgroup tree again (a cgroup gone before its event was read stays
/// unknown, unless the instance's record names it).
const REWALK_EVERY: Duration = Duration::from_millis(200);
/// Deepest cgroup the walk descends to (systemd and container runtimes
/// nest a handful of levels).
const WALK_DEPTH: usize = 12;

pub struct Enricher {
    instance: Arc<str>,
    cgroup_root: Option<PathBuf>,
    /// Cgroup id (the directory's inode on cgroup2) -> path from the root.
    cgroups: HashMap<u64, Arc<str>>,
    walked: Option<Instant>,
    /// Rule key -> remark, for the rule set last read.
    remarks: HashMap<u64, Option<Arc<str>>>,
    /// The last cgroup resolved (runs of events come from one cgroup).
    last_cgroup: Option<(u64, Arc<str>)>,
    /// The last millisecond formatted, and its text.
    last_time: Option<(u64, Arc<str>)>,
    /// CLOCK_REALTIME - CLOCK_BOOTTIME, nanoseconds, read per batch.
    boot_to_wall: i128,
}

impl Enricher {
    pub fn new(instance: &str, cgroup_root: Option<PathBuf>) -> Self {
        Self {
            instance: instance.into(),
            cgroup_root,
            cgroups: HashMap::new(),
            walked: None,
            remarks: HashMap::new(),
            last_cgroup: None,
            last_time: None,
            boot_to_wall: 0,
        }
    }

    /// Reads the clocks once for the batch of events about to be turned
    /// into records (not twice per event).
    pub fn new_batch(&mut self) {
        self.boot_to_wall =
            i128::from(clock_ns(libc::CLOCK_REALTIME)) - i128::from(clock_ns(libc::CLOCK_BOOTTIME));
    }

    pub fn record(&mut self, event: &Event, instance: &Instance) -> DecisionRecord {
        let uid = event.uid_gid as u32;
        DecisionRecord {
            time: self.wall_clock(event.boot_ns),
            instance: Arc::clone(&self.instance),
            cgroup: self.cgroup(event.cgroup_id, instance),
            pid: (event.pid_tgid >> 32) as u32,
            comm: event::comm(event),
            uid,
            protocol: Cow::Borrowed(event::protocol(event)),
            destination: event::destination(event).to_string(),
            origin_port: event.origin_port,
            line: (event.line != 0).then_some(event.line),
            remark: self.remark(event.rule_key, instance),
            outcome: Cow::Borrowed(event::outcome(event)),
            nat_port: None,
        }
    }

    fn remark(&mut self, key: u64, instance: &Instance) -> Option<Arc<str>> {
        if key == 0 {
            return None;
        }
        if !self.remarks.contains_key(&key) {
            // A rule this reader has not seen: a new set is in force.
            if let Ok(in_force) = instance.in_force()
                && let Some(set) = in_force.set
            {
                self.remarks = set
                    .rules
                    .into_iter()
                    .map(|r| (r.key, r.remark.map(Arc::from)))
                    .collect();
            }
            // Unknown still (a set swapped out again): asked once.
            self.remarks.entry(key).or_insert(None);
        }
        self.remarks.get(&key).cloned().flatten()
    }

    fn cgroup(&mut self, id: u64, instance: &Instance) -> Arc<str> {
        if let Some((last, path)) = &self.last_cgroup
            && *last == id
        {
            return Arc::clone(path);
        }
        let path = self.resolve_cgroup(id, instance);
        self.last_cgroup = Some((id, Arc::clone(&path)));
        path
    }

    fn resolve_cgroup(&mut self, id: u64, instance: &Instance) -> Arc<str> {
        if let Some(path) = self.cgroups.get(&id) {
            return path.clone();
        }
        // A cgroup the instance is attached to (a container's, attached by
        // the OCI hook) is in its record, even once gone.
        if let Ok(record) = instance.record()
            && let Some(root) = &self.cgroup_root
        {
            for a in record.attachments {
                // Recorded by the OCI hook in the runtime's mount namespace,
                // the path may start at /sys/fs/cgroup rather than our mount.
                let relative = [root.as_path(), Path::new("/sys/fs/cgroup")]
                    .iter()
                    .find_map(|r| a.cgroup.strip_prefix(r).ok())
                    .unwrap_or(&a.cgroup);
                let shown = format!("/{}", relative.display());
                self.cgroups
                    .insert(a.cgroup_id, shown.replace("//", "/").into());
            }
            if let Some(path) = self.cgroups.get(&id) {
                return path.clone();
            }
        }
        let due = self.walked.is_none_or(|t| t.elapsed() >= REWALK_EVERY);
        if due && let Some(root) = self.cgroup_root.clone() {
            self.walked = Some(Instant::now());
            walk(&root, &root, WALK_DEPTH, &mut self.cgroups);
        }
        self.cgroups
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("(cgroup id {id})").into())
    }
}

/// Every cgroup directory under `dir`, by id. Links are never followed
/// (cgroupfs has none; `symlink_metadata` keeps it so).
fn walk(root: &Path, dir: &Path, depth: usize, into: &mut HashMap<u64, Arc<str>>) {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    let relative = dir.strip_prefix(root).unwrap_or(dir);
    into.insert(meta.ino(), format!("/{}", relative.display()).into());
    if depth == 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(root, &entry.path(), depth - 1, into);
        }
    }
}

impl Enricher {
    /// CLOCK_BOOTTIME nanoseconds (what the hook stamps) as RFC 3339 UTC,
    /// formatted once per millisecond.
    fn wall_clock(&mut self, boot_ns: u64) -> Arc<str> {
        let wall = (i128::from(boot_ns) + self.boot_to_wall).max(0) as u64;
        let ms = wall / 1_000_000;
        if let Some((last, text)) = &self.last_time
            && *last == ms
        {
            return Arc::clone(text);
        }
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
        let text: Arc<str> = humantime::format_rfc3339_millis(at).to_string().into();
        self.last_time = Some((ms, Arc::clone(&text)));
        text
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}
