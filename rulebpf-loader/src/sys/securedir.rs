//! The directories rulebpf keeps its state in (`/sys/fs/bpf/rulebpf`,
//! `/run/rulebpf`), created and walked so that a local user cannot steer root
//! into their files.
//!
//! bpffs is mounted 1777 (`mount -t bpf bpf /sys/fs/bpf`): any user may
//! create `/sys/fs/bpf/rulebpf` before rulebpf does, as a symlink to a
//! directory of theirs or as their own directory full of planted links. So:
//!
//! * the top directory is created 0700 and, when it exists, accepted only
//!   if it is a real directory (opened `O_NOFOLLOW`), owned by root and
//!   writable by nobody else; otherwise every command stops with an error
//!   that says so;
//! * everything below is reached from that directory's file descriptor
//!   (`openat`/`unlinkat`/`renameat` with `O_NOFOLLOW`), never by a path a
//!   user could swap; the sticky parent keeps anyone else from renaming it;
//! * aya's pin calls need a path: they get `/proc/self/fd/N/name`, which
//!   the kernel resolves through the open directory, not through names;
//! * files are written with explicit modes whatever the umask, through a
//!   temporary created with `O_EXCL` (which never follows a planted link).

use std::{
    io::{self, Write as _},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

/// An open directory that rulebpf trusts: root's, and writable only by root.
#[derive(Debug)]
pub struct SecureDir {
    fd: OwnedFd,
    /// For messages only; never opened again.
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SecureDirError {
    #[error("{} is a symbolic link; rulebpf never follows links there (remove it)", .0.display())]
    Symlink(PathBuf),
    #[error("{} is not a directory (remove it)", .0.display())]
    NotADirectory(PathBuf),
    #[error(
        "{} is owned by uid {uid}, not root: someone else created it; remove it and run again",
        path.display()
    )]
    NotRoot { path: PathBuf, uid: u32 },
    #[error(
        "{} is writable by group or others (mode {mode:o}); rulebpf needs it 0700: \
         `chmod 0700 {}` after checking its contents",
        path.display(), path.display()
    )]
    Writable { path: PathBuf, mode: u32 },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(rustix::io::Errno) -> SecureDirError {
    let path = path.to_path_buf();
    move |e| SecureDirError::Io {
        what,
        path,
        source: e.into(),
    }
}

/// Directory modes: 0700, files 0600.
const DIR_MODE: Mode = Mode::RWXU;
const FILE_MODE: Mode = Mode::RUSR.union(Mode::WUSR);

impl SecureDir {
    /// Opens `path` (creating it 0700 when missing) as a trusted directory.
    /// Its parent must be a system directory that only root controls or
    /// that is sticky (`/sys/fs/bpf`, `/run`).
    pub fn open_top(path: &Path) -> Result<Self, SecureDirError> {
        match rustix::fs::mkdir(path, DIR_MODE) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io_error("creating", path)(e)),
        }
        let fd = rustix::fs::open(path, dir_flags(), Mode::empty()).map_err(|e| refine(e, path))?;
        Self::verified(fd, path.to_path_buf())
    }

    /// Opens `path` as a trusted directory if it exists.
    pub fn open_existing(path: &Path) -> Result<Option<Self>, SecureDirError> {
        match rustix::fs::open(path, dir_flags(), Mode::empty()) {
            Ok(fd) => Self::verified(fd, path.to_path_buf()).map(Some),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(refine(e, path)),
        }
    }

    /// The subdirectory `name`, created 0700 when `create` and missing;
    /// `None` when it does not exist (and `create` is false).
    pub fn subdir(&self, name: &str, create: bool) -> Result<Option<Self>, SecureDirError> {
        let path = self.path.join(name);
        if create {
            match rustix::fs::mkdirat(&self.fd, name, DIR_MODE) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io_error("creating", &path)(e)),
            }
        }
        match rustix::fs::openat(&self.fd, name, dir_flags(), Mode::empty()) {
            Ok(fd) => Self::verified(fd, path).map(Some),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(refine(e, &path)),
        }
    }

    fn verified(fd: OwnedFd, path: PathBuf) -> Result<Self, SecureDirError> {
        let stat = rustix::fs::fstat(&fd).map_err(io_error("inspecting", &path))?;
        if stat.st_uid != 0 {
            return Err(SecureDirError::NotRoot {
                path,
                uid: stat.st_uid,
            });
        }
        let mode = stat.st_mode & 0o7777;
        if mode & 0o022 != 0 {
            return Err(SecureDirError::Writable { path, mode });
        }
        Ok(Self { fd, path })
    }

    /// Where `name` is, for messages.
    pub fn display(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// The directory itself, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path to `name` that the kernel resolves through this open
    /// directory (for APIs that take paths: pinning, `from_pin`).
    pub fn fd_path(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}/{name}", self.fd.as_raw_fd()))
    }

    /// The names in this directory with their types (links not followed).
    pub fn entries(&self) -> Result<Vec<(String, FileType)>, SecureDirError> {
        let error = io_error("listing", &self.path);
        let mut dir = Dir::read_from(&self.fd).map_err(error)?;
        let mut out = Vec::new();
        while let Some(entry) = dir.read() {
            let entry = entry.map_err(io_error("listing", &self.path))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            out.push((name, entry.file_type()));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Whether `name` exists here (a link counts as itself).
    pub fn contains(&self, name: &str) -> bool {
        rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW).is_ok()
    }

    /// Removes the file, pin or link `name`; false when there was none.
    pub fn remove(&self, name: &str) -> Result<bool, SecureDirError> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(io_error("removing", &self.display(name))(e)),
        }
    }

    /// Removes `name` and, if it is a directory, everything in it, without
    /// following any link (a link is removed, never its target).
    pub fn remove_tree(&self, name: &str) -> Result<bool, SecureDirError> {
        let path = self.display(name);
        let stat = match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(rustix::io::Errno::NOENT) => return Ok(false),
            Err(e) => return Err(io_error("inspecting", &path)(e)),
        };
        if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
            return self.remove(name);
        }
        let fd = rustix::fs::openat(&self.fd, name, dir_flags(), Mode::empty())
            .map_err(io_error("opening", &path))?;
        let child = Self { fd, path };
        for (entry, _) in child.entries()? {
            child.remove_tree(&entry)?;
        }
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(true),
            Err(e) => Err(io_error("removing", &child.path)(e)),
        }
    }

    /// Reads the regular file `name`; `None` when there is none.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>, SecureDirError> {
        let path = self.display(name);
        let fd = match rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(refine(e, &path)),
        };
        let mut file = std::fs::File::from(fd);
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut file, &mut bytes).map_err(|source| SecureDirError::Io {
            what: "reading",
            path,
            source,
        })?;
        Ok(Some(bytes))
    }

    /// Replaces the file `name` with `bytes` as a whole (mode 0600): written
    /// to a fresh temporary, flushed, renamed over it.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), SecureDirError> {
        let tmp = format!("{name}.tmp");
        let path = self.display(&tmp);
        // A leftover (or planted) temporary goes first: O_EXCL below refuses
        // to open anything that exists, a link included.
        self.remove(&tmp)?;
        let fd = rustix::fs::openat(
            &self.fd,
            &tmp,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            FILE_MODE,
        )
        .map_err(io_error("creating", &path))?;
        // The umask may have taken bits away; the mode is ours to say.
        rustix::fs::fchmod(&fd, FILE_MODE).map_err(io_error("setting the mode of", &path))?;
        let mut file = std::fs::File::from(fd);
        let io = |source| SecureDirError::Io {
            what: "writing",
            path: path.clone(),
            source,
        };
        let written = file
            .write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(io)
            .and_then(|()| {
                rustix::fs::renameat(&self.fd, &tmp, &self.fd, name)
                    .map_err(io_error("renaming", &self.display(name)))
            });
        if written.is_err() {
            // A full disk (ENOSPC) must not leave a half-written temporary.
            let _ = self.remove(&tmp);
        }
        written
    }

    /// Opens (creating 0600) the file `name` for locking.
    pub fn lock_file(&self, name: &str) -> Result<std::fs::File, SecureDirError> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            FILE_MODE,
        )
        .map_err(|e| refine(e, &self.display(name)))?;
        Ok(std::fs::File::from(fd))
    }

    /// Opens the file `name` for locking if it exists (`None`: it does
    /// not): for readers, which must create nothing in a directory another
    /// command may be removing.
    pub fn existing_lock_file(&self, name: &str) -> Result<Option<std::fs::File>, SecureDirError> {
        match rustix::fs::openat(
            &self.fd,
            name,
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(std::fs::File::from(fd))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(refine(e, &self.display(name))),
        }
    }

    /// The directory's own file descriptor.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// A clearer error for what `open(O_NOFOLLOW | O_DIRECTORY)` refuses: on a
/// symlink it says ELOOP or, with O_DIRECTORY, ENOTDIR; lstat tells which.
fn refine(errno: rustix::io::Errno, path: &Path) -> SecureDirError {
    match errno {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => match path.symlink_metadata() {
            Ok(meta) if meta.file_type().is_symlink() => {
                SecureDirError::Symlink(path.to_path_buf())
            }
            _ => SecureDirError::NotADirectory(path.to_path_buf()),
        },
        e => io_error("opening", path)(e),
    }
}
