//! `rulebpf`: the command line. Thin glue over the library; see `--help`.

use std::{
    io::{self, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand, ValueEnum};
use rulebpf_common::Protocol;
use rulebpf_loader::{
    cgroup::{Cgroup, CgroupError},
    features::Support,
    instance::{Instance, InstanceError},
    object::{LoadOptions, Policy},
    probe::{self, EnterError},
    report::{self, StatusRow},
    service::{self, ServiceError},
    with_causes,
};
use rulebpf_rules::ruleset::{RuleFileError, RuleSet};

/// The rule syntax, shown by `--help` and `check --help`.
const RULE_SYNTAX: &str = "\
Rules (one per line, in file order; the first rule that matches decides):

    [!] DEST_IP DEST_PORTS : ORG_PORTS [PROTOCOL]

    10.*.*.*       21,2200-2300 : 64000-64100     FTP to 10/8 from 64000-64100
    ! 10.0.0.0/8   *            : 42000-43000 tcp+udp
                                                  everything else leaving 10/8

DEST_IP: IPv4 address, octet pattern (10.*.5.*), prefix (10.0.0.0/8), IPv6
address or prefix, or a DNS name. DEST_PORTS: port, range, `*` or a list
without blanks (389,636). ORG_PORTS: port, range, or 0 (the OS chooses).
PROTOCOL: tcp (default), udp or tcp+udp. `!` negates the destination.";

/// Origin (source) ports for outgoing TCP connections and connected UDP
/// sockets, IPv4 and IPv6, chosen in the kernel by tcpoport.ini rules for
/// every program in a cgroup.
#[derive(Parser)]
#[command(
    name = "rulebpf",
    version,
    about,
    long_about = None,
    after_long_help = format!("{RULE_SYNTAX}\n\nExit status: 0 success, 1 runtime failure, 2 bad input or usage."),
)]
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

impl From<ProtocolArg> for Protocol {
    fn from(arg: ProtocolArg) -> Self {
        match arg {
            ProtocolArg::Tcp => Protocol::Tcp,
            ProtocolArg::Udp => Protocol::Udp,
        }
    }
}

/// What the hook does when no port of a rule's range is free.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PolicyArg {
    /// connect() fails with EADDRNOTAVAIL.
    Strict,
    /// The OS chooses the port, as if no rule matched.
    Fallback,
}

impl From<PolicyArg> for Policy {
    fn from(arg: PolicyArg) -> Self {
        match arg {
            PolicyArg::Strict => Policy::Strict,
            PolicyArg::Fallback => Policy::Fallback,
        }
    }
}

const RULES_HELP: &str = "The rule file (tcpoport.ini): one rule per line, \
    `[!] DEST_IP DEST_PORTS : ORG_PORTS [PROTOCOL]` (see `rulebpf --help`)";
const CGROUP_HELP: &str = "cgroup v2 directory: absolute, or relative to the cgroup2 mount \
    (e.g. system.slice/gateway.service)";

#[derive(Subcommand)]
enum Command {
    /// Parse and compile a rule file; print a summary or every error
    /// (`file:line:col: message`). Changes nothing.
    #[command(after_long_help = RULE_SYNTAX)]
    Check {
        #[arg(help = RULES_HELP)]
        rules: PathBuf,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show which rule decides a destination, and the origin ports it gives.
    Explain {
        #[arg(help = RULES_HELP)]
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
        #[arg(long, help = CGROUP_HELP)]
        cgroup: PathBuf,
        /// When no origin port of a rule's range is free.
        #[arg(long, value_enum, default_value_t = PolicyArg::Strict)]
        policy: PolicyArg,
        #[arg(help = RULES_HELP)]
        rules: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Foreground service: attach (or adopt what is pinned), reload on file
    /// change or SIGHUP, re-resolve DNS names, print the kernel log. The rules
    /// stay in force when it exits (unless --detach-on-exit).
    Run {
        #[arg(long, help = CGROUP_HELP)]
        cgroup: PathBuf,
        /// When no origin port of a rule's range is free.
        #[arg(long, value_enum, default_value_t = PolicyArg::Strict)]
        policy: PolicyArg,
        /// Re-resolve DNS names this often (`30s`, `5m`, `1h`).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        dns_refresh: std::time::Duration,
        /// error, warn, info, debug (one kernel line per connect) or trace.
        #[arg(long, default_value = "info")]
        log_level: log::LevelFilter,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9464).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Remove the rules when the service stops.
        #[arg(long)]
        detach_on_exit: bool,
        #[arg(help = RULES_HELP)]
        rules: PathBuf,
    },
    /// Remove the hook from a cgroup, with all its pinned objects (also for
    /// a cgroup that no longer exists).
    Detach {
        #[arg(long, help = CGROUP_HELP)]
        cgroup: PathBuf,
    },
    /// List attached instances: what is in force, the rule file, the
    /// programs, the last reload, the service managing it.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Connect from inside a cgroup, as the service would, and print the
    /// origin port each connection got (or the error). Exits 1 when a
    /// connect failed.
    Probe {
        #[arg(long, help = CGROUP_HELP)]
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
    /// What this kernel offers that rulebpf relies on (probed, not guessed),
    /// and where cgroup v2 is mounted.
    Kernel {
        #[arg(long)]
        json: bool,
    },
    /// Per-rule counters: connects matched, ports bound, ranges exhausted.
    Stats {
        /// Only this cgroup's instance (cgroup v2 directory, absolute or
        /// relative to the cgroup2 mount).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// Everything a command can fail with; [`exit_code`] sorts it.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Rules(#[from] RuleFileError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Enter(#[from] EnterError),
    #[error("{failed} of {count} connects failed")]
    ProbeFailed { failed: usize, count: usize },
    #[error(
        "internal error: the compiled lookup chose rule {compiled:?}, first match chose \
         {reference:?}; please report"
    )]
    LookupMismatch {
        compiled: Option<u32>,
        reference: Option<usize>,
    },
    #[error("starting the service's runtime")]
    Runtime(#[source] io::Error),
    #[error("writing the output")]
    Output(#[from] io::Error),
}

/// 2 for what the user gave us (a bad file, a path that is no cgroup),
/// 1 for a failure while acting on valid input.
fn exit_code(error: &CliError) -> u8 {
    let bad_cgroup = |e: &CgroupError| e.is_bad_input();
    let bad = match error {
        CliError::Rules(_) | CliError::Service(ServiceError::Rules(_)) => true,
        CliError::Cgroup(e)
        | CliError::Instance(InstanceError::Cgroup(e))
        | CliError::Service(ServiceError::Instance(InstanceError::Cgroup(e))) => bad_cgroup(e),
        _ => false,
    };
    if bad { 2 } else { 1 }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        // One-shot commands: warnings (a kernel feature missing, ...) as
        // `warning: ...` lines on stderr; `run` sets up its own logger.
        env_logger::Builder::new()
            .filter_level(log::LevelFilter::Warn)
            .format(|out, record| {
                let level = record.level().as_str().to_ascii_lowercase();
                writeln!(out, "{level}: {}", record.args())
            })
            .init();
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`rulebpf stats | head -1`) is the reader's choice.
        Err(CliError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            // Bad input speaks for itself (`file:line:col: ...`); a runtime
            // failure says who failed. Writing to a closed stderr must not
            // panic either.
            let prefix = if code == 2 { "" } else { "rulebpf: " };
            let _ = writeln!(io::stderr(), "{prefix}{}", with_causes(&e));
            ExitCode::from(code)
        }
    }
}

fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Check { rules, json } => {
            let set = load(&rules)?;
            report::print(&report::Summary::of(&set), json)?;
        }
        Command::Explain {
            rules,
            destination,
            protocol,
            json,
        } => {
            let set = load(&rules)?;
            report::print(&explain(&set, destination, protocol.into())?, json)?;
        }
        Command::Attach {
            cgroup,
            policy,
            rules,
            json,
        } => {
            let cgroup = Cgroup::resolve(&cgroup)?;
            let set = load(&rules)?;
            let options = LoadOptions {
                policy: policy.into(),
                kernel_log: log::LevelFilter::Off,
            };
            let applied = Instance::of(&cgroup).apply(&cgroup, &set, options)?;
            report::print(&report::AttachReport::of(&set, &applied), json)?;
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
                cgroup: Cgroup::resolve(&cgroup)?,
                rules_path: rules,
                load: LoadOptions {
                    policy: policy.into(),
                    kernel_log: log_level,
                },
                dns_refresh,
                metrics_listen,
                detach_on_exit,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(CliError::Runtime)?
                .block_on(service::run(options))?;
        }
        Command::Detach { cgroup } => {
            let detached = match Instance::find(&cgroup)? {
                Some(instance) => instance.detach()?,
                None => false,
            };
            let what = if detached {
                "detached from"
            } else {
                "nothing attached to"
            };
            writeln!(io::stdout(), "{what} {}", cgroup.display())?;
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
            let cgroup = Cgroup::resolve(&cgroup)?;
            probe::enter(&cgroup)?;
            let outcomes = probe::run(&probe::Probe {
                dest: destination,
                protocol: protocol.into(),
                dual_stack,
                count,
                hold,
                bind_port,
            });
            let report = report::ProbeReport {
                destination,
                outcomes,
            };
            report::print(&report, json)?;
            match report.failures() {
                0 => {}
                failed => {
                    return Err(CliError::ProbeFailed {
                        failed,
                        count: report.outcomes.len(),
                    });
                }
            }
        }
        Command::Status { json } => {
            let rows = Instance::all()?.iter().map(status_row).collect();
            report::print(&report::StatusReport(rows), json)?;
        }
        Command::Kernel { json } => {
            report::print(&report::KernelReport::of(Support::get()), json)?;
        }
        Command::Stats { cgroup, json } => {
            let instances = match &cgroup {
                Some(arg) => vec![
                    Instance::find(arg)?
                        .filter(Instance::is_attached)
                        .ok_or_else(|| InstanceError::NotAttached(arg.clone()))?,
                ],
                None => Instance::all()?
                    .into_iter()
                    .filter(Instance::is_attached)
                    .collect(),
            };
            let mut out = Vec::new();
            for instance in instances {
                let (state, rows) = instance.stats()?;
                out.push(report::InstanceStats::of(&state, rows));
            }
            report::print(&report::StatsReport(out), json)?;
        }
    }
    Ok(())
}

/// Reads, parses, resolves and compiles a rule file, and warns on stderr
/// about names that did not resolve.
fn load(path: &Path) -> Result<RuleSet, CliError> {
    let set = RuleSet::load(path)?;
    let mut stderr = io::stderr().lock();
    for warning in report::name_warnings(&set) {
        let _ = writeln!(stderr, "{warning}");
    }
    Ok(set)
}

/// The deciding rule for `destination`, computed twice: as the hook does and
/// by the reference first match; they must agree.
fn explain(
    set: &RuleSet,
    destination: SocketAddr,
    protocol: Protocol,
) -> Result<report::Explanation, CliError> {
    let (addr, port) = (destination.ip(), destination.port());
    let compiled = set.compiled.lookup(protocol, addr, port).map(|v| v.rule);
    let reference = rulebpf_rules::first_match(&set.rules, &set.names, protocol, addr, port);
    if compiled.map(|r| r as usize) != reference {
        return Err(CliError::LookupMismatch {
            compiled,
            reference,
        });
    }
    let matched_as = rulebpf_rules::rule::canonical(addr);
    Ok(report::Explanation::of(
        set,
        destination,
        protocol,
        matched_as,
        reference,
    ))
}

/// `status` for one instance: a state file that cannot be read is shown as
/// such, not an error for every instance.
fn status_row(instance: &Instance) -> StatusRow {
    let (state, state_error) = match instance.state() {
        Ok(state) => (state, None),
        Err(e) => (None, Some(with_causes(&e))),
    };
    StatusRow {
        cgroup_id: instance.cgroup_id,
        attached: instance.is_attached(),
        cgroup_exists: state.as_ref().map(|s| cgroup_is(&s.cgroup, s.cgroup_id)),
        state,
        state_error,
    }
}

/// Whether `path` is still the cgroup with id `id`.
fn cgroup_is(path: &Path, id: u64) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.ino() == id)
}
