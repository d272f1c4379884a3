//! A rule's identity across rule sets: its text and which occurrence of
//! that text it is (the n-th `* * : 42000-43000` of the file). The same
//! identity carries a rule's counters over when the file changes, and, as a
//! 64-bit [`rule_keys`], keys the instance's occupancy in the kernel (ports
//! in use and their high-water mark), which the hook and the socket
//! releases update under that key whatever rule set is in force.

use std::collections::HashMap;

use crate::{
    RuleSet,
    rule::{Origin, Rule},
};

/// What a rule set's record keeps of each rule: where it is, what it says,
/// its key, and its origin range.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RuleInfo {
    pub line: u32,
    pub text: String,
    /// Its key in the instance's occupancy map ([`rule_keys`]).
    #[cfg_attr(feature = "serde", serde(default))]
    pub key: u64,
    /// Ports in its origin range (0: the OS chooses).
    #[cfg_attr(feature = "serde", serde(default))]
    pub ports: u32,
    /// The rule says `deny`.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "std::ops::Not::not")
    )]
    pub deny: bool,
    /// The comment after the rule on its line.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub remark: Option<String>,
    /// Its origin range, first and last port (`None`: the OS chooses, it
    /// denies, or a record written before ranges were recorded).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub origin: Option<(u16, u16)>,
}

/// The stable key of each rule: a 64-bit FNV-1a hash of its text and of
/// which occurrence of that text it is (0 for the first). The same rule
/// keeps its key in every rule set, so sockets bound under one set are
/// released against the same occupancy under the next.
pub fn rule_keys(texts: &[&str]) -> Vec<u64> {
    let mut seen: HashMap<&str, u64> = HashMap::new();
    texts
        .iter()
        .map(|text| {
            let occurrence = seen.entry(text).or_default();
            let key = fnv1a(text.as_bytes(), *occurrence);
            *occurrence += 1;
            key
        })
        .collect()
}

/// The keys of `rules`, by rule index.
pub fn keys_of(rules: &[Rule]) -> Vec<u64> {
    let texts: Vec<&str> = rules.iter().map(|r| r.text.as_str()).collect();
    rule_keys(&texts)
}

/// What a record keeps of each rule of `set`, in file order.
pub fn rule_infos(set: &RuleSet) -> Vec<RuleInfo> {
    set.rules
        .iter()
        .zip(keys_of(&set.rules))
        .map(|(rule, key)| RuleInfo {
            line: rule.line,
            text: rule.text.clone(),
            key,
            ports: match rule.origin {
                Origin::Os | Origin::Deny => 0,
                Origin::Range(r) => u32::from(r.hi) - u32::from(r.lo) + 1,
            },
            deny: rule.origin == Origin::Deny,
            remark: rule.remark.clone(),
            origin: match rule.origin {
                Origin::Os | Origin::Deny => None,
                Origin::Range(r) => Some((r.lo, r.hi)),
            },
        })
        .collect()
}

fn fnv1a(text: &[u8], occurrence: u64) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    text.iter()
        .chain(&[0xff])
        .chain(&occurrence.to_le_bytes())
        .fold(OFFSET, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(PRIME)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rule_keeps_its_key_by_text_and_occurrence() {
        let before = rule_keys(&["a", "b", "a"]);
        let after = rule_keys(&["b", "new", "a", "a", "a"]);
        // The identities the counters follow: "b", then the 1st and 2nd "a".
        assert_eq!(after[0], before[1]);
        assert_eq!(after[2], before[0]);
        assert_eq!(after[3], before[2]);
        let mut all = after.clone();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 5, "distinct rules, distinct keys");
        // Stable across builds and versions: a fixed function, not std's hasher.
        assert_eq!(rule_keys(&["a"]), [fnv1a(b"a", 0)]);
        assert_eq!(fnv1a(b"", 0), 0x2032_dd64_3620_252e);
    }
}
