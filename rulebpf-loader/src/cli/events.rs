//! `rulebpf events`: the hooks' decisions as they happen.

use std::{
    io::{self, Write as _},
    path::PathBuf,
};

use rulebpf_common::Outcome;
use rulebpf_loader::{
    instance::Instance,
    model::{event::Wire, name::InstanceName},
    report::events::EventLine,
    service::events::{self, Delivery, Wants},
    sys::cgroup::Cgroup,
};

use super::CliError;

#[derive(clap::Args)]
pub struct EventsArgs {
    /// The instance to listen to.
    #[arg(long, conflicts_with = "cgroup", required_unless_present = "cgroup")]
    name: Option<String>,
    /// Only connects from this cgroup and those below it (cgroup v2
    /// directory: absolute, or relative to the cgroup2 mount); the instance
    /// is the one attached to it or to a cgroup above it.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// One JSON object per line: time, instance, cgroup, pid, comm, uid,
    /// protocol, destination, origin_port, line, remark (when the rule has
    /// one), outcome, nat_port.
    #[arg(long)]
    json: bool,
    /// Only these outcomes (comma-separated, repeatable): bound, denied,
    /// exhausted, fallback, app_chose, kernel_chose, zero, refused, and
    /// no_match (connects no rule decided: only when asked for).
    #[arg(long, value_delimiter = ',', value_parser = parse_outcome)]
    outcome: Vec<Outcome>,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
}

fn parse_outcome(arg: &str) -> Result<Outcome, String> {
    Outcome::ALL
        .into_iter()
        .find(|o| o.name() == arg)
        .ok_or_else(|| {
            let names: Vec<_> = Outcome::ALL.iter().map(|o| o.name()).collect();
            format!("not an outcome; one of {}", names.join(", "))
        })
}

pub fn events(args: EventsArgs) -> Result<(), CliError> {
    let (name, under) = match (&args.name, &args.cgroup) {
        (Some(name), _) => (InstanceName::new(name)?, None),
        (None, Some(cgroup)) => {
            let path = Cgroup::path_of(cgroup)?;
            let relative = format!("/{}", Cgroup::relative(&path)?.display());
            (attached_above(&path)?, Some(relative))
        }
        (None, None) => return Err(CliError::Usage("give --name or --cgroup")),
    };
    let wants = Wants {
        no_match: args.outcome.contains(&Outcome::NoMatch),
    };
    let outcomes: Vec<&str> = args.outcome.iter().map(|o| o.name()).collect();
    if args.count == Some(0) {
        return Ok(());
    }
    let mut left = args.count;
    // Flushed at the end of each batch the reader hands out.
    let mut stdout = io::BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let mut failed: Option<io::Error> = None;
    let sink = |delivery: Delivery| -> bool {
        let wire = match delivery {
            Delivery::Wire(wire) => wire,
            Delivery::Flush => {
                return match stdout.flush() {
                    Ok(()) => true,
                    Err(e) => {
                        if e.kind() != io::ErrorKind::BrokenPipe {
                            failed = Some(e);
                        }
                        false
                    }
                };
            }
        };
        let record = match wire {
            Wire::Record(record) => record,
            Wire::Dropped { dropped: 0 } => return true,
            Wire::Dropped { dropped } => {
                eprintln!("rulebpf events: {dropped} events dropped: this listener fell behind");
                return true;
            }
        };
        if !outcomes.is_empty() && !outcomes.contains(&record.outcome.as_ref()) {
            return true;
        }
        if let Some(under) = &under
            && !(*record.cgroup == **under || record.cgroup.starts_with(&format!("{under}/")))
        {
            return true;
        }
        let written = if args.json {
            serde_json::to_writer(&mut stdout, &record)
                .map_err(io::Error::other)
                .and_then(|()| stdout.write_all(b"\n"))
        } else {
            writeln!(stdout, "{}", EventLine(&record))
        };
        if let Err(e) = written {
            // A closed pipe (`| head`) ends the listener quietly.
            if e.kind() != io::ErrorKind::BrokenPipe {
                failed = Some(e);
            }
            return false;
        }
        if let Some(left) = &mut left {
            *left -= 1;
            if *left == 0 {
                let _ = stdout.flush();
                return false;
            }
        }
        true
    };
    let ready = |role: events::Role| {
        eprintln!("rulebpf events: listening to instance {name} ({role})");
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    runtime.block_on(events::listen(&name, wants, sink, ready))?;
    match failed {
        Some(e) => Err(CliError::Output(e)),
        None => Ok(()),
    }
}

/// The instance attached to `cgroup` or to the nearest cgroup above it.
fn attached_above(cgroup: &std::path::Path) -> Result<InstanceName, CliError> {
    let instances = Instance::all()?;
    let mut best: Option<(usize, InstanceName)> = None;
    for instance in &instances {
        let Ok(record) = instance.record() else {
            continue;
        };
        for attachment in &record.attachments {
            let depth = attachment.cgroup.components().count();
            if cgroup.starts_with(&attachment.cgroup)
                && best.as_ref().is_none_or(|(d, _)| depth > *d)
            {
                best = Some((depth, instance.name().clone()));
            }
        }
    }
    best.map(|(_, name)| name).ok_or(CliError::Usage(
        "no instance is attached to that cgroup or above it",
    ))
}
