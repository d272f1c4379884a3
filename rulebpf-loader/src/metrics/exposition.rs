//! The OpenMetrics text of one scrape: the kernel's per-rule counters and
//! the service's own.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::counter::ConstCounter,
    registry::Registry,
};

use std::sync::atomic::Ordering::Relaxed;

use super::{EventFigures, Metrics};
use crate::model::rule_stats::RuleRow;

/// The exposition of the service's counters and, when they could be read,
/// the per-rule `rows` of `instance`.
pub fn exposition(
    instance: &str,
    rows: Option<&[RuleRow]>,
    metrics: &Metrics,
    events: &EventFigures,
) -> String {
    let collector = Exposition {
        instance: instance.to_string(),
        rows: rows.map(<[RuleRow]>::to_vec),
        events: events.clone(),
        service: [
            &metrics.reloads_ok,
            &metrics.reloads_failed,
            &metrics.dns_refreshes,
            &metrics.reattaches,
            &metrics.dns_failures,
        ]
        .map(|counter| counter.load(Relaxed)),
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// A per-rule counter family: its name without the `_total` the encoder
/// appends, its help, and its value in a row.
struct RuleFamily {
    name: &'static str,
    help: &'static str,
    value: fn(&RuleRow) -> u64,
}

const RULE_FAMILIES: [RuleFamily; 4] = [
    RuleFamily {
        name: "rulebpf_rule_matched",
        help: "connect() calls the rule decided (since the rule was loaded).",
        value: |row| row.matched,
    },
    RuleFamily {
        name: "rulebpf_rule_bound",
        help: "Sockets bound to an origin port of the rule's range.",
        value: |row| row.bound,
    },
    RuleFamily {
        name: "rulebpf_rule_exhausted",
        help: "connect() calls for which no origin port of the range was free.",
        value: |row| row.exhausted,
    },
    RuleFamily {
        name: "rulebpf_rule_denied",
        help: "connect() calls refused with EPERM because the rule says deny.",
        value: |row| row.denied,
    },
];

/// Per-rule gauges: the rule's occupancy (see `stats.rs`).
const RULE_GAUGES: [RuleFamily; 2] = [
    RuleFamily {
        name: "rulebpf_rule_ports_in_use",
        help: "Ports of the rule's origin range with a live socket the hook bound (with port \
               sharing a port serves one socket per destination).",
        value: |row| row.in_use,
    },
    RuleFamily {
        name: "rulebpf_rule_ports_high_water",
        help: "The most ports of the rule's range in use at once since the instance was created.",
        value: |row| row.high_water,
    },
];

/// Sockets the application bound before connect(), by who chose the port
/// (label `chosen_by`): name and help.
const APP_BOUND: (&str, &str) = (
    "rulebpf_rule_app_bound",
    "Sockets the application had bound before connect() (kept, or refused with \
     --app-bound refuse), by who chose the port: the application (bind(addr, P)) or the \
     kernel (bind(addr, 0)).",
);

/// In the order of [`Exposition::service`].
const SERVICE_FAMILIES: [(&str, &str); 5] = [
    (
        "rulebpf_reloads",
        "Rule sets swapped in by this service (start, file change, SIGHUP, DNS change).",
    ),
    (
        "rulebpf_reload_failures",
        "Reloads refused (invalid file, kernel error); the rules in force stayed.",
    ),
    (
        "rulebpf_dns_refreshes",
        "Periodic re-resolutions of the rules' DNS names.",
    ),
    (
        "rulebpf_reattach",
        "Followed cgroups attached again after they were re-created (a restarted unit).",
    ),
    (
        "rulebpf_dns_failures",
        "Names that failed to resolve during refreshes (last answer kept).",
    ),
];

/// One scrape's values, encoded by `prometheus-client` (which escapes the
/// label values).
#[derive(Debug)]
struct Exposition {
    instance: String,
    rows: Option<Vec<RuleRow>>,
    events: EventFigures,
    service: [u64; SERVICE_FAMILIES.len()],
}

const EVENTS: (&str, &str) = (
    "rulebpf_events",
    "Decision events this service read (run --events-log), by outcome.",
);
const EVENTS_DROPPED: (&str, &str) = (
    "rulebpf_events_dropped",
    "Decision events lost: where=\"ring\", the hooks found the ring buffer full (whoever \
     read it); where=\"log\", this service's log fell behind its reader.",
);
const NAT_REWRITES: (&str, &str) = (
    "rulebpf_nat_rewrites",
    "Connections whose origin port left the host rewritten by NAT (snat/masquerade), by rule \
     line (seen by this service's events reader).",
);

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new;
        let kind = counter(0u64).metric_type();
        for family in RULE_FAMILIES {
            let Some(rows) = &self.rows else { break };
            let mut metric = encoder.encode_descriptor(family.name, family.help, None, kind)?;
            for row in rows {
                let labels = (
                    [("instance", self.instance.as_str())],
                    ([("line", row.line)], [("rule", row.text.as_str())]),
                );
                counter((family.value)(row)).encode(metric.encode_family(&labels)?)?;
            }
        }
        if let Some(rows) = &self.rows {
            let gauge = prometheus_client::metrics::gauge::ConstGauge::new;
            for family in RULE_GAUGES {
                let mut metric = encoder.encode_descriptor(
                    family.name,
                    family.help,
                    None,
                    gauge(0u64).metric_type(),
                )?;
                for row in rows {
                    let labels = (
                        [("instance", self.instance.as_str())],
                        ([("line", row.line)], [("rule", row.text.as_str())]),
                    );
                    gauge((family.value)(row)).encode(metric.encode_family(&labels)?)?;
                }
            }
            let mut metric = encoder.encode_descriptor(APP_BOUND.0, APP_BOUND.1, None, kind)?;
            for row in rows {
                let by = [("application", row.app_chose), ("kernel", row.kernel_chose)];
                for (chosen_by, value) in by {
                    let labels = (
                        [("instance", self.instance.as_str())],
                        (
                            [("line", row.line)],
                            ([("rule", row.text.as_str())], [("chosen_by", chosen_by)]),
                        ),
                    );
                    counter(value).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        self.encode_events(&mut encoder)?;
        for ((name, help), value) in SERVICE_FAMILIES.into_iter().zip(self.service) {
            counter(value).encode(encoder.encode_descriptor(name, help, None, kind)?)?;
        }
        Ok(())
    }
}

impl Exposition {
    fn encode_events(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = ConstCounter::new;
        let kind = counter(0u64).metric_type();
        let instance = [("instance", self.instance.as_str())];
        let mut metric = encoder.encode_descriptor(EVENTS.0, EVENTS.1, None, kind)?;
        for (outcome, value) in &self.events.by_outcome {
            let labels = (instance, [("outcome", *outcome)]);
            counter(*value).encode(metric.encode_family(&labels)?)?;
        }
        let mut metric =
            encoder.encode_descriptor(EVENTS_DROPPED.0, EVENTS_DROPPED.1, None, kind)?;
        let ring = self.events.ring.map(|(_, dropped)| ("ring", dropped));
        for (place, value) in ring.into_iter().chain([("log", self.events.missed)]) {
            let labels = (instance, [("where", place)]);
            counter(value).encode(metric.encode_family(&labels)?)?;
        }
        let mut metric = encoder.encode_descriptor(NAT_REWRITES.0, NAT_REWRITES.1, None, kind)?;
        for (line, value) in &self.events.nat_rewrites {
            let labels = (instance, [("line", *line)]);
            counter(*value).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_keeps_the_names_and_labels_scrapers_know() {
        let metrics = Metrics::default();
        metrics.reloaded(true);
        metrics.dns_refreshed(2);
        let rows = [RuleRow {
            line: 7,
            text: r#"a "b" \ c"#.into(),
            matched: 3,
            bound: 2,
            exhausted: 1,
            app_chose: 4,
            kernel_chose: 5,
            denied: 11,
            remark: Some("SFTP".into()),
            in_use: 6,
            high_water: 8,
            sockets: 9,
            ports: 10,
            key: 0,
        }];
        metrics.event("bound", None);
        metrics.event("bound", Some(7));
        metrics.events_missed(4);
        let events = metrics.event_figures(Some((10, 3)));
        let text = exposition("gw", Some(&rows), &metrics, &events);
        for line in [
            r#"rulebpf_rule_matched_total{instance="gw",line="7",rule="a \"b\" \\ c"} 3"#,
            r#"rulebpf_rule_bound_total{instance="gw",line="7",rule="a \"b\" \\ c"} 2"#,
            r#"rulebpf_rule_exhausted_total{instance="gw",line="7",rule="a \"b\" \\ c"} 1"#,
            r#"rulebpf_rule_denied_total{instance="gw",line="7",rule="a \"b\" \\ c"} 11"#,
            r#"rulebpf_rule_ports_in_use{instance="gw",line="7",rule="a \"b\" \\ c"} 6"#,
            r#"rulebpf_rule_ports_high_water{instance="gw",line="7",rule="a \"b\" \\ c"} 8"#,
            r#"rulebpf_rule_app_bound_total{instance="gw",line="7",rule="a \"b\" \\ c",chosen_by="application"} 4"#,
            r#"rulebpf_rule_app_bound_total{instance="gw",line="7",rule="a \"b\" \\ c",chosen_by="kernel"} 5"#,
            "rulebpf_reloads_total 1",
            "rulebpf_reload_failures_total 0",
            "rulebpf_dns_refreshes_total 1",
            "rulebpf_dns_failures_total 2",
            "rulebpf_reattach_total 0",
            r#"rulebpf_events_total{instance="gw",outcome="bound"} 2"#,
            r#"rulebpf_events_total{instance="gw",outcome="denied"} 0"#,
            r#"rulebpf_events_dropped_total{instance="gw",where="ring"} 3"#,
            r#"rulebpf_events_dropped_total{instance="gw",where="log"} 4"#,
            r#"rulebpf_nat_rewrites_total{instance="gw",line="7"} 1"#,
            "# TYPE rulebpf_reloads counter",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        // Counters unreadable: the service's own ones still.
        let text = exposition("gw", None, &metrics, &EventFigures::default());
        assert!(!text.contains("rulebpf_rule_"), "{text}");
        assert!(text.contains("rulebpf_reloads_total 1\n"), "{text}");
    }
}
