//! The operating system, knowing no instance: raw `bpf(2)`, directories
//! walked without following links, cgroups, the ephemeral-port sysctls,
//! the kernel's BTF and feature probe, `sd_notify`, the clock.

pub mod addresses;
pub mod bpf;
pub mod btf;
pub mod cgroup;
pub mod conntrack;
pub mod ephemeral;
pub mod features;
pub mod nat;
pub mod notify;
pub mod securedir;
pub mod time;
