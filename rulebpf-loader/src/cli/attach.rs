//! `rulebpf attach`: rules put in force in an instance, attached to cgroups.

use rulebpf_loader::{
    instance::CommandLock,
    model::records::AttachedBy,
    ops::put_in_force::{Request, put_in_force},
    report,
    sys::cgroup::Cgroup,
};

use super::{
    CliError,
    args::{PortArgs, RulesArgs, WhereArgs},
    instance_name, warn_ports,
};

#[derive(clap::Args)]
pub struct AttachArgs {
    #[command(flatten)]
    at: WhereArgs,
    #[command(flatten)]
    ports: PortArgs,
    /// Change an instance that `rulebpf run` manages (it will notice).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    rules: RulesArgs,
    #[arg(long)]
    json: bool,
}

pub fn attach(args: AttachArgs) -> Result<(), CliError> {
    let name = instance_name(&args.at)?;
    let cgroups = args
        .at
        .cgroup
        .iter()
        .map(|c| Cgroup::resolve(c))
        .collect::<Result<Vec<_>, _>>()?;
    let set = args.rules.load()?;
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
