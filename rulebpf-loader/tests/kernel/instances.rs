//! Instances that follow the workload: names, several cgroups per instance,
//! `run` following a re-created cgroup, status that tells the truth, one
//! owner per instance, crashes at any moment, no stacked hooks, the previous
//! layout replaced without a gap. Origin ranges 21700-21899 belong to this
//! file (rulebpf_testkit::ports::INSTANCE_TESTS).

use std::{
    fs,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::harness::*;

fn in_range(probed: &[Probed], lo: u16, hi: u16) -> bool {
    matches!(probed, [Probed::Port(p)] if (lo..=hi).contains(p))
}

#[test]
fn one_instance_attached_to_two_cgroups_follows_every_swap() {
    let named = Named::new("two");
    let a = TestCgroup::new("two-a");
    let b = TestCgroup::new("two-b");
    let server = Listener::on([127, 0, 0, 2]);
    let rules = a.rules_file("r.ini", &format!("127.0.0.2 {} : 21701\n", server.port()));
    // Loaded and pinned first, attached later (what systemd's BPFProgram=
    // and the OCI hook rely on).
    rulebpf_ok(&["attach", "--name", &named.name, rules.to_str().unwrap()]);
    assert!(
        named.pins().contains(&"connect4".to_string()),
        "{:?}",
        named.pins()
    );
    assert!(is_os_port(only_port(&a.probe(server.addr, 1, &[]))));
    rulebpf_ok(&[
        "attach",
        "--name",
        &named.name,
        "--cgroup",
        a.arg(),
        "--cgroup",
        b.arg(),
        rules.to_str().unwrap(),
    ]);
    assert_eq!(only_port(&a.probe(server.addr, 1, &[])), 21701);
    assert_eq!(only_port(&b.probe(server.addr, 1, &[])), 21701);
    fs::write(&rules, format!("127.0.0.2 {} : 21702\n", server.port())).unwrap();
    rulebpf_ok(&["attach", "--name", &named.name, rules.to_str().unwrap()]);
    assert_eq!(only_port(&a.probe(server.addr, 1, &[])), 21702);
    assert_eq!(only_port(&b.probe(server.addr, 1, &[])), 21702);
    let status = named.status();
    let attachments = status["attachments"].as_array().unwrap();
    assert_eq!(attachments.len(), 2, "{status}");
    assert!(
        attachments.iter().all(|a| a["standing"] == "in_force"),
        "{status}"
    );
    server.take(5);

    rulebpf_ok(&["detach", "--name", &named.name]);
    assert!(named.pins().is_empty(), "{:?}", named.pins());
    assert!(is_os_port(only_port(&a.probe(server.addr, 1, &[]))));
    assert!(is_os_port(only_port(&b.probe(server.addr, 1, &[]))));
}

/// What systemd does to a unit's cgroup on every restart, 20 times: `run`
/// attaches the new cgroup within 100 ms of its mkdir, status is truthful
/// at every step, and detach leaves no pin.
#[test]
fn run_follows_a_cgroup_through_20_recreations() {
    let cg = TestCgroup::new("follow");
    let server = Listener::on([127, 0, 0, 2]);
    let file = cg.rules_file(
        "f.ini",
        &format!("127.0.0.2 {} : 21710-21719\n", server.port()),
    );
    let service = RunningService::start(&cg, &file, &[]);
    assert!(in_range(&cg.probe(server.addr, 1, &[]), 21710, 21719));
    let name = cg.status()["name"].as_str().unwrap().to_string();
    let status = || instance_status(&name);
    let mut worst = Duration::ZERO;
    // On the host, the bound of issue 11 (measured: a few ms). In vm-test's
    // emulated guest the time is the emulated CPUs' scheduling more than
    // `run`'s, and a loaded guest was seen past 100 ms once: there the test
    // proves that `run` follows, and prints how fast.
    let bound = if in_vm_guest() {
        Duration::from_secs(10)
    } else {
        Duration::from_millis(100)
    };
    for cycle in 0..20 {
        fs::remove_dir(&cg.path).unwrap();
        // Gone: `run` removes the attachment (and its pins) at once.
        wait_until(
            "status to drop the gone cgroup",
            Duration::from_secs(5),
            || {
                status()["attachments"]
                    .as_array()
                    .is_some_and(|a| a.is_empty())
            },
        );
        fs::create_dir(&cg.path).unwrap();
        let made = Instant::now();
        // Asked of the kernel (a syscall, microseconds), not by probing: a
        // probe is a process to spawn, which in a TCG guest takes tens of
        // milliseconds itself, and one started just before the attach
        // landed would count its own time against `run`.
        while !hooks_attached(&cg.path) {
            assert!(
                made.elapsed() < bound,
                "cycle {cycle}: no connect hooks on the cgroup {bound:?} after the mkdir"
            );
            thread::sleep(Duration::from_micros(200));
        }
        worst = worst.max(made.elapsed());
        let probed = cg.probe(server.addr, 1, &[]);
        assert!(in_range(&probed, 21710, 21719), "cycle {cycle}: {probed:?}");
        let now = status();
        assert_eq!(
            now["attachments"][0]["standing"],
            "in_force",
            "cycle {cycle}: {now}\n{}",
            service.log_text()
        );
        let id = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&cg.path).unwrap());
        assert_eq!(now["attachments"][0]["cgroup_id"], id, "{now}");
    }
    eprintln!("run re-attached 20 re-created cgroups; worst mkdir -> hooks attached: {worst:?}");
    // Counted just after the attach the last probe saw.
    wait_until("the re-attach count", Duration::from_secs(2), || {
        status()["service"]["reattaches"] == 20
    });
    drop(service);
    rulebpf_ok(&["detach", "--cgroup", cg.arg()]);
    assert!(status().is_null(), "{}", status());
    assert!(
        !std::path::Path::new(&format!("/sys/fs/bpf/rulebpf/{name}")).exists(),
        "detach leaves no pin"
    );
    server.take(21);
}

#[test]
fn status_tells_a_gone_cgroup_from_a_recreated_one() {
    let (cg, _server) = with_rules("truth", Listener::on([127, 0, 0, 2]), &[], |port| {
        format!("127.0.0.2 {port} : 21721\n")
    });
    let standing = || cg.status()["attachments"][0]["standing"].clone();
    assert_eq!(standing(), "in_force");
    fs::remove_dir(&cg.path).unwrap();
    assert_eq!(standing(), "cgroup_gone");
    fs::create_dir(&cg.path).unwrap();
    // No `run` follows it: the new cgroup has no rules, and status says so.
    assert!(standing()["recreated"]["id"].is_u64(), "{}", cg.status());
    let text = rulebpf_ok(&["status"]);
    assert!(text.contains("NOT attached"), "{text}");
}

/// Someone renames an instance's directory out of sight (or it is a
/// leftover nobody knows about): the kernel still has its hooks on the
/// cgroup. rulebpf must not stack a second pair on top, and detach must
/// remove what the kernel holds, not only what the pins say.
#[test]
fn never_stacks_and_detach_removes_a_hidden_instance() {
    let (cg, server) = with_rules("hidden", Listener::on([127, 0, 0, 2]), &[], |port| {
        format!("127.0.0.2 {port} : 21731\n")
    });
    let name = cg.status()["name"].as_str().unwrap().to_string();
    let hidden = format!("/sys/fs/bpf/rulebpf-hidden-{}", std::process::id());
    fs::rename(format!("/sys/fs/bpf/rulebpf/{name}"), &hidden).unwrap();
    assert!(
        cg.status().is_null(),
        "the instance is hidden from the pins"
    );

    let other = Named::new("stack");
    let file = cg.rules_file("o.ini", &format!("127.0.0.2 {} : 21732\n", server.port()));
    let out = rulebpf(&[
        "attach",
        "--name",
        &other.name,
        "--cgroup",
        cg.arg(),
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("never stacks"), "{stderr}");
    assert_eq!(
        only_port(&cg.probe(server.addr, 1, &[])),
        21731,
        "the hidden rules decide"
    );

    let out = rulebpf_ok(&["detach", "--cgroup", cg.arg()]);
    assert!(out.starts_with("detached from"), "{out}");
    assert!(
        is_os_port(only_port(&cg.probe(server.addr, 1, &[]))),
        "nothing of rulebpf left"
    );
    server.take(2);
    remove_pins(std::path::Path::new(&hidden));
}

/// bpffs has no recursive unlink.
fn remove_pins(dir: &std::path::Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.path().is_dir() {
            remove_pins(&entry.path());
        } else {
            let _ = fs::remove_file(entry.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

#[test]
fn one_owner_per_instance() {
    let cg = TestCgroup::new("owner");
    let server = Listener::on([127, 0, 0, 2]);
    let file = cg.rules_file("o.ini", &format!("127.0.0.2 {} : 21741\n", server.port()));
    let other = cg.rules_file("p.ini", &format!("127.0.0.2 {} : 21742\n", server.port()));
    let service = RunningService::start(&cg, &file, &[]);
    let pid = service.child.id().to_string();

    let out = rulebpf(&["attach", "--cgroup", cg.arg(), other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("pid {pid}")), "{stderr}");
    let out = rulebpf(&["detach", "--cgroup", cg.arg()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("pid {pid}")),
        "{out:?}"
    );
    let second = Command::new(RULEBPF)
        .args(["run", "--cgroup", cg.arg(), file.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&second.stderr).contains(&format!("pid {pid}")));
    assert_eq!(only_port(&cg.probe(server.addr, 1, &[])), 21741);

    rulebpf_ok(&[
        "attach",
        "--force",
        "--cgroup",
        cg.arg(),
        other.to_str().unwrap(),
    ]);
    assert_eq!(only_port(&cg.probe(server.addr, 1, &[])), 21742);
    wait_until("run to notice", Duration::from_secs(5), || {
        service.log_text().contains("replaced by another command")
    });
    server.take(2);
}

/// `kill -9` of attach at random moments, 50 times, alternating two rule
/// files: every time, the rules status describes are the rules the kernel
/// applies (the port a connect gets), and the next attach works.
#[test]
fn a_crash_at_any_moment_leaves_status_true_to_the_kernel() {
    let cg = TestCgroup::new("crash");
    let server = Listener::on([127, 0, 0, 2]);
    let p = server.port();
    // Enough rules that an attach takes a while to kill inside of.
    let filler: String = (0..5_000)
        .map(|i| format!("10.{}.{}.0/24 * : 21799\n", i / 250, i % 250))
        .collect();
    let a = cg.rules_file("a.ini", &format!("{filler}127.0.0.2 {p} : 21751-21755\n"));
    let b = cg.rules_file("b.ini", &format!("{filler}127.0.0.2 {p} : 21756-21760\n"));
    rulebpf_ok(&["attach", "--cgroup", cg.arg(), a.to_str().unwrap()]);
    let started = Instant::now();
    rulebpf_ok(&["attach", "--cgroup", cg.arg(), b.to_str().unwrap()]);
    let attach_time = started.elapsed();
    // A small xorshift: random kill moments without another dependency.
    let mut seed = u64::from(std::process::id()) | 1;
    let mut fraction = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % 1200) as f64 / 1000.0
    };
    let (mut killed_before_end, mut mixed) = (0, 0);
    for round in 0..50 {
        let file = if round % 2 == 0 { &a } else { &b };
        let mut child = Command::new(RULEBPF)
            .args(["attach", "--cgroup", cg.arg(), file.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        thread::sleep(attach_time.mul_f64(fraction()));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if !status.success() {
            killed_before_end += 1;
        }
        let said = cg.status();
        let rules_file = said["rule_set"]["rules_file"].as_str().unwrap().to_string();
        // Five ports per file: a probe never waits for the previous
        // probe's socket to let go of its port.
        let expected = if rules_file.ends_with("a.ini") {
            21751..=21755
        } else {
            21756..=21760
        };
        // IPv4 connects run the connect4 slot, whose set status names.
        let got = only_port(&cg.probe(server.addr, 1, &[]));
        assert!(
            expected.contains(&got),
            "round {round}: status says {rules_file}, the kernel gave {got}: {said}"
        );
        if said["mixed"] == true {
            mixed += 1;
        }
    }
    eprintln!(
        "crash rounds: 50, killed before the end: {killed_before_end}, \
         between the two slot writes: {mixed}"
    );
    // And a plain attach works after all that.
    rulebpf_ok(&["attach", "--cgroup", cg.arg(), a.to_str().unwrap()]);
    assert!((21751..=21755).contains(&only_port(&cg.probe(server.addr, 1, &[]))));
    server.take(51);
}

/// An instance of the previous layout (`/sys/fs/bpf/rulebpf/cg-<id>/`, its
/// links pinned there) is replaced by the first attach of this version,
/// under a connect storm: never an OS port, never a failed connect, and no
/// tuple left behind by the sockets both instances saw.
///
/// 64 ports, not a handful. The storm's connections end with a passive
/// close, and under load the kernel can drop that FIN: one that spins in
/// `bh_lock_sock()` while the server's socket turns into a timewait one is
/// lost ("really marginal" natively, tcp_input.c, `tcp_rcv_state_process`;
/// in vm-test's emulated 6.12 guest, 2 to 20 loss probes per 1,500
/// connects). The client's port then stays in LAST_ACK until the loss
/// probe, and with 9 ports toward one destination nine such overlapping
/// filled the range: the old instance, alone and binding one socket per
/// port, refused hundreds of connects before the upgrade had attached
/// anything (one CI run in three). What the small range also found, a
/// tuple kept across the overlap and never given back, is asked of the new
/// instance directly at the end.
/// https://github.com/torvalds/linux/blob/v6.12/net/ipv4/tcp_input.c (tcp_rcv_state_process, TCP_FIN_WAIT1)
#[test]
fn the_previous_layout_is_replaced_without_a_gap() {
    const RANGE: std::ops::RangeInclusive<u16> = 21800..=21863;
    let cg = TestCgroup::new("upgrade");
    let server = Listener::on([127, 0, 0, 2]);
    let p = server.port();
    let file = cg.rules_file(
        "u.ini",
        &format!("127.0.0.2 {p} : {}-{}\n", RANGE.start(), RANGE.end()),
    );
    // Make a previous-layout instance: a real instance's links moved to
    // cg-<id>/ (the old pins held links of connect programs just the same),
    // binding one socket per port as the previous layout did.
    let old = Named::new("old");
    rulebpf_ok(&[
        "attach",
        "--name",
        &old.name,
        "--port-sharing",
        "off",
        "--cgroup",
        cg.arg(),
        file.to_str().unwrap(),
    ]);
    let id = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&cg.path).unwrap());
    let legacy = format!("/sys/fs/bpf/rulebpf/cg-{id}");
    let base = format!("/sys/fs/bpf/rulebpf/{}", old.name);
    fs::create_dir(&legacy).unwrap();
    for hook in ["connect4", "connect6"] {
        fs::rename(
            format!("{base}/cg-{id}/link-{hook}"),
            format!("{legacy}/link-{hook}"),
        )
        .unwrap();
    }
    assert!(RANGE.contains(&only_port(&cg.probe(server.addr, 1, &[]))));

    let results = thread::scope(|s| {
        let storm = s.spawn(|| cg.probe(server.addr, 1500, &[]));
        thread::sleep(Duration::from_millis(50));
        rulebpf_ok(&["attach", "--cgroup", cg.arg(), file.to_str().unwrap()]);
        storm.join().unwrap()
    });
    let stats = || rulebpf_ok(&["stats", "--json", "--cgroup", cg.arg()]);
    let stray: Vec<(usize, &Probed)> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| !matches!(r, Probed::Port(p) if RANGE.contains(p)))
        .collect();
    assert!(
        stray.is_empty(),
        "a connect got another port (or failed) during the upgrade: {stray:?} of {}\n{}",
        results.len(),
        stats()
    );
    assert!(
        !std::path::Path::new(&legacy).exists(),
        "the previous layout's pins stay"
    );
    server.take(results.len() + 1);
    // The new instance (the cgroup's other entry): once the storm's last
    // connections have closed, no port of its range is busy. A socket the
    // old instance bound and the new one kept has its tuple recorded, and
    // given back at its close like any other.
    wait_until(
        "the new instance to hold no tuple",
        Duration::from_secs(10),
        || {
            let v: serde_json::Value = serde_json::from_str(&stats()).unwrap();
            v.as_array().unwrap().iter().any(|i| {
                i["instance"] != old.name.as_str()
                    && i["rules"][0]["in_use"] == 0
                    && i["rules"][0]["sockets"] == 0
            })
        },
    );
}

#[test]
fn gc_removes_what_gone_cgroups_left() {
    let _gc = GC.lock().unwrap_or_else(|e| e.into_inner());
    let (cg, _server) = with_rules("gc", Listener::on([127, 0, 0, 2]), &[], |port| {
        format!("127.0.0.2 {port} : 21771\n")
    });
    let name = cg.status()["name"].as_str().unwrap().to_string();
    fs::remove_dir(&cg.path).unwrap();
    let out = rulebpf_ok(&["gc"]);
    assert!(out.contains(&format!("removed instance {name}")), "{out}");
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/rulebpf/{name}")).exists());
    assert!(!std::path::Path::new(&format!("/run/rulebpf/{name}")).exists());
}
