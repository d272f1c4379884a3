//! The command line: clap's definitions, one file per command, and the
//! dispatch. Nothing below this folder sees clap.

mod args;
mod attach;
mod check;
mod detach;
mod error;
mod events;
mod firewall;
mod nri;
mod probe;
mod run;
mod status;
mod units;

use std::io::{self, Write as _};

use clap::{Parser, Subcommand};
use rulebpf_loader::{
    integrations::oci,
    model::{name::InstanceName, options::Sharing},
    sys::{cgroup::Cgroup, ephemeral, nat},
};
use rulebpf_rules::ruleset::RuleSet;

pub use error::{CliError, exit_code, lacks_privilege};

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
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Parse and compile a rule file; print a summary or every error
    /// (`file:line:col: message`). Changes nothing.
    #[command(after_long_help = RULE_SYNTAX)]
    Check(check::CheckArgs),
    /// Show which rule decides a destination, and the origin ports it gives.
    Explain(check::ExplainArgs),
    /// Print what the perimeter firewall must let through for the paths a
    /// rule file allows (file order and first match kept; denied paths
    /// dropped): an nft table, iptables-restore input, CSV or Markdown.
    Firewall(firewall::FirewallArgs),
    /// Put rules in force in an instance and attach it to cgroups. They stay
    /// in force after this command exits; attaching again swaps the rules
    /// atomically, and every cgroup of the instance follows.
    Attach(attach::AttachArgs),
    /// Foreground service: keep an instance's rules current (reload on file
    /// change or SIGHUP, re-resolve DNS names), follow its cgroup paths
    /// (re-attach when a unit restarts), print the kernel log. The rules
    /// stay in force when it exits (unless --detach-on-exit).
    Run(run::RunArgs),
    /// Remove rules: from one cgroup (every rulebpf hook on it, whichever
    /// instance; also for a cgroup that no longer exists), or a whole
    /// instance with all its pinned objects.
    Detach(detach::DetachArgs),
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
    Probe(probe::ProbeArgs),
    /// What this kernel offers that rulebpf relies on (probed, not guessed),
    /// and where cgroup v2 is mounted.
    Kernel {
        #[arg(long)]
        json: bool,
    },
    /// Per-rule counters: connects matched, ports bound, ranges exhausted.
    Stats(status::StatsArgs),
    /// The hooks' decisions as they happen, one per connect(): who (pid,
    /// comm, uid, cgroup), where to, the origin port, the rule and the
    /// outcome. Any number of listeners; whether or not `run` manages the
    /// instance.
    Events(events::EventsArgs),
    /// Give a systemd service the rules of instance NAME at every start:
    /// writes <DIR>/<UNIT>.d/50-rulebpf-<NAME>.conf (BPFProgram= for the
    /// instance's pinned entry programs, an ExecStartPre= that attaches them
    /// in the service's new cgroup and refuses the start when it cannot,
    /// Wants=/After=rulebpf@NAME.service). Then run `systemctl daemon-reload`
    /// and `systemctl restart UNIT`. UNIT is a .service (a template
    /// foo@.service covers all its instances). Writing again replaces the
    /// file; delete it to undo.
    SystemdDropin(units::DropinArgs),
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
    /// Kubernetes: an NRI plugin of the container runtime (containerd 1.7+
    /// with NRI enabled, CRI-O 1.26+). A pod annotated
    /// `io.rulebpf.instance: NAME` gets instance NAME on its cgroup before
    /// any of its containers runs (an annotated pod whose rules cannot be
    /// put in force is refused); running pods are handled when the plugin
    /// connects; a removed pod's attachment goes. Create the instances
    /// first (`rulebpf attach --name NAME RULES`, or `rulebpf run`).
    Nri(nri::NriArgs),
}

/// Runs one command.
pub fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Check(args) => check::check(args),
        Command::Explain(args) => check::explain(args),
        Command::Firewall(args) => firewall::firewall(args),
        Command::Attach(args) => attach::attach(args),
        Command::Run(args) => run::run(args),
        Command::Detach(args) => detach::detach(args),
        Command::Gc => detach::gc(),
        Command::Status { json } => status::status(json),
        Command::Probe(args) => probe::probe(args),
        Command::Kernel { json } => status::kernel(json),
        Command::Stats(args) => status::stats(args),
        Command::Events(args) => events::events(args),
        Command::SystemdDropin(args) => units::dropin(args),
        Command::SystemdAttach { name } => units::attach_own_cgroup(&name),
        Command::OciHook { stage } => units::oci_hook(stage),
        Command::Nri(args) => nri::nri(args),
    }
}

/// The logger of the long-running commands (`run`, `nri`): rulebpf's own
/// lines and the hook's (target `rulebpf`) at `level`, libraries' (aya's
/// loader chatter) at warn, with millisecond timestamps.
fn service_logger(level: log::LevelFilter) {
    env_logger::Builder::new()
        .filter_level(level.min(log::LevelFilter::Warn))
        .filter_module("rulebpf_loader", level)
        .filter_module("rulebpf", level)
        .format_timestamp_millis()
        .init();
}

/// Warns on stderr about origin ranges the kernel may hand out as ephemeral
/// ports, and TCP timestamps off with sharing (see `ephemeral`).
fn warn_ports(set: &RuleSet, sharing: Sharing, reserving: bool) {
    let mut stderr = io::stderr().lock();
    for warning in ephemeral::warnings(set, sharing == Sharing::On, reserving) {
        let _ = writeln!(stderr, "warning: {warning}");
    }
    for warning in nat::warnings(set) {
        let _ = writeln!(stderr, "warning: {warning}");
    }
}

/// The instance a command is about: `--name`, or the name derived from the
/// one `--cgroup`.
fn instance_name(at: &args::WhereArgs) -> Result<InstanceName, CliError> {
    match (&at.name, at.cgroup.as_slice()) {
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
