//! tcpoport.ini rules, from text to the lookup structures the hook walks.
//! Pure: nothing here touches the kernel or needs the eBPF build, so
//! `cargo test -p rulebpf-rules` runs on any machine with a Rust toolchain.
//!
//! The pipeline, one module per step:
//!
//! ```text
//! grammar   text -> ordered rules, or every error with line:col
//! resolve   DNS names -> addresses (the system resolver; last good answer kept)
//! compile   rules + addresses -> automaton + port tables (rulebpf-common layouts)
//! ruleset   a file through all three, and the reference first match
//! ```
pub mod compile;
pub mod grammar;
pub mod resolve;
pub mod ruleset;
