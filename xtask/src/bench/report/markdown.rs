//! BENCHMARKS.md: the method, the results and attach tables, the issue's
//! targets (each met or missed, with the round-to-round noise), the chart,
//! and how the nft SNAT peer is set up. Rendered from the report's JSON
//! only; BENCHMARKS.md at the repository root is this module's output, so
//! its prose is edited here, not there.

use std::fmt::Write as _;

use serde_json::Value;

use crate::bench::nft;

pub fn render(j: &Value) -> anyhow::Result<String> {
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "Written by `cargo xtask bench` (source: `xtask/src/bench/`); every figure below comes from one run.\n"
    )?;
    writeln!(md, "Machine: {}\n", j["machine"].as_str().unwrap_or("?"))?;
    writeln!(
        md,
        "Method: a client in the bench cgroup connects to a loopback server that accepts and closes first; \
         configurations interleaved over {} rounds of {} connects, a fresh destination port per round; \
         medians over rounds, ratios are medians of per-round ratios (after one uncounted warm-up round that also proves each configuration: \
         the server saw origin ports in the configured range, ephemeral ones without a hook). The measured destination's rule is the **last** of the file. Bulk: one \
         connection sending {} MiB. nft SNAT: `socket cgroupv2` mark in `output`, `snat to` the same \
         origin range in `postrouting` (see *How the nft SNAT peer is set up* below).\n",
        j["size"]["rounds"],
        j["size"]["connects_per_round"],
        j["size"]["bulk_bytes"].as_u64().unwrap_or(0) >> 20
    )?;
    let results = j["results"].as_array().unwrap().iter().map(|r| {
        format!(
            "| {} | {:.0} | {:.3} | {:.3} | {:.2} | {:.3} | {:.3} |",
            r["config"].as_str().unwrap(),
            r["connects_per_sec"].as_f64().unwrap(),
            r["connects_ratio_to_no_hook"].as_f64().unwrap(),
            r["connects_ratio_to_nft"].as_f64().unwrap(),
            r["bulk_gbit_per_sec"].as_f64().unwrap(),
            r["bulk_ratio_to_no_hook"].as_f64().unwrap(),
            r["bulk_ratio_to_nft"].as_f64().unwrap(),
        )
    });
    table(
        &mut md,
        "| configuration | connects/s | vs no hook | vs nft SNAT | bulk Gbit/s | bulk vs no hook | bulk vs nft |",
        "|---|---:|---:|---:|---:|---:|---:|",
        results,
    )?;
    let attach = j["attach"].as_array().unwrap().iter().map(|a| {
        // Runs before the per-hook figures name connect4's alone.
        let insns = match a.get("verified_insns_connect6") {
            Some(v6) => format!("{} / {}", a["verified_insns"], v6),
            None => a["verified_insns"].to_string(),
        };
        format!(
            "| {} | {:.3} | {:.3} | {:.1} MiB | {insns} |",
            a["rules"],
            a["attach_seconds"].as_f64().unwrap_or(0.0),
            a["compile_seconds"].as_f64().unwrap_or(0.0),
            a["map_memlock_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        )
    });
    writeln!(md)?;
    table(
        &mut md,
        "| rules | compile + attach (s) | compile (s) | pinned map memory | verifier-processed insns (connect4 / connect6) |",
        "|---:|---:|---:|---:|---:|",
        attach,
    )?;
    targets(j, &mut md)?;
    events(j, &mut md)?;
    pieces(j, &mut md)?;
    search(j, &mut md)?;
    writeln!(
        md,
        "\n![connects/s and attach time against rule count](BENCHMARKS.svg)"
    )?;
    sharing(j, &mut md)?;
    nft_peer(&mut md)?;
    Ok(md)
}

/// The capacity scenario, the busy range and the IPv6 row, with their
/// targets (absent from runs made before they existed).
fn sharing(j: &Value, md: &mut String) -> anyhow::Result<()> {
    let cap = &j["capacity"];
    let Some(rows) = cap["rows"].as_array() else {
        return Ok(());
    };
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let row = |scenario: &str, config: &str| {
        rows.iter()
            .find(|r| r["scenario"] == scenario && r["config"] == config)
            .cloned()
            .unwrap_or(Value::Null)
    };
    writeln!(md, "\n## Shared origin ports: what a range carries\n")?;
    writeln!(
        md,
        "A {}-port origin range ({}); the client closes every connection first (its FIN first, so \
         TIME_WAIT lands on the origin port, as on a gateway that ends its own connections), then \
         waits for the server's close; it connects for {} s to 50 destinations in turn \
         (127.0.1.1-50), then to 1. Every run is in a fresh network namespace (TIME_WAIT is per \
         namespace, and stays under `net.ipv4.tcp_max_tw_buckets`); configurations interleaved \
         over {} rounds, medians (ratios: medians of per-round ratios), failures summed. Origin \
         ports used: the fewest distinct ports the client's sockets had in a round (rulebpf binds \
         the socket; NAT rewrites packets only).\n",
        cap["range_ports"],
        cap["range"].as_str().unwrap_or("?"),
        cap["seconds"],
        cap["rounds"].as_u64().unwrap_or(1)
    )?;
    let configs = [
        "no hook",
        "rulebpf, port sharing",
        "rulebpf, --port-sharing off",
        "nft SNAT",
    ];
    let cell = |r: &Value| {
        format!(
            "{:.0} | {}",
            f(&r["connects_per_sec"]),
            r["errors"].as_u64().unwrap_or(0)
        )
    };
    let lines = configs.iter().map(|&c| {
        let (many, one) = (row("50 destinations", c), row("1 destination", c));
        let ports = |r: &Value| {
            r["origin_ports"]
                .as_u64()
                .map_or("—".into(), |n| n.to_string())
        };
        format!(
            "| {c} | {} | {} | {} / {} |",
            cell(&many),
            cell(&one),
            ports(&many),
            ports(&one)
        )
    });
    table(
        md,
        "| configuration | 50 destinations: connects/s | failed | 1 destination: connects/s | failed | origin ports used (50 / 1) |",
        "|---|---:|---:|---:|---:|---:|",
        lines,
    )?;
    writeln!(
        md,
        "\nnft SNAT runs at full rate toward one destination on recent kernels: when its range \
         has no free tuple it evicts a conntrack entry in TIME_WAIT whose sequence numbers the new \
         connection has passed (`nf_nat_used_tuple_harder()`, net/netfilter/nf_nat_core.c). On \
         kernels without that, its rate collapses to a few hundred connects/s there, which is \
         what the 10x target of that row was set against. `--port-sharing off` carries 100 \
         connections, then fails every connect with EADDRNOTAVAIL: every port is held (live or \
         in TIME_WAIT)."
    )?;
    let busy = &j["busy_range"];
    let v6 = &j["ipv6"];
    writeln!(md)?;
    table(
        md,
        "| measurement | connects/s | against | connects/s | ratio |",
        "|---|---:|---|---:|---:|",
        [
            format!(
                "| {} of {} ports held toward the destination | {:.0} | the range empty | {:.0} | cost {:.3}x |",
                busy["held"],
                busy["range"].as_str().unwrap_or("?"),
                f(&busy["busy_connects_per_sec"]),
                f(&busy["empty_connects_per_sec"]),
                f(&busy["cost_ratio"])
            ),
            format!(
                "| IPv6 to [::1], rulebpf ({}) | {:.0} | no hook | {:.0} | {:.3} |",
                v6["range"].as_str().unwrap_or("?"),
                f(&v6["rulebpf_connects_per_sec"]),
                f(&v6["no_hook_connects_per_sec"]),
                f(&v6["ratio_to_no_hook"])
            ),
        ]
        .into_iter(),
    )?;
    writeln!(
        md,
        "\nBusy range and IPv6: interleaved rounds of {} connects (the server closes first), \
         medians of per-round ratios after an uncounted warm-up; the cost ratio is the time per \
         connect with the range 90 % held over the time with it empty.",
        busy["connects_per_round"]
    )?;
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let shared = |s: &str| row(s, "rulebpf, port sharing");
    let ratio = |s: &str, c: &str| {
        let key = if c == "nft SNAT" {
            "ratio_to_nft"
        } else {
            "ratio_to_no_hook"
        };
        f(&shared(s)[key])
    };
    writeln!(md, "\n| target (shared origin ports) | measured | |")?;
    writeln!(md, "|---|---:|---|")?;
    for (scenario, vs_nft, vs_none) in [("50 destinations", 1.0, 0.8), ("1 destination", 10.0, 0.5)]
    {
        let (n, h) = (ratio(scenario, "nft SNAT"), ratio(scenario, "no hook"));
        let errors = shared(scenario)["errors"].as_u64().unwrap_or(u64::MAX);
        writeln!(
            md,
            "| {scenario}: >= {vs_nft:.1}x nft SNAT | {n:.2}x | {} |",
            verdict(n >= vs_nft)
        )?;
        writeln!(
            md,
            "| {scenario}: >= {vs_none:.1}x no hook | {h:.2}x | {} |",
            verdict(h >= vs_none)
        )?;
        writeln!(
            md,
            "| {scenario}: 0 failed connects | {errors} | {} |",
            verdict(errors == 0)
        )?;
        let ports = shared(scenario)["origin_ports"].as_u64().unwrap_or(0);
        let all = ports == cap["range_ports"].as_u64().unwrap_or(0)
            && shared(scenario)["origin_ports_in_range"] == true;
        writeln!(
            md,
            "| {scenario}: every port of the range, none outside | {ports} | {} |",
            verdict(all)
        )?;
    }
    let cost = f(&busy["cost_ratio"]);
    writeln!(
        md,
        "| 90 % of the range held: <= 1.2x the cost of empty | {cost:.3}x | {} |",
        verdict(cost <= 1.2)
    )?;
    let r6 = f(&v6["ratio_to_no_hook"]);
    writeln!(
        md,
        "| IPv6: >= 0.97 of no-hook connects/s | {r6:.3} | {} |",
        verdict(r6 >= 0.97)
    )?;
    Ok(())
}

/// A Markdown table: the header, the alignment row, then `rows`.
fn table(
    md: &mut String,
    header: &str,
    align: &str,
    rows: impl Iterator<Item = String>,
) -> std::fmt::Result {
    writeln!(md, "{header}\n{align}")?;
    for row in rows {
        writeln!(md, "{row}")?;
    }
    Ok(())
}

/// The issue's targets, each with the figure and met / missed.
fn targets(j: &Value, md: &mut String) -> anyhow::Result<()> {
    let results = j["results"].as_array().unwrap();
    let row = |name: &str| results.iter().find(|r| r["config"] == name).unwrap();
    let f = |r: &Value, k: &str| r[k].as_f64().unwrap_or(0.0);
    let (one, big) = (row("rulebpf 1 rules"), row("rulebpf 100000 rules"));
    let spread = one["connects_per_sec_rounds"]
        .as_array()
        .unwrap()
        .iter()
        .zip(
            row("no hook")["connects_per_sec_rounds"]
                .as_array()
                .unwrap(),
        )
        .map(|(a, b)| a.as_f64().unwrap() / b.as_f64().unwrap())
        .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(r), hi.max(r)));
    let attach_100k = j["attach"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["rules"] == 100_000)
        .map_or(0.0, |a| f(a, "attach_seconds"));
    let one_vs_big =
        (f(one, "connects_ratio_to_no_hook") - f(big, "connects_ratio_to_no_hook")).abs();
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    writeln!(md, "\n| target | measured | |")?;
    writeln!(md, "|---|---:|---|")?;
    let c = f(big, "connects_ratio_to_no_hook");
    writeln!(
        md,
        "| rulebpf 100,000 rules >= 0.97 of no-hook connects/s | {c:.3} | {} |",
        verdict(c >= 0.97)
    )?;
    writeln!(
        md,
        "| 1 rule vs 100,000 rules within 2% | {:.1}% | {} |",
        one_vs_big * 100.0,
        verdict(one_vs_big <= 0.02)
    )?;
    let n = f(big, "connects_ratio_to_nft");
    writeln!(
        md,
        "| rulebpf (100,000 rules) >= nft SNAT connects/s | {n:.3} | {} |",
        verdict(n >= 1.0)
    )?;
    let b = f(big, "bulk_ratio_to_nft");
    writeln!(
        md,
        "| rulebpf (100,000 rules) >= nft SNAT bulk throughput | {b:.3} | {} |",
        verdict(b >= 1.0)
    )?;
    writeln!(
        md,
        "| 100,000 rules compiled and attached in < 1 s | {attach_100k:.3} s | {} |",
        verdict(attach_100k < 1.0)
    )?;
    writeln!(
        md,
        "\nNoise: on this machine the per-round ratio of *1 rule* to no hook ranged from {:.3} to {:.3}, \
         so differences of a few percent between rule counts are within one round's spread. \
         The hook's instruction count does not depend on the rule count; what does grow is the \
         memory the lookups touch (the automaton's hash map, and the port LPM trie, which here holds \
         one table per rule because every rule has its own counters), hence more cache misses per \
         connect with 100,000 rules.",
        spread.0, spread.1
    )?;
    Ok(())
}

/// What decision events cost, from their own alternated rounds (absent
/// from runs made before events existed).
fn events(j: &Value, md: &mut String) -> anyhow::Result<()> {
    let Some(results) = j["events"]["results"].as_array() else {
        return Ok(());
    };
    let row = |name: &str| results.iter().find(|r| r["config"] == name);
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    writeln!(
        md,
        "\nDecision events (`rulebpf events`), in rounds of their own: no hook and a 1-rule \
         instance in four ways, alternated over {} rounds of {} connects; ratios are medians of \
         per-round ratios.\n",
        j["events"]["rounds"], j["events"]["connects_per_round"]
    )?;
    writeln!(
        md,
        "| events | connects/s | vs no hook | vs compiled out | target | | hook ns per connect | reader CPU per event |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---|---:|---:|")?;
    for (name, label, target) in [
        ("no hook", "(no hook)", None),
        (
            "rulebpf 1 rule, events compiled out",
            "compiled out (the verifier removes their code)",
            None,
        ),
        (
            "rulebpf 1 rules",
            "nobody listening (one map read per connect)",
            Some(0.99),
        ),
        (
            "rulebpf 1 rule, rulebpf events reading",
            "`rulebpf events --json` reading",
            Some(0.95),
        ),
        (
            "rulebpf 1 rule, run --events-log",
            "`run --events-log FILE` writing",
            Some(0.95),
        ),
    ] {
        let Some(r) = row(name) else { continue };
        let ratio = r["ratio_to_compiled_out"].as_f64().unwrap_or(0.0);
        let (goal, met) = match target {
            Some(t) => (format!(">= {t:.2}"), verdict(ratio >= t)),
            None => (String::new(), ""),
        };
        let cpu = r["reader_cpu_ns_per_event"]
            .as_f64()
            .map_or(String::new(), |ns| format!("{:.2} µs", ns / 1000.0));
        let hook = r["hook_ns_per_connect"]
            .as_f64()
            .map_or(String::new(), |ns| format!("{ns:.0}"));
        writeln!(
            md,
            "| {label} | {:.0} | {:.3} | {ratio:.3} | {goal} | {met} | {hook} | {cpu} |",
            r["connects_per_sec"].as_f64().unwrap_or(0.0),
            r["ratio_to_no_hook"].as_f64().unwrap_or(0.0),
        )?;
    }
    writeln!(
        md,
        "\nThe hook's nanoseconds per connect are the kernel's own account \
         (`kernel.bpf_stats_enabled`: the run time of the instance's entry program, which covers \
         the rule set it tail-calls), the reader's CPU per event its threads' `schedstat`: \
         measured, not inferred from rates. On this 2-core VM, whose rounds vary by a third from \
         one to the next, they are the steadier figures of what events cost."
    )?;
    Ok(())
}

/// The pieces section on its own (`xtask bench-pieces`).
pub fn pieces_section(j: &Value) -> anyhow::Result<String> {
    let mut md = String::new();
    pieces(j, &mut md)?;
    Ok(md)
}

/// Each piece of the hook on its own (absent from runs made before).
fn pieces(j: &Value, md: &mut String) -> anyhow::Result<()> {
    let Some(results) = j["pieces"]["results"].as_array() else {
        return Ok(());
    };
    writeln!(
        md,
        "\nEach piece of the hook on its own, in a network namespace of its own: pieces alternated \
         over {} rounds of {} connects per family (the server closes first), connect rates as \
         medians of per-round ratios to no hook, and the kernel's run time of each program per \
         connect (`kernel.bpf_stats_enabled`; the entry program's time covers the rule set it \
         tail-calls; `sockops` runs at every TCP callback of every socket of the cgroup, the \
         server's included when it is in the cgroup: here it is not).\n",
        j["pieces"]["rounds"], j["pieces"]["connects_per_round"]
    )?;
    writeln!(
        md,
        "| piece | IPv4 vs no hook | IPv6 vs no hook | connect ns (v4 / v6) | sockops ns (runs) | release ns | hook ns per connect (v4 / v6) |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|")?;
    for r in results {
        let f = |family: &str, k: &str| r[family][k].as_f64().unwrap_or(0.0);
        let ns = |family: &str, program: &str| {
            r[family]["programs"][program]["ns_per_connect"]
                .as_f64()
                .unwrap_or(0.0)
        };
        let total = |family: &str| {
            ["connect", "sock_ops", "sock_release"]
                .iter()
                .map(|p| ns(family, p))
                .sum::<f64>()
        };
        writeln!(
            md,
            "| {} | {:.3} | {:.3} | {:.0} / {:.0} | {:.0} ({:.1}) | {:.0} | {:.0} / {:.0} |",
            r["piece"].as_str().unwrap_or("?"),
            f("ipv4", "ratio_to_no_hook"),
            f("ipv6", "ratio_to_no_hook"),
            ns("ipv4", "connect"),
            ns("ipv6", "connect"),
            ns("ipv4", "sock_ops"),
            r["ipv4"]["programs"]["sock_ops"]["runs_per_connect"]
                .as_f64()
                .unwrap_or(0.0),
            ns("ipv4", "sock_release"),
            total("ipv4"),
            total("ipv6"),
        )?;
    }
    pieces_cost(results, md)
}

/// What the connect targets cost, in the kernel's nanoseconds: the hook
/// with port sharing on, by program, and what 100,000 rules before the
/// rule add (absent from runs made before that row).
fn pieces_cost(results: &[Value], md: &mut String) -> anyhow::Result<()> {
    let row = |name: &str| results.iter().find(|r| r["piece"] == name);
    let (Some(shared), Some(many)) = (
        row("origin range, port sharing on"),
        row("port sharing on, 100,000 rules before it"),
    ) else {
        return Ok(());
    };
    let ns = |r: &Value, family: &str, program: &str| {
        r[family]["programs"][program]["ns_per_connect"]
            .as_f64()
            .unwrap_or(0.0)
    };
    let total = |r: &Value, family: &str| {
        ["connect", "sock_ops", "sock_release"]
            .iter()
            .map(|p| ns(r, family, p))
            .sum::<f64>()
    };
    writeln!(
        md,
        "\nWhere the connect targets' time goes (this table, port sharing on): the hook spends \
         {:.0} ns per IPv4 connect and {:.0} per IPv6 one: the connect program (lookup, tuple, \
         `bpf_bind`) {:.0} / {:.0}, `sockops` {:.0} over {:.1} runs (the default callbacks of \
         every TCP socket, which the kernel runs whatever the program does with them, and \
         following the connection to its close), `sock_release` {:.0}. 100,000 rules before the \
         rule add {:+.0} ns (IPv4) and {:+.0} ns (IPv6) to the connect program: the lookups touch \
         more memory (the automaton's edges, the port tables), at the same instruction count.",
        total(shared, "ipv4"),
        total(shared, "ipv6"),
        ns(shared, "ipv4", "connect"),
        ns(shared, "ipv6", "connect"),
        ns(shared, "ipv4", "sock_ops"),
        shared["ipv4"]["programs"]["sock_ops"]["runs_per_connect"]
            .as_f64()
            .unwrap_or(0.0),
        ns(shared, "ipv4", "sock_release"),
        ns(many, "ipv4", "connect") - ns(shared, "ipv4", "connect"),
        ns(many, "ipv6", "connect") - ns(shared, "ipv6", "connect"),
    )?;
    Ok(())
}

/// The bounded search beside the search of every port (absent from runs
/// made before).
fn search(j: &Value, md: &mut String) -> anyhow::Result<()> {
    let Some(results) = j["search"]["results"].as_array() else {
        return Ok(());
    };
    writeln!(
        md,
        "
The port search on kernels without `bpf_loop` (before 5.17: at most {} ports per \
         connect, from the rule's cursor; forced here with `RULEBPF_ASSUME_NO_LOOP=1`) beside the \
         search of every port: connects that failed although a port of the range was free. A \
         random share of the range is held by sockets outside the cgroup; each connect is a UDP \
         socket closed before the next, so a port is always free. \"p\" is the chance that the \
         {} ports after a random start are all held, (held / size)^{}: the cursor moves from one \
         free port to the next, so what fails is a connect whose search meets a run of more than \
         {} held ports, once per lap of the range (a run of that length is rare below 99.5 %: \
         none here).\n",
        j["search"]["candidates"],
        j["search"]["candidates"],
        j["search"]["candidates"],
        j["search"]["candidates"]
    )?;
    writeln!(
        md,
        "| range | held | failed, every port | failed, bounded | p | µs per connect, probe included (every port / bounded) |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
    for r in results {
        let n = |search: &str, k: &str| r[search][k].as_f64().unwrap_or(0.0);
        let share = |search: &str| {
            format!(
                "{:.0} of {:.0} ({:.1} %)",
                n(search, "failed"),
                n(search, "connects"),
                100.0 * n(search, "failed") / n(search, "connects").max(1.0)
            )
        };
        writeln!(
            md,
            "| {} | {} of {} ({:.1} %) | {} | {} | {:.2e} | {:.0} / {:.0} |",
            r["range"].as_str().unwrap_or("?"),
            r["held"],
            r["size"],
            100.0 * r["held"].as_f64().unwrap_or(0.0) / r["size"].as_f64().unwrap_or(1.0),
            share("every_port"),
            share("bounded"),
            r["expected_bounded_failures"].as_f64().unwrap_or(0.0),
            n("every_port", "us_per_connect"),
            n("bounded", "us_per_connect"),
        )?;
    }
    Ok(())
}

/// How the peer is set up, for whoever reads the figures: the ruleset the
/// bench loads and the four facts that shaped it (the long form is
/// `xtask/src/bench/nft.rs`'s doc).
fn nft_peer(md: &mut String) -> anyhow::Result<()> {
    writeln!(md, "\n## How the nft SNAT peer is set up\n")?;
    writeln!(
        md,
        "nftables gives a cgroup's connections an origin port range with source NAT scoped to the \
         cgroup. The bench loads this ruleset (source: `xtask/src/bench/nft.rs`) before each nft SNAT \
         run and deletes the table after it:\n"
    )?;
    writeln!(md, "```text\n{}```\n", nft::ruleset())?;
    writeln!(
        md,
        "- The `socket` expression, which knows the sending socket's cgroup, is not allowed in a \
         `postrouting` chain, where source NAT happens (\"Operation not supported\"): the `output` \
         chain marks the cgroup's packets and `postrouting` translates the marked ones."
    )?;
    writeln!(
        md,
        "- nft resolves `socket cgroupv2` paths against /sys/fs/cgroup. On a hybrid host, where \
         cgroup2 is mounted at /sys/fs/cgroup/unified, the ruleset is therefore loaded in a private \
         mount namespace with cgroup2 mounted at /sys/fs/cgroup (the cgroup's id, which the kernel \
         compares, is the same): `unshare -m sh -c '{}'` with the ruleset on stdin.",
        nft::LOAD
    )?;
    writeln!(
        md,
        "- The server sees the translated port while the client's `getsockname()` still shows its \
         ephemeral port (NAT does not change the socket), so every configuration is proved by the \
         origin ports the server saw."
    )?;
    writeln!(
        md,
        "- With the server closing first, conntrack keeps each translated connection in TIME_WAIT; \
         more connections to one destination than ports in the range block the range and the rate \
         collapses. Each timed round therefore connects to a fresh destination port: the figures are \
         the per-connect cost, not the range's capacity."
    )?;
    Ok(())
}
