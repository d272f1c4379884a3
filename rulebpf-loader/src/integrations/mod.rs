//! How other programs put their processes under an instance: OCI runtime
//! hooks (podman, CRI-O) and systemd units.

pub mod nri;
pub mod oci;
pub mod oci_hook;
pub mod systemd;
