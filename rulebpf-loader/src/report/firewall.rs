//! `rulebpf firewall`: the perimeter rules of a rule file, from the same
//! file (`rulebpf_rules::paths`): an nft table, `iptables-restore` input,
//! or the table the firewall team reads (CSV, Markdown).
//!
//! The nft and iptables exports keep the file's first match: its entries
//! in file order, a `deny` as a drop where it stands, a negated rule as
//! the two matches it means; everything else is dropped (policy drop).
//! Replies pass by connection tracking, or, `--stateless`, by a mirrored
//! rule per allowed path (packet filters without conntrack; UDP replies).

use std::{
    fmt::{self, Write as _},
    net::IpAddr,
    path::PathBuf,
};

use rulebpf_common::Family;
use rulebpf_rules::{
    paths::{Action, AddrMask, Dests, Entry},
    rule::{PortRange, Protocols, family_of},
};

/// The output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Nft,
    Iptables,
    Csv,
    Markdown,
}

/// Everything an export says.
pub struct FirewallExport {
    pub rules_file: PathBuf,
    /// The gateway as the firewall sees it.
    pub sources: Vec<IpAddr>,
    /// Said in the header when the sources were not given.
    pub sources_note: Option<String>,
    pub entries: Vec<Entry>,
    /// When the names were resolved (RFC 3339).
    pub resolved_at: String,
    pub stateless: bool,
    pub format: Format,
}

/// The nft table's name (a complete table, replaced as a whole on load).
const TABLE: &str = "rulebpf_paths";

impl fmt::Display for FirewallExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self.format {
            Format::Nft => self.nft(),
            Format::Iptables => self.iptables(),
            Format::Csv => self.table(Table::Csv),
            Format::Markdown => self.table(Table::Markdown),
        };
        f.write_str(&text)
    }
}

impl FirewallExport {
    /// The header lines, each behind `comment` (`# `, or nothing).
    fn header(&self, comment: &str) -> String {
        let mut lines = vec![format!(
            "The connection paths of {}, from `rulebpf firewall`: sources {}.",
            self.rules_file.display(),
            list(&self.sources)
        )];
        if let Some(note) = &self.sources_note {
            lines.push(note.clone());
        }
        if self.entries.iter().any(|e| e.name.is_some()) {
            lines.push(format!(
                "DNS names as resolved at {}: export again when they change.",
                self.resolved_at
            ));
        }
        lines
            .into_iter()
            .map(|line| format!("{comment}{line}\n"))
            .collect()
    }

    fn sources_of(&self, family: Family) -> Vec<IpAddr> {
        self.sources
            .iter()
            .copied()
            .filter(|a| family_of(*a) == family)
            .collect()
    }

    fn nft(&self) -> String {
        let mut out = self.header("# ");
        // Replaced as a whole: `nft -f` applies the file atomically, and
        // deleting a table needs it to exist, hence the empty one first.
        let _ = writeln!(
            out,
            "table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n\
             \tchain forward {{\n\t\ttype filter hook forward priority filter; policy drop;"
        );
        if !self.stateless {
            let _ = writeln!(out, "\t\tct state established,related accept");
        }
        for entry in &self.entries {
            let sources = self.sources_of(entry.family);
            let _ = writeln!(out, "\t\t# {}", about(entry));
            if sources.is_empty() {
                let _ = writeln!(
                    out,
                    "\t\t# (no {} source address given)",
                    name(entry.family)
                );
                continue;
            }
            let ip = nft_family(entry.family);
            let saddr = format!("{ip} saddr {}", nft_set(&sources));
            let daddr = nft_dests(ip, "daddr", &entry.dests, entry.dests_negated);
            let proto = nft_protocols(entry.protocols);
            let dport = nft_ports("dport", &entry.ports, entry.ports_negated);
            let comment = nft_comment(entry);
            match entry.action {
                Action::Drop => {
                    let _ = writeln!(out, "\t\t{saddr}{daddr} {proto}{dport} drop {comment}");
                }
                Action::Accept { source_ports } => {
                    let sport = nft_ports("sport", &[source_ports], false);
                    let _ = writeln!(
                        out,
                        "\t\t{saddr}{daddr} {proto}{sport}{dport} accept {comment}"
                    );
                    if self.stateless {
                        // The reply: the path mirrored.
                        let r_saddr = nft_dests(ip, "saddr", &entry.dests, entry.dests_negated);
                        let r_daddr = format!(" {ip} daddr {}", nft_set(&sources));
                        let r_sport = nft_ports("sport", &entry.ports, entry.ports_negated);
                        let r_dport = nft_ports("dport", &[source_ports], false);
                        let _ = writeln!(
                            out,
                            "\t\t{}{r_daddr} {proto}{r_sport}{r_dport} accept {comment}",
                            r_saddr.trim_start()
                        );
                    }
                }
            }
        }
        let _ = writeln!(out, "\t}}\n}}");
        out
    }

    fn iptables(&self) -> String {
        let mut out = self.header("# ");
        let skipped: Vec<String> = self
            .entries
            .iter()
            .filter(|e| e.family == Family::Ipv6)
            .map(|e| e.line.to_string())
            .collect();
        if !skipped.is_empty() {
            let _ = writeln!(
                out,
                "# IPv6 paths (lines {}) are not here: iptables-restore is IPv4 only; \
                 `--format nft` has both families.",
                skipped.join(", ")
            );
        }
        let sources = self.sources_of(Family::Ipv4);
        let _ = writeln!(out, "*filter\n:FORWARD DROP [0:0]");
        let mut chains = Vec::new();
        let mut rules = Vec::new();
        if !self.stateless {
            rules.push("-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT".into());
        }
        for entry in self.entries.iter().filter(|e| e.family == Family::Ipv4) {
            if sources.is_empty() {
                break;
            }
            let target = match entry.action {
                Action::Accept { .. } => "ACCEPT",
                Action::Drop => "DROP",
            };
            let comment = format!("-m comment --comment {}", quoted(&short_about(entry)));
            for protocol in protocols(entry.protocols) {
                let ports = ipt_ports("--dports", &entry.ports, entry.ports_negated);
                let sport = match entry.action {
                    Action::Accept { source_ports } => {
                        format!(" --sport {}", ipt_range(source_ports))
                    }
                    Action::Drop => String::new(),
                };
                let base = format!(
                    "-s {} -p {protocol} -m {protocol}{sport}{ports}",
                    list(&sources)
                );
                let dests = match &entry.dests {
                    Dests::Any => vec![String::new()],
                    Dests::Addrs(addrs) => addrs.iter().map(|a| format!(" -d {a}")).collect(),
                };
                if entry.dests_negated && dests.len() > 1 {
                    // iptables negates one address only: the addresses
                    // return from a chain of their own, the rest is decided.
                    let chain = format!("rulebpf-l{}-{protocol}", entry.line);
                    chains.push(chain.clone());
                    rules.push(format!("-A FORWARD {base} {comment} -j {chain}"));
                    for d in &dests {
                        rules.push(format!("-A {chain}{d} -j RETURN"));
                    }
                    rules.push(format!("-A {chain} -j {target}"));
                    continue;
                }
                for d in dests {
                    let d = if entry.dests_negated {
                        d.replacen(" -d", " ! -d", 1)
                    } else {
                        d
                    };
                    rules.push(format!("-A FORWARD {base}{d} {comment} -j {target}"));
                    if self.stateless && target == "ACCEPT" {
                        let Action::Accept { source_ports } = entry.action else {
                            continue;
                        };
                        let reply_ports = ipt_ports("--sports", &entry.ports, entry.ports_negated);
                        let s = d.replacen("-d", "-s", 1);
                        rules.push(format!(
                            "-A FORWARD{s} -d {} -p {protocol} -m {protocol} --dport {}{reply_ports} {comment} -j ACCEPT",
                            list(&sources),
                            ipt_range(source_ports)
                        ));
                    }
                }
            }
        }
        for chain in &chains {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for rule in rules {
            // -m multiport is needed for lists and for negation.
            let _ = writeln!(out, "{rule}");
        }
        let _ = writeln!(out, "COMMIT");
        out
    }

    fn table(&self, kind: Table) -> String {
        let mut rows: Vec<[String; 7]> = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for entry in &self.entries {
            let Action::Accept { source_ports } = entry.action else {
                continue; // denied paths are no paths
            };
            // One row per rule: its families together.
            if !seen.insert((entry.line, entry.dests_negated, entry.ports_negated)) {
                continue;
            }
            let families: Vec<&Entry> = self
                .entries
                .iter()
                .filter(|e| {
                    e.line == entry.line
                        && e.dests_negated == entry.dests_negated
                        && e.ports_negated == entry.ports_negated
                })
                .collect();
            let sources: Vec<IpAddr> = families
                .iter()
                .flat_map(|e| self.sources_of(e.family))
                .collect();
            let dest = families
                .iter()
                .map(|e| table_dests(e))
                .collect::<Vec<_>>()
                .join(", ");
            let ports = ports_text(&entry.ports);
            rows.push([
                list(&sources),
                dest,
                entry.protocols.to_string(),
                if entry.ports_negated {
                    format!("not {ports}")
                } else {
                    ports
                },
                source_ports.to_string(),
                entry.remark.clone().unwrap_or_default(),
                entry.line.to_string(),
            ]);
        }
        const HEAD: [&str; 7] = [
            "source",
            "destination",
            "protocol",
            "ports",
            "source ports",
            "remark",
            "line",
        ];
        let mut out = String::new();
        match kind {
            Table::Csv => {
                let _ = writeln!(out, "{}", HEAD.join(","));
                for row in rows {
                    let cells: Vec<String> = row.iter().map(|c| csv_cell(c)).collect();
                    let _ = writeln!(out, "{}", cells.join(","));
                }
            }
            Table::Markdown => {
                out = self.header("");
                let _ = writeln!(out, "\n| {} |", HEAD.join(" | "));
                let _ = writeln!(out, "|{}", "---|".repeat(HEAD.len()));
                for row in rows {
                    let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
                    let _ = writeln!(out, "| {} |", cells.join(" | "));
                }
            }
        }
        out
    }
}

#[derive(Clone, Copy)]
enum Table {
    Csv,
    Markdown,
}

fn name(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "IPv4",
        Family::Ipv6 => "IPv6",
    }
}

fn list(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `line N: RULE (REMARK)`, for comments.
fn about(entry: &Entry) -> String {
    let mut out = format!("line {}: {}", entry.line, entry.text);
    if let Some(name) = &entry.name {
        let _ = write!(out, " ({name})");
    }
    if let Some(remark) = &entry.remark {
        let _ = write!(out, " - {remark}");
    }
    out
}

/// [`about`], short enough for an iptables or nft comment (255 / 128
/// bytes).
fn short_about(entry: &Entry) -> String {
    let mut text = format!("line {}", entry.line);
    if let Some(remark) = &entry.remark {
        let _ = write!(text, ": {remark}");
    }
    let mut cut: String = text.chars().take(100).collect();
    cut.retain(|c| c != '"' && c != '\\' && !c.is_control());
    cut
}

fn quoted(text: &str) -> String {
    format!("\"{text}\"")
}

fn nft_comment(entry: &Entry) -> String {
    format!("comment {}", quoted(&short_about(entry)))
}

fn nft_family(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ip",
        Family::Ipv6 => "ip6",
    }
}

fn nft_set(addrs: &[IpAddr]) -> String {
    match addrs {
        [one] => one.to_string(),
        many => format!("{{ {} }}", list(many).replace(',', ", ")),
    }
}

/// ` ip daddr X`, ` ip daddr != { a, b }`, ` ip daddr & M == V`; for every
/// address of the family, ` meta nfproto ipv4`.
fn nft_dests(ip: &str, field: &str, dests: &Dests, negated: bool) -> String {
    let not = if negated { "!= " } else { "" };
    match dests {
        Dests::Any => format!(" meta nfproto {}", if ip == "ip" { "ipv4" } else { "ipv6" }),
        Dests::Addrs(addrs) => match addrs.as_slice() {
            [one] if one.prefix_len().is_none() => {
                let op = if negated { "!=" } else { "==" };
                format!(" {ip} {field} & {} {op} {}", one.mask, one.addr)
            }
            [one] => format!(" {ip} {field} {not}{one}"),
            many => {
                let set: Vec<String> = many.iter().map(AddrMask::to_string).collect();
                format!(" {ip} {field} {not}{{ {} }}", set.join(", "))
            }
        },
    }
}

fn nft_protocols(protocols: Protocols) -> String {
    match (protocols.tcp, protocols.udp) {
        (true, true) => "meta l4proto { tcp, udp }".into(),
        (false, true) => "meta l4proto udp".into(),
        _ => "meta l4proto tcp".into(),
    }
}

/// ` th dport 22`, ` th dport != { 22, 80-90 }`; nothing for every port.
fn nft_ports(field: &str, ports: &[PortRange], negated: bool) -> String {
    if ports.len() == 1 && ports[0].is_any() {
        return String::new();
    }
    let not = if negated { "!= " } else { "" };
    let items: Vec<String> = ports.iter().map(|r| nft_range(*r)).collect();
    match items.as_slice() {
        [one] => format!(" th {field} {not}{one}"),
        many => format!(" th {field} {not}{{ {} }}", many.join(", ")),
    }
}

fn nft_range(r: PortRange) -> String {
    if r.lo == r.hi {
        r.lo.to_string()
    } else {
        format!("{}-{}", r.lo, r.hi)
    }
}

fn protocols(protocols: Protocols) -> Vec<&'static str> {
    let mut out = Vec::new();
    if protocols.tcp {
        out.push("tcp");
    }
    if protocols.udp {
        out.push("udp");
    }
    out
}

fn ipt_range(r: PortRange) -> String {
    if r.lo == r.hi {
        r.lo.to_string()
    } else {
        format!("{}:{}", r.lo, r.hi)
    }
}

/// ` -m multiport --dports 22,80:90`, negated ` -m multiport ! --dports ...`;
/// nothing for every port. (multiport takes 15 ports at most: longer lists
/// are split by the caller's rule count, not here.)
fn ipt_ports(option: &str, ports: &[PortRange], negated: bool) -> String {
    if ports.len() == 1 && ports[0].is_any() {
        return String::new();
    }
    let items: Vec<String> = ports.iter().map(|r| ipt_range(*r)).collect();
    let not = if negated { "! " } else { "" };
    format!(" -m multiport {not}{option} {}", items.join(","))
}

fn ports_text(ports: &[PortRange]) -> String {
    ports
        .iter()
        .map(PortRange::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn table_dests(entry: &Entry) -> String {
    let text = match &entry.dests {
        Dests::Any => format!("any {}", name(entry.family)),
        Dests::Addrs(addrs) => {
            let list: Vec<String> = addrs.iter().map(AddrMask::to_string).collect();
            match &entry.name {
                Some(name) => format!("{name} ({})", list.join(" ")),
                None => list.join(" "),
            }
        }
    };
    if entry.dests_negated {
        format!("not {text}")
    } else {
        text
    }
}

fn csv_cell(cell: &str) -> String {
    if cell.contains([',', '"', '\n']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rulebpf_rules::{Names, RuleSet, grammar::parse, paths};

    use super::*;

    fn export(text: &str, format: Format, stateless: bool) -> String {
        let rules = parse(text).unwrap();
        let set = RuleSet::from_parts(Path::new("r.ini"), rules, Names::new(), vec![]).unwrap();
        FirewallExport {
            rules_file: "r.ini".into(),
            sources: vec!["198.51.100.10".parse().unwrap()],
            sources_note: None,
            entries: paths::entries(
                &set,
                PortRange {
                    lo: 32768,
                    hi: 60999,
                },
            ),
            resolved_at: "now".into(),
            stateless,
            format,
        }
        .to_string()
    }

    const FILE: &str = "10.1.1.1 22 : 64000-64099  # SFTP\n10.*.5.* 443,8443 : 0 tcp+udp\n\
                        10.9.9.9 * : deny\n* * : deny tcp+udp\n";

    #[test]
    fn nft_keeps_the_order_and_drops_the_rest() {
        let text = export(FILE, Format::Nft, false);
        let rules: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("ip"))
            .collect();
        assert_eq!(
            rules,
            [
                "ip saddr 198.51.100.10 ip daddr 10.1.1.1 meta l4proto tcp th sport 64000-64099 \
                 th dport 22 accept comment \"line 1: SFTP\"",
                "ip saddr 198.51.100.10 ip daddr & 255.0.255.0 == 10.0.5.0 meta l4proto { tcp, udp } \
                 th sport 32768-60999 th dport { 443, 8443 } accept comment \"line 2\"",
                "ip saddr 198.51.100.10 ip daddr 10.9.9.9 meta l4proto tcp drop comment \"line 3\"",
                "ip saddr 198.51.100.10 meta nfproto ipv4 meta l4proto { tcp, udp } drop comment \
                 \"line 4\"",
            ]
        );
        assert!(text.contains("policy drop;"));
        assert!(text.contains("ct state established,related accept"));
        // No IPv6 source: the IPv6 half of line 4 is said, not written.
        assert!(text.contains("# (no IPv6 source address given)"));
        let stateless = export(FILE, Format::Nft, true);
        assert!(!stateless.contains("ct state"));
        // The reply, mirrored.
        assert!(
            stateless.contains(
                "ip saddr 10.1.1.1 ip daddr 198.51.100.10 meta l4proto tcp th sport 22 \
                 th dport 64000-64099 accept"
            ),
            "{stateless}"
        );
    }

    #[test]
    fn the_table_lists_the_allowed_paths() {
        let text = export(FILE, Format::Csv, false);
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "source,destination,protocol,ports,source ports,remark,line",
                "198.51.100.10,10.1.1.1,tcp,22,64000-64099,SFTP,1",
                "198.51.100.10,10.0.5.0/255.0.255.0,tcp+udp,\"443,8443\",32768-60999,,2",
            ]
        );
        let text = export(FILE, Format::Markdown, false);
        assert!(
            text.contains("| 198.51.100.10 | 10.1.1.1 | tcp | 22 | 64000-64099 | SFTP | 1 |"),
            "{text}"
        );
    }

    #[test]
    fn iptables_negates_one_address_at_a_time() {
        let text = export("! 10.0.0.0/8 80 : 100-109\n", Format::Iptables, false);
        assert!(text.contains("--sport 100:109 ! -d 10.0.0.0/8"), "{text}");
        assert!(
            text.contains("-m multiport ! --dports 80 -d 10.0.0.0/8"),
            "{text}"
        );
        assert!(text.starts_with("# The connection paths"), "{text}");
        assert!(text.contains("*filter\n:FORWARD DROP [0:0]\n"), "{text}");
        assert!(text.trim_end().ends_with("COMMIT"), "{text}");
    }
}
