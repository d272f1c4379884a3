//! `cargo xtask deb`: the Debian package, built with cargo-deb.
//!
//! What goes into it (`rulebpf` in /usr/bin, `rulebpf@.service`, the example
//! rules, the OCI hooks, the README) is declared in rulebpf-loader's
//! `[package.metadata.deb]`; this step runs `cargo deb`, which builds the
//! release binary and packs it, and reports where the package is. The result
//! installs on Debian 12 with `apt install ./rulebpf_*.deb`, with no Rust
//! toolchain there: `systemd-test` does exactly that in its guest.

use std::{fs, path::PathBuf};

use anyhow::{Context as _, bail, ensure};

use crate::cargo;

/// The cargo-deb that scripts/setup.sh installs.
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// A built package.
pub struct Deb {
    pub path: PathBuf,
    pub size: u64,
}

impl Deb {
    /// `rulebpf_0.1.0-1_amd64.deb`.
    pub fn file_name(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .expect("cargo-deb names its packages in ASCII")
    }
}

/// Builds the release binary and the package; returns the package.
pub fn build() -> anyhow::Result<Deb> {
    let status = cargo()
        .args(["deb", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !status.is_ok_and(|s| s.success()) {
        bail!(
            "cargo-deb not found: run scripts/setup.sh, or \
             `cargo install cargo-deb --locked --version {CARGO_DEB_VERSION}`"
        );
    }
    // cargo-deb builds the release binary first (`cargo build --release`
    // for the package), then prints the package's path on stdout, its
    // progress on stderr.
    let out = cargo()
        .args(["deb", "-p", "rulebpf-loader"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo deb")?;
    ensure!(out.status.success(), "cargo deb failed ({})", out.status);
    let printed = String::from_utf8_lossy(&out.stdout);
    let path = printed
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .context("cargo deb did not print the package's path")?;
    let size = fs::metadata(&path)
        .with_context(|| format!("{}", path.display()))?
        .len();
    Ok(Deb { path, size })
}

/// `cargo xtask deb`: build, then say where the package is and how big.
pub fn run() -> anyhow::Result<()> {
    let deb = build()?;
    println!("{} ({})", deb.path.display(), megabytes(deb.size));
    Ok(())
}

/// `5.1 MB`, for sizes in reports.
pub fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}
