//! rulebpf: tcpoport.ini origin-port rules enforced in the kernel.
//!
//! The rules themselves (grammar, DNS names, compiler, reference first match)
//! are the pure crate `rulebpf-rules`; this crate is the kernel side:
//!
//! ```text
//! name       instance names (--name, or derived from a cgroup path)
//! object     a compiled rule set -> a loaded eBPF object (programs + filled maps)
//! entry      an instance's stable entry programs and their jump slots
//! instance   an instance: rule set in force, attachments, swap, detach, crashes
//! bpf        the few bpf(2) commands aya does not expose (what a cgroup holds)
//! btf        the kernel's BTF, read for tw_substate's offset
//! integrity  an instance's pins checked against what its programs use
//! securedir  root's directories, walked without following links
//! state      what is recorded in /run/rulebpf
//! stats      per-rule counters: read, carried over across a swap; occupancy
//! ephemeral  origin ranges beside the kernel's ephemeral ports (--reserve-ports)
//! legacy     instances of the previous layout (cg-<id>), replaced without a gap
//! follow     the cgroup paths `run` follows across restarts
//! watch      the rule file `run` reloads when whole, also through symlinks
//! service    `rulebpf run`: reload, DNS refresh, kernel log, metrics
//! report     what each command prints (text or JSON)
//! ```
pub mod bpf;
pub mod btf;
pub mod cgroup;
pub mod entry;
pub mod ephemeral;
pub mod features;
pub mod follow;
pub mod hook;
pub mod instance;
pub mod integrity;
pub mod legacy;
pub mod metrics;
pub mod name;
pub mod object;
pub mod oci;
pub mod probe;
pub mod report;
pub mod securedir;
pub mod service;
pub mod state;
pub mod stats;
pub mod systemd;
pub mod watch;

/// An error and its causes on one line, `a: b: c` (for logs and records;
/// the CLI prints its errors the same way).
pub fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
