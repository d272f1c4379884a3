//! A rule file of arbitrary bytes, parsed and compiled as `rulebpf check`
//! does: nothing panics, every error is well formed, a rule's text reads
//! back as the same rule, and the compiled lookup (what the hook computes)
//! agrees with the reference first match on destinations drawn from the
//! rules themselves and on fixed ones (IPv4, IPv6, v4-mapped; TCP and UDP).
//!
//! No DNS: a name "resolves" to addresses derived from its text, or to none.
//! The compile budget is small, so that an amplifying input is refused
//! (which is correct) instead of filling the fuzzer's memory.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use rulebpf_rules::{
    Names, Protocol,
    compile::{Budget, CompileError, compile_within},
    first_match, grammar, resolve,
    rule::{Dest, Origin, PortRange, Rule},
};

fuzz_target!(|data: &[u8]| check(data));

/// Destinations and ports tried per input, at the most.
const MAX_ADDRESSES: usize = 24;
const MAX_PORTS: usize = 10;

fn check(data: &[u8]) {
    let (rules, errors) = grammar::parse_bytes(data);
    for error in &errors {
        assert!(error.line >= 1 && error.col >= 1, "{error:?}");
        assert!(
            !error.message.chars().any(char::is_control),
            "{:?}",
            error.message
        );
    }
    // A rule's text (its line, trimmed, without its remark) reads back as
    // the same rule.
    for rule in rules.iter().take(8) {
        let again = grammar::parse(&rule.text).unwrap_or_else(|e| panic!("{:?}: {e:?}", rule.text));
        assert_eq!(again.len(), 1, "{:?}", rule.text);
        assert_eq!(
            Rule {
                line: rule.line,
                remark: rule.remark.clone(),
                ..again[0].clone()
            },
            *rule
        );
    }
    // The good lines of a file with errors compile as a file of their own.
    let names = fake_names(&rules);
    let budget = Budget {
        max_kernel_bytes: 4 << 20,
        max_work: 1_000_000,
    };
    let compiled = match compile_within(&rules, &names, budget) {
        Ok(compiled) => compiled,
        Err(CompileError::KernelMemory { .. } | CompileError::Work { .. }) => return,
        Err(error) => panic!("{error}"),
    };
    let _ = compiled.kernel_memory(4);
    let ports = ports(&rules);
    for addr in addresses(&rules, &names) {
        for &port in &ports {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let got = compiled.lookup(protocol, addr, port);
                let want = first_match(&rules, &names, protocol, addr, port);
                assert_eq!(
                    got.map(|v| v.rule as usize),
                    want,
                    "{addr} port {port} {protocol}"
                );
                if let Some(verdict) = got {
                    let rule = &rules[verdict.rule as usize];
                    let origin = match rule.origin {
                        Origin::Os => (0, 0, false),
                        Origin::Range(range) => (range.lo, range.hi, false),
                        Origin::Deny => (0, 0, true),
                    };
                    assert_eq!(verdict.line, rule.line);
                    assert_eq!((verdict.org_lo, verdict.org_hi, verdict.denies()), origin);
                }
            }
        }
    }
}

/// FNV-1a: a name's stand-in for a DNS answer.
fn hash(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Answers for the rules' names, from a small universe so that they
/// overlap the rules' patterns: none, an empty answer, IPv4, IPv6, or
/// both with a v4-mapped one.
fn fake_names(rules: &[Rule]) -> Names {
    let mut names = Names::new();
    for name in resolve::names_in(rules) {
        let h = hash(&name);
        let v4 = IpAddr::V4(Ipv4Addr::new(
            10,
            (h >> 8) as u8 % 3,
            (h >> 16) as u8 % 3,
            (h >> 24) as u8 % 3,
        ));
        let v6 = IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0,
            0,
            0,
            0,
            0,
            (h >> 8) as u16 % 3,
        ));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, (h >> 4) as u8 % 3).to_ipv6_mapped());
        let answer = match h % 5 {
            0 => continue,
            1 => vec![],
            2 => vec![v4],
            3 => vec![v6],
            _ => vec![v4, v6, mapped],
        };
        names.insert(name, answer);
    }
    names
}

/// Fixed destinations, then the edges of the rules' patterns and their
/// names' addresses (and the v4-mapped form of some IPv4 ones).
fn addresses(rules: &[Rule], names: &Names) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = [
        "0.0.0.0",
        "255.255.255.255",
        "10.1.2.3",
        "::",
        "::1",
        "2001:db8::1",
        "::ffff:10.1.2.3",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    for rule in rules {
        if out.len() >= MAX_ADDRESSES {
            break;
        }
        match &rule.dest {
            Dest::Pattern(pattern) => {
                let octets = pattern.octets();
                let lo: Vec<u8> = octets.iter().map(|o| o.lo).collect();
                let hi: Vec<u8> = octets.iter().map(|o| o.hi).collect();
                // Just outside: the first octet that is not `*`, moved off.
                let mut outside = lo.clone();
                if let Some(k) = octets.iter().position(|o| !o.is_any()) {
                    outside[k] = if octets[k].lo > 0 {
                        octets[k].lo - 1
                    } else {
                        octets[k].hi.wrapping_add(1)
                    };
                }
                for bytes in [lo, hi, outside] {
                    let addr = address(&bytes);
                    out.push(addr);
                    if let IpAddr::V4(v4) = addr
                        && bytes[3] % 2 == 0
                    {
                        out.push(IpAddr::V6(v4.to_ipv6_mapped()));
                    }
                }
            }
            Dest::Name(name) => out.extend(names.get(name).into_iter().flatten().copied()),
            // Every address: the fixed ones above probe it.
            Dest::Any => {}
        }
    }
    out.truncate(MAX_ADDRESSES);
    out
}

fn address(bytes: &[u8]) -> IpAddr {
    match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).unwrap())),
        _ => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap())),
    }
}

/// Fixed ports, then the edges of the rules' port ranges.
fn ports(rules: &[Rule]) -> Vec<u16> {
    let mut out = vec![0, 80, u16::MAX];
    let ranges = rules.iter().flat_map(|rule| rule.dest_ports.ranges());
    for &PortRange { lo, hi } in ranges {
        if out.len() >= MAX_PORTS {
            break;
        }
        out.extend([lo, hi, lo.wrapping_sub(1), hi.wrapping_add(1)]);
    }
    out.truncate(MAX_PORTS);
    out
}
