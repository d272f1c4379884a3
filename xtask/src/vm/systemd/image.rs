//! The guest's initramfs: the base system, the freshly built package
//! installed into it by apt, the scenario's files, packed as one zstd'd cpio
//! archive whose `/init` is systemd.
//!
//! Why the whole system in an initramfs rather than a disk image: Debian's
//! cloud kernel has the virtio block and PCI drivers as modules
//! (`CONFIG_VIRTIO_BLK=m`, `CONFIG_VIRTIO_PCI=m` in its boot/config-*), so
//! a root disk would need an initramfs that loads them anyway. The kernel
//! unpacks an initramfs into a tmpfs and runs `/init` from it: no modules, no
//! loop mounts, no partitions. systemd runs there as on a disk (it only
//! treats the system as an initrd when /etc/initrd-release exists).
//!
//! `apt install ./rulebpf_*.deb` in a chroot of a fresh minbase is the check
//! that the package installs on Debian 12 on its own: its dependencies
//! resolve from what Debian ships, and the tool runs with no Rust toolchain.
//! The image is cached by a key over the base, the package and the files, so
//! an unchanged tree boots the same image again without rebuilding it.

use std::{
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use super::{digest, rootfs::Base};
use crate::deb::Deb;

/// Something the scenario puts into the guest, at an absolute path.
pub enum Entry {
    File {
        path: &'static str,
        mode: u32,
        text: String,
    },
    Symlink {
        path: String,
        target: &'static str,
    },
}

impl Entry {
    /// What the cache key sees of this entry.
    fn describe(&self) -> String {
        match self {
            Self::File { path, mode, text } => format!("file {path} {mode:o}\n{text}\n"),
            Self::Symlink { path, target } => format!("link {path} -> {target}\n"),
        }
    }
}

/// A built image, and how long building it took (`None`: from the cache).
pub struct Image {
    pub path: PathBuf,
    pub size: u64,
    pub built_in: Option<Duration>,
}

/// The image of `base` + `deb` + `entries`, from the cache in `dir` or built
/// there (the unpacked tree stays in `dir/root` for a look after a failure).
pub fn build(base: &Base, deb: &Deb, entries: &[Entry], dir: &Path) -> anyhow::Result<Image> {
    let mut recipe = format!("{}\n", base.key).into_bytes();
    recipe.extend(fs::read(&deb.path)?);
    for entry in entries {
        recipe.extend(entry.describe().into_bytes());
    }
    let path = dir.join(format!("initramfs-{}.cpio.zst", digest(&recipe)?));
    if let Ok(meta) = fs::metadata(&path) {
        return Ok(Image {
            path,
            size: meta.len(),
            built_in: None,
        });
    }
    let start = Instant::now();
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    fs::create_dir_all(&root)?;
    run(Command::new("tar")
        .args(["--numeric-owner", "-xf"])
        .arg(&base.path)
        .arg("-C")
        .arg(&root))?;
    install_deb(&root, deb)?;
    for entry in entries {
        add(&root, entry)?;
    }
    // The kernel runs /init from an initramfs.
    symlink("/lib/systemd/systemd", root.join("init"))?;

    for entry in fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("initramfs-") && name.ends_with(".cpio.zst") {
            let _ = fs::remove_file(entry.path());
        }
    }
    let partial = path.with_extension("part");
    run(Command::new("sh").arg("-c").arg(format!(
        "cd '{}' && find . -print0 | cpio --null -o -H newc --quiet | zstd -T0 -3 -q > '{}'",
        root.display(),
        partial.display()
    )))
    .context("packing the initramfs (cpio, zstd)")?;
    fs::rename(&partial, &path)?;
    Ok(Image {
        size: fs::metadata(&path)?.len(),
        path,
        built_in: Some(start.elapsed()),
    })
}

/// `apt install ./rulebpf_*.deb` inside the unpacked base, then the tool's
/// version from inside it: it runs there with nothing but Debian around it.
fn install_deb(root: &Path, deb: &Deb) -> anyhow::Result<()> {
    let inside = format!("/tmp/{}", deb.file_name());
    fs::copy(&deb.path, root.join(inside.trim_start_matches('/')))?;
    let chroot = |args: &[&str]| {
        let mut command = Command::new("chroot");
        command
            .arg(root)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C.UTF-8")
            .current_dir("/");
        command
    };
    let out = chroot(&["apt-get", "install", "-y", "-q", "--no-install-recommends"])
        .arg(&inside)
        .output()
        .context("running apt-get in the guest's root (chroot)")?;
    ensure!(
        out.status.success(),
        "apt-get install {inside} in the guest's root failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    fs::remove_file(root.join(inside.trim_start_matches('/')))?;
    let version = chroot(&["rulebpf", "--version"])
        .output()
        .context("running rulebpf in the guest's root")?;
    ensure!(
        version.status.success(),
        "the installed rulebpf does not run: {}",
        String::from_utf8_lossy(&version.stderr)
    );
    eprintln!(
        "systemd-test: apt install ./{} in a fresh Debian {}: ok, {}",
        deb.file_name(),
        super::rootfs::SUITE,
        String::from_utf8_lossy(&version.stdout).trim()
    );
    Ok(())
}

fn add(root: &Path, entry: &Entry) -> anyhow::Result<()> {
    let at = |path: &str| root.join(path.trim_start_matches('/'));
    match entry {
        Entry::File { path, mode, text } => {
            let file = at(path);
            fs::create_dir_all(file.parent().expect("absolute"))?;
            fs::write(&file, text)?;
            fs::set_permissions(&file, fs::Permissions::from_mode(*mode))?;
        }
        Entry::Symlink { path, target } => {
            let link = at(path);
            fs::create_dir_all(link.parent().expect("absolute"))?;
            let _ = fs::remove_file(&link);
            symlink(target, &link)?;
        }
    }
    Ok(())
}

/// Runs `command`, failing unless it exits 0.
fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {:?}", command.get_program()))?;
    ensure!(status.success(), "{command:?} failed ({status})");
    Ok(())
}
