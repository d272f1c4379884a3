//! `rulebpf kernel`.

use std::{fmt, path::PathBuf};

use serde::Serialize;

use crate::sys::features::{Feature, Support};

/// `rulebpf kernel`: where cgroup v2 is and what the kernel offers.
#[derive(Debug, Serialize)]
pub struct KernelReport {
    pub kernel: String,
    pub cgroup2_mount: Option<PathBuf>,
    pub features: Vec<Feature>,
    #[serde(skip)]
    missing: Option<String>,
    #[serde(skip)]
    degradations: Vec<String>,
}

impl KernelReport {
    pub fn of(support: &Support) -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        Self {
            kernel: release.trim().to_string(),
            cgroup2_mount: crate::sys::cgroup::cgroup2_mount().ok(),
            features: support.features.clone(),
            missing: support.missing_required(),
            degradations: support.degradations(),
        }
    }
}

impl fmt::Display for KernelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cgroup2_mount {
            Some(path) => writeln!(f, "cgroup v2 mounted at {}", path.display())?,
            None => writeln!(
                f,
                "no cgroup v2 mount in /proc/mounts: rulebpf needs cgroup v2"
            )?,
        }
        writeln!(f, "kernel {}:", self.kernel)?;
        for feature in &self.features {
            let state = match feature.present {
                Some(true) => "yes",
                Some(false) if feature.required => "MISSING",
                Some(false) => "no",
                None => "? (probe failed: root?)",
            };
            writeln!(
                f,
                "  {:<44} {:<8} since {:<5} {}",
                feature.name, state, feature.since, feature.role
            )?;
        }
        if let Some(missing) = &self.missing {
            writeln!(f, "{missing}")?;
        }
        for d in &self.degradations {
            writeln!(f, "note: {d}")?;
        }
        Ok(())
    }
}
