//! Reading a rule file without trusting it. The path comes from a command
//! line or a unit file and may name anything: `/dev/zero` (endless), a FIFO
//! (blocks until a writer comes), a huge or growing file. So: open without
//! blocking, look at what was opened, and read a bounded number of bytes.

use std::{
    fs::{Metadata, OpenOptions},
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

/// Why a rule file's bytes could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A device or a FIFO: reading would never end, or never start.
    #[error("{} is not a regular file ({kind})", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "{} is {size} bytes; the limit is {limit} (--max-file-size)",
        path.display()
    )]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
}

/// The bytes of the regular file at `path`, at most `limit` of them.
pub(crate) fn read(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let io = |error| FileError::Read {
        path: path.to_path_buf(),
        error,
    };
    let file = OpenOptions::new()
        .read(true)
        // open(2): O_NONBLOCK makes opening a FIFO return at once instead of
        // waiting for a writer, and "has no effect for regular files";
        // O_NOCTTY keeps a terminal from becoming our controlling one.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        // A socket cannot be opened at all (ENXIO): say what it is.
        .map_err(|error| not_regular(path, std::fs::metadata(path).ok()).unwrap_or(io(error)))?;
    // fstat of what was opened, not a second lookup of the path, which
    // may have been swapped in between.
    let metadata = file.metadata().map_err(io)?;
    let too_large = |size: u64| FileError::TooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    if let Some(error) = not_regular(path, Some(metadata.clone())) {
        return Err(error);
    }
    if metadata.len() > limit {
        return Err(too_large(metadata.len()));
    }
    // One byte past the limit is read: a file that grows while it is read
    // is caught too, and memory stays bounded whatever it does.
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or(0));
    (&file)
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let read = bytes.len() as u64;
    if read > limit {
        let now = file.metadata().map_or(read, |m| m.len());
        return Err(too_large(now.max(read)));
    }
    Ok(bytes)
}

/// The refusal of anything but a regular file (`None` for a regular file,
/// or when nothing is known about it).
fn not_regular(path: &Path, metadata: Option<Metadata>) -> Option<FileError> {
    let kind = metadata?.file_type();
    let kind = if kind.is_file() {
        return None;
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "not a file"
    };
    Some(FileError::NotRegular {
        path: path.to_path_buf(),
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_refused_without_reading_it() {
        // /dev/zero never ends: reading it once ran `check` out of memory.
        let error = read(Path::new("/dev/zero"), 1 << 30).unwrap_err();
        assert_eq!(
            error.to_string(),
            "/dev/zero is not a regular file (a character device)"
        );
        let error = read(Path::new("/"), 1 << 30).unwrap_err();
        assert_eq!(error.to_string(), "/ is not a regular file (a directory)");
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        // Opening a FIFO for reading without O_NONBLOCK waits for a writer:
        // `check` on one hung forever.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.unwrap().success());
        assert_eq!(
            read(&path, 1 << 20).unwrap_err().to_string(),
            format!("{} is not a regular file (a FIFO)", path.display())
        );
    }

    #[test]
    fn a_file_over_the_limit_is_refused_with_both_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("large.ini");
        std::fs::write(&path, vec![b'#'; 1001]).unwrap();
        assert_eq!(
            read(&path, 1000).unwrap_err().to_string(),
            format!(
                "{} is 1001 bytes; the limit is 1000 (--max-file-size)",
                path.display()
            )
        );
        assert_eq!(read(&path, 1001).unwrap().len(), 1001);
    }
}
