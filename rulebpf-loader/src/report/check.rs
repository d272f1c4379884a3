//! `rulebpf check` and `rulebpf explain`.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use rulebpf_common::{Family, Protocol};
use rulebpf_rules::{rule::Origin, ruleset::RuleSet};
use serde::Serialize;

use super::{as_text, count};

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
    /// The file ends its decisions with `* * : deny tcp+udp`: every path
    /// not allowed above is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_list: Option<AllowListSummary>,
}

/// An allow-list: where its closing deny is and how many paths it allows.
#[derive(Debug, Serialize)]
pub struct AllowListSummary {
    pub deny_line: u32,
    pub allowed_paths: usize,
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
            allow_list: set.allow_list().map(|a| AllowListSummary {
                deny_line: a.line,
                allowed_paths: a.allowed,
            }),
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
        if let Some(allow) = &self.allow_list {
            writeln!(
                f,
                "allow-list: {} allowed; line {} denies every other connect() (EPERM)",
                count(allow.allowed_paths, "path"),
                allow.deny_line
            )?;
        }
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remark: Option<String>,
    pub origin: OriginPorts,
}

/// A rule's origin ports, for scripts.
#[derive(Debug, Serialize)]
pub struct OriginPorts {
    pub os_choice: bool,
    /// The rule says `deny`: connect() fails with EPERM.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deny: bool,
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
                deny: false,
                first: None,
                last: None,
            },
            Origin::Range(r) => Self {
                os_choice: false,
                deny: false,
                first: Some(r.lo),
                last: Some(r.hi),
            },
            Origin::Deny => Self {
                os_choice: false,
                deny: true,
                first: None,
                last: None,
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
                remark: r.remark.clone(),
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
                if let Some(remark) = &d.remark {
                    writeln!(f, "  remark: {remark}")?;
                }
                match (d.origin.first, d.origin.last) {
                    _ if d.origin.deny => writeln!(f, "  denied: connect() fails with EPERM")?,
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
