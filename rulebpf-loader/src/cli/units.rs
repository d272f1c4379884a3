//! `rulebpf systemd-dropin`, `rulebpf systemd-attach` and `rulebpf
//! oci-hook`: how systemd units and containers get an instance's rules.

use std::{
    io::{self, Write as _},
    path::PathBuf,
};

use rulebpf_loader::{
    instance::{CommandLock, Instance, InstanceError},
    integrations::{oci, oci_hook, systemd},
    model::name::InstanceName,
    sys::cgroup::{self, Cgroup},
};

use super::CliError;

#[derive(clap::Args)]
pub struct DropinArgs {
    /// The rules instance (rulebpf@NAME.service, /etc/rulebpf/NAME.ini).
    #[arg(long)]
    name: String,
    /// The service, e.g. gateway.service.
    unit: String,
    /// Where unit drop-ins go.
    #[arg(long, default_value = systemd::SYSTEM_UNIT_DIR)]
    dir: PathBuf,
}

pub fn dropin(args: DropinArgs) -> Result<(), CliError> {
    let name = InstanceName::new(&args.name)?;
    let service = systemd::ServiceName::new(&args.unit)?;
    let path = systemd::write_dropin(&args.dir, &name, &service)?;
    let mut out = io::stdout().lock();
    writeln!(out, "wrote {}", path.display())?;
    writeln!(
        out,
        "next: systemctl enable --now rulebpf@{name} (rules in /etc/rulebpf/{name}.ini), \
         systemctl daemon-reload, systemctl restart {}",
        args.unit
    )?;
    Ok(())
}

/// Attaches instance `name` to this process's own cgroup (a unit's
/// `ExecStartPre=`).
pub fn attach_own_cgroup(name: &str) -> Result<(), CliError> {
    let name = InstanceName::new(name)?;
    let _lock = CommandLock::acquire(&name)?;
    let instance = Instance::open(&name)?.ok_or(InstanceError::NoInstance(name))?;
    let cgroup = Cgroup::resolve(&cgroup::own()?)?;
    instance.attach_for_unit(&cgroup)?;
    Ok(())
}

pub fn oci_hook(stage: oci::Stage) -> Result<(), CliError> {
    Ok(oci_hook::oci_hook(stage, io::stdin().lock())?)
}
