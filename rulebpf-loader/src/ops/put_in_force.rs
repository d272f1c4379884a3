//! One path that puts a rule set in force, used by `attach` and by every
//! reload of `rulebpf run`: the instance opened (or made), the settings
//! resolved against the ones in force, the set loaded and swapped in, the
//! cgroups attached, the origin ranges reserved.
//!
//! All or nothing, as far as the kernel lets it be: every cgroup is checked
//! for another instance's hooks before anything changes, and an instance
//! this call made is removed again when a later step fails, so a refused
//! command leaves nothing behind.

use std::path::PathBuf;

use rulebpf_rules::ruleset::RuleSet;

use crate::{
    instance::{Applied, Instance, InstanceError},
    model::{
        name::InstanceName,
        options::{AppBound, LoadOptions, Policy, Sharing},
        program::PerHook,
        records::{AttachedBy, ProgramInfo, RuleSetRecord},
    },
    sys::cgroup::Cgroup,
};

/// The settings a command gave; `None`: keep the one in force (or the
/// default for a new instance).
#[derive(Clone, Copy, Debug, Default)]
pub struct Settings {
    pub policy: Option<Policy>,
    pub sharing: Option<Sharing>,
    pub app_bound: Option<AppBound>,
}

impl Settings {
    /// The load options: what was given, else what `in_force` has, else
    /// the defaults. An instance keeps its settings until a flag changes
    /// them.
    pub fn resolve(
        self,
        in_force: Option<&RuleSetRecord>,
        kernel_log: log::LevelFilter,
    ) -> LoadOptions {
        LoadOptions {
            policy: self
                .policy
                .or(in_force.map(|r| r.policy))
                .unwrap_or_default(),
            sharing: self
                .sharing
                .or(in_force.map(|r| r.sharing))
                .unwrap_or_default(),
            app_bound: self
                .app_bound
                .or(in_force.map(|r| r.app_bound))
                .unwrap_or_default(),
            kernel_log,
        }
    }
}

/// What to put in force where.
pub struct Request<'a> {
    pub name: &'a InstanceName,
    pub set: &'a RuleSet,
    pub settings: Settings,
    pub kernel_log: log::LevelFilter,
    /// The tuple table of a new instance.
    pub tuple_capacity: u32,
    /// `--reserve-ports`: `Some(reserve)` sets it, `None` leaves it as is.
    pub reserve_ports: Option<bool>,
    pub cgroups: &'a [Cgroup],
    pub by: AttachedBy,
    /// Change an instance that `rulebpf run` manages.
    pub force: bool,
}

/// What was put in force.
pub struct Done {
    pub applied: Applied,
    pub options: LoadOptions,
    /// Cgroups attached by this call (already attached ones not repeated).
    pub attached: Vec<PathBuf>,
    pub entry: PerHook<ProgramInfo>,
    /// The origin ranges this instance holds reserved now.
    pub reserved: Vec<(u16, u16)>,
}

/// Puts `request.set` in force in the instance it names (made when
/// missing), on an instance already opened by the caller (`run`) or not.
pub fn put_in_force(request: &Request<'_>) -> Result<Done, InstanceError> {
    let existed = Instance::open(request.name)?.is_some();
    let instance = Instance::create_with(request.name, request.tuple_capacity)?;
    let done = put_in_force_on(&instance, request);
    if done.is_err() && !existed {
        // An instance this call made has nothing to keep.
        let _ = instance.remove();
    }
    done
}

/// [`put_in_force`] on an instance the caller holds.
pub fn put_in_force_on(instance: &Instance, request: &Request<'_>) -> Result<Done, InstanceError> {
    instance.check_unmanaged(request.force)?;
    // Refused before anything changes: a cgroup with another instance's
    // hooks.
    for cgroup in request.cgroups {
        instance.check_attachable(cgroup)?;
    }
    let in_force = instance.in_force()?.set;
    let options = request
        .settings
        .resolve(in_force.as_ref(), request.kernel_log);
    let applied = instance.apply(request.set, options)?;
    let mut attached = Vec::new();
    for cgroup in request.cgroups {
        if instance.attach(cgroup, request.by.clone())? {
            attached.push(cgroup.path.clone());
        }
    }
    // The entry programs do not change below: one read serves both.
    let record = instance.record()?;
    let reserve = request
        .reserve_ports
        .unwrap_or(!record.reserved_ports.is_empty());
    let reserved = instance.reserve_ports(request.set, reserve)?;
    Ok(Done {
        applied,
        options,
        attached,
        entry: record.entry,
        reserved,
    })
}
