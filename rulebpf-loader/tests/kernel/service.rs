//! `rulebpf run` against the real kernel: live reload, DNS refresh, restarts,
//! a reload under a connect storm, metrics.

use std::{collections::BTreeSet, fs, thread, time::Duration};

use crate::harness::*;

#[test]
fn file_edits_are_applied_and_bad_edits_refused() {
    let cg = TestCgroup::new("svc-edit");
    let server = Listener::on([127, 0, 0, 2]);
    let p = server.port();
    let file = cg.rules_file("svc.ini", &format!("127.0.0.2 {p} : 22101\n"));
    let service = RunningService::start(&cg, &file, &[]);
    assert_eq!(only_port(&cg.probe(server.addr, 1, &[])), 22101);

    fs::write(&file, format!("127.0.0.2 {p} : 22102\n")).unwrap();
    // Polling a one-port rule: a probe may find the port still held by the
    // previous probe's socket (LAST_ACK) and fail; the poll just goes on.
    let latency = wait_until("the edit to apply", Duration::from_secs(10), || {
        cg.probe(server.addr, 1, &[]) == [Probed::Port(22102)]
    });
    eprintln!("reload latency (file write -> new port observed): {latency:?}");

    fs::write(
        &file,
        format!("127.0.0.2 {p} : 22103\n127.0.0.2 {p} 22104\n"),
    )
    .unwrap();
    wait_until(
        "the bad edit to be refused",
        Duration::from_secs(10),
        || cg.status()["service"]["last_reload"]["ok"] == false,
    );
    let message = cg.status()["service"]["last_reload"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains(&format!("{}:2:", file.display())),
        "{message}"
    );
    assert_eq!(
        only_port(&cg.probe(server.addr, 1, &[])),
        22102,
        "old rules in force"
    );
    assert!(
        service.log_text().contains("nothing changed"),
        "{}",
        service.log_text()
    );

    // SIGHUP reloads without a file change.
    fs::write(&file, format!("127.0.0.2 {p} : 22105\n")).unwrap();
    wait_until("the fix to apply", Duration::from_secs(10), || {
        cg.probe(server.addr, 1, &[]) == [Probed::Port(22105)]
    });
    let generation = cg.status()["rule_set"]["generation"].as_u64().unwrap();
    service.signal(libc::SIGHUP);
    wait_until("SIGHUP to reload", Duration::from_secs(10), || {
        cg.status()["rule_set"]["generation"].as_u64() == Some(generation + 1)
    });
    server.take(0);
}

#[test]
fn dns_changes_are_followed_and_failures_keep_the_last_answer() {
    let cg = TestCgroup::new("svc-dns");
    let old = Listener::on([127, 0, 0, 5]);
    let new = Listener::on_port([127, 0, 0, 6], old.port());
    let name = format!("rulebpf-svc-{}.example", std::process::id());
    let hosts = HostsEntry::add([127, 0, 0, 5], &name);
    let file = cg.rules_file("dns.ini", &format!("{name} {} : 22201\n", old.port()));
    let _service = RunningService::start(&cg, &file, &["--dns-refresh", "1s"]);
    assert_eq!(only_port(&cg.probe(old.addr, 1, &[])), 22201);
    assert!(is_os_port(only_port(&cg.probe(new.addr, 1, &[]))));

    drop(hosts);
    let hosts = HostsEntry::add([127, 0, 0, 6], &name);
    let took = wait_until("the new address", Duration::from_secs(10), || {
        cg.probe(new.addr, 1, &[]) == [Probed::Port(22201)]
    });
    eprintln!("DNS change picked up after {took:?} (refresh 1s)");

    // The name stops resolving: the last good answer stays in force.
    drop(hosts);
    let failures = cg.status()["service"]["dns_failures"].as_u64().unwrap();
    wait_until("a failed refresh", Duration::from_secs(10), || {
        cg.status()["service"]["dns_failures"].as_u64().unwrap() > failures
    });
    assert_eq!(only_port(&cg.probe(new.addr, 1, &[])), 22201);
    assert!(cg.status()["service"]["dns_refreshes"].as_u64().unwrap() >= 2);
}

#[test]
fn rules_survive_kill_9_and_a_restart_adopts_them_without_a_gap() {
    let cg = TestCgroup::new("svc-kill");
    let server = Listener::on([127, 0, 0, 2]);
    let file = cg.rules_file(
        "k.ini",
        &format!("127.0.0.2 {} : 22300-22399\n", server.port()),
    );
    RunningService::start(&cg, &file, &[]).stop(libc::SIGKILL);
    assert!((22300..=22399).contains(&only_port(&cg.probe(server.addr, 1, &[]))));

    // Connect continuously while a new service adopts the instance.
    let results = thread::scope(|s| {
        let storm = s.spawn(|| cg.probe(server.addr, 3000, &[]));
        let _service = RunningService::start(&cg, &file, &[]);
        storm.join().unwrap()
    });
    let seen = server.take(results.len() + 1);
    assert!(
        seen.iter().all(|p| (22300..=22399).contains(p)),
        "a connect got an OS port"
    );
    assert!(results.iter().all(|r| matches!(r, Probed::Port(_))));
}

#[test]
fn sigterm_keeps_the_rules_and_detach_on_exit_removes_them() {
    let cg = TestCgroup::new("svc-term");
    let server = Listener::on([127, 0, 0, 2]);
    let file = cg.rules_file("t.ini", &format!("127.0.0.2 {} : 22401\n", server.port()));
    RunningService::start(&cg, &file, &[]).stop(libc::SIGTERM);
    assert_eq!(only_port(&cg.probe(server.addr, 1, &[])), 22401);
    RunningService::start(&cg, &file, &["--detach-on-exit"]).stop(libc::SIGTERM);
    assert!(is_os_port(only_port(&cg.probe(server.addr, 1, &[]))));
    server.take(2);
}

/// A reload that takes seconds (a large file compiling, a slow DNS server)
/// must not hold signals: SIGTERM is acted on within a second, and the
/// rules in force are whole afterwards (old or new, never half).
#[test]
fn sigterm_is_acted_on_during_a_long_reload() {
    let cg = TestCgroup::new("svc-slow");
    let server = Listener::on([127, 0, 0, 2]);
    let p = server.port();
    let file = cg.rules_file("s.ini", &format!("127.0.0.2 {p} : 22451-22459\n"));
    let mut service = RunningService::start(&cg, &file, &[]);
    // 200,000 rules: the reload compiles and loads for a while.
    let big: String = (0..200_000)
        .map(|i| format!("10.{}.{}.0/24 * : 22460-22469\n", i / 256 % 256, i % 256))
        .collect();
    fs::write(&file, format!("{big}127.0.0.2 {p} : 22460-22469\n")).unwrap();
    // The watcher waits 50 ms for editors to finish; then the reload runs.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !service.log_text().contains("file changed: rules in force"),
        "the reload ended before SIGTERM: the test proves nothing (make the file bigger)"
    );
    let sent = std::time::Instant::now();
    service.signal(libc::SIGTERM);
    let exited = loop {
        if let Some(status) = service.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "SIGTERM not acted on within a second during a reload:\n{}",
            service.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!("exited {:?} after SIGTERM during a reload", sent.elapsed());
    assert!(exited.success(), "{}", service.log_text());
    let got = only_port(&cg.probe(server.addr, 1, &[]));
    assert!(
        (22451..=22469).contains(&got),
        "whole rules, old or new: {got}"
    );
    server.take(1);
}

#[test]
fn reloads_in_a_connect_storm_never_mix_or_fail() {
    let cg = TestCgroup::new("svc-storm");
    let server = Listener::on([127, 0, 0, 2]);
    let p = server.port();
    let set_a = format!("127.0.0.2 {p} : 22500-22599\n");
    let set_b = format!("10.0.0.0 * : 1\n127.0.0.2 {p} : 22600-22699\n");
    let file = cg.rules_file("s.ini", &set_a);
    let _service = RunningService::start(&cg, &file, &[]);
    let generation = cg.status()["rule_set"]["generation"].as_u64().unwrap();
    // Two processes connect in batches until three edits are in force.
    let storming = std::sync::atomic::AtomicBool::new(true);
    let results = thread::scope(|s| {
        let storm: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut got = Vec::new();
                    while storming.load(std::sync::atomic::Ordering::Relaxed) {
                        got.extend(cg.probe(server.addr, 500, &[]));
                    }
                    got
                })
            })
            .collect();
        // Edit, wait until that edit is in force, edit back, ...
        for edits in 1..=3 {
            fs::write(&file, if edits % 2 == 1 { &set_b } else { &set_a }).unwrap();
            wait_until("the edit to apply", Duration::from_secs(30), || {
                cg.status()["rule_set"]["generation"].as_u64() >= Some(generation + edits)
            });
            // Connects under the new rules before the next edit.
            thread::sleep(Duration::from_millis(100));
        }
        storming.store(false, std::sync::atomic::Ordering::Relaxed);
        storm
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    let seen = server.take(results.len());
    let reloads = cg.status()["rule_set"]["generation"].as_u64().unwrap() - generation;
    let a = seen.iter().filter(|p| (22500..=22599).contains(*p)).count();
    let b = seen.iter().filter(|p| (22600..=22699).contains(*p)).count();
    eprintln!(
        "reload storm: {} connects, {reloads} reloads, {a} from the old set, {b} from the new",
        seen.len()
    );
    assert!(
        results.iter().all(|r| matches!(r, Probed::Port(_))),
        "a connect failed"
    );
    assert_eq!(
        a + b,
        seen.len(),
        "ports outside both sets: {:?}",
        seen.iter()
            .filter(|p| !(22500..=22699).contains(*p))
            .collect::<BTreeSet<_>>()
    );
    assert!(
        reloads >= 2 && a > 0 && b > 0,
        "reloads did not overlap the storm"
    );
}

#[test]
fn metrics_endpoint_serves_moving_counters() {
    let cg = TestCgroup::new("svc-metrics");
    let server = Listener::on([127, 0, 0, 2]);
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let file = cg.rules_file(
        "m.ini",
        &format!("127.0.0.2 {} : 22701-22709\n", server.port()),
    );
    let listen = addr.to_string();
    let _service = RunningService::start(&cg, &file, &["--metrics-listen", &listen]);
    let before = scrape(addr);
    assert!(before.starts_with("HTTP/1.0 200 OK"), "{before}");
    assert_eq!(sample(&before, "rulebpf_reloads_total"), 1);
    let matched = sample(&before, "rulebpf_rule_matched_total");
    cg.probe(server.addr, 3, &[]);
    // The page is rendered at most once a second (a scraper storm costs
    // one rendering): the new counts show within that.
    let mut after = String::new();
    wait_until("the counters to move", Duration::from_secs(5), || {
        after = scrape(addr);
        sample(&after, "rulebpf_rule_matched_total") == matched + 3
    });
    assert_eq!(sample(&after, "rulebpf_rule_bound_total"), matched + 3);
    assert!(after.contains("rulebpf_dns_refreshes_total 0"));
    server.take(3);
}
