//! `rulebpf oci-hook STAGE`: what [`oci::plan`] decided for a container,
//! done with the instance API.

use crate::{
    instance::{CommandLock, Instance, InstanceError},
    integrations::oci::{self, HookAction, OciError},
    model::records::AttachedBy,
    sys::cgroup::Cgroup,
};

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
}

/// Acts on the container whose state `input` holds, at `stage`.
pub fn oci_hook(stage: oci::Stage, input: impl std::io::Read) -> Result<(), ContainerError> {
    let state = oci::read_state(input)?;
    match oci::plan(stage, &state, &oci::System)? {
        HookAction::Attach {
            instance,
            cgroup,
            container,
        } => {
            let _lock = CommandLock::acquire(&instance)?;
            let opened = Instance::open(&instance)?.ok_or(InstanceError::NoInstance(instance))?;
            let cgroup = Cgroup::resolve(&cgroup).map_err(InstanceError::from)?;
            opened.attach(&cgroup, AttachedBy::Container { id: container })?;
            collect_gone(&opened);
        }
        HookAction::Detach {
            instance,
            container,
        } => {
            let _lock = CommandLock::acquire(&instance)?;
            // The instance may have been removed meanwhile: nothing to undo.
            if let Some(opened) = Instance::open(&instance)? {
                let by = AttachedBy::Container { id: container };
                for attachment in opened.record()?.attachments {
                    if attachment.by == by {
                        opened.detach_id(attachment.cgroup_id)?;
                    }
                }
                collect_gone(&opened);
            }
        }
        HookAction::Nothing(_) => {}
    }
    Ok(())
}

/// A container whose start failed after createRuntime never gets its
/// poststop: the attachments of such gone cgroups are collected by the next
/// hook call of the instance (and by `rulebpf run`). Best effort: the
/// container at hand is served whatever this finds.
fn collect_gone(instance: &Instance) {
    if let Err(e) = instance.collect_garbage() {
        log::warn!(
            "instance {}: collecting attachments of gone cgroups: {}",
            instance.name(),
            crate::with_causes(&e)
        );
    }
}
