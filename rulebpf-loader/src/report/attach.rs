//! `rulebpf attach`.

use std::{fmt, path::PathBuf};

use rulebpf_rules::ruleset::RuleSet;
use serde::Serialize;

use super::{Summary, app_bound_name, count, policy_name, programs_line, sharing_name};
use crate::{
    model::{
        name::InstanceName,
        options::{AppBound, Policy, Sharing},
        program::PerHook,
        records::ProgramInfo,
    },
    ops::put_in_force::Done,
};

/// `rulebpf attach`: what was put in force, and where. The same program
/// fields as `status` shows.
#[derive(Debug, Serialize)]
pub struct AttachReport {
    pub instance: InstanceName,
    /// Cgroups attached by this command (already attached ones not repeated).
    pub attached: Vec<PathBuf>,
    pub swapped: bool,
    pub generation: u64,
    pub policy: Policy,
    pub sharing: Sharing,
    pub app_bound: AppBound,
    /// Origin ranges the instance holds reserved from the ephemeral ports.
    pub reserved_ports: Vec<(u16, u16)>,
    /// The stable entry programs (attached to the cgroups).
    pub entry: PerHook<ProgramInfo>,
    /// The rule set's programs (in the entry programs' jump slots).
    pub programs: PerHook<ProgramInfo>,
    pub map_memlock_bytes: u64,
    pub summary: Summary,
}

impl AttachReport {
    pub fn of(instance: InstanceName, set: &RuleSet, done: &Done) -> Self {
        let r = &done.applied.record;
        Self {
            instance,
            attached: done.attached.clone(),
            swapped: done.applied.swapped,
            generation: r.generation,
            policy: r.policy,
            sharing: r.sharing,
            app_bound: r.app_bound,
            reserved_ports: done.reserved.clone(),
            entry: done.entry,
            programs: r.programs,
            map_memlock_bytes: r.map_memlock_bytes,
            summary: Summary::of(set),
        }
    }
}

impl fmt::Display for AttachReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.swapped { "swapped in" } else { "loaded" };
        writeln!(
            f,
            "instance {}: {verb} {} ({}) as rule set {}",
            self.instance,
            self.summary.file.display(),
            count(self.summary.rules, "rule"),
            self.generation,
        )?;
        let reserved = if self.reserved_ports.is_empty() {
            "none".to_string()
        } else {
            let ranges: Vec<String> = self
                .reserved_ports
                .iter()
                .map(|(lo, hi)| format!("{lo}-{hi}"))
                .collect();
            ranges.join(",")
        };
        writeln!(
            f,
            "  settings: policy {}, port sharing {}, app-bound {}, reserved ports {reserved}",
            policy_name(self.policy),
            sharing_name(self.sharing),
            app_bound_name(self.app_bound),
        )?;
        for cgroup in &self.attached {
            writeln!(f, "  attached to {}", cgroup.display())?;
        }
        writeln!(
            f,
            "  {}",
            programs_line(&self.programs, self.map_memlock_bytes)
        )?;
        writeln!(
            f,
            "  entry programs: connect4 id {}, connect6 id {}",
            self.entry.connect4.id, self.entry.connect6.id
        )
    }
}
