//! `rulebpf detach`: a whole instance (`--name`), an instance's attachment
//! to one cgroup (`--name` and `--cgroup`), or every rulebpf hook on one
//! cgroup (`--cgroup`).

use std::path::Path;

use crate::{
    instance::{self, Instance, InstanceError},
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
    let instances = match name {
        Some(name) => {
            let name = InstanceName::new(name)?;
            match Instance::open(&name)? {
                Some(instance) => vec![instance],
                None if path.is_none() => return Ok(format!("no instance named {name}")),
                None => vec![],
            }
        }
        None => Instance::all()?,
    };
    let Some(path) = path else {
        // The whole instance.
        let instance = instances.into_iter().next().expect("one instance");
        instance.check_unmanaged(force)?;
        let name = instance.name().clone();
        instance.remove()?;
        return Ok(format!("removed instance {name}"));
    };
    let derived = Cgroup::relative(&path)
        .ok()
        .and_then(|rel| InstanceName::for_cgroup(&rel).ok());
    let mut detached = false;
    for instance in instances {
        let recorded = instance
            .record()?
            .attachments
            .iter()
            .any(|a| a.cgroup == path);
        if !recorded {
            continue;
        }
        instance.check_unmanaged(force)?;
        detached |= instance.detach_cgroup(&path)?;
        // An instance named after this cgroup has no reason to stay.
        if Some(instance.name()) == derived.as_ref() && instance.record()?.attachments.is_empty() {
            instance.remove()?;
        }
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
