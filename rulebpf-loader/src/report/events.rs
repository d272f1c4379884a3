//! `rulebpf events` without `--json`: one line per decision, for people.

use std::fmt;

use crate::model::event::DecisionRecord;

/// One decision as a line: when, who, where to, what happened, and why.
pub struct EventLine<'a>(pub &'a DecisionRecord);

impl fmt::Display for EventLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        write!(
            f,
            "{} {} pid {} ({}) uid {} {}: {} {} ",
            r.time, r.instance, r.pid, r.comm, r.uid, r.cgroup, r.protocol, r.destination
        )?;
        match r.outcome.as_ref() {
            "bound" => write!(f, "from port {}: bound", r.origin_port)?,
            "app_chose" | "kernel_chose" | "refused" => {
                write!(f, "from port {}: {}", r.origin_port, r.outcome)?
            }
            other => f.write_str(other)?,
        }
        if let Some(nat) = r.nat_port {
            write!(f, ", left as port {nat} (NAT)")?;
        }
        match r.line {
            Some(line) => write!(f, " (line {line})")?,
            None => f.write_str(" (no rule)")?,
        }
        if let Some(remark) = &r.remark {
            write!(f, " # {remark}")?;
        }
        Ok(())
    }
}
