//! `rulebpf attach`: rules put in force in an instance, attached to cgroups.

use std::path::PathBuf;

use rulebpf_loader::{
    instance::Instance,
    model::{options::LoadOptions, records::AttachedBy},
    report,
    sys::cgroup::Cgroup,
};

use super::{
    CliError,
    args::{LimitArgs, NAME_HELP, PolicyArg, PortArgs, RULES_HELP},
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
    /// When no origin port of a rule's range is free.
    #[arg(long, value_enum, default_value_t = PolicyArg::Strict)]
    policy: PolicyArg,
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
    let options = LoadOptions {
        policy: args.policy.into(),
        kernel_log: log::LevelFilter::Off,
        sharing: ports.port_sharing.into(),
        app_bound: ports.app_bound.into(),
    };
    warn_ports(&set, options.sharing, ports.reserve_ports);
    let existed = Instance::open(&name)?.is_some();
    let instance = Instance::create_with(&name, ports.tuple_capacity)?;
    instance.check_unmanaged(args.force)?;
    let applied = match instance.apply(&set, options) {
        Ok(applied) => applied,
        Err(e) => {
            // An instance this command created has nothing to keep.
            if !existed {
                let _ = instance.remove();
            }
            return Err(e.into());
        }
    };
    let mut attached = Vec::new();
    for cgroup in &cgroups {
        if instance.attach(cgroup, AttachedBy::Attach)? {
            attached.push(cgroup.path.clone());
        }
    }
    instance.reserve_ports(&set, ports.reserve_ports)?;
    let entry = instance.record()?.entry;
    let report = report::AttachReport::of(name, entry, &set, &applied, attached);
    report::print(&report, args.json)?;
    Ok(())
}
