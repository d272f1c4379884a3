//! An instance's pins checked against the objects its programs use. The
//! bookkeeping programs keep using the maps they were loaded with, whatever
//! is pinned; a rule-set object opens the maps by pin, and aya creates and
//! pins a fresh map where a pin is missing. So a removed (or replaced) pin
//! would silently split the instance in two: the connect hooks recording
//! tuples in one map, the release programs giving them back in another,
//! and every port of a range busy after one pass over it.
//!
//! Each pinned program (and, where its pin is gone, the program the
//! instance record names, if the kernel still has it) tells which maps it
//! uses (`bpf_prog_info.map_ids`). Where an instance map's or a jump map's
//! pin is missing or holds another map, the map the programs use is pinned
//! again; a program whose pin is missing is pinned again by id. What cannot
//! be found (the program is gone from the kernel too) is reported and left
//! to [`super::entry::create`], which makes a new one.

use std::collections::BTreeMap;

use aya::{
    maps::{MapData, MapInfo},
    programs::ProgramInfo as KernelProgramInfo,
};
use rulebpf_common::{event_map_names, shared_map_names};
use serde::Serialize;

use super::entry;
use crate::{
    model::{layout, program::Hook, records::InstanceRecord},
    sys::{bpf, securedir::SecureDir},
};

/// What is wrong with one pin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "problem")]
pub enum Damage {
    /// The pin is gone; the object it held is still in use.
    Missing { pin: String },
    /// The pin holds another map than the one the programs use.
    Foreign { pin: String },
    /// The pin is gone, and so is the object: a new one will be made.
    Lost { pin: String },
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing { pin } => write!(f, "{pin}: pin missing (the object is still in use)"),
            Self::Foreign { pin } => write!(f, "{pin}: pins another map than the programs use"),
            Self::Lost { pin } => write!(f, "{pin}: pin missing and its object gone"),
        }
    }
}

/// One pin and how to make it right.
struct Finding {
    damage: Damage,
    repair: Option<Repair>,
}

enum Repair {
    PinMap { id: u32 },
    ReplaceMap { id: u32 },
    PinProgram { id: u32 },
}

/// The pins of the instance in `dir` that do not hold what its programs
/// use. Reads only.
pub fn check(dir: &SecureDir, record: &InstanceRecord) -> Vec<Damage> {
    findings(dir, record)
        .into_iter()
        .map(|f| f.damage)
        .collect()
}

/// [`check`], then puts right what can be: missing pins pinned again,
/// foreign ones replaced. Returns what was found and what was done, a line
/// each.
pub fn repair(dir: &SecureDir, record: &InstanceRecord) -> std::io::Result<Vec<String>> {
    let found = findings(dir, record);
    let mut done = Vec::new();
    for finding in &found {
        let pin = match &finding.damage {
            Damage::Missing { pin } | Damage::Foreign { pin } | Damage::Lost { pin } => pin,
        };
        match finding.repair {
            Some(Repair::PinMap { id }) => pin_map(dir, pin, id)?,
            Some(Repair::ReplaceMap { id }) => {
                dir.remove(pin).map_err(std::io::Error::other)?;
                pin_map(dir, pin, id)?;
            }
            Some(Repair::PinProgram { id }) => bpf::pin_program_by_id(id, &dir.fd_path(pin))?,
            None => {}
        }
        let what = match finding.repair {
            Some(Repair::PinMap { id }) => format!("pinned map {id} again"),
            Some(Repair::ReplaceMap { id }) => format!("pinned map {id} in its place"),
            Some(Repair::PinProgram { id }) => format!("pinned program {id} again"),
            None => "a new one is made".to_string(),
        };
        done.push(format!("{}: {what}", finding.damage));
    }
    Ok(done)
}

fn pin_map(dir: &SecureDir, pin: &str, id: u32) -> std::io::Result<()> {
    let map = MapData::from_id(id).map_err(std::io::Error::other)?;
    map.pin(dir.fd_path(pin)).map_err(std::io::Error::other)
}

/// Every program pin of an instance and the program id its record names.
fn program_pins(record: &InstanceRecord) -> Vec<(&'static str, u32)> {
    record
        .programs()
        .into_iter()
        .map(|(kind, id)| (layout::program_pin(kind), id))
        .collect()
}

/// The pin an instance keeps for a map, by the name the kernel keeps (its
/// first 15 bytes).
fn map_pin(kernel_name: &str) -> Option<String> {
    let name15 = |n: &str| n.get(..15).unwrap_or(n).to_string();
    if let Some(&name) = shared_map_names::ALL
        .iter()
        .chain(&event_map_names::ALL)
        .find(|n| name15(n) == kernel_name)
    {
        return Some(name.to_string());
    }
    Hook::ALL.iter().find_map(|&hook| {
        (name15(entry::jump_map_name(hook)) == kernel_name).then(|| layout::jump_pin(hook))
    })
}

fn findings(dir: &SecureDir, record: &InstanceRecord) -> Vec<Finding> {
    let mut found = Vec::new();
    // The maps the instance's programs use, by pin name.
    let mut used: BTreeMap<String, u32> = BTreeMap::new();
    for (pin, recorded) in program_pins(record) {
        // Never made (a new instance, or one older than this program).
        if recorded == 0 && !dir.contains(pin) {
            continue;
        }
        let info = if dir.contains(pin) {
            KernelProgramInfo::from_pin(dir.fd_path(pin)).ok()
        } else {
            // The id must still be a program of rulebpf (ids are reused).
            let alive = recorded != 0
                && bpf::program_name(recorded)
                    .is_ok_and(|n| n.starts_with(rulebpf_common::PROGRAM_PREFIX));
            found.push(Finding {
                damage: if alive {
                    Damage::Missing { pin: pin.into() }
                } else {
                    Damage::Lost { pin: pin.into() }
                },
                repair: alive.then_some(Repair::PinProgram { id: recorded }),
            });
            alive
                .then(|| {
                    aya::programs::loaded_programs()
                        .flatten()
                        .find(|p| p.id() == recorded)
                })
                .flatten()
        };
        let Some(ids) = info.and_then(|i| i.map_ids().ok().flatten()) else {
            continue;
        };
        for id in ids {
            let Ok(map) = MapInfo::from_id(id) else {
                continue;
            };
            if let Some(pin) = map.name_as_str().and_then(map_pin) {
                // Programs that disagree on a map (loaded by different
                // instances' objects): the first one, an entry program,
                // decides; the others are not repaired toward.
                used.entry(pin).or_insert(id);
            }
        }
    }
    for (pin, id) in used {
        if !dir.contains(&pin) {
            found.push(Finding {
                damage: Damage::Missing { pin },
                repair: Some(Repair::PinMap { id }),
            });
            continue;
        }
        let pinned = MapData::from_pin(dir.fd_path(&pin))
            .ok()
            .and_then(|m| m.info().ok())
            .map(|i| i.id());
        if pinned != Some(id) {
            found.push(Finding {
                damage: Damage::Foreign { pin },
                repair: Some(Repair::ReplaceMap { id }),
            });
        }
    }
    found
}
