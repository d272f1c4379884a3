//! An instance's records (`instance.json`, `set-N.json`: JSON, each
//! replaced as a whole) and its rule-set generations, pinned and recorded.

use std::path::PathBuf;

use rulebpf_rules::ruleset::RuleSet;
use serde::{Serialize, de::DeserializeOwned};

use super::{Instance, InstanceError};
use crate::{
    model::{
        layout,
        records::{InstanceRecord, RuleSetRecord, ServiceRecord},
    },
    sys::{
        ephemeral,
        securedir::{SecureDir, SecureDirError},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Dir(#[from] SecureDirError),
    #[error("{} is not a rulebpf record", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads the JSON record `name` in `dir`; `None` when there is none.
pub(super) fn read<T: DeserializeOwned>(
    dir: &SecureDir,
    name: &str,
) -> Result<Option<T>, StoreError> {
    let Some(bytes) = dir.read(name)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StoreError::Corrupt {
            path: dir.display(name),
            source,
        })
}

/// Replaces the JSON record `name` in `dir` as a whole.
pub(super) fn write<T: Serialize>(
    dir: &SecureDir,
    name: &str,
    record: &T,
) -> Result<(), StoreError> {
    let json = serde_json::to_vec_pretty(record).expect("records serialize");
    Ok(dir.write(name, &json)?)
}

impl Instance {
    /// The instance's record (empty when there is none yet).
    pub fn record(&self) -> Result<InstanceRecord, InstanceError> {
        Ok(read(&self.records, layout::INSTANCE_FILE)?.unwrap_or_default())
    }

    pub(super) fn write_record(&self, record: &InstanceRecord) -> Result<(), InstanceError> {
        Ok(write(&self.records, layout::INSTANCE_FILE, record)?)
    }

    /// Changes the instance's record under the lock.
    fn update(&self, change: impl FnOnce(&mut InstanceRecord)) -> Result<(), InstanceError> {
        let _lock = self.lock()?;
        let mut record = self.record()?;
        change(&mut record);
        self.write_record(&record)
    }

    /// Changes the service's bookkeeping; the rules in force are not touched.
    pub fn update_service(
        &self,
        change: impl FnOnce(&mut ServiceRecord),
    ) -> Result<(), InstanceError> {
        self.update(|r| change(&mut r.service))
    }

    /// `--reserve-ports`: makes `net.ipv4.ip_local_reserved_ports` hold the
    /// origin ranges of `set` (`reserve`), or none of the ports this
    /// instance added before (not `reserve`), and records what it added.
    /// Returns the ranges this instance holds reserved now.
    pub fn reserve_ports(
        &self,
        set: &RuleSet,
        reserve: bool,
    ) -> Result<Vec<(u16, u16)>, InstanceError> {
        let _lock = self.lock()?;
        let mut record = self.record()?;
        let wanted = if reserve {
            ephemeral::wanted(set)
        } else {
            vec![]
        };
        if wanted.is_empty() && record.reserved_ports.is_empty() {
            return Ok(vec![]);
        }
        record.reserved_ports = ephemeral::reconcile(&wanted, &record.reserved_ports).map_err(
            InstanceError::kernel(format!("changing {}", ephemeral::RESERVED_PORTS)),
        )?;
        self.write_record(&record)?;
        Ok(record.reserved_ports)
    }

    /// The rule set records present, by generation.
    pub(super) fn set_records(&self) -> Result<Vec<RuleSetRecord>, InstanceError> {
        let mut out = Vec::new();
        for (name, _) in self.records.entries()? {
            if layout::is_set_file(&name)
                && let Some(record) = read::<RuleSetRecord>(&self.records, &name)?
            {
                out.push(record);
            }
        }
        out.sort_by_key(|r| r.generation);
        Ok(out)
    }

    /// Rule set `generation`'s pin directory (created when `create`).
    pub(super) fn set_dir(
        &self,
        generation: u64,
        create: bool,
    ) -> Result<Option<SecureDir>, InstanceError> {
        Ok(self.pins.subdir(&layout::set_dir(generation), create)?)
    }

    /// Removes rule set `generation`: its pins, then its record.
    pub(super) fn remove_set(&self, generation: u64) -> Result<(), InstanceError> {
        self.pins.remove_tree(&layout::set_dir(generation))?;
        self.records.remove(&layout::set_file(generation))?;
        Ok(())
    }

    /// Every rule-set generation pinned or recorded, in order.
    pub(super) fn generations(&self) -> Result<Vec<u64>, InstanceError> {
        let mut all: Vec<u64> = self
            .pins
            .entries()?
            .into_iter()
            .chain(self.records.entries()?)
            .filter_map(|(name, _)| layout::set_generation(&name))
            .collect();
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }
}
