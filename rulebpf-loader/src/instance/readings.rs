//! What the hook counted for the rule set in force: per-rule counters
//! beside their rules, occupancy, and the instance counters.

use std::collections::HashMap;

use rulebpf_common::{Counter, Occupancy, RuleStats, map_names, shared_map_names};

use super::{Instance, InstanceError};
use crate::{
    kernel::counters,
    model::{
        records::RuleSetRecord,
        rule_stats::{self, RuleRow},
    },
};

impl Instance {
    pub(super) fn read_stats(&self, set: &RuleSetRecord) -> Result<Vec<RuleStats>, InstanceError> {
        let Some(dir) = self.set_dir(set.generation, false)? else {
            return Ok(vec![]);
        };
        Ok(counters::read(
            &dir.fd_path(map_names::STATS),
            &dir.display(map_names::STATS),
            set.rules.len(),
        )?)
    }

    /// The rule set in force with per-rule counters.
    pub fn stats(&self) -> Result<(RuleSetRecord, Vec<RuleRow>), InstanceError> {
        let set = self
            .in_force()?
            .set
            .ok_or_else(|| InstanceError::NoRules(self.name.clone()))?;
        let occupancy = self.occupancy_of(Some(&set))?;
        let rows = self.rows(&set, &occupancy)?;
        Ok((set, rows))
    }

    /// The per-rule rows of `set` with `occupancy` (what
    /// [`Self::occupancy_of`] read): for a caller that has both already.
    pub fn rows(
        &self,
        set: &RuleSetRecord,
        occupancy: &HashMap<u64, Occupancy>,
    ) -> Result<Vec<RuleRow>, InstanceError> {
        let totals = self.read_stats(set)?;
        Ok(rule_stats::rows(&set.rules, &totals, occupancy))
    }

    /// Every rule's occupancy (ports in use, high-water mark), by rule key
    /// (empty for an instance made before occupancy was kept); for the
    /// rules in force, as their ports tell it ([`rule_stats::by_ports`]).
    pub fn occupancy(&self) -> Result<HashMap<u64, Occupancy>, InstanceError> {
        if !self.pins.contains(shared_map_names::OCCUPANCY) {
            return Ok(Default::default());
        }
        self.occupancy_of(self.in_force()?.set.as_ref())
    }

    /// [`Self::occupancy`] with the set in force already read (`None`:
    /// none is; the kernel's per-key counts alone).
    pub fn occupancy_of(
        &self,
        set: Option<&RuleSetRecord>,
    ) -> Result<HashMap<u64, Occupancy>, InstanceError> {
        use shared_map_names::{OCCUPANCY, PORT_USE, TUPLES};
        if !self.pins.contains(OCCUPANCY) {
            return Ok(Default::default());
        }
        let kernel =
            counters::read_occupancy(&self.pins.fd_path(OCCUPANCY), &self.pins.display(OCCUPANCY))?;
        let Some(set) = set else {
            return Ok(kernel);
        };
        let port_use = if self.pins.contains(PORT_USE) {
            counters::read_port_use(&self.pins.fd_path(PORT_USE), &self.pins.display(PORT_USE))?
        } else {
            vec![]
        };
        let tuples = if self.pins.contains(TUPLES) {
            counters::read_tuples(&self.pins.fd_path(TUPLES), &self.pins.display(TUPLES))?
        } else {
            vec![]
        };
        Ok(rule_stats::by_ports(
            &set.rules, &kernel, &port_use, &tuples,
        ))
    }

    /// The instance counters (empty for an instance made before them).
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, InstanceError> {
        let name = shared_map_names::COUNTERS;
        if !self.pins.contains(name) {
            return Ok(vec![]);
        }
        Ok(counters::read_counters(
            &self.pins.fd_path(name),
            &self.pins.display(name),
        )?)
    }
}
