//! `rulebpf gc`: what gone cgroups left behind, removed.

use std::path::Path;

use crate::{
    instance::{self, Instance, InstanceError},
    model::name::InstanceName,
    sys::cgroup::{self, Cgroup},
};

/// Collects the garbage; one line for each thing removed.
pub fn gc() -> Result<Vec<String>, InstanceError> {
    let mut lines = Vec::new();
    for instance in Instance::all()? {
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
    for id in instance::legacy::collect_garbage(cgroup_exists)? {
        lines.push(format!(
            "removed cg-{id} of the previous layout (its cgroup is gone)"
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
    if lines.is_empty() {
        lines.push("nothing to collect".into());
    }
    Ok(lines)
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
