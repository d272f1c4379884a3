//! Debian's cloud kernels, fetched with apt and unpacked into a cache.
//!
//! `apt-get download` + `dpkg-deb -x` need no root and install nothing: the
//! package is only a place to take `boot/vmlinuz-*` from. The cloud flavour
//! has everything the suite needs built in (BPF, cgroup BPF, IPv6, 8250
//! console), so the guest needs no modules.
//!
//! 6.1 and 6.12 come from the host's own apt sources (bookworm). 5.10 is
//! bullseye's: its package lists are fetched into a private apt state under
//! the cache ([`Apt::private`]), so the host's apt configuration is never
//! touched. The newest package of a series may be listed but gone from the
//! mirror (a security update withdrawn after the next one): the next newest
//! is tried.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

use crate::apt::{self, Apt};

/// A kernel series of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Series {
    V5_10,
    V6_1,
    V6_12,
}

impl Series {
    pub const ALL: [Self; 3] = [Self::V5_10, Self::V6_1, Self::V6_12];

    pub fn parse(text: &str) -> anyhow::Result<Vec<Self>> {
        Ok(match text {
            "5.10" => vec![Self::V5_10],
            "6.1" => vec![Self::V6_1],
            "6.12" => vec![Self::V6_12],
            "all" => Self::ALL.to_vec(),
            other => bail!("unknown kernel `{other}`: expected 5.10, 6.1, 6.12 or all"),
        })
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::V5_10 => "5.10",
            Self::V6_1 => "6.1",
            Self::V6_12 => "6.12",
        }
    }

    /// The Debian release whose archive has the series, when it is not the
    /// host's own (bookworm).
    const fn foreign_suite(self) -> Option<&'static str> {
        match self {
            Self::V5_10 => Some("bullseye"),
            Self::V6_1 | Self::V6_12 => None,
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
            // linux-image-5.10.0-43-cloud-amd64-unsigned
            Self::V5_10 => version.starts_with("5.10.0-"),
            // linux-image-6.1.0-56-cloud-amd64-unsigned
            Self::V6_1 => version.starts_with("6.1.0-"),
            // linux-image-6.12.111+deb12-cloud-amd64-unsigned
            Self::V6_12 => version.starts_with("6.12.") && version.contains('+'),
        }
    }
}

/// The packages of `series` the apt sources offer, newest first.
fn packages(series: Series, apt: &Apt) -> anyhow::Result<Vec<String>> {
    let out = apt
        .command("apt-cache")
        .args([
            "search",
            "--names-only",
            "^linux-image-.*-cloud-amd64-unsigned$",
        ])
        .output()
        .context("running apt-cache (is this Debian?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| series.owns(name))
        .map(str::to_string)
        .collect();
    names.sort_by_key(|name| std::cmp::Reverse(version_key(name)));
    if names.is_empty() {
        bail!(
            "no linux-image {} cloud package in the apt sources (apt-get update?)",
            series.name()
        );
    }
    Ok(names)
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
    fs::create_dir_all(cache)?;
    // The kernels of the series already unpacked: what is used when apt
    // cannot list or fetch one (no network, a suite gone from the mirror).
    // apt is still asked first, so a newer package is picked up.
    let owned: Vec<PathBuf> = fs::read_dir(cache)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| series.owns(n))
        })
        .collect();
    let apt = match series.foreign_suite() {
        Some(suite) => match Apt::private(&cache.join(format!("apt-{suite}")), suite) {
            Ok(apt) => apt,
            Err(e) => return cached(series, &owned).ok_or(e),
        },
        None => Apt::host(),
    };
    let listed = match packages(series, &apt) {
        Ok(listed) => listed,
        Err(e) => return cached(series, &owned).ok_or(e),
    };
    let mut failures = Vec::new();
    for package in listed {
        let dir = cache.join(&package);
        if let Some(image) = find_vmlinuz(&dir) {
            return Ok((package, image));
        }
        match download(&apt, &package, cache) {
            Ok(image) => return Ok((package, image)),
            Err(e) => {
                eprintln!("vm-test: {package}: {e:#}; trying an older one");
                failures.push(format!("{package}: {e:#}"));
            }
        }
    }
    cached(series, &owned).with_context(|| {
        format!(
            "no {} kernel could be fetched:\n{}",
            series.name(),
            failures.join("\n")
        )
    })
}

/// The newest kernel of `series` already in the cache.
fn cached(series: Series, owned: &[PathBuf]) -> Option<(String, PathBuf)> {
    let mut found: Vec<(String, PathBuf)> = owned
        .iter()
        .filter_map(|dir| {
            let name = dir.file_name()?.to_str()?.to_string();
            Some((name, find_vmlinuz(dir)?))
        })
        .collect();
    found.sort_by_key(|(name, _)| version_key(name));
    let found = found.pop();
    if let Some((name, _)) = &found {
        eprintln!(
            "vm-test: using the cached {name} ({} series)",
            series.name()
        );
    }
    found
}

/// Downloads and unpacks `package` into `cache/package/`; returns its
/// kernel image.
fn download(apt: &Apt, package: &str, cache: &Path) -> anyhow::Result<PathBuf> {
    let dir = cache.join(package);
    let deb = apt.download(package, &cache.join("download"))?;
    let unpack = cache.join(format!("{package}.tmp"));
    apt::unpack(&deb, &unpack)?;
    // Keep only the image: the modules are not needed and are large.
    fs::create_dir_all(&dir)?;
    let image = find_vmlinuz(&unpack).context("no boot/vmlinuz-* in the package")?;
    let kept = dir.join(image.file_name().expect("a file"));
    fs::copy(&image, &kept)?;
    fs::remove_dir_all(&unpack)?;
    fs::remove_file(&deb)?;
    Ok(kept)
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
        assert!(Series::V5_10.owns("linux-image-5.10.0-43-cloud-amd64-unsigned"));
        assert!(!Series::V5_10.owns("linux-image-6.1.0-56-cloud-amd64-unsigned"));
        assert!(!Series::V6_1.owns("linux-image-5.10.0-43-cloud-amd64-unsigned"));
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
