//! A local user against root's rulebpf: planted directories and links in
//! the 1777 bpffs, a hostile umask, paths that leave cgroup v2. Each test
//! runs rulebpf with its own pin and record directories
//! (`RULEBPF_PIN_DIR`, `RULEBPF_RUN_DIR`), as an attacker's target would be,
//! so the real ones of the other tests are not touched. Origin ranges
//! 21900-21999 belong to this file.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _, chown, symlink},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::harness::*;

/// Pin and record directories for one test, removed on drop.
struct Dirs {
    pins: PathBuf,
    runs: PathBuf,
}

impl Dirs {
    fn new(tag: &str) -> Self {
        require_kernel();
        let id = format!("rulebpf-t{}-{tag}", std::process::id());
        Self {
            pins: Path::new("/sys/fs/bpf").join(&id),
            runs: Path::new("/run").join(&id),
        }
    }

    /// rulebpf with these directories (and `sh -c` around it for a umask).
    fn run(&self, args: &[&str], umask: Option<&str>) -> Output {
        let mut command = match umask {
            Some(mask) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("umask {mask}; exec \"$0\" \"$@\""))
                    .arg(RULEBPF);
                c
            }
            None => Command::new(RULEBPF),
        };
        command
            .args(args)
            .env("RULEBPF_PIN_DIR", &self.pins)
            .env("RULEBPF_RUN_DIR", &self.runs)
            .output()
            .unwrap()
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.pins);
        remove_tree(&self.pins);
        let _ = fs::remove_dir_all(&self.runs);
    }
}

/// bpffs has no recursive unlink; links are removed, never followed.
fn remove_tree(dir: &Path) {
    if dir.is_symlink() {
        let _ = fs::remove_file(dir);
        return;
    }
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path());
        } else {
            let _ = fs::remove_file(entry.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

/// A root-only directory with three files: what the attacker wants gone.
fn victim(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rulebpf-victim-{}-{tag}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    for name in ["a", "b", "c"] {
        fs::write(dir.join(name), "root's").unwrap();
    }
    dir
}

fn files_in(dir: &Path) -> usize {
    fs::read_dir(dir).unwrap().count()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_pin_directory_that_is_a_users_symlink_is_refused_and_nothing_followed() {
    let dirs = Dirs::new("symlink");
    let target = victim("symlink");
    symlink(&target, &dirs.pins).unwrap();
    let cg = TestCgroup::new("h-symlink");
    let rules = cg.rules_file("r.ini", "127.0.0.2 9 : 21901\n");
    let out = dirs.run(
        &["attach", "--cgroup", cg.arg(), rules.to_str().unwrap()],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("is a symbolic link"),
        "{}",
        stderr(&out)
    );
    let out = dirs.run(&["detach", "--cgroup", cg.arg()], None);
    assert!(!out.status.success() || stderr(&out).is_empty(), "{out:?}");
    assert_eq!(files_in(&target), 3, "root's files are intact");
    fs::remove_dir_all(target).unwrap();
}

#[test]
fn a_pin_directory_owned_by_a_user_or_writable_by_others_is_refused() {
    let dirs = Dirs::new("owner");
    let cg = TestCgroup::new("h-owner");
    let rules = cg.rules_file("r.ini", "127.0.0.2 9 : 21911\n");
    let attach = || {
        dirs.run(
            &["attach", "--cgroup", cg.arg(), rules.to_str().unwrap()],
            None,
        )
    };
    fs::create_dir(&dirs.pins).unwrap();
    chown(&dirs.pins, Some(65534), Some(65534)).unwrap();
    let out = attach();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("owned by uid 65534"),
        "{}",
        stderr(&out)
    );
    chown(&dirs.pins, Some(0), Some(0)).unwrap();
    fs::set_permissions(&dirs.pins, fs::Permissions::from_mode(0o777)).unwrap();
    let out = attach();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("writable by group or others"),
        "{}",
        stderr(&out)
    );
}

/// Cleanup walks pin directories without following links: a link planted
/// where a rule set's directory would be is removed, its target untouched.
#[test]
fn cleanup_never_follows_a_planted_link() {
    let dirs = Dirs::new("planted");
    let cg = TestCgroup::new("h-planted");
    let target = victim("planted");
    let rules = cg.rules_file("r.ini", "127.0.0.2 9 : 21921\n");
    let out = dirs.run(
        &[
            "attach",
            "--name",
            "x",
            "--cgroup",
            cg.arg(),
            rules.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    symlink(&target, dirs.pins.join("x/set-7")).unwrap();
    // A swap drops rule sets that are not in force, set-7 among them.
    let out = dirs.run(&["attach", "--name", "x", rules.to_str().unwrap()], None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(files_in(&target), 3, "the swap followed the planted link");
    symlink(&target, dirs.pins.join("x/set-8")).unwrap();
    let out = dirs.run(&["detach", "--name", "x"], None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(files_in(&target), 3, "detach followed the planted link");
    assert!(!dirs.pins.join("x").exists());
    fs::remove_dir_all(target).unwrap();
}

/// Under umask 000, with a link planted where the record's temporary goes:
/// the file it points to is not written, and what rulebpf writes is 0600 in
/// 0700 directories.
#[test]
fn records_have_explicit_modes_and_never_write_through_a_link() {
    let dirs = Dirs::new("umask");
    let cg = TestCgroup::new("h-umask");
    let rules = cg.rules_file("r.ini", "127.0.0.2 9 : 21931\n");
    let secret = std::env::temp_dir().join(format!("rulebpf-secret-{}", std::process::id()));
    fs::write(&secret, "root's secret").unwrap();
    let args = [
        "attach",
        "--name",
        "y",
        "--cgroup",
        cg.arg(),
        rules.to_str().unwrap(),
    ];
    assert!(dirs.run(&args, Some("000")).status.success());
    symlink(&secret, dirs.runs.join("y/instance.json.tmp")).unwrap();
    let out = dirs.run(&args, Some("000"));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::read_to_string(&secret).unwrap(), "root's secret");
    for (path, mode) in [
        (dirs.pins.clone(), 0o700),
        (dirs.pins.join("y"), 0o700),
        (dirs.runs.join("y"), 0o700),
        (dirs.runs.join("y/instance.json"), 0o600),
    ] {
        let meta = fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, mode, "{}", path.display());
        assert_eq!(meta.uid(), 0, "{}", path.display());
    }
    let _ = dirs.run(&["detach", "--name", "y"], None);
    fs::remove_file(secret).unwrap();
}

/// `--cgroup` must reach a cgroup v2 directory for real: `..` and links
/// that lead out of the cgroup2 mount are refused (a v1 directory's inode
/// can equal a v2 cgroup's id).
#[test]
fn cgroup_paths_must_stay_in_cgroup_v2() {
    let cg = TestCgroup::new("h-paths");
    let rules = cg.rules_file("r.ini", "127.0.0.2 9 : 21941\n");
    let dotdot = format!("{}/../../cpu/x", cg.arg());
    let out = rulebpf(&["attach", "--cgroup", &dotdot, rules.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).contains("`..` is not allowed"),
        "{}",
        stderr(&out)
    );
    // A link into a directory that is not cgroup v2.
    let outside = std::env::temp_dir().join(format!("rulebpf-notcg-{}", std::process::id()));
    fs::create_dir_all(outside.join("x")).unwrap();
    fs::write(outside.join("x/cgroup.procs"), "").unwrap();
    let link = std::env::temp_dir().join(format!("rulebpf-cglink-{}", std::process::id()));
    let _ = fs::remove_file(&link);
    symlink(outside.join("x"), &link).unwrap();
    let out = rulebpf(&[
        "attach",
        "--cgroup",
        link.to_str().unwrap(),
        rules.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        stderr(&out).contains("not a cgroup v2 directory"),
        "{}",
        stderr(&out)
    );
    fs::remove_file(link).unwrap();
    fs::remove_dir_all(outside).unwrap();
}

#[test]
fn an_unprivileged_attach_says_what_privilege_it_needs() {
    let cg = TestCgroup::new("h-unpriv");
    let rules = cg.rules_file("r.ini", "127.0.0.2 9 : 21951\n");
    fs::set_permissions(rules.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&rules, fs::Permissions::from_mode(0o644)).unwrap();
    // As nobody: setuid from root to another user drops every capability.
    let out = Command::new(RULEBPF)
        .args(["attach", "--name", "unpriv", rules.to_str().unwrap()])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("this needs root (CAP_BPF"),
        "{}",
        stderr(&out)
    );
}
