//! `rulebpf run`: the foreground service (see `rulebpf_loader::service`).

use std::net::SocketAddr;

use rulebpf_loader::{
    service::{self, events::log_file::EventsLog},
    sys::cgroup::Cgroup,
};

use super::{
    CliError,
    args::{PortArgs, RulesArgs, WhereArgs},
    instance_name,
};

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    at: WhereArgs,
    #[command(flatten)]
    ports: PortArgs,
    /// Re-resolve DNS names this often (`30s`, `5m`, `1h`).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    dns_refresh: std::time::Duration,
    /// error, warn, info, debug (one kernel line per connect) or trace.
    #[arg(long, default_value = "info")]
    pub log_level: log::LevelFilter,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Write every decision (one JSON object per line, as `rulebpf events
    /// --json`) to this file, rotated by size; `stderr` writes them to
    /// standard error (the journal, under systemd).
    #[arg(long)]
    events_log: Option<String>,
    /// Rotate the events log before it grows past this size (bytes, or
    /// with K, M, G).
    #[arg(long, value_parser = super::args::parse_size, default_value = "64M")]
    events_log_size: u64,
    /// Rotated events logs kept (PATH.1 is the newest).
    #[arg(long, default_value_t = 5)]
    events_log_keep: u32,
    /// Remove the rules when the service stops.
    #[arg(long)]
    detach_on_exit: bool,
    #[command(flatten)]
    rules: RulesArgs,
}

pub fn run(args: RunArgs) -> Result<(), CliError> {
    super::service_logger(args.log_level);
    let ports = args.ports;
    let options = service::Options {
        name: instance_name(&args.at)?,
        cgroups: args
            .at
            .cgroup
            .iter()
            .map(|c| Cgroup::path_of(c))
            .collect::<Result<_, _>>()?,
        rules_path: args.rules.rules,
        settings: ports.settings(),
        kernel_log: args.log_level,
        reserve_ports: ports.reserve_ports,
        tuple_capacity: ports.tuple_capacity,
        limits: args.rules.limits.into(),
        dns_refresh: args.dns_refresh,
        metrics_listen: args.metrics_listen,
        detach_on_exit: args.detach_on_exit,
        events_log: args
            .events_log
            .as_deref()
            .map(|arg| EventsLog::parse(arg, args.events_log_size, args.events_log_keep)),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    let result = runtime.block_on(service::run(options));
    // A reload may still run on a blocking thread: it is safe to stop it
    // (the instance is crash-consistent), not to wait for it.
    runtime.shutdown_background();
    Ok(result?)
}
