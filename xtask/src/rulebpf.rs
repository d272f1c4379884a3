//! The built `rulebpf` binary, as the demo and the bench drive it.
//!
//! xtask does not link rulebpf-loader: that would build the eBPF program for
//! every `cargo xtask` (even `ci`'s fmt step). It runs the release binary
//! instead, the same one a user runs. The binary also tells where cgroup2 is
//! mounted (`rulebpf kernel --json`, field `cgroup2_mount`), so there is one
//! lookup of that mount, the loader's, which decodes /proc/mounts' octal
//! escapes and finds /sys/fs/cgroup/unified on hybrid hosts: xtask never
//! parses /proc/mounts itself.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};
use serde_json::Value;

/// `target/release/rulebpf` (under `CARGO_TARGET_DIR` when that is set), or
/// for the demo `target/debug/rulebpf`.
pub struct Rulebpf {
    path: PathBuf,
}

impl Rulebpf {
    /// The release binary of this workspace; fails when it is not built.
    pub fn built() -> anyhow::Result<Self> {
        Self::built_in(Profile::Release)
    }

    /// The binary `cargo build` built in `profile`; fails when it is not
    /// built.
    pub fn built_in(profile: Profile) -> anyhow::Result<Self> {
        let (dir, build) = match profile {
            Profile::Release => ("release", "cargo build --release"),
            Profile::Debug => ("debug", "cargo build"),
        };
        let path = crate::target_dir().join(dir).join("rulebpf");
        ensure!(
            path.exists(),
            "{} not built: run `{build}` first",
            path.display()
        );
        Ok(Self { path })
    }

    /// Another build of rulebpf, at `path` (the bench's baseline).
    pub fn at(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rulebpf ARGS` to spawn as the caller needs.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.path);
        command.args(args);
        command
    }

    /// Runs `rulebpf ARGS` with its output on the terminal; fails unless it
    /// exits 0.
    pub fn show(&self, args: &[&str]) -> anyhow::Result<()> {
        let status = Command::new(&self.path).args(args).status()?;
        ensure!(
            status.success(),
            "rulebpf {} failed ({status})",
            args.join(" ")
        );
        Ok(())
    }

    /// Runs `rulebpf ARGS` (which must include `--json`) and parses what it
    /// prints; fails with its stderr unless it exits 0.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        self.json_env(args, &[])
    }

    /// [`Self::json`] with environment variables set for `rulebpf`.
    pub fn json_env(&self, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Value> {
        let out = Command::new(&self.path)
            .args(args)
            .envs(env.iter().copied())
            .output()?;
        ensure!(
            out.status.success(),
            "rulebpf {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("rulebpf {}: output is not JSON", args.join(" ")))
    }

    /// Where cgroup2 is mounted, as the loader finds it.
    pub fn cgroup2_mount(&self) -> anyhow::Result<PathBuf> {
        let kernel = self.json(&["kernel", "--json"])?;
        cgroup2_mount_of(&kernel)
    }

    /// `rulebpf detach --cgroup CG`; a failure is ignored, because this
    /// cleans up after runs that may not have attached anything.
    pub fn detach(&self, cgroup: &Path) {
        let _ = Command::new(&self.path)
            .args(["detach", "--cgroup"])
            .arg(cgroup)
            .output();
    }
}

/// The `cgroup2_mount` field of `rulebpf kernel --json` (null: no cgroup2).
fn cgroup2_mount_of(kernel: &Value) -> anyhow::Result<PathBuf> {
    kernel["cgroup2_mount"]
        .as_str()
        .map(PathBuf::from)
        .context("rulebpf kernel: no cgroup2 mount in /proc/mounts (rulebpf needs cgroup v2)")
}

/// Which of cargo's builds of the binary: `target/release` or `target/debug`.
#[derive(Clone, Copy)]
pub enum Profile {
    Release,
    Debug,
}

/// A path as a CLI argument (the CLI's arguments here are all UTF-8).
pub fn arg(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::cgroup2_mount_of;

    #[test]
    fn cgroup2_mount_from_kernel_json() {
        let hybrid = json!({
            "kernel": "6.18.0",
            "cgroup2_mount": "/sys/fs/cgroup/unified",
            "features": [],
        });
        assert_eq!(
            cgroup2_mount_of(&hybrid).unwrap(),
            Path::new("/sys/fs/cgroup/unified")
        );
        let none = json!({ "kernel": "6.18.0", "cgroup2_mount": null, "features": [] });
        assert!(cgroup2_mount_of(&none).is_err());
    }
}
