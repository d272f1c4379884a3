//! apt without touching the host's configuration: the host's own sources,
//! or a private state for another Debian suite (bullseye's kernels for
//! vm-test, trixie's containerd for cri-test), and `apt-get download` +
//! `dpkg-deb -x`, which need no root and install nothing.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// How apt is run: the host's configuration, or a private one for a suite
/// the host does not carry.
pub struct Apt {
    options: Vec<String>,
}

impl Apt {
    pub fn host() -> Self {
        Self {
            options: Vec::new(),
        }
    }

    /// A private apt state in `dir` for Debian `suite` (its main and
    /// security archives), with fresh package lists. Signed by the keys
    /// of the host's `debian-archive-keyring`.
    pub fn private(dir: &Path, suite: &str) -> anyhow::Result<Self> {
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        // Unstable has no security archive.
        let security = if suite == "sid" {
            String::new()
        } else {
            format!(
                "deb [signed-by={keyring}] http://deb.debian.org/debian-security \
                 {suite}-security main\n"
            )
        };
        fs::write(
            dir.join("sources.list"),
            format!(
                "deb [signed-by={keyring}] http://deb.debian.org/debian {suite} main\n{security}"
            ),
        )?;
        let at = |key: &str, path: PathBuf| format!("{key}={}", path.display());
        let options = [
            at("Dir::State", dir.to_path_buf()),
            at("Dir::State::Lists", dir.join("lists")),
            at("Dir::Cache", dir.join("cache")),
            at("Dir::Etc::SourceList", dir.join("sources.list")),
            at("Dir::Etc::SourceParts", dir.join("sources.list.d")),
            "Dir::State::status=/dev/null".to_string(),
            // Root downloads into directories `_apt` cannot enter.
            "APT::Sandbox::User=root".to_string(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();
        let apt = Self { options };
        let status = apt
            .command("apt-get")
            .args(["update", "-q"])
            .status()
            .context("running apt-get update")?;
        if !status.success() {
            bail!("apt-get update for {suite} failed");
        }
        Ok(apt)
    }

    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.args(&self.options);
        command
    }
}

impl Apt {
    /// Downloads `package` (a name, or `name=version`) into `dir`; returns
    /// the .deb.
    pub fn download(&self, package: &str, dir: &Path) -> anyhow::Result<PathBuf> {
        fs::create_dir_all(dir)?;
        let status = self
            .command("apt-get")
            .args(["download", "-q", package])
            .current_dir(dir)
            .status()
            .context("running apt-get download")?;
        if !status.success() {
            bail!("apt-get download {package} failed");
        }
        let name = package.split('=').next().unwrap_or(package);
        fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{name}_")) && n.ends_with(".deb"))
            })
            .context("no .deb after apt-get download")
    }
}

/// Unpacks `deb` into `dir` (emptied first).
pub fn unpack(deb: &Path, dir: &Path) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(dir);
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(dir)
        .status()
        .context("running dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed", deb.display());
    }
    Ok(())
}
