//! Every path and pin name rulebpf uses, in one place:
//!
//! ```text
//! /sys/fs/bpf/rulebpf/NAME/connect4, connect6     entry programs (systemd's BPFProgram=)
//! /sys/fs/bpf/rulebpf/NAME/jump-connect4, -6      slot 0: the rule set in force
//! /sys/fs/bpf/rulebpf/NAME/bind4, bind6,          bookkeeping programs
//!                          sock_release, sock_ops
//! /sys/fs/bpf/rulebpf/NAME/RULEBPF_*              instance maps (by their map names)
//! /sys/fs/bpf/rulebpf/NAME/set-N/prog-connect4,-6 rule set N: programs + maps
//! /sys/fs/bpf/rulebpf/NAME/cg-ID/link-KIND        an attachment to cgroup ID: a
//!                                                 pinned link per program kind
//! /run/rulebpf/NAME/instance.json, set-N.json     records (crate::model::records)
//! /run/rulebpf/NAME/lock                          orders the commands that change it
//! /run/rulebpf/NAME/owner                         held by `rulebpf run`
//! /run/rulebpf/.lock.NAME                         orders the commands that change NAME
//! /run/rulebpf/.kernel                            the probed sharing answer, per boot
//! /sys/fs/bpf/rulebpf/cg-ID/                      the previous layout (one per cgroup)
//! ```
//!
//! Names are plain strings here; the directories are opened (and checked)
//! by `sys::securedir`.

use std::path::PathBuf;

use super::program::{Hook, ProgramKind};

/// bpffs must be mounted here for the pins to outlive the loader.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// Where every instance pins its objects.
pub const PIN_DIR: &str = "/sys/fs/bpf/rulebpf";
/// Where every instance keeps its records.
pub const RUN_DIR: &str = "/run/rulebpf";
/// Environment variables that move the two directories (the tests run a
/// second, independent rulebpf beside the first; the pin directory must
/// still be on bpffs and meets the same checks).
pub const PIN_DIR_ENV: &str = "RULEBPF_PIN_DIR";
pub const RUN_DIR_ENV: &str = "RULEBPF_RUN_DIR";
/// Set (to anything): rule sets load without the decision-event code, as
/// if compiled out (what `cargo xtask bench` compares events against).
pub const NO_EVENTS_ENV: &str = "RULEBPF_NO_EVENTS";

/// The top pin directory, as the environment sets it.
pub fn pin_dir() -> PathBuf {
    dir_from_env(PIN_DIR_ENV, PIN_DIR)
}

/// The top record directory, as the environment sets it.
pub fn run_dir() -> PathBuf {
    dir_from_env(RUN_DIR_ENV, RUN_DIR)
}

fn dir_from_env(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// The instance's own record.
pub const INSTANCE_FILE: &str = "instance.json";
/// The lock file every command that changes an instance holds.
pub const LOCK_FILE: &str = "lock";
/// The lock file `rulebpf run` holds while it manages the instance (with
/// its pid in it).
pub const OWNER_FILE: &str = "owner";
/// In the top record directory: the lock every command that changes
/// instance `name` holds for as long as it runs (a dot file: no instance).
pub fn command_lock(name: &str) -> String {
    format!(".lock.{name}")
}
/// In the top record directory: the lock the reader of instance `name`'s
/// decision events holds (one reader per instance, `rulebpf events`).
pub fn events_lock(name: &str) -> String {
    format!(".events.{name}")
}

/// In the top record directory: the socket where the reader of instance
/// `name`'s events serves every other listener. Named after the instance
/// when the path fits a socket address (108 bytes, reached through
/// `/proc/self/fd/N/`), else after a hash of its name.
pub fn events_socket(name: &str) -> String {
    if name.len() <= 64 {
        return format!("events.{name}.sock");
    }
    // FNV-1a: stable across releases (a listener and a reader of two
    // versions must agree).
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("events.{hash:016x}.sock")
}

/// In the top record directory: what the kernel answered to the sharing
/// probe, with the boot's id (a dot file: no instance).
pub const KERNEL_CACHE: &str = ".kernel";

/// The pods' guard's pins (Kubernetes), in the pin directory: a name no
/// instance can have (`+`), and without a dot, which bpffs refuses in
/// names (`bpf_lookup`: "reserved for future extensions").
/// https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/inode.c
pub const GUARD_DIR: &str = "+guard";

/// The pin directory of rule set `generation`.
pub fn set_dir(generation: u64) -> String {
    format!("set-{generation}")
}

/// The record of rule set `generation`.
pub fn set_file(generation: u64) -> String {
    format!("set-{generation}.json")
}

/// The generation of a rule set's pin directory (`set-N`) or record
/// (`set-N.json`) name.
pub fn set_generation(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("set-")?;
    let digits = digits.strip_suffix(".json").unwrap_or(digits);
    digits_only(digits)
}

/// Whether `name` is a rule set's record (`set-N.json`), not its pins.
pub fn is_set_file(name: &str) -> bool {
    name.ends_with(".json") && set_generation(name).is_some()
}

/// The pin of a rule set's program for `hook`, in the set's directory.
pub fn set_program_pin(hook: Hook) -> String {
    format!("prog-{}", hook.name())
}

/// The pin of an instance's program of `kind` (an entry or a bookkeeping
/// program), in the instance's directory: its short name.
pub fn program_pin(kind: impl Into<ProgramKind>) -> &'static str {
    kind.into().name()
}

/// The pin of `hook`'s jump map, in the instance's directory.
pub fn jump_pin(hook: Hook) -> String {
    format!("jump-{}", hook.name())
}

/// The directory of the attachment to cgroup `cgroup_id`, in the
/// instance's directory.
pub fn attachment_dir(cgroup_id: u64) -> String {
    format!("cg-{cgroup_id}")
}

/// The pin of the link of a program of `kind`, in an attachment directory.
pub fn link_pin(kind: impl Into<ProgramKind>) -> String {
    format!("link-{}", kind.into().name())
}

/// The pinned entry program of instance `name` for `hook`, as systemd's
/// `BPFProgram=` names it (the default pin directory: systemd reads no
/// environment of ours).
pub fn entry_pin_path(name: &str, hook: Hook) -> String {
    format!("{PIN_DIR}/{name}/{}", program_pin(hook))
}

/// The top directory name of the previous layout's instance of cgroup
/// `cgroup_id`.
pub fn legacy_dir(cgroup_id: u64) -> String {
    attachment_dir(cgroup_id)
}

/// The cgroup id of a previous-layout instance directory name (`cg-<id>`).
pub fn legacy_cgroup_id(name: &str) -> Option<u64> {
    digits_only(name.strip_prefix("cg-")?)
}

fn digits_only(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back() {
        assert_eq!(set_generation(&set_dir(7)), Some(7));
        assert_eq!(set_generation(&set_file(12)), Some(12));
        assert!(is_set_file(&set_file(3)) && !is_set_file(&set_dir(3)));
        assert_eq!(set_generation("set-"), None);
        assert_eq!(set_generation("set-1.json.tmp"), None);
        assert_eq!(legacy_cgroup_id(&legacy_dir(1146)), Some(1146));
        assert_eq!(legacy_cgroup_id("cg-"), None);
        assert_eq!(legacy_cgroup_id("cg-12x"), None);
        assert_eq!(link_pin(Hook::Connect6), "link-connect6");
    }
}
