//! DNS names in rules -> IPv4 and IPv6 addresses, with the system resolver.
//!
//! getaddrinfo(3) is used (through the standard library), so /etc/hosts and
//! nsswitch.conf are honoured exactly as for the gateway itself. Every address
//! of a name (A and AAAA) is kept: a rule on a name covers all of them. Names
//! are resolved by the loader, never in the kernel.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, ToSocketAddrs as _},
    thread,
};

use crate::rule::{Dest, Rule, canonical};

/// The answers for the DNS names the rules use (IPv4 and IPv6 addresses);
/// a name absent here (or with no address) matches nothing.
pub type Names = HashMap<String, Vec<IpAddr>>;

/// The addresses of `name`, or `None` when it has none: such a name is
/// unresolved, and its rule is left out (the compiler and the reference
/// first match agree on this through this one function).
pub fn addresses<'a>(names: &'a Names, name: &str) -> Option<&'a [IpAddr]> {
    names.get(name).map(Vec::as_slice).filter(|a| !a.is_empty())
}

/// A name that did not resolve, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameFailure {
    pub name: String,
    pub reason: String,
}

/// The distinct DNS names used by `rules`, in first-use order.
pub fn names_in(rules: &[Rule]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    rules
        .iter()
        .filter_map(|r| match &r.dest {
            Dest::Name(name) if seen.insert(name.clone()) => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// Resolves every name (in parallel: a gateway's file can name many hosts).
pub fn resolve_all(names: &[String]) -> (Names, Vec<NameFailure>) {
    let results: Vec<(String, Result<Vec<IpAddr>, String>)> = thread::scope(|scope| {
        let handles: Vec<_> = names
            .chunks(names.len().div_ceil(16).max(1))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|n| (n.clone(), resolve(n)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut resolved = Names::new();
    let mut failures = Vec::new();
    for (name, result) in results {
        match result {
            Ok(addrs) => {
                resolved.insert(name, addrs);
            }
            Err(reason) => failures.push(NameFailure { name, reason }),
        }
    }
    (resolved, failures)
}

/// The answers of one resolution round, where a failed lookup falls back to
/// the last good answer (a gateway must not lose a partner to a DNS hiccup).
#[derive(Debug, Default)]
pub struct Answers {
    /// Fresh answers, and last good answers for failed lookups.
    pub names: Names,
    /// Failed lookups whose last good answer was kept.
    pub stale: Vec<NameFailure>,
    /// Failed lookups with no answer at all: their rules match nothing.
    pub unresolved: Vec<NameFailure>,
}

/// Combines a round's results (`resolve_all`) with the last good answers.
pub fn keep_last_good(fresh: Names, failures: Vec<NameFailure>, last_good: &Names) -> Answers {
    let mut answers = Answers {
        names: fresh,
        ..Answers::default()
    };
    for failure in failures {
        match last_good.get(&failure.name) {
            Some(addrs) => {
                answers.names.insert(failure.name.clone(), addrs.clone());
                answers.stale.push(failure);
            }
            None => answers.unresolved.push(failure),
        }
    }
    answers
}

/// One resolution round for every name `rules` use, a failed lookup
/// keeping its last good answer: what loading a file and the service's
/// DNS refresh both do.
pub fn refresh(rules: &[Rule], last_good: &Names) -> Answers {
    let (fresh, failures) = resolve_all(&names_in(rules));
    keep_last_good(fresh, failures, last_good)
}

/// All addresses of `name` (IPv4-mapped answers as IPv4), sorted, or why
/// there are none.
pub fn resolve(name: &str) -> Result<Vec<IpAddr>, String> {
    let addrs = (name, 0).to_socket_addrs().map_err(|e| e.to_string())?;
    let all: BTreeSet<IpAddr> = addrs.map(|a| canonical(a.ip())).collect();
    if all.is_empty() {
        return Err("no address".into());
    }
    Ok(all.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn localhost_resolves_through_the_system_resolver() {
        assert!(
            resolve("localhost")
                .unwrap()
                .contains(&IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }

    #[test]
    fn a_name_that_cannot_exist_fails_with_a_reason() {
        let (names, failures) = resolve_all(&["does-not-exist.invalid".to_string()]);
        assert!(names.is_empty());
        assert_eq!(failures.len(), 1);
        assert!(!failures[0].reason.is_empty());
    }

    #[test]
    fn a_failed_lookup_keeps_its_last_good_answer() {
        let fail = |n: &str| NameFailure {
            name: n.into(),
            reason: "timeout".into(),
        };
        let fresh = Names::from([(
            "a".to_string(),
            vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))],
        )]);
        let last = Names::from([(
            "b".to_string(),
            vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2))],
        )]);
        let answers = keep_last_good(fresh, vec![fail("b"), fail("c")], &last);
        assert_eq!(answers.names.len(), 2);
        assert_eq!(
            answers.names["b"],
            [IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2))]
        );
        assert_eq!(answers.stale, [fail("b")]);
        assert_eq!(answers.unresolved, [fail("c")]);
    }

    #[test]
    fn names_are_listed_once_in_first_use_order() {
        let rules = crate::grammar::parse(
            "b.example * : 1\n1.2.3.4 * : 1\na.example * : 1\nb.example 2 : 1",
        )
        .unwrap();
        assert_eq!(names_in(&rules), ["b.example", "a.example"]);
    }
}
