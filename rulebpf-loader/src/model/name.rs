//! Instance names: what `--name` takes, and the name an instance gets from
//! its cgroup when only `--cgroup` is given.
//!
//! A name is a directory under `/sys/fs/bpf/rulebpf/` and `/run/rulebpf/`
//! and the instance of the template unit `rulebpf@NAME.service`, so it uses
//! systemd's instance-name alphabet: letters, digits and `_.:@-`, with
//! everything else escaped as `\xNN` the way `systemd-escape --path` does.
//! A name derived from `system.slice/gateway.service` is therefore
//! `system.slice-gateway.service` (the escaping keeps `a-b/c` and `a/b-c`
//! apart: `a\x2db-c`, `a-b\x2dc`).

use std::{fmt, path::Path};

use serde::{Deserialize, Serialize};

/// A valid instance name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InstanceName(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("an instance name must not be empty")]
    Empty,
    #[error("instance name `{0}` is longer than 200 characters")]
    TooLong(String),
    #[error(
        "instance name `{name}`: `{ch}` is not allowed (letters, digits, `_.:@-` and `\\xNN` escapes)"
    )]
    BadChar { name: String, ch: char },
    #[error("instance name `{0}` must not start with `.`")]
    Dot(String),
    #[error(
        "instance name `{0}` is reserved for instances of the previous layout (cg-<cgroup id>)"
    )]
    Legacy(String),
}

impl InstanceName {
    /// Checks a name given with `--name`.
    pub fn new(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > 200 {
            return Err(NameError::TooLong(name.into()));
        }
        if name.starts_with('.') {
            return Err(NameError::Dot(name.into()));
        }
        if let Some(ch) = name
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || "_.:@-\\".contains(c)))
        {
            return Err(NameError::BadChar {
                name: name.into(),
                ch,
            });
        }
        if super::layout::legacy_cgroup_id(name).is_some() {
            return Err(NameError::Legacy(name.into()));
        }
        Ok(Self(name.into()))
    }

    /// The name of the instance of a cgroup given by its path relative to
    /// the cgroup2 mount, escaped as `systemd-escape --path` does.
    pub fn for_cgroup(relative: &Path) -> Result<Self, NameError> {
        let text = relative.to_string_lossy();
        let trimmed = text.trim_matches('/');
        if trimmed.is_empty() {
            // The root cgroup, as systemd escapes `/`.
            return Self::new("-");
        }
        let mut out = String::new();
        for (i, byte) in trimmed.bytes().enumerate() {
            match byte {
                b'/' => out.push('-'),
                b'.' if i == 0 => out.push_str("\\x2e"),
                b if b.is_ascii_alphanumeric() || b":_.".contains(&b) => out.push(b as char),
                b => out.push_str(&format!("\\x{b:02x}")),
            }
        }
        Self::new(&out)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_systemds_path_escaping() {
        let name = |p: &str| InstanceName::for_cgroup(Path::new(p)).unwrap();
        assert_eq!(
            name("system.slice/gateway.service").as_str(),
            "system.slice-gateway.service"
        );
        assert_eq!(name("/a-b/c/").as_str(), "a\\x2db-c");
        assert_ne!(name("a-b/c"), name("a/b-c"));
        assert_eq!(name(".hidden/x").as_str(), "\\x2ehidden-x");
        assert_eq!(name("with space").as_str(), "with\\x20space");
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        assert_eq!(InstanceName::new(""), Err(NameError::Empty));
        assert!(matches!(
            InstanceName::new("a/b"),
            Err(NameError::BadChar { ch: '/', .. })
        ));
        assert!(matches!(InstanceName::new(".x"), Err(NameError::Dot(_))));
        assert!(matches!(
            InstanceName::new("cg-42"),
            Err(NameError::Legacy(_))
        ));
        assert!(InstanceName::new("gw@dmz_1:a.b-c").is_ok());
    }
}
