//! The CRI messages the test sends as the kubelet would, with the field
//! numbers of kubernetes/cri-api's `pkg/apis/runtime/v1/api.proto`
//! (package `runtime.v1`), and the few answers it reads.
//! https://github.com/kubernetes/cri-api/blob/master/pkg/apis/runtime/v1/api.proto

use rulebpf_protobuf::{self as protobuf, Fields, Value, Writer};

pub const RUNTIME: &str = "/runtime.v1.RuntimeService";
pub const IMAGES: &str = "/runtime.v1.ImageService";

/// `NamespaceMode.NODE`: the host's network namespace, so no CNI is needed
/// (containerd sets up no pod network for it).
const NODE: u64 = 2;

/// A pod as the test asks for it.
pub struct Pod<'a> {
    pub name: &'a str,
    pub uid: &'a str,
    pub namespace: &'a str,
    pub annotations: &'a [(&'a str, &'a str)],
    /// `linux.cgroup_parent` (cgroupfs driver: a path below the cgroup2
    /// mount), as the kubelet passes the pod's cgroup.
    pub cgroup_parent: &'a str,
}

impl Pod<'_> {
    /// `PodSandboxConfig`.
    pub fn config(&self) -> Writer {
        let mut metadata = Writer::new();
        metadata
            .string(1, self.name)
            .string(2, self.uid)
            .string(3, self.namespace);
        let mut namespaces = Writer::new();
        namespaces.varint(1, NODE);
        let mut security = Writer::new();
        security.message(1, namespaces);
        let mut linux = Writer::new();
        linux.string(1, self.cgroup_parent).message(2, security);
        let mut config = Writer::new();
        // No hostname: a pod in the host's network namespace has the
        // host's UTS namespace too, and runc refuses to set one there.
        config.message(1, metadata);
        for (key, value) in self.annotations {
            config.map_entry(7, key, value);
        }
        config.message(8, linux);
        config
    }
}

/// `RunPodSandboxRequest{config = 1}`.
pub fn run_pod(pod: &Pod) -> Vec<u8> {
    let mut w = Writer::new();
    w.message(1, pod.config());
    w.into_bytes()
}

/// `CreateContainerRequest{pod_sandbox_id = 1, config = 2, sandbox_config = 3}`
/// for a container of `image` running `command`, in the host's network
/// namespace like its pod.
pub fn create_container(
    pod_id: &str,
    pod: &Pod,
    name: &str,
    image: &str,
    command: &[&str],
) -> Vec<u8> {
    let mut metadata = Writer::new();
    metadata.string(1, name);
    let mut spec = Writer::new();
    spec.string(1, image);
    let mut namespaces = Writer::new();
    namespaces.varint(1, NODE);
    let mut security = Writer::new();
    security.message(3, namespaces);
    let mut linux = Writer::new();
    linux.message(2, security);
    let mut config = Writer::new();
    config.message(1, metadata).message(2, spec);
    for arg in command {
        config.string(3, arg);
    }
    config.message(15, linux);
    let mut w = Writer::new();
    w.string(1, pod_id)
        .message(2, config)
        .message(3, pod.config());
    w.into_bytes()
}

/// A request whose only field is an id in field 1 (`StartContainer`,
/// `StopPodSandbox`, `RemovePodSandbox`, `ContainerStatus`...).
pub fn by_id(id: &str) -> Vec<u8> {
    let mut w = Writer::new();
    w.string(1, id);
    w.into_bytes()
}

/// `ImageStatusRequest{image = 1 {image = 1}}`.
pub fn image_status(image: &str) -> Vec<u8> {
    let mut spec = Writer::new();
    spec.string(1, image);
    let mut w = Writer::new();
    w.message(1, spec);
    w.into_bytes()
}

/// `VersionRequest{version = 1}`.
pub fn version() -> Vec<u8> {
    let mut w = Writer::new();
    w.string(1, "v1");
    w.into_bytes()
}

/// String field `field` of an answer (`RunPodSandboxResponse.pod_sandbox_id`,
/// `CreateContainerResponse.container_id`, `VersionResponse.runtime_version`...).
pub fn string_field(answer: &[u8], field: u32) -> anyhow::Result<String> {
    for item in Fields::new(answer) {
        if let (f, Value::Bytes(b)) = item?
            && f == field
        {
            return Ok(protobuf::string(f, b)?);
        }
    }
    anyhow::bail!("no field {field} in the answer")
}

/// Whether `ImageStatusResponse` names an image (an absent image is an
/// answer without field 1, not an error).
pub fn has_field(answer: &[u8], field: u32) -> anyhow::Result<bool> {
    for item in Fields::new(answer) {
        if item?.0 == field {
            return Ok(true);
        }
    }
    Ok(false)
}
