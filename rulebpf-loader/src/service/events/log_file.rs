//! `run --events-log PATH`: decision records, one JSON object per line, in
//! a file rotated by size (PATH, PATH.1 ... PATH.KEEP), or on stderr (where
//! systemd's journal takes a service's output).

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

/// Where the records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventsLog {
    Stderr,
    File {
        path: PathBuf,
        /// Rotate before a line would take the file past this size.
        max_bytes: u64,
        /// Rotated files kept (PATH.1 is the newest).
        keep: u32,
    },
}

impl EventsLog {
    /// `stderr`, or a file path.
    pub fn parse(arg: &str, max_bytes: u64, keep: u32) -> Self {
        if arg == "stderr" || arg == "-" {
            Self::Stderr
        } else {
            Self::File {
                path: arg.into(),
                max_bytes,
                keep,
            }
        }
    }
}

/// Writes lines to an [`EventsLog`].
pub struct LogWriter {
    log: EventsLog,
    /// Written out at each [`Self::flush`] (the end of a batch of events)
    /// and before a rotation.
    file: Option<BufWriter<File>>,
    size: u64,
}

impl LogWriter {
    pub fn open(log: EventsLog) -> io::Result<Self> {
        let mut writer = Self {
            log,
            file: None,
            size: 0,
        };
        if let EventsLog::File { path, .. } = &writer.log {
            let file = open(path)?;
            writer.size = file.metadata()?.len();
            writer.file = Some(BufWriter::with_capacity(64 * 1024, file));
        }
        Ok(writer)
    }

    /// Writes one line (with its newline).
    pub fn write_line(&mut self, line: &str) -> io::Result<()> {
        let EventsLog::File {
            path,
            max_bytes,
            keep,
        } = &self.log
        else {
            return writeln!(io::stderr().lock(), "{line}");
        };
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > *max_bytes {
            if let Some(file) = &mut self.file {
                file.flush()?;
            }
            rotate(path, *keep)?;
            self.file = Some(BufWriter::with_capacity(64 * 1024, open(path)?));
            self.size = 0;
        }
        let file = self.file.as_mut().expect("a file log has its file");
        file.write_all(line.as_bytes())?;
        file.write_all(b"\n")?;
        self.size += len;
        Ok(())
    }

    /// Writes out what is buffered.
    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

/// Appends, creating 0640; never through a link (the path is root's
/// choice, but the directory may not be).
fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// PATH.(k-1) -> PATH.k for k = keep down to 2, then PATH -> PATH.1; the
/// oldest falls off.
fn rotate(path: &Path, keep: u32) -> io::Result<()> {
    let numbered = |n: u32| {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    };
    if keep == 0 {
        return std::fs::remove_file(path);
    }
    for n in (1..keep).rev() {
        match std::fs::rename(numbered(n), numbered(n + 1)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::rename(path, numbered(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.log");
        let mut log = LogWriter::open(EventsLog::File {
            path: path.clone(),
            max_bytes: 20,
            keep: 2,
        })
        .unwrap();
        for i in 0..10 {
            log.write_line(&format!("line {i:04}")).unwrap(); // 10 bytes each
        }
        log.flush().unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&path), "line 0008\nline 0009\n");
        assert_eq!(
            read(&dir.path().join("events.log.1")),
            "line 0006\nline 0007\n"
        );
        assert_eq!(
            read(&dir.path().join("events.log.2")),
            "line 0004\nline 0005\n"
        );
        assert!(!dir.path().join("events.log.3").exists());
    }
}
