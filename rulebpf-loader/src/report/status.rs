//! `rulebpf status`.

use std::fmt;

use super::{
    StatusReport, StatusRow, app_bound_name, count, policy_name, programs_line, sharing_name, time,
};
use crate::instance::Standing;

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return writeln!(f, "no rulebpf instance");
        }
        for row in &self.0 {
            row.fmt_text(f)?;
        }
        Ok(())
    }
}

fn standing_text(standing: Standing) -> String {
    match standing {
        Standing::InForce => "in force".into(),
        Standing::CgroupGone => "cgroup gone".into(),
        Standing::Recreated { id } => format!("re-created (now id {id}): NOT attached"),
        Standing::Detached => "NOT attached".into(),
    }
}

impl StatusRow {
    fn fmt_text(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let managed = match self.managed_by {
            Some(pid) => format!(", managed by `rulebpf run` (pid {pid})"),
            None => String::new(),
        };
        writeln!(f, "instance {}{managed}", self.name)?;
        if let Some(error) = &self.error {
            writeln!(f, "  error: {error}")?;
        }
        for damage in &self.damage {
            writeln!(f, "  damaged: {damage}; the next attach or run repairs it")?;
        }
        match &self.rule_set {
            Some(r) => {
                writeln!(
                    f,
                    "  rules: {} ({}), rule set {}, policy {}, port sharing {}, app-bound {}, \
                     loaded {}",
                    r.rules_file.display(),
                    count(r.rules.len(), "rule"),
                    r.generation,
                    policy_name(r.policy),
                    sharing_name(r.sharing),
                    app_bound_name(r.app_bound),
                    time(r.loaded_at)
                )?;
                if !r.unresolved.is_empty() {
                    writeln!(f, "  unresolved names: {}", r.unresolved.join(", "))?;
                }
                writeln!(f, "  {}", programs_line(&r.programs, r.map_memlock_bytes))?;
            }
            None => writeln!(f, "  rules: none in force (connects pass untouched)")?,
        }
        if self.mixed {
            writeln!(
                f,
                "  note: connect4 and connect6 run different rule sets (an interrupted swap; \
                 the next attach or run completes it)"
            )?;
        }
        writeln!(
            f,
            "  entry programs: connect4 id {}, connect6 id {}",
            self.entry.connect4.id, self.entry.connect6.id
        )?;
        if self.attachments.is_empty() {
            writeln!(f, "  attached to: no cgroup by rulebpf")?;
        }
        // The one variable-width column last, so nothing shifts.
        for row in &self.attachments {
            writeln!(
                f,
                "  {:<36} {:>10}  {}",
                standing_text(row.standing),
                row.attachment.cgroup_id,
                row.attachment.cgroup.display()
            )?;
        }
        // The ten busiest rules; `stats` has them all.
        for o in self.occupancy.iter().take(10) {
            writeln!(
                f,
                "  line {}: {} of {} ports in use (at most {}), {}, `{}`{}",
                o.line,
                o.in_use,
                o.ports,
                o.high_water,
                count(o.sockets as usize, "socket"),
                o.text,
                remark(o.remark.as_deref())
            )?;
        }
        for d in &self.denied {
            writeln!(
                f,
                "  line {}: {} denied, `{}`{}",
                d.line,
                count(d.denied as usize, "connect"),
                d.text,
                remark(d.remark.as_deref())
            )?;
        }
        let s = &self.service;
        if let Some(reload) = &s.last_reload {
            writeln!(
                f,
                "  last reload: {} at {}: {}",
                if reload.ok { "ok" } else { "REFUSED" },
                time(reload.at),
                reload.message.replace('\n', "\n    ")
            )?;
        }
        if s.dns_refreshes + s.dns_failures + s.reattaches > 0 {
            writeln!(
                f,
                "  DNS refreshes {}, failures {}; cgroups re-attached {}",
                s.dns_refreshes, s.dns_failures, s.reattaches
            )?;
        }
        Ok(())
    }
}

/// `  # REMARK` after a rule, or nothing.
fn remark(remark: Option<&str>) -> String {
    remark.map(|r| format!("  # {r}")).unwrap_or_default()
}
