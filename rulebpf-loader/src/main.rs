//! `rulebpf`: the command line. Thin glue over the library; see `--help`.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use rulebpf_loader::{
    cgroup::Cgroup,
    features,
    instance::Instance,
    maps::{LoadOptions, Policy},
    probe, report, service,
};
use rulebpf_rules::ruleset::{RuleFileError, RuleSet};

/// Origin (source) ports for outgoing TCP connections, chosen in the kernel
/// by tcpoport.ini rules, for every program in a cgroup.
///
/// Exit status: 0 success, 1 runtime failure, 2 bad input or usage.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A socket's protocol, as the commands take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ProtocolArg {
    Tcp,
    Udp,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and compile a rule file; print a summary or every error
    /// (`file:line:col: message`).
    Check {
        rules: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show which rule decides a destination, and the origin ports it gives.
    Explain {
        rules: PathBuf,
        /// Destination as IPv4:PORT or [IPv6]:PORT, e.g. 10.1.2.3:21,
        /// [2001:db8::10]:443, [::ffff:10.1.2.3]:21.
        destination: SocketAddr,
        /// The connecting socket's protocol.
        #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp)]
        protocol: ProtocolArg,
        #[arg(long)]
        json: bool,
    },
    /// Load the rules and attach them to a cgroup. They stay in force after
    /// this command exits; attaching again swaps the rules atomically.
    Attach {
        /// cgroup v2 directory: absolute, or relative to the cgroup2 mount.
        #[arg(long)]
        cgroup: PathBuf,
        /// When no origin port of a rule's range is free: `strict` fails
        /// connect() with EADDRNOTAVAIL, `fallback` lets the OS choose.
        #[arg(long, value_enum, default_value_t = Policy::Strict)]
        policy: Policy,
        rules: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Foreground service: attach (or adopt what is pinned), reload on file
    /// change or SIGHUP, re-resolve DNS names, print the kernel log. The rules
    /// stay in force when it exits (unless --detach-on-exit).
    Run {
        #[arg(long)]
        cgroup: PathBuf,
        #[arg(long, value_enum, default_value_t = Policy::Strict)]
        policy: Policy,
        /// Re-resolve DNS names this often (`30s`, `5m`, `1h`).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        dns_refresh: std::time::Duration,
        /// error, warn, info, debug (one kernel line per connect) or trace.
        #[arg(long, default_value = "info")]
        log_level: log::LevelFilter,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
        /// Remove the rules when the service stops.
        #[arg(long)]
        detach_on_exit: bool,
        rules: PathBuf,
    },
    /// Remove the hook from a cgroup, with all its pinned objects.
    Detach {
        #[arg(long)]
        cgroup: PathBuf,
    },
    /// List attached instances: cgroup, rule file, rule count.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Connect from inside a cgroup, as the service would, and print the
    /// origin port each connection got (or the error).
    Probe {
        #[arg(long)]
        cgroup: PathBuf,
        /// Destination as IPv4:PORT or [IPv6]:PORT.
        destination: SocketAddr,
        /// TCP connections, or connected UDP sockets sending one datagram.
        #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp)]
        protocol: ProtocolArg,
        /// Connect to an IPv4 destination from a dual-stack IPv6 socket
        /// (at ::ffff:a.b.c.d), as Java does.
        #[arg(long)]
        dual_stack: bool,
        /// Number of connections, made one after the other.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Keep all connections open until the last is made (each then needs
        /// its own origin port).
        #[arg(long)]
        hold: bool,
        /// Bind this origin port before connect(), as an application that
        /// chooses its own port does (rulebpf must leave it alone).
        #[arg(long)]
        bind_port: Option<u16>,
        #[arg(long)]
        json: bool,
    },
    /// What this kernel offers that rulebpf relies on (probed, not guessed).
    Kernel {
        #[arg(long)]
        json: bool,
    },
    /// Per-rule counters: connects matched, ports bound, ranges exhausted.
    Stats {
        /// Only this cgroup's instance.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// An error in what the user gave us (exit status 2), as opposed to a
/// failure while acting on valid input (exit status 1).
#[derive(Debug)]
struct BadInput(anyhow::Error);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for BadInput {}

fn bad_input(e: impl Into<anyhow::Error>) -> anyhow::Error {
    BadInput(e.into()).into()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // One-shot commands: warnings (a kernel feature missing, ...) as
        // `warning: ...` lines on stderr; `run` sets up its own logger.
        env_logger::Builder::new()
            .filter_level(log::LevelFilter::Warn)
            .format(|out, record| {
                use std::io::Write as _;
                let level = record.level().as_str().to_ascii_lowercase();
                writeln!(out, "{level}: {}", record.args())
            })
            .init();
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.downcast_ref::<RuleFileError>().is_some() || e.downcast_ref::<BadInput>().is_some()
            {
                eprintln!("{e}");
                ExitCode::from(2)
            } else {
                eprintln!("rulebpf: {e:#}");
                ExitCode::from(1)
            }
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Check { rules, json } => {
            let set = RuleSet::load(&rules)?;
            report::check(&set, json)
        }
        Command::Explain {
            rules,
            destination,
            protocol,
            json,
        } => {
            let set = RuleSet::load(&rules)?;
            report::explain(&set, destination, protocol == ProtocolArg::Udp, json)
        }
        Command::Attach {
            cgroup,
            policy,
            rules,
            json,
        } => {
            let cgroup = Cgroup::resolve(&cgroup).map_err(bad_input)?;
            let set = RuleSet::load(&rules)?;
            let options = LoadOptions {
                policy,
                kernel_log: log::LevelFilter::Off,
            };
            let applied = Instance::of(&cgroup).apply(&cgroup, &set, options)?;
            report::applied(&set, &applied, json)
        }
        Command::Run {
            cgroup,
            policy,
            dns_refresh,
            log_level,
            metrics_listen,
            detach_on_exit,
            rules,
        } => {
            // Our own lines and the hook's (target `rulebpf`) at --log-level;
            // libraries (aya's loader chatter) at warn.
            env_logger::Builder::new()
                .filter_level(log_level.min(log::LevelFilter::Warn))
                .filter_module("rulebpf_loader", log_level)
                .filter_module("rulebpf", log_level)
                .format_timestamp_millis()
                .init();
            let options = service::Options {
                cgroup: Cgroup::resolve(&cgroup).map_err(bad_input)?,
                rules_path: rules,
                load: LoadOptions {
                    policy,
                    kernel_log: log_level,
                },
                dns_refresh,
                metrics_listen,
                detach_on_exit,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(service::run(options))
        }
        Command::Detach { cgroup } => {
            let instance = match Cgroup::resolve(&cgroup) {
                Ok(cg) => Instance::of(&cg),
                // A deleted cgroup: find its instance by the recorded path.
                Err(e) => Instance::by_recorded_path(&cgroup)?.ok_or_else(|| bad_input(e))?,
            };
            if instance.detach()? {
                println!("detached from {}", cgroup.display());
            } else {
                println!("nothing attached to {}", cgroup.display());
            }
            Ok(())
        }
        Command::Probe {
            cgroup,
            destination,
            protocol,
            dual_stack,
            count,
            hold,
            bind_port,
            json,
        } => {
            let cgroup = Cgroup::resolve(&cgroup).map_err(bad_input)?;
            probe::enter(&cgroup)?;
            let outcomes = probe::run(&probe::Probe {
                dest: destination,
                udp: protocol == ProtocolArg::Udp,
                dual_stack,
                count,
                hold,
                bind_port,
            });
            report::probe(destination, &outcomes, json)
        }
        Command::Status { json } => report::status(&Instance::all()?, json),
        Command::Kernel { json } => report::kernel(features::Support::get(), json),
        Command::Stats { cgroup, json } => {
            let instances = match cgroup {
                Some(cg) => vec![Instance::of(&Cgroup::resolve(&cg).map_err(bad_input)?)],
                None => Instance::all()?,
            };
            report::stats(&instances, json)
        }
    }
}
