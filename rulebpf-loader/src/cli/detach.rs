//! `rulebpf detach` and `rulebpf gc`: rules removed, on request or because
//! their cgroup is gone.

use std::{
    io::{self, Write as _},
    path::PathBuf,
};

use rulebpf_loader::ops;

use super::{
    CliError,
    args::{CGROUP_HELP, NAME_HELP},
};

#[derive(clap::Args)]
pub struct DetachArgs {
    #[arg(long, help = NAME_HELP)]
    name: Option<String>,
    #[arg(long, help = CGROUP_HELP)]
    cgroup: Option<PathBuf>,
    /// Change an instance that `rulebpf run` manages (it will notice).
    #[arg(long)]
    force: bool,
}

pub fn detach(args: DetachArgs) -> Result<(), CliError> {
    let line = ops::detach::detach(args.name.as_deref(), args.cgroup.as_deref(), args.force)?;
    writeln!(io::stdout(), "{line}")?;
    Ok(())
}

pub fn gc() -> Result<(), CliError> {
    let collected = ops::gc::gc()?;
    let mut out = io::stdout().lock();
    for line in &collected.lines {
        writeln!(out, "{line}")?;
    }
    if collected.failures.is_empty() {
        Ok(())
    } else {
        Err(CliError::NotCollected(collected.failures.join("\n")))
    }
}
