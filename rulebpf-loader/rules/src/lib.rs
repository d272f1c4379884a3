//! tcpoport.ini rules, from text to the lookup structures the hook walks.
//! Pure: nothing here touches the kernel or needs the eBPF build, so
//! `cargo test -p rulebpf-rules` runs on any machine with a Rust toolchain.
//!
//! # The pipeline
//!
//! ```text
//! text ──grammar::parse──▶ Vec<Rule> ──resolve──▶ Names ──compile::compile──▶ Compiled
//!                             │                     │                            │
//!                             └──────── first_match (reference) ◀── must agree ──┘ lookup
//! ```
//!
//! 1. [`grammar`] turns the file into ordered [`rule::Rule`]s, or returns
//!    every malformed line at once (`line:col: message`).
//! 2. [`resolve`] asks the system resolver for the DNS names the rules use;
//!    [`Names`] holds the answers (a failed lookup can keep its last good one).
//! 3. [`compile`] turns rules + answers into the maps the hook reads (an
//!    automaton over the destination's octets, then port tables; layouts in
//!    `rulebpf-common`). First match and negation are resolved here, so the
//!    hook does a fixed amount of work per connect().
//! 4. [`first_match()`] is the spec read naively, rule by rule; the compiled
//!    [`compile::Compiled::lookup`] (the hook's computation, in userspace) is
//!    property-tested against it.
//!
//! [`RuleSet::load`] runs steps 1-3 on a file; that is what the loader uses.
//! By hand, without DNS names:
//!
//! ```
//! use rulebpf_rules::{Names, Protocol, compile::compile, first_match, grammar::parse};
//!
//! let rules = parse("! 10.*.*.* * : 42000-43000\n10.0.0.0/8 21 : 64000\n").unwrap();
//! let names = Names::new();
//! let compiled = compile(&rules, &names).unwrap();
//!
//! let dest = "10.1.2.3".parse().unwrap();
//! let verdict = compiled.lookup(Protocol::Tcp, dest, 21).unwrap();
//! assert_eq!((verdict.line, verdict.org_lo, verdict.org_hi), (2, 64000, 64000));
//! let reference = first_match(&rules, &names, Protocol::Tcp, dest, 21);
//! assert_eq!(reference, Some(verdict.rule as usize));
//! ```
pub mod compile;
pub mod file;
mod first_match;
pub mod grammar;
pub mod identity;
pub mod paths;
pub mod resolve;
pub mod rule;
pub mod ruleset;

pub use file::FileError;
pub use first_match::first_match;
pub use resolve::Names;
pub use rulebpf_common::{Family, Protocol};
pub use ruleset::{LoadLimits, RuleFileError, RuleSet};
