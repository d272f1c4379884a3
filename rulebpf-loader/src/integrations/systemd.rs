//! The systemd drop-in that puts a service under a rules instance.
//!
//! An instance NAME pins two entry programs that never change while it lives,
//! `/sys/fs/bpf/rulebpf/NAME/connect4` and `.../connect6`. [`write_dropin`]
//! writes `/etc/systemd/system/<unit>.d/50-rulebpf-<NAME>.conf`, which makes
//! systemd attach them to the service's cgroup at every start, before the
//! service's own command runs; a restart gives the service a new cgroup, so
//! this has to happen each time:
//!
//! ```text
//! [Unit]
//! Wants=rulebpf@NAME.service
//! After=rulebpf@NAME.service
//!
//! [Service]
//! BPFProgram=connect4:/sys/fs/bpf/rulebpf/NAME/connect4
//! BPFProgram=connect6:/sys/fs/bpf/rulebpf/NAME/connect6
//! ExecStartPre=+/usr/bin/rulebpf systemd-attach --name NAME
//! ```
//!
//! Why both `BPFProgram=` and `ExecStartPre=` (seen on Debian 12's systemd
//! 252 by `cargo xtask systemd-test`):
//!
//! * `BPFProgram=` ([systemd.resource-control(5)], v249+) attaches when
//!   systemd creates the unit's cgroup ([`cgroup_apply_bpf_foreign_program`]
//!   → [`bpf_foreign_install`]), but systemd 252 does it only at the unit's
//!   first start: it keeps the loaded program in the unit for the unit's
//!   lifetime, and [`bpf_program_cgroup_attach`] skips an attach to the same
//!   cgroup path it "already" did, although the restart made a new cgroup
//!   there. The first start got the rule's port, every restart after it an
//!   OS port. It also starts the unit when a pin is missing (it logs
//!   "foreign program ... does not exist, skipping"). Newer systemd keeps
//!   the programs per cgroup and attaches at every start.
//! * `ExecStartPre=+rulebpf systemd-attach` runs in the unit's new cgroup at
//!   every start, before `ExecStart=`: it attaches the entry programs there
//!   unless they already are, and fails (so the unit does not start) when it
//!   cannot. `+`: as root and outside the unit's sandbox, whatever `User=` or
//!   `ProtectSystem=` the service has.
//! * `Wants=` + `After=`: starting the service starts the instance first and
//!   waits until it is ready (Type=notify: pinned, rules in force). Not
//!   `Requires=`: on systemd 252 that also restarts the service whenever the
//!   instance restarts, even automatically after a crash, and the rules stay
//!   in force while rulebpf is down; the `ExecStartPre=` check is what keeps
//!   the service from running without them.
//!
//! Only `.service` units: the others that accept `BPFProgram=` have no
//! `ExecStartPre=` (slices, scopes) or do not connect (sockets are made by
//! systemd itself, mounts, swaps). A scope's processes even run before the
//! scope exists; containers get the rules from the OCI hook, any other
//! cgroup from `rulebpf run --cgroup`.
//!
//! [systemd.resource-control(5)]: https://www.freedesktop.org/software/systemd/man/252/systemd.resource-control.html#BPFProgram=type:program-path
//! [`cgroup_apply_bpf_foreign_program`]: https://github.com/systemd/systemd/blob/v252/src/core/cgroup.c
//! [`bpf_foreign_install`]: https://github.com/systemd/systemd/blob/v252/src/core/bpf-foreign.c
//! [`bpf_program_cgroup_attach`]: https://github.com/systemd/systemd/blob/v252/src/shared/bpf-program.c

use std::{
    fmt,
    fs::{self, DirBuilder, OpenOptions},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use crate::model::{layout, name::InstanceName, program::Hook};

/// Where the drop-ins of system units go by default.
pub const SYSTEM_UNIT_DIR: &str = "/etc/systemd/system";

/// The binary the drop-in runs: the Debian package's (`cargo xtask deb`).
pub const RULEBPF: &str = "/usr/bin/rulebpf";

/// The subcommand `ExecStartPre=` runs in the unit's cgroup (see the module
/// doc): `rulebpf systemd-attach --name NAME`.
pub const ATTACH_SUBCOMMAND: &str = "systemd-attach";

/// systemd's limit on a unit name (`UNIT_NAME_MAX`, 256 with the NUL).
const UNIT_NAME_MAX: usize = 255;

/// A service a drop-in can be written for: `gateway.service`, or a template
/// `sftp@.service` (the drop-in then covers every instance of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceName(String);

/// Why a unit name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    #[error("a unit name must not be empty")]
    Empty,
    #[error("unit name `{0}` is longer than {UNIT_NAME_MAX} characters")]
    TooLong(String),
    #[error(
        "unit name `{name}`: `{ch}` is not allowed (letters, digits, `:_.@-` and `\\` escapes)"
    )]
    BadChar { name: String, ch: char },
    #[error("`{0}` is not a unit name: expected NAME.service")]
    NotAUnit(String),
    #[error("{name}: {why}")]
    Unsupported { name: String, why: &'static str },
    #[error("{0}: a rules instance cannot wait for itself")]
    Instance(String),
}

impl ServiceName {
    /// Checks a unit name as systemd would (unit-name.c), then that it is a
    /// service other than `rulebpf@*.service` itself.
    pub fn new(name: &str) -> Result<Self, UnitError> {
        if name.is_empty() {
            return Err(UnitError::Empty);
        }
        if name.len() > UNIT_NAME_MAX {
            return Err(UnitError::TooLong(name.into()));
        }
        // No `/` in the alphabet: the drop-in directory is always a direct
        // child of the unit directory.
        if let Some(ch) = name.chars().find(|&c| !is_unit_name_char(c)) {
            return Err(UnitError::BadChar {
                name: name.into(),
                ch,
            });
        }
        let Some((prefix, suffix)) = name.rsplit_once('.') else {
            return Err(UnitError::NotAUnit(name.into()));
        };
        if prefix.is_empty() || prefix.starts_with('@') {
            return Err(UnitError::NotAUnit(name.into()));
        }
        if suffix != "service" {
            return Err(unsupported(name, suffix));
        }
        if prefix.starts_with("rulebpf@") {
            return Err(UnitError::Instance(name.into()));
        }
        Ok(Self(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// systemd's alphabet for unit names and their instance parts (unit-name.c,
/// `VALID_CHARS_WITH_AT`): letters, digits, `:_.@-` and `\` of its `\xNN`
/// escapes.
pub fn is_unit_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || ":_.@-\\".contains(c)
}

/// The refusal for a unit that is not a service, with what to do instead.
fn unsupported(name: &str, suffix: &str) -> UnitError {
    let why = match suffix {
        "scope" => {
            "a scope's processes run before systemd creates it, so they could connect \
             before the rules are attached; a container gets them from the OCI hook, \
             any other cgroup from `rulebpf run --cgroup`"
        }
        "slice" => {
            "a slice runs no command at start that could check the rules are attached; \
             write a drop-in for each service in it"
        }
        "socket" => {
            "systemd itself makes a socket unit's sockets; write the drop-in for the \
             service the socket activates"
        }
        "mount" | "swap" | "target" | "timer" | "path" | "device" | "automount" => {
            "only services are covered; write the drop-in for the service that connects"
        }
        _ => return UnitError::NotAUnit(name.into()),
    };
    UnitError::Unsupported {
        name: name.into(),
        why,
    }
}

/// Why the drop-in could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DropinError {
    #[error("creating {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("renaming {} to {}", from.display(), to.display())]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The drop-in's file name: `50-` sorts it among the usual drop-ins; the
/// instance name lets one service be given to several instances.
pub fn dropin_file_name(name: &InstanceName) -> String {
    format!("50-rulebpf-{name}.conf")
}

/// The drop-in text that puts `service` under instance `name`.
///
/// Instance names may hold `\` (systemd's `\xNN` escapes). systemd keeps it
/// as is in unit names (`Wants=`) and in `BPFProgram=`'s path, but C-unescapes
/// the words of an `ExecStartPre=` line, so there it is doubled. `%`, which
/// systemd would expand everywhere, is not in names.
pub fn dropin(name: &InstanceName, service: &ServiceName) -> String {
    let instance = format!("rulebpf@{name}.service");
    let connect4 = layout::entry_pin_path(name.as_str(), Hook::Connect4);
    let connect6 = layout::entry_pin_path(name.as_str(), Hook::Connect6);
    let exec_name = name.as_str().replace('\\', "\\\\");
    format!(
        "\
# Written by `rulebpf systemd-dropin --name {name} {service}`: {service}
# connects with the origin ports of rulebpf instance {name}
# (rules: /etc/rulebpf/{name}.ini). To undo: remove this file, then
# `systemctl daemon-reload`.
#
# Starting {service} starts {instance} first and waits until it is
# ready (its programs pinned, the rules in force). Wants=, not Requires=: the
# rules stay in force while rulebpf restarts or is stopped, so {service}
# need not restart with it.
[Unit]
Wants={instance}
After={instance}

# At every start, before {service} runs, its new cgroup gets the two
# programs. systemd attaches them (BPFProgram=, systemd.resource-control(5)),
# but systemd 252 (Debian 12) only at the unit's first start, and it starts
# the unit even when a program is missing. So rulebpf attaches them too, in
# the new cgroup, unless they already are; when it cannot, {service} does
# not start. `+`: as root and outside {service}'s sandbox.
[Service]
BPFProgram=connect4:{connect4}
BPFProgram=connect6:{connect6}
ExecStartPre=+{RULEBPF} {ATTACH_SUBCOMMAND} --name {exec_name}
"
    )
}

/// Writes [`dropin`] to `<dir>/<service>.d/50-rulebpf-<name>.conf` (0644;
/// the directories 0755) and returns that path. The file appears whole or not
/// at all: it is written to a temporary file in the same directory, flushed
/// to disk, then renamed over the old one, so a `daemon-reload` never reads
/// half a drop-in. Writing it again replaces it.
pub fn write_dropin(
    dir: &Path,
    name: &InstanceName,
    service: &ServiceName,
) -> Result<PathBuf, DropinError> {
    let unit_dir = dir.join(format!("{service}.d"));
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&unit_dir)
        .map_err(|source| DropinError::CreateDir {
            path: unit_dir.clone(),
            source,
        })?;
    let path = unit_dir.join(dropin_file_name(name));
    // A dot file: systemd reads only `*.conf` from a drop-in directory.
    let temp = unit_dir.join(format!(
        ".{}.{}.tmp",
        dropin_file_name(name),
        std::process::id()
    ));
    let write = |temp: &Path| -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(temp)?;
        file.write_all(dropin(name, service).as_bytes())?;
        // open()'s mode is reduced by the umask; 0644 is what it should be.
        file.set_permissions(fs::Permissions::from_mode(0o644))?;
        file.sync_all()
    };
    if let Err(source) = write(&temp) {
        let _ = fs::remove_file(&temp);
        return Err(DropinError::Write { path: temp, source });
    }
    if let Err(source) = fs::rename(&temp, &path) {
        let _ = fs::remove_file(&temp);
        return Err(DropinError::Rename {
            from: temp,
            to: path,
            source,
        });
    }
    // The rename reaches the disk with the directory. A failure here still
    // leaves a complete file in place, so it is not an error.
    if let Ok(dir) = fs::File::open(&unit_dir) {
        let _ = dir.sync_all();
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn name(text: &str) -> InstanceName {
        InstanceName::new(text).unwrap()
    }

    fn service(text: &str) -> ServiceName {
        ServiceName::new(text).unwrap()
    }

    /// The settings of a drop-in: (section, line) for every line that is
    /// neither blank nor a comment, as systemd reads them.
    fn settings(text: &str) -> Vec<(String, String)> {
        let mut section = String::new();
        let mut out = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_string();
            } else {
                out.push((section.clone(), line.to_string()));
            }
        }
        out
    }

    #[test]
    fn a_service_gets_the_instance_and_both_entry_programs() {
        let text = dropin(&name("gw"), &service("gateway.service"));
        let expected = [
            ("Unit", "Wants=rulebpf@gw.service"),
            ("Unit", "After=rulebpf@gw.service"),
            (
                "Service",
                "BPFProgram=connect4:/sys/fs/bpf/rulebpf/gw/connect4",
            ),
            (
                "Service",
                "BPFProgram=connect6:/sys/fs/bpf/rulebpf/gw/connect6",
            ),
            (
                "Service",
                "ExecStartPre=+/usr/bin/rulebpf systemd-attach --name gw",
            ),
        ]
        .map(|(s, l)| (s.to_string(), l.to_string()));
        assert_eq!(settings(&text), expected);
        assert!(text.contains("`rulebpf systemd-dropin --name gw gateway.service`"));
        assert!(text.contains("/etc/rulebpf/gw.ini"));
    }

    #[test]
    fn escaped_names_are_written_as_systemd_reads_them() {
        let text = dropin(&name("a\\x2db-c"), &service("sftp@.service"));
        assert!(text.contains("\nWants=rulebpf@a\\x2db-c.service\n"));
        assert!(text.contains("connect4:/sys/fs/bpf/rulebpf/a\\x2db-c/connect4\n"));
        // C-unescaped by systemd: `\\` reaches rulebpf as `\`.
        assert!(text.contains(" systemd-attach --name a\\\\x2db-c\n"));
    }

    #[test]
    fn unit_names_are_checked_like_systemd_does() {
        assert_eq!(ServiceName::new(""), Err(UnitError::Empty));
        assert!(matches!(
            ServiceName::new(&format!("{}.service", "a".repeat(250))),
            Err(UnitError::TooLong(_))
        ));
        assert!(matches!(
            ServiceName::new("../x.service"),
            Err(UnitError::BadChar { ch: '/', .. })
        ));
        assert!(matches!(
            ServiceName::new("a b.service"),
            Err(UnitError::BadChar { ch: ' ', .. })
        ));
        for not_a_unit in ["gateway", ".service", "@x.service", "gateway.exe"] {
            assert_eq!(
                ServiceName::new(not_a_unit),
                Err(UnitError::NotAUnit(not_a_unit.into())),
                "{not_a_unit}"
            );
        }
        for ok in ["gateway.service", "sftp@.service", "sftp@partner-1.service"] {
            assert_eq!(service(ok).as_str(), ok);
        }
    }

    #[test]
    fn units_that_cannot_be_covered_are_refused_with_the_reason() {
        for refused in [
            "docker-1.scope",
            "machine.slice",
            "ftp.socket",
            "home.mount",
            "a.timer",
        ] {
            assert!(
                matches!(
                    ServiceName::new(refused),
                    Err(UnitError::Unsupported { .. })
                ),
                "{refused}"
            );
        }
        assert_eq!(
            ServiceName::new("rulebpf@gw.service"),
            Err(UnitError::Instance("rulebpf@gw.service".into()))
        );
    }

    #[test]
    fn the_dropin_is_written_whole_with_its_modes_and_replaced_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc/systemd/system");
        let path = write_dropin(&etc, &name("gw"), &service("gateway.service")).unwrap();
        assert_eq!(path, etc.join("gateway.service.d/50-rulebpf-gw.conf"));
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            dropin(&name("gw"), &service("gateway.service"))
        );
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o644);
        assert_eq!(
            fs::metadata(path.parent().unwrap()).unwrap().mode() & 0o7777,
            0o755
        );

        // Again, and for a second instance: one file each, no temporary left.
        write_dropin(&etc, &name("gw"), &service("gateway.service")).unwrap();
        write_dropin(&etc, &name("backup"), &service("gateway.service")).unwrap();
        let mut files: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, ["50-rulebpf-backup.conf", "50-rulebpf-gw.conf"]);
    }

    #[test]
    fn a_write_that_fails_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the service's drop-in directory should be.
        fs::write(dir.path().join("gateway.service.d"), "").unwrap();
        let err = write_dropin(dir.path(), &name("gw"), &service("gateway.service")).unwrap_err();
        assert!(matches!(err, DropinError::CreateDir { .. }), "{err:?}");
        assert!(err.to_string().contains("gateway.service.d"));
    }
}
