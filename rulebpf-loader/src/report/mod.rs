//! What the commands print. Each command builds one typed report; the same
//! value is rendered as text for people ([`fmt::Display`]) or, with `--json`,
//! serialized for scripts (one JSON document on stdout). Nothing is built as
//! JSON and read back by key.

use std::{
    fmt,
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, UNIX_EPOCH},
};

use rulebpf_common::{Family, Protocol};
use rulebpf_rules::{rule::Origin, ruleset::RuleSet};
use serde::Serialize;

pub use crate::ops::status::{AttachmentRow, InstanceStats, StatsReport, StatusReport, StatusRow};
use crate::{
    instance::Standing,
    model::{
        name::InstanceName,
        options::{AppBound, Policy, Sharing},
        program::PerHook,
        records::ProgramInfo,
    },
    ops::{probe::Outcome, put_in_force::Done},
    sys::features::{Feature, Support},
};

/// Prints `report` as text, or as pretty JSON.
pub fn print(report: &(impl Serialize + fmt::Display), json: bool) -> io::Result<()> {
    let text = if json {
        let mut text = serde_json::to_string_pretty(report).map_err(io::Error::other)?;
        text.push('\n');
        text
    } else {
        report.to_string()
    };
    io::stdout().lock().write_all(text.as_bytes())
}

/// Serializes a value as its text form (`tcp`, not `Tcp`).
fn as_text<S: serde::Serializer>(value: &impl fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

/// `n thing` or `n things`.
fn count(n: usize, thing: &str) -> String {
    match (n, thing.ends_with('x')) {
        (1, _) => format!("{n} {thing}"),
        (_, true) => format!("{n} {thing}es"),
        (_, false) => format!("{n} {thing}s"),
    }
}

/// What every command that compiles a file warns about, one line each:
/// rules whose name did not resolve.
pub fn name_warnings(set: &RuleSet) -> Vec<String> {
    let file = set.path.display().to_string();
    set.unresolved_rules()
        .iter()
        .map(|u| u.warning(&file))
        .collect()
}

/// What an operator must know about UDP rules (the hook runs at connect()).
const UDP_NOTE: &str = "Only connected UDP sockets (connect() before send()) get an origin \
    port; datagrams sent with sendto() on an unconnected socket cannot be given one by \
    this hook and leave from the port the OS chose.";

/// `rulebpf check`: what a file compiled into.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub file: PathBuf,
    pub rules: usize,
    /// Distinct DNS names in the rules, resolved or not.
    pub names: usize,
    pub unresolved_names: Vec<UnresolvedName>,
    pub ipv6_rules: usize,
    pub udp_rules: usize,
    pub automaton_states: usize,
    pub automaton_edges: usize,
    pub port_tables: u32,
    pub port_prefixes: usize,
    pub compile_seconds: f64,
    /// Kernel memory the rule set's maps will take (estimated from the
    /// compiled sizes; `status` shows what the kernel charged).
    pub kernel_memory_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct UnresolvedName {
    pub name: String,
    pub reason: String,
}

impl Summary {
    pub fn of(set: &RuleSet) -> Self {
        let c = &set.compiled;
        Self {
            file: set.path.clone(),
            rules: set.rules.len(),
            names: set.names.len() + set.name_failures.len(),
            unresolved_names: set
                .name_failures
                .iter()
                .map(|f| UnresolvedName {
                    name: f.name.clone(),
                    reason: f.reason.clone(),
                })
                .collect(),
            ipv6_rules: set
                .rules
                .iter()
                .filter(|r| r.covers_family(Family::Ipv6))
                .count(),
            udp_rules: set
                .rules
                .iter()
                .filter(|r| r.protocols.covers(Protocol::Udp))
                .count(),
            automaton_states: c.defaults.len(),
            automaton_edges: c.edges.len(),
            port_tables: c.tables,
            port_prefixes: c.ports.len(),
            compile_seconds: set.compile_time.as_secs_f64(),
            // Per-CPU counters count once per possible CPU.
            kernel_memory_bytes: c
                .kernel_memory(aya::util::nr_cpus().map_or(1, |n| n.get()))
                .total(),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unresolved = match self.unresolved_names.len() {
            0 => String::new(),
            n => format!(", {n} unresolved"),
        };
        writeln!(
            f,
            "{}: {} OK ({}{unresolved}); compiled in {:.1?} into {}, {}, {} ({})",
            self.file.display(),
            count(self.rules, "rule"),
            count(self.names, "DNS name"),
            Duration::from_secs_f64(self.compile_seconds),
            count(self.automaton_states, "automaton state"),
            count(self.automaton_edges, "edge"),
            count(self.port_tables as usize, "port table"),
            count(self.port_prefixes, "prefix"),
        )?;
        writeln!(
            f,
            "kernel memory: about {} for its maps",
            rulebpf_rules::compile::size(self.kernel_memory_bytes)
        )?;
        if self.udp_rules > 0 {
            let verb = if self.udp_rules == 1 {
                "applies"
            } else {
                "apply"
            };
            writeln!(
                f,
                "note: {} {verb} to UDP. {UDP_NOTE}",
                count(self.udp_rules, "rule")
            )?;
        }
        Ok(())
    }
}

/// `rulebpf explain NAME:PORT`: the decision for each address of the name.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct Explanations(pub Vec<Explanation>);

impl fmt::Display for Explanations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for explanation in &self.0 {
            explanation.fmt(f)?;
        }
        Ok(())
    }
}

/// `rulebpf explain`: which rule decides a destination.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// The name the destination was given as, when it was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub destination: SocketAddr,
    #[serde(serialize_with = "as_text")]
    pub protocol: Protocol,
    /// The address the rules were matched against (IPv4 for a v4-mapped one).
    pub matched_as: IpAddr,
    pub matched: Option<Decision>,
    pub note: Option<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct Decision {
    pub line: u32,
    pub text: String,
    pub origin: OriginPorts,
}

/// A rule's origin ports, for scripts.
#[derive(Debug, Serialize)]
pub struct OriginPorts {
    pub os_choice: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<u16>,
}

impl From<Origin> for OriginPorts {
    fn from(origin: Origin) -> Self {
        match origin {
            Origin::Os => Self {
                os_choice: true,
                first: None,
                last: None,
            },
            Origin::Range(r) => Self {
                os_choice: false,
                first: Some(r.lo),
                last: Some(r.hi),
            },
        }
    }
}

impl Explanation {
    /// `rule`: the index of the deciding rule, if any.
    pub fn of(
        set: &RuleSet,
        destination: SocketAddr,
        protocol: Protocol,
        matched_as: IpAddr,
        rule: Option<usize>,
    ) -> Self {
        Self {
            name: None,
            destination,
            protocol,
            matched_as,
            matched: rule.map(|i| &set.rules[i]).map(|r| Decision {
                line: r.line,
                text: r.text.clone(),
                origin: r.origin.into(),
            }),
            note: (protocol == Protocol::Udp).then_some(UDP_NOTE),
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (dest, protocol) = (self.destination, self.protocol);
        if let Some(name) = &self.name {
            writeln!(f, "{name} is {}:", dest.ip())?;
        }
        if self.matched_as != dest.ip() {
            writeln!(
                f,
                "{dest}: IPv4-mapped; matched against the IPv4 rules as {}",
                self.matched_as
            )?;
        }
        match &self.matched {
            None => writeln!(
                f,
                "{dest} ({protocol}): no rule matches; the OS chooses the origin port"
            )?,
            Some(d) => {
                writeln!(
                    f,
                    "{dest} ({protocol}): line {} decides: `{}`",
                    d.line, d.text
                )?;
                match (d.origin.first, d.origin.last) {
                    (Some(lo), Some(hi)) => {
                        let size = usize::from(hi - lo) + 1;
                        let ports = if lo == hi {
                            lo.to_string()
                        } else {
                            format!("{lo}-{hi}")
                        };
                        writeln!(f, "  origin port: {ports} ({})", count(size, "port"))?
                    }
                    _ => writeln!(f, "  origin port: chosen by the OS (the rule says 0)")?,
                }
            }
        }
        if let Some(note) = self.note {
            writeln!(f, "  note: {note}")?;
        }
        Ok(())
    }
}

/// `rulebpf attach`: what was put in force, and where. The same program
/// fields as `status` shows.
#[derive(Debug, Serialize)]
pub struct AttachReport {
    pub instance: InstanceName,
    /// Cgroups attached by this command (already attached ones not repeated).
    pub attached: Vec<PathBuf>,
    pub swapped: bool,
    pub generation: u64,
    pub policy: Policy,
    pub sharing: Sharing,
    pub app_bound: AppBound,
    /// Origin ranges the instance holds reserved from the ephemeral ports.
    pub reserved_ports: Vec<(u16, u16)>,
    /// The stable entry programs (attached to the cgroups).
    pub entry: PerHook<ProgramInfo>,
    /// The rule set's programs (in the entry programs' jump slots).
    pub programs: PerHook<ProgramInfo>,
    pub map_memlock_bytes: u64,
    pub summary: Summary,
}

impl AttachReport {
    pub fn of(instance: InstanceName, set: &RuleSet, done: &Done) -> Self {
        let r = &done.applied.record;
        Self {
            instance,
            attached: done.attached.clone(),
            swapped: done.applied.swapped,
            generation: r.generation,
            policy: r.policy,
            sharing: r.sharing,
            app_bound: r.app_bound,
            reserved_ports: done.reserved.clone(),
            entry: done.entry,
            programs: r.programs,
            map_memlock_bytes: r.map_memlock_bytes,
            summary: Summary::of(set),
        }
    }
}

impl fmt::Display for AttachReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.swapped { "swapped in" } else { "loaded" };
        writeln!(
            f,
            "instance {}: {verb} {} ({}) as rule set {}",
            self.instance,
            self.summary.file.display(),
            count(self.summary.rules, "rule"),
            self.generation,
        )?;
        let reserved = if self.reserved_ports.is_empty() {
            "none".to_string()
        } else {
            let ranges: Vec<String> = self
                .reserved_ports
                .iter()
                .map(|(lo, hi)| format!("{lo}-{hi}"))
                .collect();
            ranges.join(",")
        };
        writeln!(
            f,
            "  settings: policy {}, port sharing {}, app-bound {}, reserved ports {reserved}",
            policy_name(self.policy),
            sharing_name(self.sharing),
            app_bound_name(self.app_bound),
        )?;
        for cgroup in &self.attached {
            writeln!(f, "  attached to {}", cgroup.display())?;
        }
        writeln!(
            f,
            "  {}",
            programs_line(&self.programs, self.map_memlock_bytes)
        )?;
        writeln!(
            f,
            "  entry programs: connect4 id {}, connect6 id {}",
            self.entry.connect4.id, self.entry.connect6.id
        )
    }
}

fn policy_name(policy: Policy) -> &'static str {
    match policy {
        Policy::Strict => "strict",
        Policy::Fallback => "fallback",
    }
}

fn sharing_name(sharing: Sharing) -> &'static str {
    match sharing {
        Sharing::On => "on",
        Sharing::Off => "off",
    }
}

fn app_bound_name(app_bound: AppBound) -> &'static str {
    match app_bound {
        AppBound::Keep => "keep",
        AppBound::Refuse => "refuse",
    }
}

/// `programs: connect4 id 12 (531 instructions verified), ...; maps: N KiB`.
fn programs_line(programs: &PerHook<ProgramInfo>, memlock: u64) -> String {
    let one = |name: &str, p: &ProgramInfo| {
        let insns = p.verified_insns.map_or("?".to_string(), |n| n.to_string());
        format!("{name} id {} ({insns} instructions verified)", p.id)
    };
    format!(
        "programs: {}, {}; maps: {} KiB of kernel memory",
        one("connect4", &programs.connect4),
        one("connect6", &programs.connect6),
        memlock.div_ceil(1024)
    )
}

/// `rulebpf probe`: what each connect() gave.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct ProbeReport {
    #[serde(skip)]
    pub destination: SocketAddr,
    pub outcomes: Vec<Outcome>,
}

impl ProbeReport {
    pub fn failures(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| matches!(o, Outcome::Failed { .. }))
            .count()
    }
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dest = self.destination;
        for outcome in &self.outcomes {
            match outcome {
                Outcome::Connected { local_port } => {
                    writeln!(f, "{dest}: connected from origin port {local_port}")?
                }
                Outcome::Failed { error, .. } => writeln!(f, "{dest}: connect failed: {error}")?,
            }
        }
        Ok(())
    }
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return writeln!(f, "no rulebpf instance");
        }
        for row in &self.0 {
            row.fmt_text(f)?;
        }
        Ok(())
    }
}

fn standing_text(standing: Standing) -> String {
    match standing {
        Standing::InForce => "in force".into(),
        Standing::CgroupGone => "cgroup gone".into(),
        Standing::Recreated { id } => format!("re-created (now id {id}): NOT attached"),
        Standing::Detached => "NOT attached".into(),
    }
}

impl StatusRow {
    fn fmt_text(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let managed = match self.managed_by {
            Some(pid) => format!(", managed by `rulebpf run` (pid {pid})"),
            None => String::new(),
        };
        writeln!(f, "instance {}{managed}", self.name)?;
        if let Some(error) = &self.error {
            writeln!(f, "  error: {error}")?;
        }
        for damage in &self.damage {
            writeln!(f, "  damaged: {damage}; the next attach or run repairs it")?;
        }
        match &self.rule_set {
            Some(r) => {
                writeln!(
                    f,
                    "  rules: {} ({}), rule set {}, policy {}, port sharing {}, app-bound {}, \
                     loaded {}",
                    r.rules_file.display(),
                    count(r.rules.len(), "rule"),
                    r.generation,
                    policy_name(r.policy),
                    sharing_name(r.sharing),
                    app_bound_name(r.app_bound),
                    time(r.loaded_at)
                )?;
                if !r.unresolved.is_empty() {
                    writeln!(f, "  unresolved names: {}", r.unresolved.join(", "))?;
                }
                writeln!(f, "  {}", programs_line(&r.programs, r.map_memlock_bytes))?;
            }
            None => writeln!(f, "  rules: none in force (connects pass untouched)")?,
        }
        if self.mixed {
            writeln!(
                f,
                "  note: connect4 and connect6 run different rule sets (an interrupted swap; \
                 the next attach or run completes it)"
            )?;
        }
        writeln!(
            f,
            "  entry programs: connect4 id {}, connect6 id {}",
            self.entry.connect4.id, self.entry.connect6.id
        )?;
        if self.attachments.is_empty() {
            writeln!(f, "  attached to: no cgroup by rulebpf")?;
        }
        // The one variable-width column last, so nothing shifts.
        for row in &self.attachments {
            writeln!(
                f,
                "  {:<36} {:>10}  {}",
                standing_text(row.standing),
                row.attachment.cgroup_id,
                row.attachment.cgroup.display()
            )?;
        }
        // The ten busiest rules; `stats` has them all.
        for o in self.occupancy.iter().take(10) {
            writeln!(
                f,
                "  line {}: {} of {} ports in use (at most {}), {}, `{}`",
                o.line,
                o.in_use,
                o.ports,
                o.high_water,
                count(o.sockets as usize, "socket"),
                o.text
            )?;
        }
        let s = &self.service;
        if let Some(reload) = &s.last_reload {
            writeln!(
                f,
                "  last reload: {} at {}: {}",
                if reload.ok { "ok" } else { "REFUSED" },
                time(reload.at),
                reload.message.replace('\n', "\n    ")
            )?;
        }
        if s.dns_refreshes + s.dns_failures + s.reattaches > 0 {
            writeln!(
                f,
                "  DNS refreshes {}, failures {}; cgroups re-attached {}",
                s.dns_refreshes, s.dns_failures, s.reattaches
            )?;
        }
        Ok(())
    }
}

/// A time of the state file (seconds since the epoch), for people.
fn time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

impl fmt::Display for StatsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return writeln!(f, "no rulebpf instance with rules in force");
        }
        for instance in &self.0 {
            writeln!(
                f,
                "instance {} ({}, rule set {}):",
                instance.instance,
                instance.rules_file.display(),
                instance.generation
            )?;
            // APP/KERNEL: sockets the application had bound before
            // connect(), by who chose the port; IN USE/PEAK: ports of the
            // range with a live socket now, and at most.
            writeln!(
                f,
                "  {:>6} {:>12} {:>12} {:>10} {:>8} {:>8} {:>7} {:>7}  RULE",
                "LINE", "MATCHED", "BOUND", "EXHAUSTED", "APP", "KERNEL", "IN USE", "PEAK"
            )?;
            for rule in &instance.rules {
                writeln!(
                    f,
                    "  {:>6} {:>12} {:>12} {:>10} {:>8} {:>8} {:>7} {:>7}  {}",
                    rule.line,
                    rule.matched,
                    rule.bound,
                    rule.exhausted,
                    rule.app_chose,
                    rule.kernel_chose,
                    rule.in_use,
                    rule.high_water,
                    rule.text
                )?;
            }
            let noted: Vec<String> = instance
                .counters
                .iter()
                .filter(|&(_, &n)| n > 0)
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            if !noted.is_empty() {
                writeln!(f, "  instance: {}", noted.join(", "))?;
            }
        }
        Ok(())
    }
}

/// `rulebpf kernel`: where cgroup v2 is and what the kernel offers.
#[derive(Debug, Serialize)]
pub struct KernelReport {
    pub kernel: String,
    pub cgroup2_mount: Option<PathBuf>,
    pub features: Vec<Feature>,
    #[serde(skip)]
    missing: Option<String>,
    #[serde(skip)]
    degradations: Vec<String>,
}

impl KernelReport {
    pub fn of(support: &Support) -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        Self {
            kernel: release.trim().to_string(),
            cgroup2_mount: crate::sys::cgroup::cgroup2_mount().ok(),
            features: support.features.clone(),
            missing: support.missing_required(),
            degradations: support.degradations(),
        }
    }
}

impl fmt::Display for KernelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cgroup2_mount {
            Some(path) => writeln!(f, "cgroup v2 mounted at {}", path.display())?,
            None => writeln!(
                f,
                "no cgroup v2 mount in /proc/mounts: rulebpf needs cgroup v2"
            )?,
        }
        writeln!(f, "kernel {}:", self.kernel)?;
        for feature in &self.features {
            let state = match feature.present {
                Some(true) => "yes",
                Some(false) if feature.required => "MISSING",
                Some(false) => "no",
                None => "? (probe failed: root?)",
            };
            writeln!(
                f,
                "  {:<44} {:<8} since {:<5} {}",
                feature.name, state, feature.since, feature.role
            )?;
        }
        if let Some(missing) = &self.missing {
            writeln!(f, "{missing}")?;
        }
        for d in &self.degradations {
            writeln!(f, "note: {d}")?;
        }
        Ok(())
    }
}
