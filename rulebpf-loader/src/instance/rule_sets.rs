//! Which rule set is in force, and how a new one gets there: the swap of
//! [`super::swap`] on the real kernel (the jump maps, the sets' pins under
//! `set-N/`, their records `set-N.json`).

use rulebpf_rules::{identity, ruleset::RuleSet};

use super::{
    Instance, InstanceError, store,
    swap::{self, Sets},
};
use crate::{
    kernel::{
        ObjectError, counters, entry, entry::Jumps, program::Pinned, rule_set::RuleSetObject,
    },
    model::{
        layout,
        options::LoadOptions,
        program::{Hook, PerHook},
        records::{Reload, RuleSetRecord},
        rule_stats,
    },
    sys::time::unix_now,
};

pub use super::swap::InForce;

/// What `apply` did.
#[derive(Debug)]
pub struct Applied {
    pub record: RuleSetRecord,
    /// True when a rule set was in force before and has been replaced.
    pub swapped: bool,
}

/// The instance's rule sets and jump slots, as [`Sets`].
struct KernelSets<'a> {
    instance: &'a Instance,
    /// `None` for an instance without an entry object (nothing in force).
    jumps: Option<Jumps>,
}

impl<'a> KernelSets<'a> {
    fn open(instance: &'a Instance) -> Result<Self, InstanceError> {
        let jumps = if entry::exists(&instance.pins) {
            Some(Jumps::open(&instance.pins)?)
        } else {
            None
        };
        Ok(Self { instance, jumps })
    }

    fn jumps(&mut self) -> Result<&mut Jumps, InstanceError> {
        // An instance is made whole (entry object and all) before any set
        // is put in force: `Instance::create_with`.
        Ok(self
            .jumps
            .as_mut()
            .expect("an instance with an entry object"))
    }
}

impl Sets for KernelSets<'_> {
    type Loaded = RuleSetObject;

    fn slots(&self) -> Result<PerHook<Option<u32>>, InstanceError> {
        match &self.jumps {
            Some(jumps) => Ok(PerHook::try_from_fn(|hook| jumps.current(hook))?),
            None => Ok(PerHook::default()),
        }
    }

    fn put_pinned(&mut self, hook: Hook, generation: u64) -> Result<(), InstanceError> {
        let dir = self
            .instance
            .set_dir(generation, false)?
            .ok_or_else(|| ObjectError::Missing("the rule set's directory"))?;
        let program = Pinned::open(dir.fd_path(&layout::set_program_pin(hook)), hook.into())?;
        let fd = program.fd().map_err(|source| ObjectError::Program {
            program: hook.name(),
            source,
        })?;
        Ok(self.jumps()?.set(hook, fd)?)
    }

    fn put_loaded(&mut self, hook: Hook, loaded: &mut RuleSetObject) -> Result<(), InstanceError> {
        let fd = loaded.program_fd(hook)?;
        Ok(self.jumps()?.set(hook, fd)?)
    }

    fn records(&self) -> Result<Vec<RuleSetRecord>, InstanceError> {
        self.instance.set_records()
    }

    fn generations(&self) -> Result<Vec<u64>, InstanceError> {
        self.instance.generations()
    }

    fn remove(&mut self, generation: u64) -> Result<(), InstanceError> {
        self.instance.remove_set(generation)
    }

    fn load(
        &mut self,
        set: &RuleSet,
        options: LoadOptions,
        old: Option<&RuleSetRecord>,
    ) -> Result<RuleSetObject, InstanceError> {
        let mut object = RuleSetObject::load(set, options, &self.instance.pins)?;
        if let Some(old) = old {
            // Counters of rules that stay (same text) continue where they
            // were; increments between this read and the swap are lost.
            let totals = self.instance.read_stats(old)?;
            let texts: Vec<&str> = set.rules.iter().map(|r| r.text.as_str()).collect();
            let seeds = rule_stats::carry_over(&old.rules, totals, &texts);
            counters::seed(&mut object, &seeds)?;
        }
        Ok(object)
    }

    fn stage(
        &mut self,
        object: &mut RuleSetObject,
        generation: u64,
        set: &RuleSet,
        options: LoadOptions,
    ) -> Result<RuleSetRecord, InstanceError> {
        let dir = self.instance.set_dir(generation, true)?.expect("created");
        let programs = object.pin(&dir)?;
        let record = RuleSetRecord {
            generation,
            rules_file: set.path.clone(),
            policy: options.policy,
            programs,
            sharing: options.sharing,
            app_bound: options.app_bound,
            map_memlock_bytes: object.map_memlock_bytes(),
            loaded_at: unix_now(),
            rules: identity::rule_infos(set),
            unresolved: set.name_failures.iter().map(|f| f.name.clone()).collect(),
        };
        store::write(
            &self.instance.records,
            &layout::set_file(generation),
            &record,
        )?;
        Ok(record)
    }
}

impl Instance {
    /// What the kernel has in force, with the matching record.
    pub fn in_force(&self) -> Result<InForce, InstanceError> {
        swap::in_force(&KernelSets::open(self)?)
    }

    /// Puts `set` in force: loads it, records it, swaps it into the jump
    /// slots ([`swap::apply`]). On error, what was in force stays.
    pub fn apply(&self, set: &RuleSet, options: LoadOptions) -> Result<Applied, InstanceError> {
        let _lock = self.lock()?;
        // Read first: an unreadable record refuses the change before
        // anything in force changes, not after the swap.
        let mut instance = self.record()?;
        let mut sets = KernelSets::open(self)?;
        let (record, swapped) = swap::apply(&mut sets, set, options)?;
        // Occupancy of rules that are gone and hold no socket: forgotten.
        counters::prune_occupancy(&self.pins, &record.rules);
        instance.service.last_reload = Some(Reload {
            at: unix_now(),
            ok: true,
            message: format!(
                "{} rule{} from {} (rule set {})",
                set.rules.len(),
                if set.rules.len() == 1 { "" } else { "s" },
                set.path.display(),
                record.generation
            ),
        });
        self.write_record(&instance)?;
        Ok(Applied { record, swapped })
    }
}
