//! Source NAT that could rewrite the origin ports rulebpf chose, found in
//! a network namespace's nftables ruleset (`nft -j list ruleset`, which
//! also holds the rules iptables-nft made), and the rules it could apply
//! to. Pure: the ruleset is read by `crate::sys::nat`.
//!
//! Only `nat` chains on the `postrouting` hook can rewrite a connection's
//! source (`snat` and `masquerade` are refused elsewhere, bar `input`,
//! which sees arriving packets only).
//! https://git.netfilter.org/nftables/tree/doc/statements.txt (NAT STATEMENTS)

use std::{fmt, net::IpAddr};

use rulebpf_common::Family;
use rulebpf_rules::rule::{AddrPattern, Dest, Origin, Rule};
use serde_json::Value;

/// What a NAT rule does to the origin port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortFate {
    /// `random`, `fully-random` or a port mapping: rewritten every time.
    Rewritten,
    /// Kept unless the translated source already has a connection from
    /// that port to the same destination; then the kernel picks another.
    KeptUnlessClash,
    /// An iptables target (`xt`) whose options nft cannot show: assume it
    /// may rewrite.
    Unknown,
}

/// One `snat`/`masquerade` rule of a postrouting nat chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatRule {
    /// `table ip nat chain POSTROUTING handle 7`.
    pub place: String,
    /// `masquerade fully-random`, `snat to 192.0.2.1:1024-2048`, ...
    pub action: String,
    pub fate: PortFate,
    /// Families it can see: a table of family `ip` sees IPv4 only.
    pub families: Vec<Family>,
    /// Destination conditions (`ip daddr`), each: negated, the addresses.
    pub daddr: Vec<(bool, Vec<AddrPattern>)>,
    /// Whether it also requires something about the source (`ip saddr`,
    /// an interface): shown, not evaluated.
    pub other_conditions: bool,
}

impl NatRule {
    /// Whether this NAT rule could see a connection rulebpf's `rule` decides.
    pub fn could_apply(&self, rule: &Rule) -> bool {
        let dests: Vec<AddrPattern> = match (&rule.dest, rule.negated) {
            (Dest::Pattern(p), false) => vec![*p],
            // A name's answers change; a negated destination is nearly
            // everything: either may meet any NAT rule of its families.
            _ => [Family::Ipv4, Family::Ipv6]
                .into_iter()
                .filter(|f| rule.covers_family(*f))
                .map(AddrPattern::any)
                .collect(),
        };
        dests.iter().any(|dest| {
            self.families.contains(&dest.family())
                && self.daddr.iter().all(|(negated, set)| {
                    let family: Vec<_> =
                        set.iter().filter(|p| p.family() == dest.family()).collect();
                    if *negated {
                        // Excluded only when every address of the rule is.
                        !family.iter().any(|p| contains(p, dest))
                    } else {
                        family.iter().any(|p| overlaps(p, dest))
                    }
                })
        })
    }
}

impl fmt::Display for NatRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.place, self.action)?;
        f.write_str(match self.fate {
            PortFate::Rewritten => " (rewrites every origin port)",
            PortFate::KeptUnlessClash => {
                " (keeps the origin port unless the translated source already uses it to the same \
                 destination; then the kernel picks another)"
            }
            PortFate::Unknown => {
                " (an iptables target: nft does not show its options, so it may rewrite every \
                 origin port)"
            }
        })?;
        if self.other_conditions {
            f.write_str(" [with conditions on the source or interface: check them]")?;
        }
        Ok(())
    }
}

fn overlaps(a: &AddrPattern, b: &AddrPattern) -> bool {
    a.family() == b.family()
        && a.octets()
            .iter()
            .zip(b.octets())
            .all(|(x, y)| x.lo <= y.hi && y.lo <= x.hi)
}

/// Whether every address of `inner` is in `outer`.
fn contains(outer: &AddrPattern, inner: &AddrPattern) -> bool {
    outer.family() == inner.family()
        && outer
            .octets()
            .iter()
            .zip(inner.octets())
            .all(|(o, i)| o.lo <= i.lo && i.hi <= o.hi)
}

/// The NAT rules of `ruleset` (the JSON `nft -j list ruleset` prints) that
/// could rewrite a connection's source.
pub fn nat_rules(ruleset: &Value) -> Vec<NatRule> {
    let items = ruleset["nftables"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    let rules: Vec<&Value> = items.iter().filter_map(|item| item.get("rule")).collect();
    let key = |v: &Value| -> Option<(String, String, String)> {
        Some((
            v["family"].as_str()?.to_string(),
            v["table"].as_str()?.to_string(),
            v["chain"].as_str().or(v["name"].as_str())?.to_string(),
        ))
    };
    // (family, table, chain) of every postrouting nat chain, then every
    // chain those jump or go to (iptables-nft, Docker, CNI and kube-proxy
    // put their masquerade in such chains).
    let mut chains: Vec<(String, String, String)> = items
        .iter()
        .filter_map(|item| item.get("chain"))
        .filter(|c| c["type"] == "nat" && c["hook"] == "postrouting")
        .filter_map(key)
        .collect();
    let mut i = 0;
    while i < chains.len() {
        let (family, table, _) = chains[i].clone();
        for rule in &rules {
            if key(rule).as_ref() != Some(&chains[i]) {
                continue;
            }
            for expr in rule["expr"].as_array().map_or(&[][..], Vec::as_slice) {
                let target = expr["jump"]["target"]
                    .as_str()
                    .or(expr["goto"]["target"].as_str());
                if let Some(target) = target {
                    let next = (family.clone(), table.clone(), target.to_string());
                    if !chains.contains(&next) {
                        chains.push(next);
                    }
                }
            }
        }
        i += 1;
    }
    rules
        .iter()
        .filter_map(|rule| {
            let k = key(rule)?;
            chains
                .contains(&k)
                .then(|| nat_rule((&k.0, &k.1, &k.2), rule))
                .flatten()
        })
        .collect()
}

fn nat_rule((family, table, chain): (&str, &str, &str), rule: &Value) -> Option<NatRule> {
    let exprs = rule["expr"].as_array()?;
    let (action, fate) = exprs.iter().find_map(action)?;
    let families = match family {
        "ip" => vec![Family::Ipv4],
        "ip6" => vec![Family::Ipv6],
        _ => vec![Family::Ipv4, Family::Ipv6],
    };
    let mut daddr = Vec::new();
    let mut other_conditions = false;
    for expr in exprs {
        let Some(m) = expr.get("match") else { continue };
        let field = &m["left"]["payload"];
        if field["field"] == "daddr" && (field["protocol"] == "ip" || field["protocol"] == "ip6") {
            match addresses(&m["right"]) {
                Some(set) => daddr.push((m["op"] == "!=", set)),
                None => other_conditions = true,
            }
        } else {
            other_conditions = true;
        }
    }
    Some(NatRule {
        place: format!(
            "table {family} {table} chain {chain} handle {}",
            rule["handle"]
        ),
        action,
        fate,
        families,
        daddr,
        other_conditions,
    })
}

/// `snat`/`masquerade` (nft's own) or an iptables `SNAT`/`MASQUERADE`
/// target, described, with what it does to the port.
fn action(expr: &Value) -> Option<(String, PortFate)> {
    let obj = expr.as_object()?;
    if let Some(xt) = obj.get("xt") {
        let name = xt["name"].as_str()?;
        return matches!(name, "MASQUERADE" | "SNAT")
            .then(|| (format!("iptables -j {name}"), PortFate::Unknown));
    }
    let (verb, args) = obj
        .iter()
        .find(|(k, _)| *k == "snat" || *k == "masquerade")?;
    let flags: Vec<String> = match &args["flags"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|f| f.as_str().map(String::from))
            .collect(),
        _ => vec![],
    };
    let port = &args["port"];
    let mapped = !port.is_null();
    let random = flags.iter().any(|f| f == "random" || f == "fully-random");
    let mut text = verb.clone();
    if let Some(addr) = args["addr"].as_str() {
        text.push_str(&format!(" to {addr}"));
    }
    if mapped {
        text.push_str(&format!(" port {}", compact(port)));
    }
    for flag in &flags {
        text.push_str(&format!(" {flag}"));
    }
    let fate = if random || mapped {
        PortFate::Rewritten
    } else {
        PortFate::KeptUnlessClash
    };
    Some((text, fate))
}

fn compact(value: &Value) -> String {
    match value {
        Value::Object(o) if o.contains_key("range") => {
            let r = &o["range"];
            format!("{}-{}", r[0], r[1])
        }
        other => other.to_string(),
    }
}

/// The addresses of a match's right side: one address, a prefix, a range
/// (by the prefix covering it) or a set of those; `None` for anything else.
fn addresses(right: &Value) -> Option<Vec<AddrPattern>> {
    if let Some(set) = right.get("set").and_then(Value::as_array) {
        return set.iter().map(one).collect::<Option<Vec<_>>>();
    }
    Some(vec![one(right)?])
}

fn one(value: &Value) -> Option<AddrPattern> {
    if let Some(addr) = value.as_str() {
        return addr.parse::<IpAddr>().ok().map(AddrPattern::exact);
    }
    if let Some(prefix) = value.get("prefix") {
        let addr = prefix["addr"].as_str()?.parse().ok()?;
        return Some(AddrPattern::prefix(addr, prefix["len"].as_u64()? as u8));
    }
    if let Some(range) = value.get("range") {
        let lo: IpAddr = range[0].as_str()?.parse().ok()?;
        let hi: IpAddr = range[1].as_str()?.parse().ok()?;
        let common = match (lo, hi) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) ^ u32::from(b)).leading_zeros(),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a) ^ u128::from(b)).leading_zeros(),
            _ => return None,
        };
        return Some(AddrPattern::prefix(lo, common as u8));
    }
    None
}

/// One warning per NAT rule that could apply to some of `rules`, naming
/// their lines (`file` for the message).
pub fn warnings(file: &str, rules: &[Rule], nat: &[NatRule]) -> Vec<String> {
    nat.iter()
        .filter_map(|n| {
            let lines: Vec<String> = rules
                .iter()
                .filter(|r| matches!(r.origin, Origin::Range(_)) && n.could_apply(r))
                .map(|r| r.line.to_string())
                .collect();
            (!lines.is_empty()).then(|| {
                format!(
                    "{file}: NAT in this network namespace may change the origin ports of \
                     line{} {}: {n}",
                    if lines.len() == 1 { "" } else { "s" },
                    lines.join(", ")
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rulebpf_rules::ruleset::RuleSet;

    const RULESET: &str = r#"{"nftables": [
      {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
      {"table": {"family": "ip", "name": "t", "handle": 1}},
      {"chain": {"family": "ip", "table": "t", "name": "post", "handle": 1, "type": "nat",
                 "hook": "postrouting", "prio": 100, "policy": "accept"}},
      {"chain": {"family": "ip", "table": "t", "name": "other", "handle": 2}},
      {"rule": {"family": "ip", "table": "t", "chain": "post", "handle": 3, "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                   "right": {"prefix": {"addr": "203.0.113.0", "len": 24}}}},
        {"masquerade": {"flags": ["fully-random"]}}]}},
      {"rule": {"family": "ip", "table": "t", "chain": "post", "handle": 4, "expr": [
        {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                   "right": {"prefix": {"addr": "10.0.0.0", "len": 8}}}},
        {"masquerade": null}]}},
      {"rule": {"family": "ip", "table": "t", "chain": "post", "handle": 5, "expr": [
        {"snat": {"addr": "192.0.2.1", "port": {"range": [1024, 2048]}}}]}},
      {"rule": {"family": "ip", "table": "t", "chain": "other", "handle": 6, "expr": [
        {"masquerade": {"flags": "random"}}]}},
      {"chain": {"family": "ip", "table": "t", "name": "CNI-1", "handle": 7}},
      {"rule": {"family": "ip", "table": "t", "chain": "post", "handle": 8, "expr": [
        {"jump": {"target": "CNI-1"}}]}},
      {"rule": {"family": "ip", "table": "t", "chain": "CNI-1", "handle": 9, "expr": [
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                   "right": "198.51.100.1"}},
        {"xt": {"type": "target", "name": "MASQUERADE"}}]}}
    ]}"#;

    fn rules(text: &str) -> Vec<Rule> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.ini");
        std::fs::write(&path, text).unwrap();
        RuleSet::load(&path).unwrap().rules
    }

    #[test]
    fn finds_what_rewrites_and_which_rules_it_meets() {
        let nat = nat_rules(&serde_json::from_str(RULESET).unwrap());
        // The chain `other` is no postrouting chain and nothing jumps to
        // it; CNI-1 is reached by a jump.
        assert_eq!(nat.len(), 4, "{nat:?}");
        assert_eq!(nat[3].fate, PortFate::Unknown);
        assert_eq!(nat[3].place, "table ip t chain CNI-1 handle 9");
        assert_eq!(nat[0].fate, PortFate::Rewritten);
        assert_eq!(nat[0].action, "masquerade fully-random");
        assert_eq!(nat[1].fate, PortFate::KeptUnlessClash);
        assert_eq!(nat[2].fate, PortFate::Rewritten);
        assert_eq!(nat[2].action, "snat to 192.0.2.1 port 1024-2048");
        let rules = rules(
            "203.0.113.7 21 : 41000-41010\n10.1.2.3 21 : 42000\n::1 21 : 43000\n198.51.100.1 22 : deny\n",
        );
        let hits = |n: &NatRule| -> Vec<u32> {
            rules
                .iter()
                .filter(|r| n.could_apply(r))
                .map(|r| r.line)
                .collect()
        };
        assert_eq!(hits(&nat[0]), [1]);
        // != 10/8: every IPv4 rule but the one inside 10/8.
        assert_eq!(hits(&nat[1]), [1, 4]);
        assert_eq!(hits(&nat[2]), [1, 2, 4]);
        let text = warnings("r.ini", &rules, &nat);
        assert_eq!(text.len(), 3, "{text:?}");
        assert!(text[0].contains("line 1: table ip t chain post handle 3: masquerade fully-random (rewrites every origin port)"), "{}", text[0]);
        // A deny rule's connections never leave: not named.
        assert!(text[1].contains("line 1: "), "{}", text[1]);
    }
}
