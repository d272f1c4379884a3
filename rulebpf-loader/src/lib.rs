//! rulebpf: tcpoport.ini origin-port rules enforced in the kernel.
//!
//! The rules themselves (grammar, DNS names, compiler, reference first match,
//! rule identity) are the pure crate `rulebpf-rules`; this crate is the
//! kernel side, in layers that each import only from the layers above them
//! in this list (read it bottom-up to follow a rule file into the kernel):
//!
//! ```text
//! model         plain data: program kinds, options, records, names, every
//!               path and pin name (layout), the rows reports show
//! sys           the OS, knowing no instance: bpf(2), secure directories,
//!               cgroups, sysctls, BTF, the kernel feature probe, sd_notify
//! kernel        the eBPF objects (entry, rule set), one attach/detach path
//!               for every program kind, counters, pin integrity
//! instance      the state machine: locks, records, stage/swap/reconcile,
//!               attachments, the previous layout
//! ops           the use cases the CLI and the service share
//! service       `rulebpf run`: reload, follow, watch, kernel log
//! metrics       the Prometheus exposition and its bounded HTTP server
//! integrations  OCI runtime hooks, systemd units
//! report        what each command prints (text or JSON)
//! ```
//!
//! The command line (clap) is the binary's (`src/main.rs`, `src/cli/`).
pub mod model;
pub mod sys;

pub mod kernel;

pub mod instance;

pub mod ops;

pub mod integrations;
pub mod metrics;
pub mod report;
pub mod service;

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
