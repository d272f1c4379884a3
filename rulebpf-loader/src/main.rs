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
    ephemeral,
    features::Support,
    instance::{self, Instance, InstanceError},
    name::{InstanceName, NameError},
    object::{LoadOptions, Policy, PortArgs, Sharing},
    oci::{self, HookAction, OciError},
    probe::{self, EnterError},
    report::{self, StatusRow},
    service::{self, ServiceError},
    state::AttachedBy,
    systemd, with_causes,
};
use rulebpf_rules::{
    LoadLimits,
    compile::Budget,
    resolve::Names,
    ruleset::{RuleFileError, RuleSet},
};

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
const NAME_HELP: &str = "The instance's name (letters, digits, `_.:@-`); default: derived \
    from the one --cgroup, as `systemd-escape --path` does";
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
        #[command(flatten)]
        limits: LimitArgs,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show which rule decides a destination, and the origin ports it gives.
    Explain {
        #[arg(help = RULES_HELP)]
        rules: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
        /// Destination as IPv4:PORT or [IPv6]:PORT, e.g. 10.1.2.3:21,
        /// [2001:db8::10]:443, [::ffff:10.1.2.3]:21.
        destination: SocketAddr,
        /// The connecting socket's protocol.
        #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp)]
        protocol: ProtocolArg,
        #[arg(long)]
        json: bool,
    },
    /// Put rules in force in an instance and attach it to cgroups. They stay
    /// in force after this command exits; attaching again swaps the rules
    /// atomically, and every cgroup of the instance follows.
    Attach {
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
    },
    /// Foreground service: keep an instance's rules current (reload on file
    /// change or SIGHUP, re-resolve DNS names), follow its cgroup paths
    /// (re-attach when a unit restarts), print the kernel log. The rules
    /// stay in force when it exits (unless --detach-on-exit).
    Run {
        #[arg(long, help = NAME_HELP)]
        name: Option<String>,
        /// Attach to this cgroup path and follow it (repeatable). cgroup v2
        /// directory: absolute, or relative to the cgroup2 mount; it may not
        /// exist yet.
        #[arg(long)]
        cgroup: Vec<PathBuf>,
        /// When no origin port of a rule's range is free.
        #[arg(long, value_enum, default_value_t = PolicyArg::Strict)]
        policy: PolicyArg,
        #[command(flatten)]
        ports: PortArgs,
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
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Remove rules: from one cgroup (every rulebpf hook on it, whichever
    /// instance; also for a cgroup that no longer exists), or a whole
    /// instance with all its pinned objects.
    Detach {
        #[arg(long, help = NAME_HELP)]
        name: Option<String>,
        #[arg(long, help = CGROUP_HELP)]
        cgroup: Option<PathBuf>,
        /// Change an instance that `rulebpf run` manages (it will notice).
        #[arg(long)]
        force: bool,
    },
    /// Remove what gone cgroups left behind: attachments of cgroups that no
    /// longer exist (or were re-created), and their instances when nothing
    /// else is left of them.
    Gc,
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
        /// With --hold: keep the connections open until standard input
        /// ends, so that a script decides when they close.
        #[arg(long, requires = "hold")]
        hold_until_eof: bool,
        /// Close each TCP connection at once, this side first (it keeps the
        /// TIME_WAIT), instead of waiting up to 2 s for the peer to close.
        #[arg(long)]
        close_first: bool,
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
        /// Only this instance.
        #[arg(long)]
        name: Option<String>,
        /// Only the instances attached to this cgroup (cgroup v2 directory,
        /// absolute or relative to the cgroup2 mount).
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Give a systemd service the rules of instance NAME at every start:
    /// writes <DIR>/<UNIT>.d/50-rulebpf-<NAME>.conf (BPFProgram= for the
    /// instance's pinned entry programs, an ExecStartPre= that attaches them
    /// in the service's new cgroup and refuses the start when it cannot,
    /// Wants=/After=rulebpf@NAME.service). Then run `systemctl daemon-reload`
    /// and `systemctl restart UNIT`. UNIT is a .service (a template
    /// foo@.service covers all its instances). Writing again replaces the
    /// file; delete it to undo.
    SystemdDropin {
        /// The rules instance (rulebpf@NAME.service, /etc/rulebpf/NAME.ini).
        #[arg(long)]
        name: String,
        /// The service, e.g. gateway.service.
        unit: String,
        /// Where unit drop-ins go.
        #[arg(long, default_value = systemd::SYSTEM_UNIT_DIR)]
        dir: PathBuf,
    },
    /// Attach instance NAME's entry programs to this process's own cgroup
    /// (run by a unit's ExecStartPre=, see systemd-dropin).
    #[command(hide = true)]
    SystemdAttach {
        #[arg(long)]
        name: String,
    },
    /// OCI runtime hook, run by podman or CRI-O from the hooks.d entries in
    /// contrib/oci/ for containers annotated `io.rulebpf.instance=NAME`:
    /// createRuntime attaches instance NAME to the container's cgroup before
    /// its program starts (a failure stops the container), poststop removes
    /// that attachment. Reads the container state JSON on stdin.
    OciHook {
        /// createRuntime or poststop.
        stage: oci::Stage,
    },
}

/// How large a rules file and its compiled maps may be.
#[derive(Clone, Copy, Debug, clap::Args)]
struct LimitArgs {
    /// Refuse a rules file larger than this (bytes, or with K, M, G: 128M).
    #[arg(long, value_parser = parse_size, default_value = "128M")]
    max_file_size: u64,
    /// Refuse rules whose lookup maps would need more kernel memory than
    /// this (bytes, or with K, M, G).
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    max_kernel_memory: u64,
}

impl From<LimitArgs> for LoadLimits {
    fn from(args: LimitArgs) -> Self {
        let defaults = LoadLimits::default();
        LoadLimits {
            max_file_bytes: args.max_file_size,
            compile: Budget {
                max_kernel_bytes: args.max_kernel_memory,
                ..defaults.compile
            },
        }
    }
}

/// `4096`, `64K`, `128M`, `1G` (binary multiples) -> bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 10),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 20),
        Some(b'G' | b'g') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}`: a size is a number, with K, M or G after it"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))
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
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Unit(#[from] systemd::UnitError),
    #[error(transparent)]
    Dropin(#[from] systemd::DropinError),
    #[error("reading /proc/self/cgroup")]
    OwnCgroup(#[source] io::Error),
    #[error("{0}")]
    Usage(&'static str),
    #[error("starting the service's runtime")]
    Runtime(#[source] io::Error),
    #[error("writing the output")]
    Output(#[from] io::Error),
}

/// Whether `error` comes from the kernel refusing an unprivileged caller.
fn lacks_privilege(error: &CliError) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return false;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// 2 for what the user gave us (a bad file, a path that is no cgroup),
/// 1 for a failure while acting on valid input.
fn exit_code(error: &CliError) -> u8 {
    let bad_cgroup = |e: &CgroupError| e.is_bad_input();
    let bad = match error {
        CliError::Rules(_)
        | CliError::Service(ServiceError::Rules(_))
        | CliError::Name(_)
        | CliError::Instance(InstanceError::Name(_))
        | CliError::Usage(_)
        | CliError::Unit(_) => true,
        CliError::Oci(e) => e.is_bad_input(),
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
            if lacks_privilege(&e) {
                let _ = writeln!(
                    io::stderr(),
                    "rulebpf: this needs root (CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN): \
                     the pins in /sys/fs/bpf/rulebpf and the records in /run/rulebpf are root's"
                );
            }
            ExitCode::from(code)
        }
    }
}

fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Check {
            rules,
            limits,
            json,
        } => {
            let set = load(&rules, &limits)?;
            warn_ports(&set, Sharing::On, false);
            report::print(&report::Summary::of(&set), json)?;
        }
        Command::Explain {
            rules,
            limits,
            destination,
            protocol,
            json,
        } => {
            let set = load(&rules, &limits)?;
            report::print(&explain(&set, destination, protocol.into())?, json)?;
        }
        Command::Attach {
            name,
            cgroup,
            policy,
            ports,
            force,
            rules,
            limits,
            json,
        } => {
            let name = instance_name(name.as_deref(), &cgroup)?;
            let cgroups = cgroup
                .iter()
                .map(|c| Cgroup::resolve(c))
                .collect::<Result<Vec<_>, _>>()?;
            let set = load(&rules, &limits)?;
            let options = LoadOptions {
                policy: policy.into(),
                kernel_log: log::LevelFilter::Off,
                sharing: ports.port_sharing,
                app_bound: ports.app_bound,
            };
            warn_ports(&set, ports.port_sharing, ports.reserve_ports);
            let existed = Instance::open(&name)?.is_some();
            let instance = Instance::create_with(&name, ports.tuple_capacity)?;
            instance.check_unmanaged(force)?;
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
            report::print(&report, json)?;
        }
        Command::Run {
            name,
            cgroup,
            policy,
            ports,
            dns_refresh,
            log_level,
            metrics_listen,
            detach_on_exit,
            rules,
            limits,
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
                name: instance_name(name.as_deref(), &cgroup)?,
                cgroups: cgroup
                    .iter()
                    .map(|c| Cgroup::path_of(c))
                    .collect::<Result<_, _>>()?,
                rules_path: rules,
                load: LoadOptions {
                    policy: policy.into(),
                    kernel_log: log_level,
                    sharing: ports.port_sharing,
                    app_bound: ports.app_bound,
                },
                reserve_ports: ports.reserve_ports,
                tuple_capacity: ports.tuple_capacity,
                limits: limits.into(),
                dns_refresh,
                metrics_listen,
                detach_on_exit,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(CliError::Runtime)?;
            let result = runtime.block_on(service::run(options));
            // A reload may still run on a blocking thread: it is safe to
            // stop it (the instance is crash-consistent), not to wait for it.
            runtime.shutdown_background();
            result?;
        }
        Command::Detach {
            name,
            cgroup,
            force,
        } => detach(name.as_deref(), cgroup.as_deref(), force)?,
        Command::Gc => {
            for line in gc()? {
                writeln!(io::stdout(), "{line}")?;
            }
        }
        Command::Probe {
            cgroup,
            destination,
            protocol,
            dual_stack,
            count,
            hold,
            hold_until_eof,
            close_first,
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
                hold_until_eof,
                close_first,
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
        Command::OciHook { stage } => oci_hook(stage)?,
        Command::SystemdDropin { name, unit, dir } => {
            let name = InstanceName::new(&name)?;
            let service = systemd::ServiceName::new(&unit)?;
            let path = systemd::write_dropin(&dir, &name, &service)?;
            let mut out = io::stdout().lock();
            writeln!(out, "wrote {}", path.display())?;
            writeln!(
                out,
                "next: systemctl enable --now rulebpf@{name} (rules in /etc/rulebpf/{name}.ini), \
                 systemctl daemon-reload, systemctl restart {unit}"
            )?;
        }
        Command::SystemdAttach { name } => {
            let name = InstanceName::new(&name)?;
            let instance = Instance::open(&name)?.ok_or(InstanceError::NoInstance(name))?;
            let cgroup = Cgroup::resolve(&own_cgroup()?)?;
            instance.attach_for_unit(&cgroup)?;
        }
        Command::Kernel { json } => {
            report::print(&report::KernelReport::of(Support::get()), json)?;
        }
        Command::Stats { name, cgroup, json } => {
            let mut instances = Instance::all()?;
            if let Some(name) = &name {
                let name = InstanceName::new(name)?;
                instances.retain(|i| *i.name() == name);
                if instances.is_empty() {
                    return Err(InstanceError::NoInstance(name).into());
                }
            }
            if let Some(arg) = &cgroup {
                let path = Cgroup::path_of(arg)?;
                instances.retain(|i| {
                    i.record()
                        .is_ok_and(|r| r.attachments.iter().any(|a| a.cgroup == path))
                });
                if instances.is_empty() {
                    return Err(InstanceError::NotAttached(arg.display().to_string()).into());
                }
            }
            let mut out = Vec::new();
            for instance in instances {
                match instance.stats() {
                    Ok((set, rows)) => out.push(
                        report::InstanceStats::of(instance.name().clone(), &set, rows)
                            .with_counters(instance.counters().unwrap_or_default()),
                    ),
                    Err(InstanceError::NoRules(_)) if name.is_none() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            report::print(&report::StatsReport(out), json)?;
        }
    }
    Ok(())
}

/// Reads, parses, resolves and compiles a rule file, and warns on stderr
/// about names that did not resolve.
fn load(path: &Path, limits: &LimitArgs) -> Result<RuleSet, CliError> {
    let set = RuleSet::load_within(path, &Names::new(), &(*limits).into())?;
    let mut stderr = io::stderr().lock();
    for warning in report::name_warnings(&set) {
        let _ = writeln!(stderr, "{warning}");
    }
    Ok(set)
}

/// Warns on stderr about origin ranges the kernel may hand out as ephemeral
/// ports, and TCP timestamps off with sharing (see `ephemeral`).
fn warn_ports(set: &RuleSet, sharing: Sharing, reserving: bool) {
    let mut stderr = io::stderr().lock();
    for warning in ephemeral::warnings(set, sharing == Sharing::On, reserving) {
        let _ = writeln!(stderr, "warning: {warning}");
    }
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

/// The instance a command is about: `--name`, or the name derived from the
/// one `--cgroup`.
fn instance_name(name: Option<&str>, cgroups: &[PathBuf]) -> Result<InstanceName, CliError> {
    match (name, cgroups) {
        (Some(name), _) => Ok(InstanceName::new(name)?),
        (None, [cgroup]) => {
            let path = Cgroup::path_of(cgroup)?;
            Ok(InstanceName::for_cgroup(&Cgroup::relative(&path)?)?)
        }
        (None, _) => Err(CliError::Usage(
            "give the instance a --name (or exactly one --cgroup to name it after)",
        )),
    }
}

/// `rulebpf detach`: a whole instance (`--name`), an instance's attachment
/// to one cgroup (`--name` and `--cgroup`), or every rulebpf hook on one
/// cgroup (`--cgroup`).
fn detach(name: Option<&str>, cgroup: Option<&Path>, force: bool) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    let path = cgroup.map(Cgroup::path_of).transpose()?;
    let instances = match name {
        Some(name) => {
            let name = InstanceName::new(name)?;
            match Instance::open(&name)? {
                Some(instance) => vec![instance],
                None if path.is_none() => {
                    writeln!(out, "no instance named {name}")?;
                    return Ok(());
                }
                None => vec![],
            }
        }
        None => Instance::all()?,
    };
    let Some(path) = path else {
        // The whole instance.
        let instance = instances.into_iter().next().expect("one instance");
        instance.check_unmanaged(force)?;
        let name = instance.name().clone();
        instance.remove()?;
        writeln!(out, "removed instance {name}")?;
        return Ok(());
    };
    let derived = Cgroup::relative(&path)
        .ok()
        .and_then(|rel| InstanceName::for_cgroup(&rel).ok());
    let mut detached = false;
    for instance in instances {
        let recorded = instance
            .record()?
            .attachments
            .iter()
            .any(|a| a.cgroup == path);
        if !recorded {
            continue;
        }
        instance.check_unmanaged(force)?;
        detached |= instance.detach_cgroup(&path)?;
        // An instance named after this cgroup has no reason to stay.
        if Some(instance.name()) == derived.as_ref() && instance.record()?.attachments.is_empty() {
            instance.remove()?;
        }
    }
    // The kernel decides what is left: any rulebpf hook still on the
    // cgroup (another instance's, a hidden one, the previous layout's) goes.
    if name.is_none()
        && let Ok(cgroup) = Cgroup::resolve(&path)
    {
        detached |= instance::clear_cgroup(&cgroup, None)? > 0;
        detached |= instance::remove_legacy(cgroup.id)?;
    }
    let what = if detached {
        "detached from"
    } else {
        "nothing attached to"
    };
    let shown = cgroup.expect("a cgroup").display();
    writeln!(out, "{what} {shown}")?;
    Ok(())
}

/// `rulebpf gc`: what gone cgroups left behind, removed; one line each.
fn gc() -> Result<Vec<String>, CliError> {
    let mut lines = Vec::new();
    for instance in Instance::all()? {
        let removed = instance.collect_garbage()?;
        for attachment in &removed {
            lines.push(format!(
                "instance {}: removed the attachment to {} (cgroup id {}, gone)",
                instance.name(),
                attachment.cgroup.display(),
                attachment.cgroup_id
            ));
        }
        let named_after_gone = removed.iter().any(|a| {
            Cgroup::relative(&a.cgroup)
                .ok()
                .and_then(|rel| InstanceName::for_cgroup(&rel).ok())
                .as_ref()
                == Some(instance.name())
        });
        if named_after_gone
            && instance.record()?.attachments.is_empty()
            && instance.managed_by()?.is_none()
        {
            let name = instance.name().clone();
            instance.remove()?;
            lines.push(format!("removed instance {name} (its cgroup is gone)"));
        }
    }
    for id in instance::collect_legacy_garbage(cgroup_exists)? {
        lines.push(format!(
            "removed cg-{id} of the previous layout (its cgroup is gone)"
        ));
    }
    let orphans = instance::collect_orphan_records()?;
    if !orphans.is_empty() {
        lines.push(format!(
            "removed {} record director{} with no pins",
            orphans.len(),
            if orphans.len() == 1 { "y" } else { "ies" }
        ));
    }
    if lines.is_empty() {
        lines.push("nothing to collect".into());
    }
    Ok(lines)
}

/// Whether a cgroup with id `id` exists (a slow walk; only for `gc`).
fn cgroup_exists(id: u64) -> bool {
    fn walk(dir: &Path, id: u64) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        entries.flatten().any(|e| {
            e.file_type().is_ok_and(|t| t.is_dir())
                && (e.metadata().is_ok_and(|m| m.ino() == id) || walk(&e.path(), id))
        })
    }
    rulebpf_loader::cgroup::cgroup2_mount().is_ok_and(|root| walk(&root, id))
}

/// `status` for one instance: what the kernel has in force and where, and
/// what could not be read (one bad record does not hide the others).
fn status_row(instance: &Instance) -> StatusRow {
    let mut errors = Vec::new();
    let record = instance.record().unwrap_or_else(|e| {
        errors.push(with_causes(&e));
        Default::default()
    });
    let in_force = instance.in_force().unwrap_or_else(|e| {
        errors.push(with_causes(&e));
        Default::default()
    });
    let managed_by = instance.managed_by().unwrap_or_else(|e| {
        errors.push(with_causes(&e));
        None
    });
    let attachments = record
        .attachments
        .iter()
        .map(|a| report::AttachmentRow {
            attachment: a.clone(),
            standing: instance.standing(a),
        })
        .collect();
    let occupancy = match (&in_force.set, instance.occupancy()) {
        (Some(set), Ok(occupancy)) => rulebpf_loader::stats::occupied(&set.rules, &occupancy),
        (_, Err(e)) => {
            errors.push(with_causes(&e));
            vec![]
        }
        (None, _) => vec![],
    };
    let damage = instance.damage();
    StatusRow {
        name: instance.name().clone(),
        damage,
        entry: record.entry,
        rule_set: in_force.set,
        mixed: in_force.mixed,
        attachments,
        managed_by,
        service: record.service,
        occupancy,
        error: (!errors.is_empty()).then(|| errors.join("; ")),
    }
}

/// `rulebpf oci-hook STAGE`: what [`oci::plan`] decided, done with the
/// instance API.
fn oci_hook(stage: oci::Stage) -> Result<(), CliError> {
    let state = oci::read_state(io::stdin().lock())?;
    match oci::plan(stage, &state, &oci::System)? {
        HookAction::Attach {
            instance,
            cgroup,
            container,
        } => {
            let opened = Instance::open(&instance)?.ok_or(InstanceError::NoInstance(instance))?;
            let cgroup = Cgroup::resolve(&cgroup)?;
            opened.attach(
                &cgroup,
                rulebpf_loader::state::AttachedBy::Container { id: container },
            )?;
        }
        HookAction::Detach {
            instance,
            container,
        } => {
            // The instance may have been removed meanwhile: nothing to undo.
            if let Some(opened) = Instance::open(&instance)? {
                let by = rulebpf_loader::state::AttachedBy::Container { id: container };
                for attachment in opened.record()?.attachments {
                    if attachment.by == by {
                        opened.detach_id(attachment.cgroup_id)?;
                    }
                }
            }
        }
        HookAction::Nothing(_) => {}
    }
    Ok(())
}

/// This process's cgroup v2 directory, from /proc/self/cgroup (`0::/path`).
fn own_cgroup() -> Result<PathBuf, CliError> {
    let text = std::fs::read_to_string("/proc/self/cgroup").map_err(CliError::OwnCgroup)?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| CliError::OwnCgroup(io::Error::other("no cgroup v2 line (0::)")))?;
    Ok(Cgroup::path_of(Path::new(
        relative.trim_start_matches('/'),
    ))?)
}
