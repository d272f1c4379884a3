//! The guest's whole file system: an initramfs with busybox, the `rulebpf`
//! binary and the kernel test binary at the paths they were built for, the
//! glibc libraries they link (found with ldd), and an `/init` that prepares
//! what the suite needs (cgroup2, bpffs, `lo`) and runs it.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

/// Printed by `/init` before and after the suite; the host reads them.
pub const KERNEL_MARK: &str = "RULEBPF-VM-KERNEL";
pub const EXIT_MARK: &str = "RULEBPF-VM-EXIT";
/// Kernel command line flag: boot, print the marks, power off (no tests).
pub const BOOT_ONLY: &str = "rulebpf.boot_only";

/// What goes into the guest.
pub struct Contents<'a> {
    /// Binaries, each copied to the same absolute path (the test binary
    /// finds `rulebpf` at the path cargo baked into it).
    pub binaries: &'a [PathBuf],
    /// Run first, for the log (e.g. `rulebpf kernel`).
    pub before: Vec<String>,
    /// The test binary and its arguments.
    pub test_command: Vec<String>,
    /// The guest stops the suite after this long.
    pub guest_timeout: Duration,
}

/// Builds the initramfs (gzip'd newc cpio) at `out`, using `work` as scratch.
pub fn build(contents: &Contents<'_>, work: &Path, out: &Path) -> anyhow::Result<()> {
    let root = work.join("root");
    let _ = fs::remove_dir_all(&root);
    for dir in ["bin", "dev", "etc", "proc", "run", "sys", "tmp"] {
        fs::create_dir_all(root.join(dir))?;
    }
    let busybox =
        crate::which("busybox").context("busybox not found (apt-get install busybox-static)")?;
    copy_into(&root, &busybox, Path::new("/bin/busybox"))?;
    for binary in contents.binaries {
        copy_into(&root, binary, binary)?;
        for lib in shared_libraries(binary)? {
            copy_into(&root, &lib, &lib)?;
        }
    }
    fs::write(
        root.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost ip6-localhost\n",
    )?;
    fs::write(root.join("etc/nsswitch.conf"), "hosts: files dns\n")?;
    // As on Debian: every /etc/hosts line of a name counts (A and AAAA).
    fs::write(root.join("etc/host.conf"), "multi on\n")?;
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    let init = root.join("init");
    fs::write(&init, init_script(contents))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 > '{}'",
            root.display(),
            out.display()
        ))
        .status()
        .context("running cpio")?;
    if !status.success() {
        bail!("building the initramfs with cpio failed");
    }
    Ok(())
}

/// `/init`: PID 1 of the guest, a busybox shell script.
fn init_script(contents: &Contents<'_>) -> String {
    let quote = |args: &[String]| {
        args.iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let before = quote(&contents.before);
    let command = quote(&contents.test_command);
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/ RUST_BACKTRACE=1
# Tells the suite it runs in an emulated guest (harness::in_vm_guest).
export RULEBPF_VM_GUEST=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# /tmp and /run stay on the (writable) initramfs: the binaries may live under
# /tmp at the paths cargo built them for, and a tmpfs there would hide them.
# What the suite expects of a host: cgroup2, bpffs, loopback up.
mkdir -p /sys/fs/cgroup
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
echo "{KERNEL_MARK} $(uname -r)"
if grep -q {BOOT_ONLY} /proc/cmdline; then
    echo "{EXIT_MARK} 0"
    poweroff -f
fi
cd /tmp
{before} 2>&1
timeout {timeout} {command} 2>&1
echo "{EXIT_MARK} $?"
poweroff -f
"#,
        timeout = contents.guest_timeout.as_secs(),
    )
}

/// Copies `from` to `at` (an absolute path) under `root`, following symlinks.
fn copy_into(root: &Path, from: &Path, at: &Path) -> anyhow::Result<()> {
    let dest = root.join(at.strip_prefix("/").unwrap_or(at));
    if dest.exists() {
        return Ok(());
    }
    fs::create_dir_all(dest.parent().expect("an absolute path has a parent"))?;
    fs::copy(from, &dest).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

/// The shared libraries `binary` loads (and the dynamic loader), per ldd.
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}
