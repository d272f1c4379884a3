//! rulebpf: tcpoport.ini origin-port rules enforced in the kernel.
pub mod cgroup;
pub mod features;
pub mod instance;
pub mod maps;
pub mod metrics;
pub mod probe;
pub mod report;
pub mod service;
