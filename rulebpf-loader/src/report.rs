//! What the commands print: one function per command, text for people and
//! `--json` for scripts (one JSON document on stdout).

use std::net::SocketAddr;

use anyhow::bail;
use rulebpf_common::{Family, Protocol};
use serde_json::{Value, json};

use rulebpf_rules::{
    rule::{Dest, Origin, Rule, canonical},
    ruleset::RuleSet,
};

use crate::{
    features::Support,
    instance::{Applied, Instance},
    probe::Outcome,
};

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn origin_json(origin: Origin) -> Value {
    match origin {
        Origin::Os => json!({ "os_choice": true }),
        Origin::Range(r) => json!({ "os_choice": false, "first": r.lo, "last": r.hi }),
    }
}

/// Warnings every command that compiles a file shows.
fn name_warnings(set: &RuleSet) {
    for failure in &set.name_failures {
        for rule in set
            .rules
            .iter()
            .filter(|r| r.dest == Dest::Name(failure.name.clone()))
        {
            eprintln!(
                "warning: {}:{}: `{}` did not resolve ({}); this rule matches nothing",
                set.path.display(),
                rule.line,
                failure.name,
                failure.reason
            );
        }
    }
}

fn summary_json(set: &RuleSet) -> Value {
    let c = &set.compiled;
    json!({
        "file": set.path,
        "rules": set.rules.len(),
        "names": set.names.len(),
        "unresolved_names": set.name_failures.iter().map(|f| json!({"name": f.name, "reason": f.reason})).collect::<Vec<_>>(),
        "ipv6_rules": set.rules.iter().filter(|r| r.covers_family(Family::Ipv6)).count(),
        "udp_rules": set.rules.iter().filter(|r| r.protocols.covers(Protocol::Udp)).count(),
        "automaton_states": c.defaults.len(),
        "automaton_edges": c.edges.len(),
        "port_tables": c.tables,
        "port_prefixes": c.ports.len(),
        "compile_seconds": set.compile_time.as_secs_f64(),
    })
}

pub fn check(set: &RuleSet, json: bool) -> anyhow::Result<()> {
    name_warnings(set);
    if json {
        return print_json(&summary_json(set));
    }
    let c = &set.compiled;
    println!(
        "{}: {} rules OK ({} DNS names); compiled in {:.1?} into {} automaton states, \
         {} edges, {} port tables ({} prefixes)",
        set.path.display(),
        set.rules.len(),
        set.names.len(),
        set.compile_time,
        c.defaults.len(),
        c.edges.len(),
        c.tables,
        c.ports.len()
    );
    let udp = set
        .rules
        .iter()
        .filter(|r| r.protocols.covers(Protocol::Udp))
        .count();
    if udp > 0 {
        println!("note: {udp} rules apply to UDP. {UDP_NOTE}");
    }
    Ok(())
}

/// What an operator must know about UDP rules (the hook runs at connect()).
const UDP_NOTE: &str = "Only connected UDP sockets (connect() before send()) get an origin \
    port; datagrams sent with sendto() on an unconnected socket cannot be given one by \
    this hook and leave from the port the OS chose.";

pub fn explain(set: &RuleSet, dest: SocketAddr, udp: bool, json: bool) -> anyhow::Result<()> {
    name_warnings(set);
    let protocol = if udp { Protocol::Udp } else { Protocol::Tcp };
    let verdict = set.compiled.lookup(protocol, dest.ip(), dest.port());
    let reference =
        rulebpf_rules::first_match(&set.rules, &set.names, protocol, dest.ip(), dest.port());
    if verdict.map(|v| v.rule as usize) != reference {
        bail!(
            "internal error: compiled lookup chose rule {:?}, first match chose {:?}; please report",
            verdict.map(|v| v.rule),
            reference
        );
    }
    let protocol = if udp { "udp" } else { "tcp" };
    let matched_as = canonical(dest.ip());
    let mapped = matched_as != dest.ip();
    let rule: Option<&Rule> = reference.map(|i| &set.rules[i]);
    if json {
        return print_json(&json!({
            "destination": dest.to_string(),
            "protocol": protocol,
            "matched_as": matched_as.to_string(),
            "matched": rule.map(|r| json!({ "line": r.line, "text": r.text, "origin": origin_json(r.origin) })),
            "note": udp.then_some(UDP_NOTE),
        }));
    }
    if mapped {
        println!("{dest}: IPv4-mapped; matched against the IPv4 rules as {matched_as}");
    }
    match rule {
        None => println!("{dest} ({protocol}): no rule matches; the OS chooses the origin port"),
        Some(r) => {
            println!("{dest} ({protocol}): line {} decides: `{}`", r.line, r.text);
            match r.origin {
                Origin::Os => println!("  origin port: chosen by the OS (the rule says 0)"),
                Origin::Range(range) => println!(
                    "  origin port: {range} ({} port{})",
                    range.size(),
                    if range.size() == 1 { "" } else { "s" }
                ),
            }
        }
    }
    if udp {
        println!("  note: {UDP_NOTE}");
    }
    Ok(())
}

pub fn applied(set: &RuleSet, applied: &Applied, json: bool) -> anyhow::Result<()> {
    name_warnings(set);
    let s = &applied.state;
    if json {
        return print_json(&json!({
            "cgroup": s.cgroup,
            "cgroup_id": s.cgroup_id,
            "swapped": applied.swapped,
            "generation": s.generation,
            "program_id": s.program_id,
            "verified_insns": s.verified_insns,
            "connect6_program_id": s.connect6_program_id,
            "connect6_verified_insns": s.connect6_verified_insns,
            "map_memlock_bytes": s.map_memlock_bytes,
            "policy": s.policy,
            "summary": summary_json(set),
        }));
    }
    println!(
        "{} {} ({} rules) {} {}: programs {}/{}, {}/{} instructions verified \
         (connect4/connect6), policy {:?}",
        if applied.swapped {
            "swapped in"
        } else {
            "attached"
        },
        set.path.display(),
        s.rules.len(),
        if applied.swapped { "on" } else { "to" },
        s.cgroup.display(),
        s.program_id,
        s.connect6_program_id,
        s.verified_insns.map_or("?".into(), |n| n.to_string()),
        s.connect6_verified_insns
            .map_or("?".into(), |n| n.to_string()),
        s.policy,
    );
    Ok(())
}

pub fn probe(dest: SocketAddr, outcomes: &[Outcome], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::to_value(outcomes)?);
    }
    for outcome in outcomes {
        match outcome {
            Outcome::Connected { local_port } => {
                println!("{dest}: connected from origin port {local_port}")
            }
            Outcome::Failed { error, .. } => println!("{dest}: connect failed: {error}"),
        }
    }
    Ok(())
}

pub fn status(instances: &[Instance], json: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for instance in instances {
        let state = instance.state()?;
        rows.push(json!({
            "cgroup_id": instance.cgroup_id,
            "attached": instance.is_attached(),
            "cgroup": state.as_ref().map(|s| &s.cgroup),
            "cgroup_exists": state.as_ref().map(|s| s.cgroup.exists()),
            "rules_file": state.as_ref().map(|s| &s.rules_file),
            "rules": state.as_ref().map(|s| s.rules.len()),
            "generation": state.as_ref().map(|s| s.generation),
            "policy": state.as_ref().map(|s| s.policy),
            "program_id": state.as_ref().map(|s| s.program_id),
            "verified_insns": state.as_ref().and_then(|s| s.verified_insns),
            "connect6_verified_insns": state.as_ref().and_then(|s| s.connect6_verified_insns),
            "map_memlock_bytes": state.as_ref().map(|s| s.map_memlock_bytes),
            "attached_at": state.as_ref().map(|s| s.attached_at),
            "updated_at": state.as_ref().map(|s| s.updated_at),
            "unresolved_names": state.as_ref().map(|s| &s.unresolved),
            "last_reload": state.as_ref().map(|s| &s.last_reload),
            "service_pid": state.as_ref().and_then(|s| s.service_pid),
            "dns_refreshes": state.as_ref().map(|s| s.dns_refreshes),
            "dns_failures": state.as_ref().map(|s| s.dns_failures),
        }));
    }
    if json {
        return print_json(&Value::Array(rows));
    }
    if rows.is_empty() {
        println!("no rulebpf instance attached");
        return Ok(());
    }
    println!(
        "{:<32} {:>6} {:>4} {:<9} RULES FILE",
        "CGROUP", "RULES", "GEN", "POLICY"
    );
    for (row, instance) in rows.iter().zip(instances) {
        let text = |k: &str| match &row[k] {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            v => v.to_string(),
        };
        let mut cgroup = text("cgroup");
        if row["cgroup_exists"] == json!(false) {
            cgroup.push_str(" (gone)");
        }
        if !instance.is_attached() {
            cgroup.push_str(" (not attached)");
        }
        println!(
            "{:<32} {:>6} {:>4} {:<9} {}",
            cgroup,
            text("rules"),
            text("generation"),
            text("policy"),
            text("rules_file")
        );
        let reload = &row["last_reload"];
        if reload.is_object() {
            println!(
                "    last reload: {} at {} (unix): {}",
                if reload["ok"] == json!(true) {
                    "ok"
                } else {
                    "REFUSED"
                },
                reload["at"],
                reload["message"]
                    .as_str()
                    .unwrap_or("")
                    .replace('\n', "\n      ")
            );
        }
        if let Some(pid) = row["service_pid"].as_u64() {
            println!(
                "    managed by `rulebpf run` (pid {pid}); DNS refreshes {}, failures {}",
                row["dns_refreshes"], row["dns_failures"]
            );
        }
    }
    Ok(())
}

pub fn stats(instances: &[Instance], json: bool) -> anyhow::Result<()> {
    let mut out = Vec::new();
    for instance in instances {
        let (state, stats) = instance.stats()?;
        let rules: Vec<Value> = state
            .rules
            .iter()
            .zip(&stats)
            .map(|(rule, s)| {
                json!({
                    "line": rule.line,
                    "text": rule.text,
                    "matched": s.matched,
                    "bound": s.bound,
                    "exhausted": s.exhausted,
                })
            })
            .collect();
        out.push(json!({
            "cgroup": state.cgroup,
            "rules_file": state.rules_file,
            "generation": state.generation,
            "rules": rules,
        }));
    }
    if json {
        return print_json(&Value::Array(out));
    }
    for instance in &out {
        println!(
            "{} ({}, rule set {}):",
            instance["cgroup"].as_str().unwrap_or("?"),
            instance["rules_file"].as_str().unwrap_or("?"),
            instance["generation"]
        );
        println!(
            "  {:>6} {:>12} {:>12} {:>10}  RULE",
            "LINE", "MATCHED", "BOUND", "EXHAUSTED"
        );
        for rule in instance["rules"].as_array().into_iter().flatten() {
            let n = |k: &str| rule[k].as_u64().unwrap_or(0);
            println!(
                "  {:>6} {:>12} {:>12} {:>10}  {}",
                n("line"),
                n("matched"),
                n("bound"),
                n("exhausted"),
                rule["text"].as_str().unwrap_or("")
            );
        }
    }
    Ok(())
}

pub fn kernel(support: &Support, json: bool) -> anyhow::Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let cgroup2 = crate::cgroup::cgroup2_mount().ok();
    if json {
        return print_json(&json!({
            "kernel": release,
            "cgroup2_mount": cgroup2,
            "features": support.features,
        }));
    }
    match &cgroup2 {
        Some(path) => println!("cgroup v2 mounted at {}", path.display()),
        None => println!("no cgroup v2 mount in /proc/mounts: rulebpf needs cgroup v2"),
    }
    println!("kernel {release}:");
    for f in &support.features {
        let state = match f.present {
            Some(true) => "yes",
            Some(false) if f.required => "MISSING",
            Some(false) => "no",
            None => "? (probe failed: root?)",
        };
        println!(
            "  {:<44} {:<8} since {:<5} {}",
            f.name, state, f.since, f.role
        );
    }
    if let Some(missing) = support.missing_required() {
        println!("{missing}");
    }
    for d in support.degradations() {
        println!("note: {d}");
    }
    Ok(())
}
