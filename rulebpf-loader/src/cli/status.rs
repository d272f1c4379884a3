//! `rulebpf status`, `rulebpf stats` and `rulebpf kernel`: what is in
//! force, what it counted, and what the kernel offers.

use std::path::PathBuf;

use rulebpf_loader::{
    instance::Instance,
    ops::status::{self, StatusReport},
    report,
    sys::features::Support,
};

use super::CliError;

pub fn status(json: bool) -> Result<(), CliError> {
    let rows = Instance::all()?.iter().map(status::status_row).collect();
    report::print(&StatusReport(rows), json)?;
    Ok(())
}

#[derive(clap::Args)]
pub struct StatsArgs {
    /// Only this instance.
    #[arg(long)]
    name: Option<String>,
    /// Only the instances attached to this cgroup (cgroup v2 directory,
    /// absolute or relative to the cgroup2 mount).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn stats(args: StatsArgs) -> Result<(), CliError> {
    let stats = status::stats(args.name.as_deref(), args.cgroup.as_deref())?;
    report::print(&stats, args.json)?;
    Ok(())
}

pub fn kernel(json: bool) -> Result<(), CliError> {
    report::print(&report::KernelReport::of(Support::get()), json)?;
    Ok(())
}
