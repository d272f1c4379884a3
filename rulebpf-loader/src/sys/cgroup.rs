//! Finding the cgroup v2 directory a rule set is attached to.
//!
//! `--cgroup` takes an absolute path or one relative to the cgroup2 mount,
//! which is found in /proc/mounts (on hybrid hosts it is
//! /sys/fs/cgroup/unified, not /sys/fs/cgroup).

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// A cgroup v2 directory and its id (the directory's inode number, which is
/// what the kernel reports as the cgroup id for cgroup2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    pub path: PathBuf,
    pub id: u64,
}

/// `statfs(2)`'s `f_type` of a cgroup2 file system (linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Why `--cgroup` does not name a usable cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("reading /proc/mounts")]
    Mounts(#[source] std::io::Error),
    #[error("no cgroup2 file system in /proc/mounts: rulebpf needs cgroup v2")]
    NoCgroup2,
    #[error("cgroup {}: no such directory", path.display())]
    NotFound {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a cgroup directory", path.display())]
    NotACgroup { path: PathBuf },
    #[error("{} is not a cgroup v2 directory (the cgroup2 mount is {}; rulebpf needs cgroup v2)", path.display(), root.display())]
    NotCgroup2 { path: PathBuf, root: PathBuf },
    #[error("--cgroup {}: `..` is not allowed in a cgroup path", .0.display())]
    DotDot(PathBuf),
    #[error("reading /proc/self/cgroup")]
    OwnCgroup(#[source] std::io::Error),
}

impl CgroupError {
    /// Whether the argument was wrong (rather than the host).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::NotFound { .. }
                | Self::NotACgroup { .. }
                | Self::NotCgroup2 { .. }
                | Self::DotDot(_)
        )
    }
}

/// The first cgroup2 mount point listed in /proc/mounts.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(CgroupError::Mounts)?;
    mount_of_type(&mounts, "cgroup2").ok_or(CgroupError::NoCgroup2)
}

/// The mount point of the first file system of type `fstype` in a
/// /proc/mounts text (octal escapes such as `\040` decoded).
pub fn mount_of_type(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, ty) = (fields.next()?, fields.next()?, fields.next()?);
        (ty == fstype).then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = s
                .get(i + 1..i + 4)
                .and_then(|oct| u8::from_str_radix(oct, 8).ok())
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 path (relative to the hierarchy's root, starting with `/`)
/// in a /proc/PID/cgroup text. On a hybrid host the v1 lines
/// (`4:memory:/...`) come first; the v2 line is the one with id 0 and no
/// controllers.
pub fn unified_line(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
}

/// This process's cgroup v2 directory, from /proc/self/cgroup.
pub fn own() -> Result<PathBuf, CgroupError> {
    let text = fs::read_to_string("/proc/self/cgroup").map_err(CgroupError::OwnCgroup)?;
    let relative = unified_line(&text)
        .ok_or_else(|| CgroupError::OwnCgroup(std::io::Error::other("no cgroup v2 line (0::)")))?;
    Cgroup::path_of(Path::new(relative.trim_start_matches('/')))
}

impl Cgroup {
    /// Resolves `arg` (absolute, or relative to the cgroup2 mount) to an
    /// existing cgroup v2 directory.
    ///
    /// The path is made canonical (links and `..` resolved) before anything
    /// else, and the directory must be on a cgroup2 file system (statfs), not
    /// only under the mount's path: a cgroup v1 directory's inode number can
    /// equal a v2 cgroup's id, and a textual prefix says nothing about what
    /// `x/../../cpu/y` reaches.
    pub fn resolve(arg: &Path) -> Result<Self, CgroupError> {
        let root = cgroup2_mount()?;
        let given = Self::path_of(arg)?;
        let path = fs::canonicalize(&given).map_err(|source| CgroupError::NotFound {
            path: given.clone(),
            source,
        })?;
        if !path.starts_with(&root) {
            return Err(CgroupError::NotCgroup2 { path, root });
        }
        match rustix::fs::statfs(&path) {
            Ok(fs) if fs.f_type == CGROUP2_SUPER_MAGIC => {}
            _ => return Err(CgroupError::NotCgroup2 { path, root }),
        }
        let meta = fs::metadata(&path).map_err(|source| CgroupError::NotFound {
            path: path.clone(),
            source,
        })?;
        if !meta.is_dir() || !path.join("cgroup.procs").exists() {
            return Err(CgroupError::NotACgroup { path });
        }
        Ok(Self {
            path,
            id: meta.ino(),
        })
    }

    /// The directory `arg` names (absolute, or relative to the cgroup2
    /// mount), whether or not it exists. `..` is refused: a cgroup that does
    /// not exist yet cannot be made canonical, and `run` follows this path.
    pub fn path_of(arg: &Path) -> Result<PathBuf, CgroupError> {
        if arg
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(CgroupError::DotDot(arg.to_path_buf()));
        }
        Ok(absolute_in(&cgroup2_mount()?, arg))
    }

    /// `path` relative to the cgroup2 mount (for instance names).
    pub fn relative(path: &Path) -> Result<PathBuf, CgroupError> {
        let root = cgroup2_mount()?;
        path.strip_prefix(&root)
            .map(Path::to_path_buf)
            .map_err(|_| CgroupError::NotCgroup2 {
                path: path.to_path_buf(),
                root,
            })
    }

    /// The path relative to the cgroup2 mount, for display (`/` for the root).
    pub fn display_path(&self) -> String {
        match cgroup2_mount() {
            Ok(root) => match self.path.strip_prefix(&root) {
                Ok(rel) => format!("/{}", rel.display()),
                Err(_) => self.path.display().to_string(),
            },
            Err(_) => self.path.display().to_string(),
        }
    }
}

fn absolute_in(root: &Path, arg: &Path) -> PathBuf {
    if arg.is_absolute() {
        arg.to_path_buf()
    } else {
        root.join(arg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
                      tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            mount_of_type(mounts, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mount_of_type(mounts, "bpf"), None);
    }

    #[test]
    fn decodes_escaped_mount_points() {
        let mounts = "none /mnt/with\\040space cgroup2 rw 0 0\n";
        assert_eq!(
            mount_of_type(mounts, "cgroup2"),
            Some(PathBuf::from("/mnt/with space"))
        );
    }
}
