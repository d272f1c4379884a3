//! rulebpf: tcpoport.ini origin-port rules enforced in the kernel.
//!
//! The rules themselves (grammar, DNS names, compiler, reference first match)
//! are the pure crate `rulebpf-rules`; this crate is the kernel side:
//!
//! ```text
//! object    a compiled rule set -> a loaded eBPF object (programs + filled maps)
//! instance  a cgroup's rule set: pins, attach, atomic swap, detach
//! state     what is recorded about it in /run/rulebpf
//! stats     per-rule counters: read, carried over across a swap
//! service   `rulebpf run`: reload, DNS refresh, kernel log, metrics
//! report    what each command prints (text or JSON)
//! ```
pub mod bpf;
pub mod cgroup;
pub mod entry;
pub mod features;
pub mod follow;
pub mod hook;
pub mod instance;
pub mod legacy;
pub mod metrics;
pub mod name;
pub mod object;
pub mod probe;
pub mod report;
pub mod securedir;
pub mod service;
pub mod state;
pub mod stats;

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
