//! `rulebpf detach`: a whole instance (`--name`), an instance's attachment
//! to one cgroup (`--name` and `--cgroup`), or every rulebpf hook on one
//! cgroup (`--cgroup`). Each instance is changed under its command lock.

use std::path::{Path, PathBuf};

use crate::{
    instance::{self, CommandLock, Instance, InstanceError},
    model::name::InstanceName,
    sys::cgroup::Cgroup,
};

/// What `detach` did, one line (for the command's output).
pub fn detach(
    name: Option<&str>,
    cgroup: Option<&Path>,
    force: bool,
) -> Result<String, InstanceError> {
    let path = cgroup.map(Cgroup::path_of).transpose()?;
    let names = match name {
        Some(name) => vec![InstanceName::new(name)?],
        None => Instance::all()?
            .into_iter()
            .map(|i| i.name().clone())
            .collect(),
    };
    let Some(path) = path else {
        // The whole instance.
        let name = names.into_iter().next().expect("one name");
        let _lock = CommandLock::acquire(&name)?;
        let instance = Instance::open(&name)?.ok_or(InstanceError::NoInstance(name.clone()))?;
        instance.check_unmanaged(force)?;
        instance.remove()?;
        return Ok(format!("removed instance {name}"));
    };
    // Without --name every instance on the cgroup is looked at: one whose
    // record cannot be read is passed over (the kernel's answer below
    // removes its hooks all the same); named, it is the error.
    let skip_unreadable = name.is_none();
    let mut detached = false;
    for name in &names {
        detached |= detach_one(name, &path, force, skip_unreadable)?;
    }
    // The kernel decides what is left: any rulebpf hook still on the
    // cgroup (another instance's, a hidden one, the previous layout's) goes.
    if name.is_none()
        && let Ok(cgroup) = Cgroup::resolve(&path)
    {
        detached |= instance::clear_cgroup(&cgroup, None)? > 0;
        detached |= instance::legacy::remove_for(cgroup.id)?;
    }
    let what = if detached {
        "detached from"
    } else {
        "nothing attached to"
    };
    let shown = cgroup.expect("a cgroup").display();
    Ok(format!("{what} {shown}"))
}

/// Detaches instance `name` from the cgroup at `path`, if it is attached
/// there; `skip_unreadable`: an instance whose record cannot be read is
/// passed over with a warning (one bad record must not keep the cgroup's
/// hooks: the kernel's answer removes them afterwards).
fn detach_one(
    name: &InstanceName,
    path: &PathBuf,
    force: bool,
    skip_unreadable: bool,
) -> Result<bool, InstanceError> {
    let _lock = CommandLock::acquire(name)?;
    let Some(instance) = Instance::open(name)? else {
        return Ok(false);
    };
    let record = match instance.record() {
        Ok(record) => record,
        Err(e) if skip_unreadable => {
            log::warn!("instance {name}: skipped: {}", crate::with_causes(&e));
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    if !record.attachments.iter().any(|a| &a.cgroup == path) {
        return Ok(false);
    }
    instance.check_unmanaged(force)?;
    let detached = instance.detach_cgroup(path)?;
    // An instance named after this cgroup has no reason to stay.
    let derived = Cgroup::relative(path)
        .ok()
        .and_then(|rel| InstanceName::for_cgroup(&rel).ok());
    if Some(name) == derived.as_ref() && instance.record()?.attachments.is_empty() {
        instance.remove()?;
    }
    Ok(detached)
}
