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

use aya::programs::links::{FdLink, PinnedLink};

use super::{InstanceError, Tops};
use crate::{
    model::{layout, program::Hook},
    sys::securedir::{SecureDir, SecureDirError},
};

/// Ids of the cgroups that have a previous-layout instance pinned.
fn all(pins: &SecureDir) -> Result<Vec<u64>, SecureDirError> {
    Ok(pins
        .entries()?
        .into_iter()
        .filter_map(|(name, _)| layout::legacy_cgroup_id(&name))
        .collect())
}

/// Removes the previous-layout instance of cgroup `id`: its pins (which
/// detaches its links) and its records. False when there was none.
pub(super) fn remove(
    pins: &SecureDir,
    records: Option<&SecureDir>,
    cgroup_id: u64,
) -> Result<bool, SecureDirError> {
    let name = layout::legacy_dir(cgroup_id);
    let removed = pins.remove_tree(&name)?;
    if let Some(records) = records {
        records.remove_tree(&name)?;
    }
    Ok(removed)
}

/// Program ids of the previous-layout instance's links on cgroup `id`.
pub(super) fn programs_on(cgroup_id: u64) -> Result<Vec<u32>, InstanceError> {
    let Some(tops) = Tops::existing()? else {
        return Ok(vec![]);
    };
    let Some(dir) = tops.pins.subdir(&layout::legacy_dir(cgroup_id), false)? else {
        return Ok(vec![]);
    };
    let mut out = Vec::new();
    for hook in Hook::ALL {
        if let Ok(link) = PinnedLink::from_pin(dir.fd_path(&layout::link_pin(hook)))
            && let Ok(info) = FdLink::from(link).info()
        {
            out.push(info.program_id());
        }
    }
    Ok(out)
}

/// Removes the previous layout's instance of cgroup `id`, if any.
pub fn remove_for(cgroup_id: u64) -> Result<bool, InstanceError> {
    let Some(tops) = Tops::existing()? else {
        return Ok(false);
    };
    Ok(remove(&tops.pins, Some(&tops.records), cgroup_id)?)
}

/// Removes the previous layout's instances whose cgroup is gone, and
/// returns their cgroup ids (`rulebpf gc`).
pub fn collect_garbage(live: impl Fn(u64) -> bool) -> Result<Vec<u64>, InstanceError> {
    let Some(tops) = Tops::existing()? else {
        return Ok(vec![]);
    };
    let mut removed = Vec::new();
    for id in all(&tops.pins)? {
        if !live(id) {
            remove(&tops.pins, Some(&tops.records), id)?;
            removed.push(id);
        }
    }
    Ok(removed)
}
