//! The guest's Debian 12 base system: a tarball made by mmdebstrap from the
//! Debian mirrors this host's apt already uses (no other network), cached
//! under target/vm/systemd.
//!
//! `--variant=minbase` is the Essential packages and apt; [`PACKAGES`] adds
//! what the scenario needs. Manuals, locales and docs are left out
//! (`path-exclude`): a third of the size, and the guest unpacks every byte
//! under TCG. The file name carries a key made of the suite, the packages,
//! those options and the mirrors, so changing any of them builds a new base;
//! otherwise the base is reused (building it takes one to two minutes, most
//! of it downloading).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use super::digest;

/// Debian 12, whose systemd (252) has `BPFProgram=` (v249+).
pub const SUITE: &str = "bookworm";

/// On top of minbase: systemd as PID 1 (systemd-sysv), `ss` (iproute2) to
/// wait for the listener, socat as the listener that records origin ports,
/// bpftool only for a look at the cgroups' programs when the test fails.
pub const PACKAGES: &[&str] = &["systemd-sysv", "iproute2", "socat", "bpftool"];

/// dpkg options: what not to unpack. `rulebpf`'s own docs are kept, so the
/// guest shows the package complete (`dpkg -L rulebpf`).
const DPKG_OPTIONS: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/rulebpf/*",
];

/// A base tarball, and how long building it took (`None`: from the cache).
pub struct Base {
    pub path: PathBuf,
    pub key: String,
    pub built_in: Option<Duration>,
}

/// The base for [`SUITE`] and [`PACKAGES`], from the cache in `dir` or built.
pub fn base(dir: &Path) -> anyhow::Result<Base> {
    let mirrors = mirrors()?;
    let recipe = format!(
        "{SUITE}\n{}\n{}\n{}\n",
        PACKAGES.join(","),
        DPKG_OPTIONS.join("\n"),
        mirrors.join("\n")
    );
    let key = digest(recipe.as_bytes())?;
    let path = dir.join(format!("base-{key}.tar"));
    if path.exists() {
        return Ok(Base {
            path,
            key,
            built_in: None,
        });
    }
    crate::step(&format!(
        "mmdebstrap {SUITE} + {} (once; cached as {})",
        PACKAGES.join(", "),
        path.display()
    ));
    let start = Instant::now();
    let partial = dir.join(format!("base-{key}.tar.part"));
    let mut command = Command::new("mmdebstrap");
    command
        .args(["--variant=minbase", "--format=tar", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")))
        .args(DPKG_OPTIONS.iter().map(|o| format!("--dpkgopt={o}")))
        .arg(SUITE)
        .arg(&partial)
        .args(&mirrors);
    let status = command
        .status()
        .context("running mmdebstrap (apt-get install mmdebstrap)")?;
    ensure!(status.success(), "mmdebstrap failed ({status})");
    remove_other_bases(dir);
    std::fs::rename(&partial, &path)?;
    Ok(Base {
        path,
        key,
        built_in: Some(start.elapsed()),
    })
}

/// Earlier bases (another key): one base is enough to keep.
fn remove_other_bases(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("base-") && name.ends_with(".tar") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The Debian [`SUITE`] mirrors this host's apt uses, as sources.list lines
/// for mmdebstrap. Asking apt (`apt-cache policy`) covers both the one-line
/// and the deb822 source formats, and only sources apt actually read.
fn mirrors() -> anyhow::Result<Vec<String>> {
    let out = Command::new("apt-cache")
        .arg("policy")
        .output()
        .context("running apt-cache policy (is this Debian?)")?;
    let lines = debian_sources(&String::from_utf8_lossy(&out.stdout), SUITE);
    ensure!(
        !lines.is_empty(),
        "apt knows no Debian {SUITE} mirror (apt-cache policy); add one to /etc/apt/sources.list.d"
    );
    Ok(lines)
}

/// `deb URI DIST main` for every Debian `suite*` index in `apt-cache policy`'s
/// output, where each index is a line and its release line below it:
///
/// ```text
///  500 http://deb.debian.org/debian bookworm-updates/main amd64 Packages
///      release v=12-updates,o=Debian,a=oldstable-updates,n=bookworm-updates,l=Debian,c=main,b=amd64
/// ```
fn debian_sources(policy: &str, suite: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut index: Option<(String, String)> = None;
    for line in policy.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let [priority, uri, dist_component, _arch, "Packages"] = words[..]
            && priority.parse::<i32>().is_ok()
            && let Some((dist, "main")) = dist_component.rsplit_once('/')
        {
            index = Some((uri.to_string(), dist.to_string()));
        } else if let Some(fields) = line.strip_prefix("release ")
            && let Some((uri, dist)) = index.take()
        {
            let field = |key: &str| {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
            };
            let name = field("n").unwrap_or_default();
            let ours = name == suite || name.starts_with(&format!("{suite}-"));
            let entry = format!("deb {uri} {dist} main");
            if field("o") == Some("Debian") && ours && !out.contains(&entry) {
                out.push(entry);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::debian_sources;

    #[test]
    fn debian_suite_indexes_become_source_lines() {
        let policy = "\
Package files:
 100 /var/lib/dpkg/status
     release a=now
 500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
     release v=12,o=Debian,a=oldstable-security,n=bookworm-security,l=Debian-Security,c=main,b=amd64
     origin deb.debian.org
 500 https://deb.nodesource.com/node_20.x nodistro/main amd64 Packages
     release o=Node Source,n=nodistro,l=Node Source,c=main,b=amd64
 500 http://deb.debian.org/debian trixie/main amd64 Packages
     release v=13,o=Debian,a=stable,n=trixie,l=Debian,c=main,b=amd64
 500 http://deb.debian.org/debian bookworm/main amd64 Packages
     release v=12.15,o=Debian,a=oldstable,n=bookworm,l=Debian,c=main,b=amd64
 500 http://deb.debian.org/debian bookworm/main i386 Packages
     release v=12.15,o=Debian,a=oldstable,n=bookworm,l=Debian,c=main,b=i386
Pinned packages:
";
        assert_eq!(
            debian_sources(policy, "bookworm"),
            [
                "deb http://deb.debian.org/debian-security bookworm-security main",
                "deb http://deb.debian.org/debian bookworm main",
            ]
        );
    }
}
