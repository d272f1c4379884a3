//! Instances of the previous layout, one per cgroup, named by its id:
//!
//! ```text
//! /sys/fs/bpf/rulebpf/cg-<id>/link-connect4, link-connect6, gen-<N>/
//! /run/rulebpf/cg-<id>/state.json, lock
//! ```
//!
//! They are replaced without a gap: the new instance's links are attached
//! first (both programs then run; the old one, attached earlier, binds first
//! and the new one sees a bound socket), and only then are the old links'
//! pins removed, which detaches them.

use crate::securedir::{SecureDir, SecureDirError};

/// The cgroup id of a previous-layout instance directory name (`cg-<id>`).
pub fn cgroup_id_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("cg-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The directory name of the previous-layout instance of cgroup `id`.
pub fn dir_name(cgroup_id: u64) -> String {
    format!("cg-{cgroup_id}")
}

/// Ids of the cgroups that have a previous-layout instance pinned.
pub fn all(pins: &SecureDir) -> Result<Vec<u64>, SecureDirError> {
    Ok(pins
        .entries()?
        .into_iter()
        .filter_map(|(name, _)| cgroup_id_of(&name))
        .collect())
}

/// Removes the previous-layout instance of cgroup `id`: its pins (which
/// detaches its links) and its records. False when there was none.
pub fn remove(
    pins: &SecureDir,
    records: Option<&SecureDir>,
    cgroup_id: u64,
) -> Result<bool, SecureDirError> {
    let name = dir_name(cgroup_id);
    let removed = pins.remove_tree(&name)?;
    if let Some(records) = records {
        records.remove_tree(&name)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_cg_digits_is_the_old_layout() {
        assert_eq!(cgroup_id_of("cg-1146"), Some(1146));
        assert_eq!(cgroup_id_of("cg-"), None);
        assert_eq!(cgroup_id_of("cg-12x"), None);
        assert_eq!(cgroup_id_of("gateway"), None);
    }
}
