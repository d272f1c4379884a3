//! NAT that rewrites the origin port after rulebpf chose it: `check` warns
//! from the namespace's nftables ruleset, and each decision event carries
//! the port the wire saw (`nat_port`), counted per rule by `run`. The
//! gateway namespace of firewall.rs masquerades with `fully-random`
//! toward the server. Host only (the VM guests have no nft). Origin ranges
//! 17100-17199 (rulebpf_testkit::ports::EVENT_TESTS).

use std::{fs, time::Duration};

use serde_json::Value;

use crate::{
    agent::Agent,
    events::Events,
    firewall::{Net, Server, in_netns},
    harness::*,
};

#[test]
fn masquerade_fully_random_is_warned_about_and_seen_on_the_wire() {
    let net = Net::new("nat");
    let gateway = &net.names()[0];
    let cg = TestCgroup::new("n-masq");
    let nat = cg.rules_file(
        "nat.nft",
        "table ip rbnat {\n  chain post {\n    type nat hook postrouting priority srcnat;\n    \
         ip daddr 203.0.113.0/24 masquerade fully-random\n  }\n}\n",
    );
    in_netns(gateway, &["nft", "-f", nat.to_str().unwrap()]);
    let server = Server::start(net.server(), &[0], &[]);
    let (port, seen) = &server.tcp[0];
    let rules = cg.rules_file(
        "r.ini",
        "203.0.113.2 * : 17100-17109   # through the NAT\n198.51.100.9 * : 17110\n",
    );

    // check, in the gateway's namespace, names the NAT rule and line 1 only.
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", net.gateway().display()))
        .args([RULEBPF, "check", rules.to_str().unwrap()])
        .output()
        .unwrap();
    let warning = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{warning}");
    assert!(
        warning.contains("may change the origin ports of line 1: table ip rbnat chain post")
            && warning.contains("masquerade fully-random (rewrites every origin port)"),
        "{warning}"
    );

    let log = rules.with_file_name("events.log");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = metrics.local_addr().unwrap();
    drop(metrics);
    let _service = RunningService::start(
        &cg,
        &rules,
        &[
            "--events-log",
            log.to_str().unwrap(),
            "--metrics-listen",
            &addr.to_string(),
        ],
    );
    let events = Events::start(&cg, "nat", &["--cgroup", cg.arg(), "--json"]);
    let mut agent = Agent::start_in(&cg.path, Some(&net.gateway()));
    let mut bound = Vec::new();
    for _ in 0..3 {
        let (_, origin) = agent.tcp(Server::addr(*port)).unwrap();
        assert!((17100..=17109).contains(&origin), "{origin}");
        bound.push(origin);
    }
    wait_until(
        "the server to see 3 connections",
        Duration::from_secs(5),
        || Server::seen(seen).len() == 3,
    );
    let wire = Server::seen(seen);
    let mut rewritten = 0;
    for (origin, on_wire) in bound.iter().zip(&wire) {
        let event = events.next();
        assert_eq!(event["origin_port"], *origin, "{event}");
        assert_eq!(event["line"], 1);
        // fully-random: the wire's port is another one (but for a 1 in
        // 28,000 chance, when nat_port stays null).
        let expected = if on_wire == origin {
            Value::Null
        } else {
            rewritten += 1;
            Value::from(*on_wire)
        };
        assert_eq!(event["nat_port"], expected, "{event} wire {on_wire}");
    }
    assert!(
        rewritten > 0,
        "fully-random never rewrote: {wire:?} {bound:?}"
    );
    // run's log says the same, and its metrics count the rewrites of line 1.
    wait_until("3 logged decisions", Duration::from_secs(5), || {
        fs::read_to_string(&log).unwrap_or_default().lines().count() >= 3
    });
    let text = scrape(addr);
    let line = "rulebpf_nat_rewrites_total{instance=\"";
    let counted: u64 = text
        .lines()
        .find(|l| l.starts_with(line) && l.contains("line=\"1\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no rewrites counted:\n{text}"));
    assert_eq!(counted, rewritten, "{text}");
}
