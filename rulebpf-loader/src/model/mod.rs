//! Plain data, no kernel and no I/O: the program kinds, the options, the
//! records kept in `/run/rulebpf`, instance names, every path and pin name
//! (`layout`), and the per-rule rows the reports show.

pub mod event;
pub mod layout;
pub mod name;
pub mod nat;
pub mod options;
pub mod program;
pub mod records;
pub mod rule_stats;
