//! What the plugin does for a pod: pure decisions ([`plan`]) from the pod
//! the runtime describes, acted on with the instance API ([`act`]).
//!
//! A pod is touched only when it carries the annotation
//! `io.rulebpf.instance: NAME` (and, when the agent was given a label
//! selector, only when its labels match). Its rules go on the **pod's**
//! cgroup, the parent of every container cgroup of the pod (sandbox,
//! init containers, sidecars, application containers), so that every
//! container of the pod is under them from its first instruction: NRI's
//! `RunPodSandbox` comes before the runtime creates any container of the
//! pod but the sandbox.
//!
//! The pod's cgroup is `linux.cgroup_parent` (what the kubelet asked the
//! runtime for): with the cgroupfs driver a path below the cgroup2 mount
//! (`/kubepods/besteffort/pod<uid>`), with the systemd driver a slice name
//! (`kubepods-besteffort-pod<uid>.slice`), whose directory is the chain of
//! its parent slices (systemd.slice(5)).
//! https://github.com/containerd/containerd/blob/v1.7.24/pkg/cri/server/helpers_linux.go (getCgroupsPath)

use std::path::{Path, PathBuf};

use super::api::{Event, PodSandbox};
use crate::{
    instance::{CommandLock, Instance, InstanceError},
    integrations::oci::ANNOTATION,
    model::{
        name::{InstanceName, NameError},
        records::AttachedBy,
    },
    sys::cgroup::Cgroup,
};

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("pod {pod}: {ANNOTATION}={name:?} is not an instance name: {source}")]
    BadInstanceName {
        pod: String,
        name: String,
        source: NameError,
    },
    #[error("pod {pod}: namespace {namespace} may not name an instance (rulebpf nri --namespace)")]
    NamespaceNotAllowed { pod: String, namespace: String },
    #[error("pod {pod}: the runtime gave no cgroup parent: its cgroup is unknown")]
    NoCgroupParent { pod: String },
    #[error("pod {pod}: cgroup parent {parent:?} is not a cgroupfs path or a systemd slice")]
    BadCgroupParent { pod: String, parent: String },
    #[error(
        "pod {pod}: no instance {instance} (create it first: rulebpf attach --name {instance} RULES)"
    )]
    NoInstance { pod: String, instance: InstanceName },
    #[error("pod {pod}: admitting it past the pods' guard: {source}")]
    Guard {
        pod: String,
        source: Box<crate::kernel::guard::GuardError>,
    },
    #[error("pod {pod}, instance {instance}: {source}")]
    Instance {
        pod: String,
        instance: InstanceName,
        source: Box<InstanceError>,
    },
}

/// A label the pod must carry for the agent to act on it (`--selector
/// key=value`), besides the annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub key: String,
    pub value: String,
}

/// Which pods may ask for an instance: the annotation is written by
/// whoever writes the pod, so without a limit any namespace could take
/// another's origin ports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub selector: Option<Selector>,
    /// Namespaces whose pods may name an instance (`--namespace`); empty:
    /// every namespace.
    pub namespaces: Vec<String>,
}

/// What to do for one pod event.
#[derive(Debug, PartialEq, Eq)]
pub enum PodAction {
    /// Put `instance` in force on the pod's cgroup, a path below the
    /// cgroup2 mount.
    Attach {
        instance: InstanceName,
        cgroup: PathBuf,
        pod: String,
    },
    /// Remove what was attached for the pod.
    Detach { instance: InstanceName, pod: String },
    /// Not ours (no annotation, another selector) or nothing to do.
    Nothing,
}

/// Decides what `event` means for `pod`. An error refuses the pod (the
/// runtime fails `RunPodSandbox`): only for an annotated pod whose rules
/// cannot be put in force.
pub fn plan(event: Event, pod: &PodSandbox, scope: &Scope) -> Result<PodAction, PodError> {
    let Some(name) = pod.annotations.get(ANNOTATION) else {
        return Ok(PodAction::Nothing);
    };
    if let Some(selector) = &scope.selector
        && pod.labels.get(&selector.key) != Some(&selector.value)
    {
        return Ok(PodAction::Nothing);
    }
    if !scope.namespaces.is_empty() && !scope.namespaces.contains(&pod.namespace) {
        if event != Event::RunPodSandbox {
            return Ok(PodAction::Nothing);
        }
        return Err(PodError::NamespaceNotAllowed {
            pod: pod.id.clone(),
            namespace: pod.namespace.clone(),
        });
    }
    let instance = match InstanceName::new(name) {
        Ok(instance) => instance,
        // A pod that was never attached has nothing to undo.
        Err(_) if event != Event::RunPodSandbox => return Ok(PodAction::Nothing),
        Err(source) => {
            return Err(PodError::BadInstanceName {
                pod: pod.id.clone(),
                name: name.clone(),
                source,
            });
        }
    };
    match event {
        Event::RunPodSandbox => Ok(PodAction::Attach {
            cgroup: pod_cgroup(pod)?,
            instance,
            pod: pod.id.clone(),
        }),
        // Stopped, its containers are gone but the sandbox may be started
        // again; removed, it is gone for good.
        Event::StopPodSandbox => Ok(PodAction::Nothing),
        Event::RemovePodSandbox => Ok(PodAction::Detach {
            instance,
            pod: pod.id.clone(),
        }),
    }
}

/// The pod's cgroup, relative to the cgroup2 mount.
pub fn pod_cgroup(pod: &PodSandbox) -> Result<PathBuf, PodError> {
    let parent = pod.cgroup_parent.as_str();
    if parent.is_empty() {
        return Err(PodError::NoCgroupParent {
            pod: pod.id.clone(),
        });
    }
    let bad = || PodError::BadCgroupParent {
        pod: pod.id.clone(),
        parent: parent.to_owned(),
    };
    if let Some(slice) = parent.strip_suffix(".slice") {
        if slice.contains('/') {
            return Err(bad());
        }
        return slice_path(slice).ok_or_else(bad);
    }
    let relative = Path::new(parent.trim_start_matches('/'));
    if !parent.starts_with('/')
        || relative.as_os_str().is_empty()
        || relative
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(bad());
    }
    Ok(relative.to_path_buf())
}

/// `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice` (systemd.slice(5));
/// `None` for a name systemd would refuse (empty parts).
fn slice_path(name: &str) -> Option<PathBuf> {
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in name.split('-') {
        if part.is_empty() {
            return None;
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Some(path)
}

/// Does what [`plan`] decided. Returns the pod's cgroup when it attached
/// to it (the guard admits the same cgroup, resolved once).
pub fn act(action: PodAction) -> Result<Option<Cgroup>, PodError> {
    match action {
        PodAction::Nothing => Ok(None),
        PodAction::Attach {
            instance,
            cgroup,
            pod,
        } => {
            let fail = |source| PodError::Instance {
                pod: pod.clone(),
                instance: instance.clone(),
                source: Box::new(source),
            };
            let _lock = CommandLock::acquire(&instance).map_err(fail)?;
            let opened =
                Instance::open(&instance)
                    .map_err(fail)?
                    .ok_or_else(|| PodError::NoInstance {
                        pod: pod.clone(),
                        instance: instance.clone(),
                    })?;
            let cgroup = Cgroup::resolve(&cgroup).map_err(|e| fail(e.into()))?;
            opened
                .attach(&cgroup, AttachedBy::Pod { id: pod.clone() })
                .map_err(fail)?;
            Ok(Some(cgroup))
        }
        PodAction::Detach { instance, pod } => {
            let fail = |source| PodError::Instance {
                pod: pod.clone(),
                instance: instance.clone(),
                source: Box::new(source),
            };
            let _lock = CommandLock::acquire(&instance).map_err(fail)?;
            // Removed meanwhile: nothing to undo.
            let Some(opened) = Instance::open(&instance).map_err(fail)? else {
                return Ok(None);
            };
            let by = AttachedBy::Pod { id: pod.clone() };
            for attachment in opened.record().map_err(fail)?.attachments {
                if attachment.by == by {
                    opened.detach_id(attachment.cgroup_id).map_err(fail)?;
                }
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: &[(&str, &str)], parent: &str) -> PodSandbox {
        PodSandbox {
            id: "4f1c".into(),
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            labels: [("app".to_string(), "gateway".to_string())].into(),
            cgroup_parent: parent.into(),
            ..PodSandbox::default()
        }
    }

    fn name(s: &str) -> InstanceName {
        InstanceName::new(s).unwrap()
    }

    #[test]
    fn an_annotated_pod_gets_its_instance_on_the_pod_cgroup() {
        let p = pod(&[(ANNOTATION, "gw")], "/kubepods/besteffort/pod0a9e");
        assert_eq!(
            plan(Event::RunPodSandbox, &p, &Scope::default()).unwrap(),
            PodAction::Attach {
                instance: name("gw"),
                cgroup: "kubepods/besteffort/pod0a9e".into(),
                pod: "4f1c".into(),
            }
        );
        assert_eq!(
            plan(Event::RemovePodSandbox, &p, &Scope::default()).unwrap(),
            PodAction::Detach {
                instance: name("gw"),
                pod: "4f1c".into()
            }
        );
        assert_eq!(
            plan(Event::StopPodSandbox, &p, &Scope::default()).unwrap(),
            PodAction::Nothing
        );
    }

    #[test]
    fn systemd_slices_are_expanded() {
        let p = pod(&[(ANNOTATION, "gw")], "kubepods-besteffort-pod0a9e.slice");
        let PodAction::Attach { cgroup, .. } =
            plan(Event::RunPodSandbox, &p, &Scope::default()).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            cgroup,
            Path::new("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a9e.slice")
        );
    }

    #[test]
    fn pods_without_the_annotation_or_the_selector_are_never_touched() {
        let selector = Scope {
            selector: Some(Selector {
                key: "app".into(),
                value: "gateway".into(),
            }),
            ..Scope::default()
        };
        let other = Scope {
            selector: Some(Selector {
                key: "app".into(),
                value: "web".into(),
            }),
            ..Scope::default()
        };
        let bare = pod(&[("other", "x")], "/kubepods/pod1");
        let annotated = pod(&[(ANNOTATION, "gw")], "/kubepods/pod1");
        for event in [
            Event::RunPodSandbox,
            Event::StopPodSandbox,
            Event::RemovePodSandbox,
        ] {
            assert_eq!(plan(event, &bare, &selector).unwrap(), PodAction::Nothing);
            assert_eq!(
                plan(event, &bare, &Scope::default()).unwrap(),
                PodAction::Nothing
            );
            assert_eq!(plan(event, &annotated, &other).unwrap(), PodAction::Nothing);
        }
        assert!(matches!(
            plan(Event::RunPodSandbox, &annotated, &selector).unwrap(),
            PodAction::Attach { .. }
        ));
    }

    #[test]
    fn only_the_namespaces_given_may_name_an_instance() {
        let scope = Scope {
            namespaces: vec!["dmz".into()],
            ..Scope::default()
        };
        let mut p = pod(&[(ANNOTATION, "gw")], "/kubepods/pod1");
        p.namespace = "dmz".into();
        assert!(matches!(
            plan(Event::RunPodSandbox, &p, &scope).unwrap(),
            PodAction::Attach { .. }
        ));
        p.namespace = "default".into();
        assert!(matches!(
            plan(Event::RunPodSandbox, &p, &scope),
            Err(PodError::NamespaceNotAllowed { .. })
        ));
        assert_eq!(
            plan(Event::RemovePodSandbox, &p, &scope).unwrap(),
            PodAction::Nothing
        );
        // A pod without the annotation is never refused for its namespace.
        let bare = pod(&[], "/kubepods/pod2");
        assert_eq!(
            plan(Event::RunPodSandbox, &bare, &scope).unwrap(),
            PodAction::Nothing
        );
    }

    #[test]
    fn an_annotated_pod_whose_cgroup_is_unknown_or_bad_is_refused() {
        for parent in [
            "",
            "kubepods/pod1",
            "/",
            "/kubepods/../etc",
            "a--b.slice",
            "a/b.slice",
        ] {
            let p = pod(&[(ANNOTATION, "gw")], parent);
            assert!(
                plan(Event::RunPodSandbox, &p, &Scope::default()).is_err(),
                "{parent:?}"
            );
        }
        let bad_name = pod(&[(ANNOTATION, "../x")], "/kubepods/pod1");
        assert!(matches!(
            plan(Event::RunPodSandbox, &bad_name, &Scope::default()),
            Err(PodError::BadInstanceName { .. })
        ));
        // Nothing was attached for it: its removal is not an error.
        assert_eq!(
            plan(Event::RemovePodSandbox, &bad_name, &Scope::default()).unwrap(),
            PodAction::Nothing
        );
    }
}
