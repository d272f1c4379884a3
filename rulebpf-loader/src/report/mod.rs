//! What the commands print. Each command builds one typed report; the same
//! value is rendered as text for people ([`fmt::Display`]) or, with `--json`,
//! serialized for scripts (one JSON document on stdout). Nothing is built as
//! JSON and read back by key. One file per command:
//!
//! ```text
//! check    check's summary, explain's decisions
//! attach   what attach put in force, and where
//! status   each instance: what the kernel has in force and where
//! stats    per-rule counters
//! probe    what each connect() of a probe got
//! kernel   what the kernel offers
//! events   one decision per line
//! ```

mod attach;
mod check;
pub mod events;
pub mod firewall;
mod kernel;
mod probe;
mod stats;
mod status;

use std::{
    fmt,
    io::{self, Write as _},
    time::{Duration, UNIX_EPOCH},
};

use serde::Serialize;

pub use attach::AttachReport;
pub use check::{
    Decision, Explanation, Explanations, OriginPorts, Summary, UnresolvedName, name_warnings,
};
pub use kernel::KernelReport;
pub use probe::ProbeReport;

use crate::model::{
    options::{AppBound, Policy, Sharing},
    program::PerHook,
    records::ProgramInfo,
};
pub use crate::ops::status::{AttachmentRow, InstanceStats, StatsReport, StatusReport, StatusRow};

/// Prints `report` as text, or as pretty JSON.
pub fn print(report: &(impl Serialize + fmt::Display), json: bool) -> io::Result<()> {
    let text = if json {
        let mut text = serde_json::to_string_pretty(report).map_err(io::Error::other)?;
        text.push('\n');
        text
    } else {
        report.to_string()
    };
    io::stdout().lock().write_all(text.as_bytes())
}

/// Serializes a value as its text form (`tcp`, not `Tcp`).
fn as_text<S: serde::Serializer>(value: &impl fmt::Display, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

/// `n thing` or `n things`.
fn count(n: usize, thing: &str) -> String {
    match (n, thing.ends_with('x')) {
        (1, _) => format!("{n} {thing}"),
        (_, true) => format!("{n} {thing}es"),
        (_, false) => format!("{n} {thing}s"),
    }
}

fn policy_name(policy: Policy) -> &'static str {
    match policy {
        Policy::Strict => "strict",
        Policy::Fallback => "fallback",
    }
}

fn sharing_name(sharing: Sharing) -> &'static str {
    match sharing {
        Sharing::On => "on",
        Sharing::Off => "off",
    }
}

fn app_bound_name(app_bound: AppBound) -> &'static str {
    match app_bound {
        AppBound::Keep => "keep",
        AppBound::Refuse => "refuse",
    }
}

/// `programs: connect4 id 12 (531 instructions verified), ...; maps: N KiB`.
fn programs_line(programs: &PerHook<ProgramInfo>, memlock: u64) -> String {
    let one = |name: &str, p: &ProgramInfo| {
        let insns = p.verified_insns.map_or("?".to_string(), |n| n.to_string());
        format!("{name} id {} ({insns} instructions verified)", p.id)
    };
    format!(
        "programs: {}, {}; maps: {} KiB of kernel memory",
        one("connect4", &programs.connect4),
        one("connect6", &programs.connect6),
        memlock.div_ceil(1024)
    )
}

/// A time of the state file (seconds since the epoch), for people.
pub fn time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}
