//! Debian's cloud kernels, fetched with apt and unpacked into a cache.
//!
//! `apt-get download` + `dpkg-deb -x` need no root and install nothing: the
//! package is only a place to take `boot/vmlinuz-*` from. The cloud flavour
//! has everything the suite needs built in (BPF, cgroup BPF, IPv6, 8250
//! console), so the guest needs no modules.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// A kernel series of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Series {
    V6_1,
    V6_12,
}

impl Series {
    pub const ALL: [Self; 2] = [Self::V6_1, Self::V6_12];

    pub fn parse(text: &str) -> anyhow::Result<Vec<Self>> {
        Ok(match text {
            "6.1" => vec![Self::V6_1],
            "6.12" => vec![Self::V6_12],
            "all" => Self::ALL.to_vec(),
            other => bail!("unknown kernel `{other}`: expected 6.1, 6.12 or all"),
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
        }
    }

    /// Does `package` (a name from `apt-cache search`) belong to this series?
    fn owns(self, package: &str) -> bool {
        let Some(version) = package
            .strip_prefix("linux-image-")
            .and_then(|p| p.strip_suffix("-cloud-amd64-unsigned"))
        else {
            return false;
        };
        match self {
            // linux-image-6.1.0-56-cloud-amd64-unsigned
            Self::V6_1 => version.starts_with("6.1.0-"),
            // linux-image-6.12.111+deb12-cloud-amd64-unsigned
            Self::V6_12 => version.starts_with("6.12.") && version.contains('+'),
        }
    }
}

/// The newest package of `series` the apt sources offer.
fn newest_package(series: Series) -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args([
            "search",
            "--names-only",
            "^linux-image-6.*-cloud-amd64-unsigned$",
        ])
        .output()
        .context("running apt-cache (is this Debian?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| series.owns(name))
        .collect();
    names.sort_by_key(|name| version_key(name));
    names.last().map(|n| n.to_string()).with_context(|| {
        format!(
            "no linux-image {} cloud package in the apt sources (apt-get update?)",
            series.name()
        )
    })
}

/// Numbers in a package name, for a version-aware sort.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

/// The kernel image of `series`, from the cache or fetched into it.
/// Returns `(package, vmlinuz path)`.
pub fn fetch(series: Series, cache: &Path) -> anyhow::Result<(String, PathBuf)> {
    let package = newest_package(series)?;
    let dir = cache.join(&package);
    if let Some(image) = find_vmlinuz(&dir) {
        return Ok((package, image));
    }
    let download = cache.join("download");
    fs::create_dir_all(&download)?;
    let status = Command::new("apt-get")
        .args(["download", "-q", &package])
        .current_dir(&download)
        .status()
        .context("running apt-get download")?;
    if !status.success() {
        bail!("apt-get download {package} failed");
    }
    let deb = fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("{package}: no .deb after apt-get download"))?;
    let unpack = cache.join(format!("{package}.tmp"));
    let _ = fs::remove_dir_all(&unpack);
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&unpack)
        .status()
        .context("running dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed", deb.display());
    }
    // Keep only the image: the modules are not needed and are large.
    fs::create_dir_all(&dir)?;
    let image = find_vmlinuz(&unpack).context("no boot/vmlinuz-* in the package")?;
    let kept = dir.join(image.file_name().expect("a file"));
    fs::copy(&image, &kept)?;
    fs::remove_dir_all(&unpack)?;
    fs::remove_file(&deb)?;
    Ok((package, kept))
}

fn find_vmlinuz(dir: &Path) -> Option<PathBuf> {
    let boot = if dir.join("boot").is_dir() {
        dir.join("boot")
    } else {
        dir.to_path_buf()
    };
    fs::read_dir(boot)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_are_told_apart_by_series() {
        assert!(Series::V6_1.owns("linux-image-6.1.0-56-cloud-amd64-unsigned"));
        assert!(!Series::V6_1.owns("linux-image-6.12.111+deb12-cloud-amd64-unsigned"));
        assert!(Series::V6_12.owns("linux-image-6.12.111+deb12-cloud-amd64-unsigned"));
        assert!(!Series::V6_12.owns("linux-image-6.1.0-56-cloud-amd64-unsigned"));
        assert!(!Series::V6_1.owns("linux-image-6.1.0-56-cloud-amd64-dbg"));
    }

    #[test]
    fn newest_means_highest_version_not_last_in_text() {
        let mut names = [
            "linux-image-6.1.0-9-cloud-amd64-unsigned",
            "linux-image-6.1.0-56-cloud-amd64-unsigned",
            "linux-image-6.1.0-47-cloud-amd64-unsigned",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names[2], "linux-image-6.1.0-56-cloud-amd64-unsigned");
    }
}
