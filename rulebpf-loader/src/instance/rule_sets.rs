//! Which rule set is in force, and how a new one gets there: staged
//! (pinned and recorded) before anything in force changes, swapped into
//! the jump slots, the old one removed; and reconciled after a crash (an
//! interrupted swap completed, sets not in force removed).

use rulebpf_rules::{identity, ruleset::RuleSet};

use super::{Instance, InstanceError, store};
use crate::{
    kernel::{ObjectError, counters, entry::Jumps, program::Pinned, rule_set::RuleSetObject},
    model::{
        layout,
        options::LoadOptions,
        program::{Hook, PerHook},
        records::{ProgramInfo, Reload, RuleSetRecord},
        rule_stats,
    },
    sys::{securedir::SecureDir, time::unix_now},
};

/// What `apply` did.
#[derive(Debug)]
pub struct Applied {
    pub record: RuleSetRecord,
    /// True when a rule set was in force before and has been replaced.
    pub swapped: bool,
}

/// The rule set in force, as the kernel's jump slots say.
#[derive(Debug, Default)]
pub struct InForce {
    /// The program each jump slot holds.
    pub programs: PerHook<Option<u32>>,
    /// The record of the set whose connect4 program is in force.
    pub set: Option<RuleSetRecord>,
    /// The two slots hold programs of different sets (an interrupted swap,
    /// completed by the next command that changes the instance).
    pub mixed: bool,
}

impl Instance {
    /// What the kernel has in force, with the matching record.
    pub fn in_force(&self) -> Result<InForce, InstanceError> {
        if !crate::kernel::entry::exists(&self.pins) {
            return Ok(InForce::default());
        }
        let jumps = Jumps::open(&self.pins)?;
        let programs = PerHook::try_from_fn(|hook| jumps.current(hook))?;
        let records = self.set_records()?;
        let owner = |hook: Hook, id: Option<u32>| {
            records
                .iter()
                .find(|r| id.is_some_and(|id| r.programs.get(hook).id == id))
                .cloned()
        };
        let set4 = owner(Hook::Connect4, programs.connect4);
        let set6 = owner(Hook::Connect6, programs.connect6);
        let mixed = set4.as_ref().map(|s| s.generation) != set6.as_ref().map(|s| s.generation);
        Ok(InForce {
            programs,
            set: set4.or(set6),
            mixed,
        })
    }

    /// Makes the pins and records agree with the kernel: completes an
    /// interrupted swap, removes rule sets that are not in force.
    fn reconcile(&self, jumps: &mut Jumps) -> Result<InForce, InstanceError> {
        let mut in_force = self.in_force()?;
        if in_force.mixed
            && let Some(set) = &in_force.set
        {
            // connect4 is always swapped first: the set it holds is the newer.
            if let Some(set_dir) = self.set_dir(set.generation, false)? {
                let program = set_program(&set_dir, Hook::Connect6)?;
                jumps.set(Hook::Connect6, program_fd(&program, Hook::Connect6)?)?;
                in_force = self.in_force()?;
            }
        }
        let keep = in_force.set.as_ref().map(|s| s.generation);
        self.remove_sets_except(keep)?;
        Ok(in_force)
    }

    /// Puts `set` in force: loads it, records it, swaps it into the jump
    /// slots. On error, what was in force stays.
    pub fn apply(&self, set: &RuleSet, options: LoadOptions) -> Result<Applied, InstanceError> {
        let _lock = self.lock()?;
        // Read first: an unreadable record refuses the change before
        // anything in force changes, not after the swap.
        let mut instance = self.record()?;
        let mut jumps = Jumps::open(&self.pins)?;
        let in_force = self.reconcile(&mut jumps)?;
        let generation = self.next_generation()?;

        let mut object = RuleSetObject::load(set, options, &self.pins)?;
        if let Some(old) = &in_force.set {
            self.carry_stats(old, set, &mut object)?;
        }
        // Staged: pinned and recorded before anything in force changes.
        let set_dir = self.set_dir(generation, true)?.expect("created");
        let staged = Staged {
            instance: self,
            generation,
            keep: false,
        };
        let programs = object.pin(&set_dir)?;
        let record = rule_set_record(set, options, generation, programs, &object);
        store::write(&self.records, &layout::set_file(generation), &record)?;

        self.swap(&mut jumps, &mut object, in_force.set.as_ref())?;
        let mut staged = staged;
        staged.keep = true;
        drop(staged);
        self.remove_sets_except(Some(generation))?;
        // Occupancy of rules that are gone and hold no socket: forgotten.
        counters::prune_occupancy(&self.pins, &record.rules);

        let now = unix_now();
        instance.service.last_reload = Some(Reload {
            at: now,
            ok: true,
            message: format!(
                "{} rule{} from {} (rule set {generation})",
                set.rules.len(),
                if set.rules.len() == 1 { "" } else { "s" },
                set.path.display()
            ),
        });
        self.write_record(&instance)?;
        Ok(Applied {
            record,
            swapped: in_force.set.is_some(),
        })
    }

    /// Writes the new programs into the jump slots, connect4 first. If the
    /// second write fails, connect4 gets the old program back.
    fn swap(
        &self,
        jumps: &mut Jumps,
        object: &mut RuleSetObject,
        old: Option<&RuleSetRecord>,
    ) -> Result<(), InstanceError> {
        jumps.set(Hook::Connect4, object.program_fd(Hook::Connect4)?)?;
        if let Err(error) = jumps.set(Hook::Connect6, object.program_fd(Hook::Connect6)?) {
            if let Some(old) = old
                && let Some(dir) = self.set_dir(old.generation, false)?
                && let Ok(program) = set_program(&dir, Hook::Connect4)
                && let Ok(fd) = program_fd(&program, Hook::Connect4)
            {
                let _ = jumps.set(Hook::Connect4, fd);
            }
            return Err(error.into());
        }
        Ok(())
    }

    /// Counters of rules that stay (same text) continue where they were;
    /// increments between this read and the swap are lost.
    fn carry_stats(
        &self,
        old: &RuleSetRecord,
        set: &RuleSet,
        object: &mut RuleSetObject,
    ) -> Result<(), InstanceError> {
        let totals = self.read_stats(old)?;
        let texts: Vec<&str> = set.rules.iter().map(|r| r.text.as_str()).collect();
        let seeds = rule_stats::carry_over(&old.rules, totals, &texts);
        Ok(counters::seed(object, &seeds)?)
    }
}

/// A rule set pinned and recorded but not (yet) in force: removed on drop
/// unless kept.
struct Staged<'a> {
    instance: &'a Instance,
    generation: u64,
    keep: bool,
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if !self.keep {
            let _ = self
                .instance
                .pins
                .remove_tree(&layout::set_dir(self.generation));
            let _ = self
                .instance
                .records
                .remove(&layout::set_file(self.generation));
        }
    }
}

fn rule_set_record(
    set: &RuleSet,
    options: LoadOptions,
    generation: u64,
    programs: PerHook<ProgramInfo>,
    object: &RuleSetObject,
) -> RuleSetRecord {
    RuleSetRecord {
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
    }
}

/// A pinned program of a rule set, loaded back from its pin.
fn set_program(dir: &SecureDir, hook: Hook) -> Result<Pinned, ObjectError> {
    Pinned::open(dir.fd_path(&layout::set_program_pin(hook)), hook.into())
}

fn program_fd(program: &Pinned, hook: Hook) -> Result<&aya::programs::ProgramFd, ObjectError> {
    program.fd().map_err(|source| ObjectError::Program {
        program: hook.name(),
        source,
    })
}
