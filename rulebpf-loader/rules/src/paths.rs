//! The connection paths a rule file decides, as a perimeter firewall must
//! see them: one [`Entry`] per rule and address family, in file order,
//! each accepting (from the rule's origin range) or dropping. Read in
//! order with the first match deciding, the entries mean what the rules
//! mean: a `deny` above an allow stays a drop above an accept, and a
//! negated rule (`!`: the address outside **or** the port outside) is two
//! entries with the same action. `rulebpf firewall` renders them.

use std::net::IpAddr;

use rulebpf_common::Family;

use crate::{
    RuleSet,
    resolve::addresses,
    rule::{AddrPattern, Dest, Origin, PortRange, Protocols, Rule},
};

/// Destination addresses as a firewall matches them: an address under a
/// mask (`10.0.0.0/8`, or `10.0.5.0/255.0.255.0` for `10.*.5.*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrMask {
    pub addr: IpAddr,
    pub mask: IpAddr,
}

impl AddrMask {
    /// The pattern's addresses: each octet is one value or all of them (a
    /// prefix's last octet an aligned range), so one address and a mask say
    /// it exactly.
    pub fn of(pattern: &AddrPattern) -> Self {
        let octets = pattern.octets();
        let value: Vec<u8> = octets.iter().map(|o| o.lo).collect();
        let mask: Vec<u8> = octets.iter().map(|o| !(o.hi - o.lo)).collect();
        let ip = |bytes: &[u8]| -> IpAddr {
            match bytes.len() {
                4 => <[u8; 4]>::try_from(bytes).expect("4 octets").into(),
                _ => <[u8; 16]>::try_from(bytes).expect("16 octets").into(),
            }
        };
        Self {
            addr: ip(&value),
            mask: ip(&mask),
        }
    }

    /// The mask as a prefix length, when it is one (contiguous).
    pub fn prefix_len(&self) -> Option<u8> {
        let bits: u128 = match self.mask {
            IpAddr::V4(m) => u128::from(u32::from(m)) << 96,
            IpAddr::V6(m) => u128::from(m),
        };
        let len = bits.leading_ones();
        (bits.checked_shl(len).unwrap_or(0) == 0).then_some(len as u8)
    }
}

impl std::fmt::Display for AddrMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let full = match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        match self.prefix_len() {
            Some(len) if len == full => write!(f, "{}", self.addr),
            Some(len) => write!(f, "{}/{len}", self.addr),
            None => write!(f, "{}/{}", self.addr, self.mask),
        }
    }
}

/// Which destinations of a family an entry is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dests {
    /// Every address of the family.
    Any,
    /// Any of these.
    Addrs(Vec<AddrMask>),
}

/// What the firewall does with a packet an entry matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Let it through from these source ports (the rule's origin range,
    /// or, for a `0` rule, the host's ephemeral range).
    Accept { source_ports: PortRange },
    /// Drop it (`deny`).
    Drop,
}

/// One firewall rule: a rule of the file, for one address family (a
/// negated rule gives two).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub line: u32,
    /// The rule as written (its remark apart).
    pub text: String,
    pub remark: Option<String>,
    /// The DNS name the addresses are the answer for.
    pub name: Option<String>,
    pub family: Family,
    pub protocols: Protocols,
    pub dests: Dests,
    /// Matches destinations **outside** `dests`.
    pub dests_negated: bool,
    /// Destination ports, sorted and disjoint.
    pub ports: Vec<PortRange>,
    /// Matches destination ports **outside** `ports`.
    pub ports_negated: bool,
    pub action: Action,
}

/// The entries of `set`, in file order. `os_range`: the host's ephemeral
/// ports (`ip_local_port_range`), where a `0` rule's connections leave
/// from. Rules whose name did not resolve match nothing and give nothing.
pub fn entries(set: &RuleSet, os_range: PortRange) -> Vec<Entry> {
    let mut out = Vec::new();
    for rule in &set.rules {
        for family in [Family::Ipv4, Family::Ipv6] {
            if rule.covers_family(family) {
                entries_of(rule, family, set, os_range, &mut out);
            }
        }
    }
    out
}

fn entries_of(rule: &Rule, family: Family, set: &RuleSet, os: PortRange, out: &mut Vec<Entry>) {
    let (dests, name) = match &rule.dest {
        Dest::Any => (Dests::Any, None),
        Dest::Pattern(p) => (Dests::Addrs(vec![AddrMask::of(p)]), None),
        Dest::Name(name) => {
            let Some(answers) = addresses(&set.names, name) else {
                return; // unresolved: the rule matches nothing
            };
            let addrs: Vec<AddrMask> = answers
                .iter()
                .map(|&a| AddrMask::of(&AddrPattern::exact(a)))
                .filter(|m| {
                    matches!(
                        (m.addr, family),
                        (IpAddr::V4(_), Family::Ipv4) | (IpAddr::V6(_), Family::Ipv6)
                    )
                })
                .collect();
            (Dests::Addrs(addrs), Some(name.clone()))
        }
    };
    let action = match rule.origin {
        Origin::Os => Action::Accept { source_ports: os },
        Origin::Range(range) => Action::Accept {
            source_ports: range,
        },
        Origin::Deny => Action::Drop,
    };
    let ports = rule.dest_ports.normalized();
    let all_ports = ports.len() == 1 && ports[0].is_any();
    let entry = |dests: Dests, dests_negated, ports: Vec<PortRange>, ports_negated| Entry {
        line: rule.line,
        text: rule.text.clone(),
        remark: rule.remark.clone(),
        name: name.clone(),
        family,
        protocols: rule.protocols,
        dests,
        dests_negated,
        ports,
        ports_negated,
        action,
    };
    let no_addr = matches!(&dests, Dests::Addrs(a) if a.is_empty());
    if !rule.negated {
        if !no_addr {
            out.push(entry(dests, false, ports, false));
        }
        return;
    }
    // `!`: the address outside, or the port outside.
    match (&dests, no_addr) {
        // Every address of the family is outside a name without one.
        (_, true) => out.push(entry(Dests::Any, false, vec![PortRange::ANY], false)),
        // No address is outside `*`: only the ports can be.
        (Dests::Any, _) => {}
        _ => out.push(entry(dests.clone(), true, vec![PortRange::ANY], false)),
    }
    if !all_ports && !no_addr {
        out.push(entry(dests, false, ports, true));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{Names, grammar::parse};

    fn set(text: &str) -> RuleSet {
        let rules = parse(text).unwrap();
        RuleSet::from_parts(Path::new("r.ini"), rules, Names::new(), vec![]).unwrap()
    }

    const OS: PortRange = PortRange {
        lo: 32768,
        hi: 60999,
    };

    #[test]
    fn patterns_become_address_and_mask() {
        let shown = |text: &str| {
            let e = entries(&set(text), OS);
            let Dests::Addrs(a) = &e[0].dests else {
                panic!("{e:?}")
            };
            a[0].to_string()
        };
        assert_eq!(shown("10.0.0.0/8 * : 1"), "10.0.0.0/8");
        assert_eq!(shown("10.*.5.* * : 1"), "10.0.5.0/255.0.255.0");
        assert_eq!(shown("10.1.1.1 * : 1"), "10.1.1.1");
        assert_eq!(shown("2001:db8::/32 * : 1"), "2001:db8::/32");
        assert_eq!(shown("192.168.4.0/22 * : 1"), "192.168.4.0/22");
    }

    #[test]
    fn order_deny_and_negation_keep_their_meaning() {
        let e = entries(
            &set("10.1.1.1 22 : deny\n! 10.0.0.0/8 22,80 : 100-109\n* * : 0 udp\n"),
            OS,
        );
        let summary: Vec<_> = e
            .iter()
            .map(|e| (e.line, e.family, e.dests_negated, e.ports_negated, e.action))
            .collect();
        let accept = |lo, hi| Action::Accept {
            source_ports: PortRange { lo, hi },
        };
        assert_eq!(
            summary,
            [
                (1, Family::Ipv4, false, false, Action::Drop),
                // The address outside 10/8, or a port other than 22 and 80.
                (2, Family::Ipv4, true, false, accept(100, 109)),
                (2, Family::Ipv4, false, true, accept(100, 109)),
                // `*`: both families; `0`: the host's ephemeral ports.
                (3, Family::Ipv4, false, false, accept(32768, 60999)),
                (3, Family::Ipv6, false, false, accept(32768, 60999)),
            ]
        );
        assert_eq!(
            e[2].ports,
            [PortRange { lo: 22, hi: 22 }, PortRange { lo: 80, hi: 80 }]
        );
        assert_eq!(e[3].dests, Dests::Any);
    }
}
