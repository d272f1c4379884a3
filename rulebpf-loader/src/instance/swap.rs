//! The swap and its crash consistency, on the few kernel operations it
//! needs ([`Sets`]), so that the ordering is tested without root against a
//! fake kernel that can fail or die at any step (`tests` below), beside the
//! kernel tests that run it for real.
//!
//! The order that makes every moment safe:
//!
//! 1. **Reconcile** what an earlier command left: slots holding programs
//!    of two sets are an interrupted swap (connect4 is written first, so
//!    its set is the newer one: connect6 gets it too); every set not in
//!    force is removed.
//! 2. **Stage**: the new set is loaded, pinned and recorded under a
//!    generation above every one pinned or recorded; nothing in force has
//!    changed yet.
//! 3. **Swap**: connect4's slot, then connect6's. If the second write
//!    fails, connect4 gets the old program back.
//! 4. **Clean**: every set but the new one is removed. A failure before
//!    the swap removes the staged set.
//!
//! A command killed at any step leaves slots, pins and records that the
//! next command's reconcile turns into one set in force, recorded, alone.

use rulebpf_rules::ruleset::RuleSet;

use super::InstanceError;
use crate::model::{
    options::LoadOptions,
    program::{Hook, PerHook},
    records::RuleSetRecord,
};

/// The kernel operations of the swap: the jump slots, the rule sets'
/// pins and records.
pub(super) trait Sets {
    /// A rule set loaded (maps filled, programs verified), not pinned.
    type Loaded;

    /// The program id each jump slot holds.
    fn slots(&self) -> Result<PerHook<Option<u32>>, InstanceError>;
    /// Puts the pinned program of set `generation` in `hook`'s slot.
    fn put_pinned(&mut self, hook: Hook, generation: u64) -> Result<(), InstanceError>;
    /// Puts a loaded set's program in `hook`'s slot.
    fn put_loaded(&mut self, hook: Hook, loaded: &mut Self::Loaded) -> Result<(), InstanceError>;
    /// The records of the sets, by generation.
    fn records(&self) -> Result<Vec<RuleSetRecord>, InstanceError>;
    /// Every generation with pins or a record.
    fn generations(&self) -> Result<Vec<u64>, InstanceError>;
    /// Removes set `generation`: its pins and its record.
    fn remove(&mut self, generation: u64) -> Result<(), InstanceError>;
    /// Loads `set`; `old`: the set in force, whose counters carry over.
    fn load(
        &mut self,
        set: &RuleSet,
        options: LoadOptions,
        old: Option<&RuleSetRecord>,
    ) -> Result<Self::Loaded, InstanceError>;
    /// Pins `loaded` as set `generation` and records it; returns the
    /// record.
    fn stage(
        &mut self,
        loaded: &mut Self::Loaded,
        generation: u64,
        set: &RuleSet,
        options: LoadOptions,
    ) -> Result<RuleSetRecord, InstanceError>;
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

/// What the slots hold, with the matching records.
pub(super) fn in_force(sets: &impl Sets) -> Result<InForce, InstanceError> {
    let programs = sets.slots()?;
    let records = sets.records()?;
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

/// Step 1: completes an interrupted swap, removes the sets not in force.
pub(super) fn reconcile(sets: &mut impl Sets) -> Result<InForce, InstanceError> {
    let mut now = in_force(sets)?;
    if now.mixed
        && let Some(set) = &now.set
        && sets.generations()?.contains(&set.generation)
    {
        sets.put_pinned(Hook::Connect6, set.generation)?;
        now = in_force(sets)?;
    }
    let keep = now.set.as_ref().map(|s| s.generation);
    remove_all_but(sets, keep)?;
    Ok(now)
}

fn remove_all_but(sets: &mut impl Sets, keep: Option<u64>) -> Result<(), InstanceError> {
    for generation in sets.generations()? {
        if Some(generation) != keep {
            sets.remove(generation)?;
        }
    }
    Ok(())
}

/// Steps 1-4: puts `set` in force. Returns its record and whether a set
/// was in force before. On error, what was in force stays.
pub(super) fn apply<S: Sets>(
    sets: &mut S,
    set: &RuleSet,
    options: LoadOptions,
) -> Result<(RuleSetRecord, bool), InstanceError> {
    let before = reconcile(sets)?;
    let generation = sets.generations()?.into_iter().max().unwrap_or(0) + 1;
    let mut loaded = sets.load(set, options, before.set.as_ref())?;
    let staged = sets
        .stage(&mut loaded, generation, set, options)
        .and_then(|record| {
            swap(sets, &mut loaded, before.set.as_ref())?;
            Ok(record)
        });
    let record = match staged {
        Ok(record) => record,
        Err(e) => {
            // Best effort: a set left behind is removed by the next
            // reconcile all the same.
            let _ = sets.remove(generation);
            return Err(e);
        }
    };
    // In force now: a set left behind costs only its pins until the next
    // reconcile removes it, so the command has done what it was asked.
    if let Err(e) = remove_all_but(sets, Some(generation)) {
        log::warn!(
            "removing the replaced rule set (the next change retries): {}",
            crate::with_causes(&e)
        );
    }
    Ok((record, before.set.is_some()))
}

/// Step 3: connect4 first; if connect6 fails, connect4 gets the old
/// program back.
fn swap<S: Sets>(
    sets: &mut S,
    loaded: &mut S::Loaded,
    old: Option<&RuleSetRecord>,
) -> Result<(), InstanceError> {
    sets.put_loaded(Hook::Connect4, loaded)?;
    if let Err(error) = sets.put_loaded(Hook::Connect6, loaded) {
        if let Some(old) = old {
            let _ = sets.put_pinned(Hook::Connect4, old.generation);
        }
        return Err(error);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{options::Policy, records::ProgramInfo};

    /// A kernel in memory: slots, and per generation the pinned programs
    /// and the record. `fail_at`: the operation (counted from 0) that
    /// fails; `dies_at`: from that operation on, nothing reaches the
    /// kernel any more (the command was killed).
    #[derive(Default)]
    struct Fake {
        slots: PerHook<Option<u32>>,
        pins: BTreeMap<u64, PerHook<u32>>,
        records: BTreeMap<u64, RuleSetRecord>,
        next_program: u32,
        ops: usize,
        fail_at: Option<usize>,
        dies_at: Option<usize>,
    }

    /// A loaded set: its two program ids.
    struct Loaded(PerHook<u32>);

    fn refused() -> InstanceError {
        InstanceError::Kernel {
            what: "fake".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        }
    }

    impl Fake {
        /// Counts an operation that changes the kernel: `Err` when it is
        /// the one that fails or the command is dead.
        fn step(&mut self) -> Result<(), InstanceError> {
            let op = self.ops;
            self.ops += 1;
            if self.fail_at == Some(op) || self.dies_at.is_some_and(|d| op >= d) {
                return Err(refused());
            }
            Ok(())
        }

        fn revive(&mut self) {
            self.fail_at = None;
            self.dies_at = None;
        }
    }

    impl Sets for Fake {
        type Loaded = Loaded;

        fn slots(&self) -> Result<PerHook<Option<u32>>, InstanceError> {
            Ok(self.slots)
        }

        fn put_pinned(&mut self, hook: Hook, generation: u64) -> Result<(), InstanceError> {
            self.step()?;
            let program = *self.pins.get(&generation).ok_or_else(refused)?.get(hook);
            match hook {
                Hook::Connect4 => self.slots.connect4 = Some(program),
                Hook::Connect6 => self.slots.connect6 = Some(program),
            }
            Ok(())
        }

        fn put_loaded(&mut self, hook: Hook, loaded: &mut Loaded) -> Result<(), InstanceError> {
            self.step()?;
            let program = *loaded.0.get(hook);
            match hook {
                Hook::Connect4 => self.slots.connect4 = Some(program),
                Hook::Connect6 => self.slots.connect6 = Some(program),
            }
            Ok(())
        }

        fn records(&self) -> Result<Vec<RuleSetRecord>, InstanceError> {
            Ok(self.records.values().cloned().collect())
        }

        fn generations(&self) -> Result<Vec<u64>, InstanceError> {
            let mut all: Vec<u64> = self
                .pins
                .keys()
                .chain(self.records.keys())
                .copied()
                .collect();
            all.sort();
            all.dedup();
            Ok(all)
        }

        fn remove(&mut self, generation: u64) -> Result<(), InstanceError> {
            self.step()?;
            self.pins.remove(&generation);
            self.records.remove(&generation);
            Ok(())
        }

        fn load(
            &mut self,
            _: &RuleSet,
            _: LoadOptions,
            _: Option<&RuleSetRecord>,
        ) -> Result<Loaded, InstanceError> {
            self.step()?;
            self.next_program += 2;
            Ok(Loaded(PerHook {
                connect4: self.next_program - 1,
                connect6: self.next_program,
            }))
        }

        fn stage(
            &mut self,
            loaded: &mut Loaded,
            generation: u64,
            set: &RuleSet,
            options: LoadOptions,
        ) -> Result<RuleSetRecord, InstanceError> {
            // Pins, then the record: two steps, as on bpffs and in /run.
            self.step()?;
            self.pins.insert(generation, loaded.0);
            self.step()?;
            let record = RuleSetRecord {
                generation,
                rules_file: set.path.clone(),
                policy: options.policy,
                programs: PerHook {
                    connect4: ProgramInfo {
                        id: loaded.0.connect4,
                        verified_insns: None,
                    },
                    connect6: ProgramInfo {
                        id: loaded.0.connect6,
                        verified_insns: None,
                    },
                },
                sharing: options.sharing,
                app_bound: options.app_bound,
                map_memlock_bytes: 0,
                loaded_at: 0,
                rules: vec![],
                unresolved: vec![],
            };
            self.records.insert(generation, record.clone());
            Ok(record)
        }
    }

    fn rules() -> RuleSet {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.ini");
        std::fs::write(&path, "127.0.0.2 * : 22000\n").unwrap();
        RuleSet::load(&path).unwrap()
    }

    fn options() -> LoadOptions {
        LoadOptions {
            policy: Policy::Strict,
            kernel_log: log::LevelFilter::Off,
            sharing: Default::default(),
            app_bound: Default::default(),
        }
    }

    /// One set in force, recorded, alone: what every command must leave
    /// (after its own reconcile, when it was killed).
    fn whole(fake: &Fake) -> u64 {
        let now = in_force(fake).unwrap();
        assert!(!now.mixed, "slots {:?}", fake.slots);
        let set = now.set.expect("a set in force");
        assert_eq!(fake.generations().unwrap(), [set.generation], "sets left");
        assert_eq!(
            fake.pins[&set.generation].connect6,
            fake.slots.connect6.unwrap()
        );
        set.generation
    }

    #[test]
    fn a_first_set_then_a_swap() {
        let (mut fake, set) = (Fake::default(), rules());
        let (record, swapped) = apply(&mut fake, &set, options()).unwrap();
        assert_eq!((record.generation, swapped), (1, false));
        assert_eq!(whole(&fake), 1);
        let (record, swapped) = apply(&mut fake, &set, options()).unwrap();
        assert_eq!((record.generation, swapped), (2, true));
        assert_eq!(whole(&fake), 2);
    }

    #[test]
    fn a_failed_connect6_write_gives_connect4_its_old_program_back() {
        let (mut fake, set) = (Fake::default(), rules());
        apply(&mut fake, &set, options()).unwrap();
        let before = fake.slots;
        // Reconcile removes nothing; load, pin, record, connect4, connect6.
        fake.ops = 0;
        fake.fail_at = Some(4);
        assert!(apply(&mut fake, &set, options()).is_err());
        assert_eq!(fake.slots, before);
        assert_eq!(whole(&fake), 1, "the staged set is removed");
    }

    #[test]
    fn an_interrupted_swap_is_completed_by_the_next_reconcile() {
        let (mut fake, set) = (Fake::default(), rules());
        apply(&mut fake, &set, options()).unwrap();
        // Killed between the two slot writes.
        fake.ops = 0;
        fake.dies_at = Some(4);
        assert!(apply(&mut fake, &set, options()).is_err());
        assert!(in_force(&fake).unwrap().mixed);
        fake.revive();
        let now = reconcile(&mut fake).unwrap();
        assert_eq!(
            now.set.unwrap().generation,
            2,
            "connect4's set is the newer"
        );
        assert_eq!(whole(&fake), 2);
    }

    /// Killed or refused at every step of a swap: the rules in force are
    /// the old set's or the new one's, whole, and the next command works.
    #[test]
    fn every_step_can_fail_or_die() {
        let set = rules();
        let mut steps = 0;
        for killed in [false, true] {
            for at in 0.. {
                let mut fake = Fake::default();
                apply(&mut fake, &set, options()).unwrap();
                apply(&mut fake, &set, options()).unwrap();
                fake.ops = 0;
                if killed {
                    fake.dies_at = Some(at);
                } else {
                    fake.fail_at = Some(at);
                }
                let result = apply(&mut fake, &set, options());
                let reached = fake.ops > at;
                fake.revive();
                if !reached {
                    // Every step done: the swap as it should be.
                    assert!(result.is_ok());
                    assert_eq!(whole(&fake), 3);
                    break;
                }
                steps += 1;
                let now = in_force(&fake).unwrap();
                match result {
                    // In force; what it replaced goes at the next change.
                    Ok(_) => assert_eq!((now.set.unwrap().generation, now.mixed), (3, false)),
                    // A refused command changed nothing in force.
                    Err(_) if !killed => {
                        assert_eq!((now.set.unwrap().generation, now.mixed), (2, false));
                    }
                    Err(_) => {}
                }
                reconcile(&mut fake).unwrap();
                let generation = whole(&fake);
                assert!(generation == 2 || generation == 3, "{generation}");
                let (record, _) = apply(&mut fake, &set, options()).unwrap();
                assert_eq!(whole(&fake), record.generation);
            }
        }
        assert!(steps >= 10, "{steps} failure points tried");
    }
}
