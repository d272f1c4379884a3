//! What a bench run writes: BENCHMARKS.json (every figure, every round),
//! BENCHMARKS.md ([`markdown`]: the tables, the targets, the method and how
//! the nft peer is set up) and BENCHMARKS.svg ([`svg`]: two charts). The
//! Markdown and the SVG are rendered from the JSON alone, so the three
//! always agree.
//!
//! Figures are medians over the counted rounds. Ratios are medians of
//! per-round ratios: each configuration against the reference measured in
//! the same round, which cancels drift between rounds (this is why the runs
//! are interleaved).

pub(super) mod markdown;
mod svg;

use std::{collections::BTreeMap, fs, path::Path, thread};

use serde_json::{Value, json};

use super::{Echo, Measured, Size, config::Config};

/// Medians, ratios and the attach figures, as JSON.
pub struct Report {
    json: Value,
}

impl Report {
    pub fn new(
        size: Size,
        configs: &[Config],
        measured: &BTreeMap<usize, Measured>,
        attach: Vec<Value>,
    ) -> Self {
        let nft_index = configs.iter().position(|c| *c == Config::NftSnat).unwrap();
        let paired =
            |a: &[f64], b: &[f64]| median(&a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>());
        let rows: Vec<Value> = configs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let m = &measured[&i];
                let (base, nft) = (&measured[&0], &measured[&nft_index]);
                json!({
                    "config": c.name(),
                    "rules": match c { Config::Rulebpf(n) => json!(n), _ => Value::Null },
                    "connects_per_sec": median(&m.connects_per_sec),
                    "connects_ratio_to_no_hook": paired(&m.connects_per_sec, &base.connects_per_sec),
                    "connects_ratio_to_nft": paired(&m.connects_per_sec, &nft.connects_per_sec),
                    "bulk_gbit_per_sec": median(&m.bulk_gbit),
                    "bulk_ratio_to_no_hook": paired(&m.bulk_gbit, &base.bulk_gbit),
                    "bulk_ratio_to_nft": paired(&m.bulk_gbit, &nft.bulk_gbit),
                    "connects_per_sec_rounds": m.connects_per_sec,
                    "bulk_gbit_rounds": m.bulk_gbit,
                })
            })
            .collect();
        Self {
            json: json!({
                "machine": machine(),
                "size": { "rounds": size.rounds, "connects_per_round": size.connects, "bulk_bytes": size.bulk_bytes },
                "results": rows,
                "attach": attach,
            }),
        }
    }

    /// With the capacity scenario and the busy-range and IPv6 rows.
    pub fn with(mut self, capacity: Value, costs: Value) -> Self {
        self.json["capacity"] = capacity;
        self.json["busy_range"] = costs["busy_range"].clone();
        self.json["ipv6"] = costs["ipv6"].clone();
        self
    }

    /// With what decision events cost.
    pub fn with_events(mut self, events: Value) -> Self {
        self.json["events"] = events;
        self
    }

    /// With each piece of the hook on its own.
    pub fn with_pieces(mut self, pieces: Value) -> Self {
        self.json["pieces"] = pieces;
        self
    }

    /// With the bounded search beside the search of every port.
    pub fn with_search(mut self, search: Value) -> Self {
        self.json["search"] = search;
        self
    }

    /// Writes BENCHMARKS.{json,svg,md} into `out_dir`.
    pub fn write(&self, out_dir: &Path, echo: Echo) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(&self.json)?;
        fs::write(out_dir.join("BENCHMARKS.json"), &text)?;
        // Rendered from the file as written and read back, as the test that
        // checks the committed report reads it: serde_json's float parsing
        // may differ from the value written in its last digit.
        let json: Value = serde_json::from_str(&text)?;
        fs::write(out_dir.join("BENCHMARKS.svg"), svg::render(&json))?;
        let md = markdown::render(&json)?;
        fs::write(out_dir.join("BENCHMARKS.md"), &md)?;
        if echo == Echo::Report {
            println!("{md}");
        }
        println!("written: {}/BENCHMARKS.{{md,json,svg}}", out_dir.display());
        Ok(())
    }
}

pub(super) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores, Linux {}", crate::kernel_release())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use serde_json::Value;

    use super::{markdown, median, svg};
    use crate::workspace;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    /// BENCHMARKS.md and .svg at the root are what the generator renders
    /// from BENCHMARKS.json: prose edited by hand would be lost on the next
    /// run, so it belongs in the generator.
    #[test]
    fn committed_report_is_what_the_generator_writes() {
        let read = |name: &str| fs::read_to_string(workspace().join(name)).unwrap();
        let json: Value = serde_json::from_str(&read("BENCHMARKS.json")).unwrap();
        assert_eq!(markdown::render(&json).unwrap(), read("BENCHMARKS.md"));
        assert_eq!(svg::render(&json), read("BENCHMARKS.svg"));
    }
}
