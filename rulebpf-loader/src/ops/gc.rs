//! `rulebpf gc`: what gone cgroups left behind, removed.

use std::path::Path;

use crate::{
    instance::{self, CommandLock, Instance, InstanceError},
    model::{layout, name::InstanceName},
    sys::cgroup::{self, Cgroup},
};

/// What `gc` did, and what it could not do.
#[derive(Debug, Default)]
pub struct Collected {
    /// One line for each thing removed.
    pub lines: Vec<String>,
    /// One line for each instance it could not look at (an unreadable
    /// record): the others are collected all the same.
    pub failures: Vec<String>,
}

/// Collects the garbage of every instance.
pub fn gc() -> Result<Collected, InstanceError> {
    let mut collected = Collected::default();
    for instance in Instance::all()? {
        let name = instance.name().clone();
        drop(instance);
        let mut collect = || -> Result<(), InstanceError> {
            let _lock = CommandLock::acquire(&name)?;
            match Instance::open(&name)? {
                Some(instance) => collect_instance(instance, &mut collected.lines),
                None => Ok(()),
            }
        };
        if let Err(e) = collect() {
            collected
                .failures
                .push(format!("instance {name}: {}", crate::with_causes(&e)));
        }
    }
    let lines = &mut collected.lines;
    for id in instance::legacy::collect_garbage(cgroup_exists)? {
        lines.push(format!(
            "removed {} of the previous layout (its cgroup is gone)",
            layout::legacy_dir(id)
        ));
    }
    let orphans = instance::collect_orphan_records()?;
    if !orphans.is_empty() {
        lines.push(format!(
            "removed {} record director{} with no pins",
            orphans.len(),
            if orphans.len() == 1 { "y" } else { "ies" }
        ));
    }
    if lines.is_empty() && collected.failures.is_empty() {
        lines.push("nothing to collect".into());
    }
    Ok(collected)
}

/// One instance's garbage: attachments of gone cgroups, and the instance
/// itself when it was named after one of them and nothing is left.
fn collect_instance(instance: Instance, lines: &mut Vec<String>) -> Result<(), InstanceError> {
    {
        let removed = instance.collect_garbage()?;
        for attachment in &removed {
            lines.push(format!(
                "instance {}: removed the attachment to {} (cgroup id {}, gone)",
                instance.name(),
                attachment.cgroup.display(),
                attachment.cgroup_id
            ));
        }
        let named_after_gone = removed.iter().any(|a| {
            Cgroup::relative(&a.cgroup)
                .ok()
                .and_then(|rel| InstanceName::for_cgroup(&rel).ok())
                .as_ref()
                == Some(instance.name())
        });
        if named_after_gone
            && instance.record()?.attachments.is_empty()
            && instance.managed_by()?.is_none()
        {
            let name = instance.name().clone();
            instance.remove()?;
            lines.push(format!("removed instance {name} (its cgroup is gone)"));
        }
    }
    Ok(())
}

/// Whether a cgroup with id `id` exists (a slow walk; only for `gc`).
fn cgroup_exists(id: u64) -> bool {
    fn walk(dir: &Path, id: u64) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return false;
        };
        entries.flatten().any(|e| {
            e.file_type().is_ok_and(|t| t.is_dir())
                && (e.metadata().is_ok_and(|m| m.ino() == id) || walk(&e.path(), id))
        })
    }
    cgroup::cgroup2_mount().is_ok_and(|root| walk(&root, id))
}
