//! The NRI messages the plugin reads and writes (`nri.pkg.api.v1alpha1`),
//! with the field numbers of containerd/nri's `pkg/api/api.proto`, which
//! NRI v0.6 (containerd 1.7) to v0.10 (containerd 2.2) share; later
//! versions only add fields, which readers here skip.
//! https://github.com/containerd/nri/blob/v0.8.0/pkg/api/api.proto

use std::collections::BTreeMap;

use rulebpf_protobuf::{self as protobuf, DecodeError, Fields, Value, Writer};

/// The ttrpc service the runtime serves (connection 2).
pub const RUNTIME_SERVICE: &str = "nri.pkg.api.v1alpha1.Runtime";
/// The ttrpc service the plugin serves (connection 1).
pub const PLUGIN_SERVICE: &str = "nri.pkg.api.v1alpha1.Plugin";

/// `enum Event`: the pod events the plugin subscribes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    RunPodSandbox = 1,
    StopPodSandbox = 2,
    RemovePodSandbox = 3,
}

impl Event {
    fn from_wire(value: u64) -> Option<Self> {
        match value {
            1 => Some(Self::RunPodSandbox),
            2 => Some(Self::StopPodSandbox),
            3 => Some(Self::RemovePodSandbox),
            _ => None,
        }
    }

    /// The event's bit in `ConfigureResponse.events`: `1 << (event - 1)`
    /// (pkg/api/event.go). A mask of 0 would mean every event.
    pub const fn mask(self) -> u64 {
        1 << (self as u64 - 1)
    }
}

/// `RegisterPluginRequest{plugin_name = 1, plugin_idx = 2}`. The index is
/// exactly two digits: it orders plugins.
pub fn register_plugin(name: &str, index: &str) -> Vec<u8> {
    let mut w = Writer::new();
    w.string(1, name).string(2, index);
    w.into_bytes()
}

/// `ConfigureResponse{events = 2}`.
pub fn configure_response(events: &[Event]) -> Vec<u8> {
    let mask = events.iter().fold(0, |mask, e| mask | e.mask());
    let mut w = Writer::new();
    w.varint(2, mask);
    w.into_bytes()
}

/// `SynchronizeResponse{update = 1, more = 2}`: no updates, `more` echoed
/// (the runtime closes a plugin that does not echo it, NRI v0.8+).
pub fn synchronize_response(more: bool) -> Vec<u8> {
    let mut w = Writer::new();
    w.varint(2, more.into());
    w.into_bytes()
}

/// `ConfigureRequest`: who the runtime is.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Configure {
    pub runtime_name: String,
    pub runtime_version: String,
}

impl Configure {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut c = Self::default();
        for field in Fields::new(bytes) {
            match field? {
                (2, Value::Bytes(b)) => c.runtime_name = protobuf::string(2, b)?,
                (3, Value::Bytes(b)) => c.runtime_version = protobuf::string(3, b)?,
                _ => {}
            }
        }
        Ok(c)
    }
}

/// `SynchronizeRequest{pods = 1, containers = 2, more = 3}`: the pods
/// already there (containers are not needed: a pod's cgroup holds them).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Synchronize {
    pub pods: Vec<PodSandbox>,
    pub more: bool,
}

impl Synchronize {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut s = Self::default();
        for field in Fields::new(bytes) {
            match field? {
                (1, Value::Bytes(b)) => s.pods.push(PodSandbox::decode(b)?),
                (3, Value::Varint(v)) => s.more = v != 0,
                _ => {}
            }
        }
        Ok(s)
    }
}

/// `StateChangeEvent{event = 1, pod = 2, container = 3}`: `None` for an
/// event the plugin did not ask for.
#[derive(Debug, PartialEq, Eq)]
pub struct StateChange {
    pub event: Option<Event>,
    pub pod: PodSandbox,
}

impl StateChange {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (mut event, mut pod) = (None, PodSandbox::default());
        for field in Fields::new(bytes) {
            match field? {
                (1, Value::Varint(v)) => event = Event::from_wire(v),
                (2, Value::Bytes(b)) => pod = PodSandbox::decode(b)?,
                _ => {}
            }
        }
        Ok(Self { event, pod })
    }
}

/// `PodSandbox`: what the plugin needs of a pod.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodSandbox {
    pub id: String,
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `linux.cgroup_parent`: the pod's cgroup (CRI's `cgroup_parent`),
    /// with the cgroupfs driver a path, with systemd's a slice name.
    pub cgroup_parent: String,
    /// `linux.cgroups_path`: the sandbox (pause) container's cgroup.
    pub cgroups_path: String,
    /// The sandbox's process (0 when the runtime does not say).
    pub pid: u32,
}

impl PodSandbox {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut pod = Self::default();
        for field in Fields::new(bytes) {
            match field? {
                (1, Value::Bytes(b)) => pod.id = protobuf::string(1, b)?,
                (2, Value::Bytes(b)) => pod.name = protobuf::string(2, b)?,
                (3, Value::Bytes(b)) => pod.uid = protobuf::string(3, b)?,
                (4, Value::Bytes(b)) => pod.namespace = protobuf::string(4, b)?,
                (5, Value::Bytes(b)) => {
                    let (k, v) = protobuf::map_entry(5, b)?;
                    pod.labels.insert(k, v);
                }
                (6, Value::Bytes(b)) => {
                    let (k, v) = protobuf::map_entry(6, b)?;
                    pod.annotations.insert(k, v);
                }
                (8, Value::Bytes(linux)) => {
                    for field in Fields::new(linux) {
                        match field? {
                            (3, Value::Bytes(b)) => pod.cgroup_parent = protobuf::string(3, b)?,
                            (4, Value::Bytes(b)) => pod.cgroups_path = protobuf::string(4, b)?,
                            _ => {}
                        }
                    }
                }
                (9, Value::Varint(v)) => pod.pid = v as u32,
                _ => {}
            }
        }
        Ok(pod)
    }

    /// The pod as the runtime writes it (tests, and the CRI test's checks).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.string(1, &self.id)
            .string(2, &self.name)
            .string(3, &self.uid)
            .string(4, &self.namespace);
        for (k, v) in &self.labels {
            w.map_entry(5, k, v);
        }
        for (k, v) in &self.annotations {
            w.map_entry(6, k, v);
        }
        let mut linux = Writer::new();
        linux
            .string(3, &self.cgroup_parent)
            .string(4, &self.cgroups_path);
        w.message(8, linux).varint(9, self.pid.into());
        w.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodSandbox {
        PodSandbox {
            id: "4f1c".into(),
            name: "gw-0".into(),
            uid: "0a9e".into(),
            namespace: "dmz".into(),
            labels: [("app".into(), "gateway".into())].into(),
            annotations: [("io.rulebpf.instance".into(), "gw".into())].into(),
            cgroup_parent: "/kubepods/besteffort/pod0a9e".into(),
            cgroups_path: "/kubepods/besteffort/pod0a9e/4f1c".into(),
            pid: 4242,
        }
    }

    #[test]
    fn pods_round_trip_inside_events() {
        let mut event = Writer::new();
        event.varint(1, 1).bytes(2, &pod().encode());
        let change = StateChange::decode(&event.into_bytes()).unwrap();
        assert_eq!(change.event, Some(Event::RunPodSandbox));
        assert_eq!(change.pod, pod());
        let mut sync = Writer::new();
        sync.bytes(1, &pod().encode())
            .bytes(1, &PodSandbox::default().encode())
            .varint(3, 1);
        let sync = Synchronize::decode(&sync.into_bytes()).unwrap();
        assert_eq!(sync.pods, [pod(), PodSandbox::default()]);
        assert!(sync.more);
    }

    /// The reply that subscribes to run, stop and remove: `events = 2`
    /// with bits 0, 1 and 2 (`12 02 10 07`, less the ttrpc wrapping).
    #[test]
    fn the_event_mask_has_the_runtime_numbering() {
        assert_eq!(
            configure_response(&[
                Event::RunPodSandbox,
                Event::StopPodSandbox,
                Event::RemovePodSandbox
            ]),
            [0x10, 0x07]
        );
        assert_eq!(synchronize_response(true), [0x10, 0x01]);
        assert_eq!(synchronize_response(false), [] as [u8; 0]);
        assert_eq!(
            register_plugin("rulebpf", "50"),
            b"\x0a\x07rulebpf\x12\x0250"
        );
    }

    #[test]
    fn unknown_events_and_fields_are_skipped() {
        let mut event = Writer::new();
        // CREATE_CONTAINER = 4, a container in field 3, a future field 40.
        event
            .varint(1, 4)
            .bytes(3, b"\x0a\x01x")
            .string(40, "later");
        let change = StateChange::decode(&event.into_bytes()).unwrap();
        assert_eq!(change.event, None);
    }
}
