//! `rulebpf stats`.

use std::fmt;

use super::StatsReport;

impl fmt::Display for StatsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return writeln!(f, "no rulebpf instance with rules in force");
        }
        for instance in &self.0 {
            writeln!(
                f,
                "instance {} ({}, rule set {}):",
                instance.instance,
                instance.rules_file.display(),
                instance.generation
            )?;
            // APP/KERNEL: sockets the application had bound before
            // connect(), by who chose the port; IN USE/PEAK: ports of the
            // range with a live socket now, and at most.
            writeln!(
                f,
                "  {:>6} {:>12} {:>12} {:>10} {:>8} {:>8} {:>10} {:>7} {:>7}  RULE",
                "LINE",
                "MATCHED",
                "BOUND",
                "EXHAUSTED",
                "APP",
                "KERNEL",
                "DENIED",
                "IN USE",
                "PEAK"
            )?;
            for rule in &instance.rules {
                let remark = rule
                    .remark
                    .as_ref()
                    .map(|r| format!("  # {r}"))
                    .unwrap_or_default();
                writeln!(
                    f,
                    "  {:>6} {:>12} {:>12} {:>10} {:>8} {:>8} {:>10} {:>7} {:>7}  {}{remark}",
                    rule.line,
                    rule.matched,
                    rule.bound,
                    rule.exhausted,
                    rule.app_chose,
                    rule.kernel_chose,
                    rule.denied,
                    rule.in_use,
                    rule.high_water,
                    rule.text
                )?;
            }
            let noted: Vec<String> = instance
                .counters
                .iter()
                .filter(|&(_, &n)| n > 0)
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            if !noted.is_empty() {
                writeln!(f, "  instance: {}", noted.join(", "))?;
            }
        }
        Ok(())
    }
}
