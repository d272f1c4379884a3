//! `rulebpf oci-hook STAGE`: what [`oci::plan`] decided for a container,
//! done with the instance API.

use crate::{
    instance::{Instance, InstanceError},
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
            let opened = Instance::open(&instance)?.ok_or(InstanceError::NoInstance(instance))?;
            let cgroup = Cgroup::resolve(&cgroup).map_err(InstanceError::from)?;
            opened.attach(&cgroup, AttachedBy::Container { id: container })?;
        }
        HookAction::Detach {
            instance,
            container,
        } => {
            // The instance may have been removed meanwhile: nothing to undo.
            if let Some(opened) = Instance::open(&instance)? {
                let by = AttachedBy::Container { id: container };
                for attachment in opened.record()?.attachments {
                    if attachment.by == by {
                        opened.detach_id(attachment.cgroup_id)?;
                    }
                }
            }
        }
        HookAction::Nothing(_) => {}
    }
    Ok(())
}
