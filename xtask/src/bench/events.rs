//! What decision events cost per connect: the 1-rule instance with their
//! code compiled out, with nobody listening, with `rulebpf events` reading
//! and with `rulebpf run --events-log` writing, and no hook, alternated
//! round after round (A B C D E A B C D E ...) so that each ratio pairs
//! configurations measured seconds apart: on a VM whose speed drifts from
//! round to round, pairing is what makes a 1 % difference visible.

use serde_json::{Value, json};

use super::{
    Bench, Size,
    bpf::{Program, StatsOn},
    config::{Config, Events},
    report::median,
};

/// Destination ports of these rounds: after the main rounds' (7400 and
/// up: 8 rounds of 7 configurations and 7 proofs end at 7462), before the
/// bulk port (22 rounds of 5 and 5 proofs end at 7584).
const FIRST_PORT: u16 = 7470;

/// In the order each round runs them.
fn configs() -> [Config; 5] {
    [
        Config::NoHook,
        Config::Events(Events::CompiledOut),
        Config::Rulebpf(1),
        Config::Events(Events::Read),
        Config::Events(Events::Logged),
    ]
}

/// What each configuration measured per counted round, and the medians of
/// the paired ratios.
pub fn measure(bench: &Bench, size: Size) -> anyhow::Result<Value> {
    let configs = configs();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut last = vec![0.0; configs.len()];
    // Per configuration with a reader: its CPU nanoseconds and the events
    // it was given, over the counted rounds.
    let mut reader = vec![(0u64, 0u64); configs.len()];
    // Per hooked configuration: the hook's nanoseconds and runs (the
    // entry program's, which covers the rule set it tail-calls).
    let mut hook = vec![(0u64, 0u64); configs.len()];
    let _stats = StatsOn::new()?;
    let mut port = FIRST_PORT;
    let rounds = size.cost_rounds * 3;
    for round in 0..=rounds {
        for (i, config) in configs.iter().enumerate() {
            bench.rig.on(config)?;
            let outcome = (|| {
                if round == 0 {
                    bench.prove(config, port)?;
                    port += 1;
                }
                let program = match config {
                    Config::NoHook => None,
                    _ => Some(Program::open(&bench.rig.pin("connect4"))?),
                };
                let hook_before = program.as_ref().map(Program::counters).transpose()?;
                let before = bench.rig.reader_cpu_ns();
                let rate = bench.connect_rate(port, size.cost_connects)?;
                let cpu = before.zip(bench.rig.reader_cpu_ns()).map(|(a, b)| b - a);
                let hook_after = program.as_ref().map(Program::counters).transpose()?;
                let ran = hook_before
                    .zip(hook_after)
                    .map(|((t0, n0), (t1, n1))| (t1 - t0, n1 - n0));
                port += 1;
                anyhow::Ok((rate, cpu, ran))
            })();
            bench.rig.off(config);
            let (rate, cpu, ran) = outcome?;
            last[i] = rate;
            if round > 0 {
                rates[i].push(rate);
                if let Some((ns, runs)) = ran {
                    hook[i].0 += ns;
                    hook[i].1 += runs;
                }
                if let Some(cpu) = cpu {
                    reader[i].0 += cpu;
                    reader[i].1 += u64::from(size.cost_connects);
                }
            }
            anyhow::ensure!(port < super::BULK_PORT, "out of fresh destination ports");
        }
        eprintln!(
            "round {round} events: {}",
            configs
                .iter()
                .zip(&last)
                .map(|(c, r)| format!("{} {r:.0}/s", c.name()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let paired =
        |a: &[f64], b: &[f64]| median(&a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>());
    let rows: Vec<Value> = configs
        .iter()
        .zip(&rates)
        .zip(&reader)
        .zip(&hook)
        .map(|(((config, r), &(cpu_ns, events)), &(hook_ns, runs))| {
            json!({
                "config": config.name(),
                "connects_per_sec": median(r),
                "ratio_to_no_hook": paired(r, &rates[0]),
                "ratio_to_compiled_out": paired(r, &rates[1]),
                "connects_per_sec_rounds": r,
                // The reader's own CPU per event (null: no reader).
                "reader_cpu_ns_per_event": (events > 0).then(|| cpu_ns as f64 / events as f64),
                // The hook's own time per connect (bpf_stats; null: no hook).
                "hook_ns_per_connect": (runs > 0).then(|| hook_ns as f64 / runs as f64),
            })
        })
        .collect();
    Ok(json!({
        "rounds": rounds,
        "connects_per_round": size.cost_connects,
        "results": rows,
    }))
}
