//! `rulebpf status` and `rulebpf stats`: what each instance has in force,
//! read so that one bad record does not hide the others.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{
    instance::{Instance, InstanceError, Standing},
    kernel::integrity::Damage,
    model::{
        name::InstanceName,
        program::PerHook,
        records::{Attachment, ProgramInfo, RuleSetRecord, ServiceRecord},
        rule_stats::{self, OccupancyRow, RuleRow},
    },
    sys::cgroup::Cgroup,
    with_causes,
};

/// `rulebpf status`: one row per instance.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct StatusReport(pub Vec<StatusRow>);

/// One instance as `status` sees it: the kernel says what is in force and
/// where; the records add what the kernel cannot tell.
#[derive(Debug, Serialize)]
pub struct StatusRow {
    pub name: InstanceName,
    pub entry: PerHook<ProgramInfo>,
    /// The rule set in force (the program in the jump slots), if any.
    pub rule_set: Option<RuleSetRecord>,
    /// The two hooks run programs of different rule sets (an interrupted
    /// swap; the next attach or run completes it).
    pub mixed: bool,
    pub attachments: Vec<AttachmentRow>,
    /// The pid of the `rulebpf run` that manages the instance.
    pub managed_by: Option<u32>,
    pub service: ServiceRecord,
    /// Rules that bound a socket: ports in use and their high-water mark,
    /// busiest first.
    pub occupancy: Vec<OccupancyRow>,
    /// Rules that denied a connect(), with how many.
    pub denied: Vec<DeniedRow>,
    /// Pins that do not hold what the instance's programs use (repaired by
    /// the next `attach` or `run`).
    pub damage: Vec<Damage>,
    /// What could not be read, if anything.
    pub error: Option<String>,
}

/// A `deny` rule and the connects it refused.
#[derive(Debug, Serialize)]
pub struct DeniedRow {
    pub line: u32,
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remark: Option<String>,
    pub denied: u64,
}

/// One attachment: the recorded cgroup and how it stands now.
#[derive(Debug, Serialize)]
pub struct AttachmentRow {
    #[serde(flatten)]
    pub attachment: Attachment,
    pub standing: Standing,
}

/// `rulebpf stats`: per-rule counters, per instance.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct StatsReport(pub Vec<InstanceStats>);

#[derive(Debug, Serialize)]
pub struct InstanceStats {
    pub instance: InstanceName,
    pub rules_file: PathBuf,
    pub generation: u64,
    pub rules: Vec<RuleRow>,
    /// The instance counters (tuple table full, sharing unavailable, ...).
    pub counters: std::collections::BTreeMap<&'static str, u64>,
}

impl InstanceStats {
    pub fn of(instance: InstanceName, set: &RuleSetRecord, rules: Vec<RuleRow>) -> Self {
        Self {
            instance,
            rules_file: set.rules_file.clone(),
            generation: set.generation,
            rules,
            counters: Default::default(),
        }
    }

    /// With the instance counters (`Instance::counters`).
    pub fn with_counters(mut self, counters: Vec<(rulebpf_common::Counter, u64)>) -> Self {
        self.counters = counters.into_iter().map(|(c, n)| (c.name(), n)).collect();
        self
    }
}

/// `status` for one instance: what the kernel has in force and where, and
/// what could not be read.
pub fn status_row(instance: &Instance) -> StatusRow {
    let mut errors = Vec::new();
    let record = instance.record().unwrap_or_else(|e| {
        errors.push(with_causes(&e));
        Default::default()
    });
    let in_force = instance.in_force().unwrap_or_else(|e| {
        errors.push(with_causes(&e));
        Default::default()
    });
    let managed_by = instance.managed_by().unwrap_or_else(|e| {
        errors.push(with_causes(&e));
        None
    });
    let attachments = record
        .attachments
        .iter()
        .map(|a| AttachmentRow {
            attachment: a.clone(),
            standing: instance.standing(a),
        })
        .collect();
    // Read once, for both the occupancy and the denied rows.
    let by_key = instance.occupancy_of(in_force.set.as_ref());
    let occupancy = match (&in_force.set, &by_key) {
        (Some(set), Ok(occupancy)) => rule_stats::occupied(&set.rules, occupancy),
        (_, Err(e)) => {
            errors.push(with_causes(e));
            vec![]
        }
        (None, _) => vec![],
    };
    let denied = match (&in_force.set, &by_key) {
        (Some(set), Ok(by_key)) => instance
            .rows(set, by_key)
            .map(|rows| {
                rows.into_iter()
                    .filter(|r| r.denied > 0)
                    .map(|r| DeniedRow {
                        line: r.line,
                        text: r.text,
                        remark: r.remark,
                        denied: r.denied,
                    })
                    .collect()
            })
            .unwrap_or_else(|e| {
                errors.push(with_causes(&e));
                vec![]
            }),
        _ => vec![],
    };
    let damage = instance.damage();
    StatusRow {
        name: instance.name().clone(),
        damage,
        entry: record.entry,
        rule_set: in_force.set,
        mixed: in_force.mixed,
        attachments,
        managed_by,
        service: record.service,
        occupancy,
        denied,
        error: (!errors.is_empty()).then(|| errors.join("; ")),
    }
}

/// The counters of every instance, or of the one named `name`, or of
/// those attached to the cgroup `cgroup`.
pub fn stats(name: Option<&str>, cgroup: Option<&Path>) -> Result<StatsReport, InstanceError> {
    let mut instances = Instance::all()?;
    if let Some(name) = name {
        let name = InstanceName::new(name)?;
        instances.retain(|i| *i.name() == name);
        if instances.is_empty() {
            return Err(InstanceError::NoInstance(name));
        }
    }
    if let Some(arg) = cgroup {
        let path = Cgroup::path_of(arg)?;
        instances.retain(|i| {
            i.record()
                .is_ok_and(|r| r.attachments.iter().any(|a| a.cgroup == path))
        });
        if instances.is_empty() {
            return Err(InstanceError::NotAttached(arg.display().to_string()));
        }
    }
    let mut out = Vec::new();
    for instance in instances {
        match instance.stats() {
            Ok((set, rows)) => out.push(
                InstanceStats::of(instance.name().clone(), &set, rows)
                    .with_counters(instance.counters().unwrap_or_default()),
            ),
            Err(InstanceError::NoRules(_)) if name.is_none() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(StatsReport(out))
}
