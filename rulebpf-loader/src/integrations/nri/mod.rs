//! Kubernetes pods through the container runtime's Node Resource Interface
//! (NRI): containerd (1.7 with NRI enabled, 2.x by default) and CRI-O call
//! a plugin at `RunPodSandbox`, with the pod's annotations and cgroup,
//! before any of the pod's containers runs.
//!
//! The protocol is written from its definition (there is no maintained
//! Rust NRI crate): the protobuf fields (crate `rulebpf-protobuf`), the multiplexed
//! ttrpc transport ([`ttrpc`]) and the messages ([`api`]). What a pod
//! gets is decided in [`pods`]; [`plugin`] serves the runtime.
//! https://github.com/containerd/nri

pub mod api;
pub mod plugin;
pub mod pods;
pub mod ttrpc;
