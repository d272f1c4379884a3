//! `rulebpf attach`: rules put in force in an instance, attached to cgroups.

use std::path::PathBuf;

use rulebpf_loader::{
    instance::CommandLock,
    model::records::AttachedBy,
    ops::put_in_force::{Request, put_in_force},
    report,
    sys::cgroup::Cgroup,
};

use super::{
    CliError,
    args::{LimitArgs, NAME_HELP, PortArgs, RULES_HELP},
    instance_name, load, warn_ports,
};

#[derive(clap::Args)]
pub struct AttachArgs {
    #[arg(long, help = NAME_HELP)]
    name: Option<String>,
    /// Attach to this cgroup too (repeatable; none: load and pin only,
    /// for systemd's BPFProgram= or the OCI hook). cgroup v2 directory:
    /// absolute, or relative to the cgroup2 mount.
    #[arg(long)]
    cgroup: Vec<PathBuf>,
    #[command(flatten)]
    ports: PortArgs,
    /// Change an instance that `rulebpf run` manages (it will notice).
    #[arg(long)]
    force: bool,
    #[arg(help = RULES_HELP)]
    rules: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
    #[arg(long)]
    json: bool,
}

pub fn attach(args: AttachArgs) -> Result<(), CliError> {
    let name = instance_name(args.name.as_deref(), &args.cgroup)?;
    let cgroups = args
        .cgroup
        .iter()
        .map(|c| Cgroup::resolve(c))
        .collect::<Result<Vec<_>, _>>()?;
    let set = load(&args.rules, &args.limits)?;
    let ports = args.ports;
    let _lock = CommandLock::acquire(&name)?;
    let done = put_in_force(&Request {
        name: &name,
        set: &set,
        settings: ports.settings(),
        kernel_log: log::LevelFilter::Off,
        tuple_capacity: ports.tuple_capacity,
        reserve_ports: ports.reserve_ports,
        cgroups: &cgroups,
        by: AttachedBy::Attach,
        force: args.force,
    })?;
    warn_ports(&set, done.options.sharing, !done.reserved.is_empty());
    let report = report::AttachReport::of(name, &set, &done);
    report::print(&report, args.json)?;
    Ok(())
}
