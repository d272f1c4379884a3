//! The reference semantics of a rule file: the first rule, in file order,
//! that matches a connect() decides.
//!
//! This is deliberately the slow, obvious reading of the spec, straight from
//! the rules: [`crate::compile::Compiled::lookup`] (what the hook computes) is
//! tested against it, and `rulebpf explain` refuses to answer when they differ.

use std::net::IpAddr;

use rulebpf_common::Protocol;

use crate::{
    resolve::{Names, addresses},
    rule::{Dest, Rule, canonical, family_of},
};

/// The index in `rules` of the rule deciding a connect() to `addr:port` on a
/// `protocol` socket, or `None` when no rule matches (the OS chooses).
///
/// A rule takes part when it covers the protocol and the destination's family
/// (an IPv4-mapped destination is IPv4); a DNS name matches the addresses
/// `names` holds for it, and a rule whose name has none is left out, negated
/// or not. A negated rule matches when the address or the port is outside it.
pub fn first_match(
    rules: &[Rule],
    names: &Names,
    protocol: Protocol,
    addr: IpAddr,
    port: u16,
) -> Option<usize> {
    let addr = canonical(addr);
    let family = family_of(addr);
    rules.iter().position(|rule| {
        if !rule.protocols.covers(protocol) || !rule.covers_family(family) {
            return false;
        }
        let addr_hit = match &rule.dest {
            Dest::Pattern(pattern) => pattern.matches(addr),
            Dest::Any => true,
            Dest::Name(name) => match addresses(names, name) {
                Some(answers) => answers.iter().any(|&a| canonical(a) == addr),
                None => return false,
            },
        };
        (addr_hit && rule.dest_ports.contains(port)) != rule.negated
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grammar::parse;

    #[test]
    fn first_match_honours_order_and_negation() {
        let rules = parse("! 10.*.*.* 22 : 100\n10.*.*.* * : 200\n").unwrap();
        let decide = |ip: [u8; 4], port| {
            first_match(&rules, &Names::new(), Protocol::Tcp, ip.into(), port)
                .map(|i| rules[i].line)
        };
        assert_eq!(decide([10, 0, 0, 1], 22), Some(2)); // inside 10/8 port 22 -> not negated hit
        assert_eq!(decide([10, 0, 0, 1], 80), Some(1)); // port outside the set -> negation matches
        assert_eq!(decide([11, 0, 0, 1], 22), Some(1)); // address outside -> negation matches
    }
}
