//! The cgroups an instance is attached to: attach (with pinned links, or
//! without for a systemd unit's own cgroup), detach, removal of the whole
//! instance, and the garbage gone cgroups leave.

use std::{fs::File, os::fd::AsFd as _, os::unix::fs::MetadataExt as _, path::Path};

use super::{Instance, InstanceError, Standing, Tops, legacy};
use crate::{
    kernel::attach::{self, How, OpenCgroup},
    model::{
        layout,
        name::InstanceName,
        program::{Hook, ProgramKind},
        records::{AttachedBy, Attachment, InstanceRecord},
    },
    sys::{bpf, cgroup::Cgroup, ephemeral, time::unix_now},
};

impl Instance {
    /// Attaches the instance's programs to `cgroup` (idempotent).
    /// Refused when the cgroup carries another rulebpf instance's hooks; an
    /// instance of the previous layout on it is replaced without a gap.
    /// Returns false when it was attached already.
    pub fn attach(&self, cgroup: &Cgroup, by: AttachedBy) -> Result<bool, InstanceError> {
        let _lock = self.lock()?;
        let record = self.record()?;
        let dir = open(cgroup)?;
        let open = OpenCgroup::new(&dir, cgroup);
        let legacy_programs = legacy::programs_on(cgroup.id)?;
        self.refuse_stacking(&record, &open, &legacy_programs)?;
        // The bookkeeping programs too: also where systemd's BPFProgram=
        // attached the entry programs (it cannot attach sock_release).
        let missing = attach::missing(&open, &record.programs())?;
        let recorded = record.attachments.iter().any(|a| a.cgroup_id == cgroup.id);
        if missing.is_empty() && recorded {
            // Attached already, maybe for someone else now: a pod whose
            // sandbox the kubelet re-created keeps its cgroup, and the old
            // sandbox's removal must not take the new one's rules away.
            if record
                .attachments
                .iter()
                .any(|a| a.cgroup_id == cgroup.id && a.by != by)
            {
                let mut record = record;
                for a in &mut record.attachments {
                    if a.cgroup_id == cgroup.id {
                        a.by = by.clone();
                    }
                }
                self.write_record(&record)?;
            }
            return Ok(false);
        }
        // Recorded first, so that status never shows rules in force on a
        // cgroup it does not list (it checks the kernel for each record);
        // a failure below takes the record back.
        let before = record.clone();
        let mut record = record;
        record.attachments.retain(|a| a.cgroup_id != cgroup.id);
        record.attachments.push(Attachment {
            cgroup: cgroup.path.clone(),
            cgroup_id: cgroup.id,
            attached_at: unix_now(),
            by,
        });
        self.write_record(&record)?;
        let link_dir = self
            .pins
            .subdir(&layout::attachment_dir(cgroup.id), true)?
            .expect("created");
        if let Err(e) = attach::attach(&self.pins, &open, &missing, How::Linked(&link_dir)) {
            let _ = self.write_record(&before);
            return Err(e.into());
        }
        // Only now that ours run: the previous layout's links go.
        if !legacy_programs.is_empty() {
            let tops = Tops::create()?;
            legacy::remove(&tops.pins, Some(&tops.records), cgroup.id)?;
        }
        Ok(true)
    }

    /// Attaches the instance's programs to `cgroup` without links, unless
    /// they are attached already (systemd's `BPFProgram=` may have attached
    /// the entry programs): for `rulebpf systemd-attach`, run by a unit's
    /// `ExecStartPre=` in its new cgroup. The attachment lives as long as
    /// the cgroup, so it is not recorded. The same no-stacking check as
    /// [`Instance::attach`]. Returns how many programs it attached.
    pub fn attach_for_unit(&self, cgroup: &Cgroup) -> Result<usize, InstanceError> {
        let _lock = self.lock()?;
        let record = self.record()?;
        let dir = open(cgroup)?;
        let open = OpenCgroup::new(&dir, cgroup);
        self.refuse_stacking(&record, &open, &[])?;
        let missing = attach::missing(&open, &record.programs())?;
        attach::attach(&self.pins, &open, &missing, How::Unlinked)?;
        Ok(missing.len())
    }

    /// Whether [`Instance::attach`] would attach to `cgroup` (refused when
    /// it carries another instance's hooks); changes nothing.
    pub fn check_attachable(&self, cgroup: &Cgroup) -> Result<(), InstanceError> {
        let dir = open(cgroup)?;
        let open = OpenCgroup::new(&dir, cgroup);
        let legacy_programs = legacy::programs_on(cgroup.id)?;
        self.refuse_stacking(&self.record()?, &open, &legacy_programs)
    }

    /// Refuses a cgroup whose connect hooks hold another rulebpf program
    /// than this instance's entry programs (or than `replaceable`, the
    /// previous layout's, which an attach replaces).
    fn refuse_stacking(
        &self,
        record: &InstanceRecord,
        cgroup: &OpenCgroup<'_>,
        replaceable: &[u32],
    ) -> Result<(), InstanceError> {
        for hook in Hook::ALL {
            let ours = record.entry.get(hook).id;
            let present = attach::ours_on(cgroup, hook.into())?;
            if present.contains(&ours) {
                continue;
            }
            if let Some(&other) = present.iter().find(|id| !replaceable.contains(id)) {
                return Err(InstanceError::Stacked {
                    cgroup: cgroup.path.to_path_buf(),
                    hook: hook.name(),
                    program: other,
                    owner: owner_of(other),
                });
            }
        }
        Ok(())
    }

    /// Removes the attachments recorded for the cgroup at `path` (also a
    /// gone or re-created one). Returns whether anything was removed.
    pub fn detach_cgroup(&self, path: &Path) -> Result<bool, InstanceError> {
        let _lock = self.lock()?;
        let mut record = self.record()?;
        let (gone, kept): (Vec<_>, Vec<_>) = record
            .attachments
            .into_iter()
            .partition(|a| a.cgroup == path);
        record.attachments = kept;
        for attachment in &gone {
            self.pins
                .remove_tree(&layout::attachment_dir(attachment.cgroup_id))?;
        }
        self.write_record(&record)?;
        Ok(!gone.is_empty())
    }

    /// Removes the attachment to cgroup `id` (pins and record).
    pub fn detach_id(&self, cgroup_id: u64) -> Result<bool, InstanceError> {
        let _lock = self.lock()?;
        let mut record = self.record()?;
        let before = record.attachments.len();
        record.attachments.retain(|a| a.cgroup_id != cgroup_id);
        let removed_pins = self.pins.remove_tree(&layout::attachment_dir(cgroup_id))?;
        let removed = removed_pins || record.attachments.len() != before;
        self.write_record(&record)?;
        Ok(removed)
    }

    /// Removes the whole instance: attachments, rule sets, entry programs,
    /// records. Programs attached by others (systemd) lose their rules: the
    /// entry's jump slots go with the pins.
    pub fn remove(self) -> Result<Vec<Attachment>, InstanceError> {
        let _lock = self.lock()?;
        let record = match self.record() {
            Ok(record) => record,
            // An unreadable record must not keep the instance: its pins go
            // all the same (which detaches its links); what only the record
            // knew is said.
            Err(InstanceError::Store(e)) => {
                log::warn!(
                    "instance {}: {}; removing its pins anyway (ports it reserved, if any, \
                     stay in net.ipv4.ip_local_reserved_ports)",
                    self.name,
                    crate::with_causes(&e)
                );
                Default::default()
            }
            Err(e) => return Err(e),
        };
        // The reserved ports it added go first: a failure leaves the
        // instance (and its record of them) for the next attempt.
        if !record.reserved_ports.is_empty() {
            ephemeral::reconcile(&[], &record.reserved_ports).map_err(InstanceError::kernel(
                format!("changing {}", ephemeral::RESERVED_PORTS),
            ))?;
        }
        let tops = Tops::create()?;
        tops.pins.remove_tree(self.name.as_str())?;
        tops.records.remove_tree(self.name.as_str())?;
        // A link someone else still holds open outlives its pin: the kernel
        // is asked what is left of this instance on its cgroups.
        let programs = record.program_ids();
        for attachment in &record.attachments {
            if let Ok(cgroup) = Cgroup::resolve(&attachment.cgroup)
                && cgroup.id == attachment.cgroup_id
            {
                clear_cgroup(&cgroup, Some(&programs))?;
            }
        }
        Ok(record.attachments)
    }

    /// How `attachment` stands now.
    pub fn standing(&self, attachment: &Attachment) -> Standing {
        let Ok(meta) = std::fs::metadata(&attachment.cgroup) else {
            return Standing::CgroupGone;
        };
        if meta.ino() != attachment.cgroup_id {
            return Standing::Recreated { id: meta.ino() };
        }
        let Ok(record) = self.record() else {
            return Standing::Detached;
        };
        let Ok(dir) = File::open(&attachment.cgroup) else {
            return Standing::CgroupGone;
        };
        let attached = Hook::ALL.iter().all(|&hook| {
            bpf::attached_programs(dir.as_fd(), ProgramKind::Hook(hook))
                .is_ok_and(|ids| ids.contains(&record.entry.get(hook).id))
        });
        if attached {
            Standing::InForce
        } else {
            Standing::Detached
        }
    }

    /// Removes the attachments of cgroups that are gone or were re-created
    /// (their links no longer hold anything). Returns what was removed.
    pub fn collect_garbage(&self) -> Result<Vec<Attachment>, InstanceError> {
        let stale: Vec<Attachment> = self
            .record()?
            .attachments
            .into_iter()
            .filter(|a| {
                matches!(
                    self.standing(a),
                    Standing::CgroupGone | Standing::Recreated { .. }
                )
            })
            .collect();
        for attachment in &stale {
            self.detach_id(attachment.cgroup_id)?;
        }
        Ok(stale)
    }
}

fn open(cgroup: &Cgroup) -> Result<File, InstanceError> {
    File::open(&cgroup.path)
        .map_err(|e| InstanceError::kernel(format!("opening {}", cgroup.path.display()))(e))
}

/// The instance whose entry program is `program`, if any.
fn owner_of(program: u32) -> Option<InstanceName> {
    Instance::all().ok()?.into_iter().find_map(|instance| {
        let record = instance.record().ok()?;
        Hook::ALL
            .iter()
            .any(|&h| record.entry.get(h).id == program)
            .then(|| instance.name.clone())
    })
}

/// Removes the rulebpf programs attached directly to `cgroup` (links by
/// anyone, and programs attached without a link, as systemd does) — all of
/// them, or `only` those — then checks that none is left. Returns how many
/// were removed.
pub fn clear_cgroup(cgroup: &Cgroup, only: Option<&[u32]>) -> Result<usize, InstanceError> {
    let dir = open(cgroup)?;
    let open = OpenCgroup::new(&dir, cgroup);
    Ok(attach::clear(&open, only)?)
}
