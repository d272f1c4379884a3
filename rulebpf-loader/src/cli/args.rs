//! Options several commands share, and how clap spells the library's
//! option types (the library never sees clap).

use std::{
    io::{self, Write as _},
    path::PathBuf,
};

use clap::ValueEnum;
use rulebpf_common::Protocol;
use rulebpf_loader::report;
use rulebpf_loader::{
    model::options::{AppBound, Policy, Sharing},
    ops::put_in_force::Settings,
};
use rulebpf_rules::{LoadLimits, RuleFileError, RuleSet, compile::Budget, resolve::Names};

pub const RULES_HELP: &str = "The rule file (tcpoport.ini): one rule per line, \
    `[!] DEST_IP DEST_PORTS : ORG_PORTS [PROTOCOL]` (see `rulebpf --help`)";
pub const NAME_HELP: &str = "The instance's name (letters, digits, `_.:@-`); default: derived \
    from the one --cgroup, as `systemd-escape --path` does";
pub const CGROUP_HELP: &str = "cgroup v2 directory: absolute, or relative to the cgroup2 mount \
    (e.g. system.slice/gateway.service)";

/// A socket's protocol, as the commands take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
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
pub enum PolicyArg {
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

/// Whether an origin port carries one socket per destination or one in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SharingArg {
    On,
    Off,
}

impl From<SharingArg> for Sharing {
    fn from(arg: SharingArg) -> Self {
        match arg {
            SharingArg::On => Sharing::On,
            SharingArg::Off => Sharing::Off,
        }
    }
}

/// What happens to a socket the application bound outside its rule's range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AppBoundArg {
    Keep,
    Refuse,
}

impl From<AppBoundArg> for AppBound {
    fn from(arg: AppBoundArg) -> Self {
        match arg {
            AppBoundArg::Keep => AppBound::Keep,
            AppBoundArg::Refuse => AppBound::Refuse,
        }
    }
}

/// The settings of `attach` and `run`: each flag not given keeps the
/// instance's setting in force.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct PortArgs {
    /// When no origin port of a rule's range is free: strict (connect()
    /// fails with EADDRNOTAVAIL) or fallback (the OS chooses). Default: the
    /// instance's setting in force, else strict.
    #[arg(long, value_enum)]
    pub policy: Option<PolicyArg>,
    /// on: an origin port carries one connection per destination, as the
    /// kernel's own connect() allocator does; off: one socket per port (a
    /// range of N ports carries N connections, TIME_WAIT included).
    /// Default: the instance's setting in force, else on.
    #[arg(long, value_enum)]
    pub port_sharing: Option<SharingArg>,
    /// A socket the application bound itself (bind() before connect())
    /// outside the matching rule's range: keep its port (counted, logged at
    /// info), or refuse its connect() with EPERM (logged, naming the rule).
    /// Default: the instance's setting in force, else keep.
    #[arg(long, value_enum)]
    pub app_bound: Option<AppBoundArg>,
    /// Add the rules' origin ranges to net.ipv4.ip_local_reserved_ports, so
    /// that no process gets them as ephemeral ports; detach takes back
    /// exactly the ports it added. `--reserve-ports=false` gives them back.
    /// Default: as the instance does now.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub reserve_ports: Option<bool>,
    /// Live shared sockets a new instance can track at once (its tuple
    /// table); beyond that, sockets are bound without sharing (counted).
    #[arg(long, default_value_t = rulebpf_common::TUPLE_CAPACITY)]
    pub tuple_capacity: u32,
}

impl PortArgs {
    pub fn settings(&self) -> Settings {
        Settings {
            policy: self.policy.map(Into::into),
            sharing: self.port_sharing.map(Into::into),
            app_bound: self.app_bound.map(Into::into),
        }
    }
}

/// The rule file and how large it may be.
#[derive(clap::Args)]
pub struct RulesArgs {
    #[arg(help = RULES_HELP)]
    pub rules: PathBuf,
    #[command(flatten)]
    pub limits: LimitArgs,
}

impl RulesArgs {
    /// Reads, parses, resolves and compiles the rule file, and warns on
    /// stderr about names that did not resolve.
    pub fn load(&self) -> Result<RuleSet, RuleFileError> {
        let set = RuleSet::load_within(&self.rules, &Names::new(), &self.limits.into())?;
        let mut stderr = io::stderr().lock();
        for warning in report::name_warnings(&set) {
            let _ = writeln!(stderr, "{warning}");
        }
        Ok(set)
    }
}

/// Where an instance is: its name, its cgroups.
#[derive(clap::Args)]
pub struct WhereArgs {
    #[arg(long, help = NAME_HELP)]
    pub name: Option<String>,
    /// Attach to this cgroup (repeatable). cgroup v2 directory: absolute,
    /// or relative to the cgroup2 mount. attach: none loads and pins only
    /// (for systemd's BPFProgram= or the OCI hook); run: followed, and it
    /// may not exist yet.
    #[arg(long)]
    pub cgroup: Vec<PathBuf>,
}

/// How large a rules file and its compiled maps may be.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct LimitArgs {
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
pub(super) fn parse_size(text: &str) -> Result<u64, String> {
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
