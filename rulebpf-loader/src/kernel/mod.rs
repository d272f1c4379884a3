//! The eBPF objects of an instance, and how they meet cgroups:
//!
//! ```text
//! program    any program kind: open a pin, load (verifier log), info, link
//! entry      the entry object: stable programs, jump maps, instance maps
//! rule_set   one rule set's object: its connect programs and filled maps
//! attach     one attach and one detach path for every program kind
//! counters   the hook's counters and occupancy, read from the pinned maps
//! events     the decision-event ring, its control word and counts
//! guard      Kubernetes: the pods' guard on the pods' parent cgroup
//! integrity  an instance's pins checked against what its programs use
//! ```
//!
//! Knows pins and cgroups, not instances: which set is in force, records
//! and locks are `crate::instance`'s.

pub mod attach;
pub mod counters;
pub mod entry;
pub mod events;
pub mod guard;
pub mod integrity;
pub mod program;
pub mod rule_set;

use std::path::PathBuf;

use aya::{EbpfError, maps::MapError, pin::PinError, programs::ProgramError};

/// Why an eBPF object could not be loaded, pinned or opened. Never the
/// user's rules: those were checked when they compiled.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("{0} (see `rulebpf kernel`)")]
    KernelLacks(String),
    #[error("creating the eBPF maps")]
    CreateMaps(#[source] EbpfError),
    #[error("writing the rules into map {map}")]
    Fill {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("the kernel refused the {program} program: {io_error}\n{verifier_log}")]
    Verifier {
        program: &'static str,
        io_error: std::io::Error,
        verifier_log: String,
    },
    #[error("loading the {program} program")]
    Load {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("{0} is missing from the eBPF object (a build problem)")]
    Missing(&'static str),
    #[error("the {0} program has an unexpected type (a build problem)")]
    ProgramType(&'static str),
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("pinning {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("reading the {program} program's info")]
    Info {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the instance's {program} program")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the instance's {hook} jump map")]
    Jump {
        hook: &'static str,
        #[source]
        source: MapError,
    },
    #[error("reading the instance's {hook} jump slot")]
    Slot {
        hook: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the instance map {map}")]
    SharedMap {
        map: &'static str,
        #[source]
        source: MapError,
    },
}
