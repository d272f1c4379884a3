//! Faults a production gateway meets: rule-set swaps under connect load.
//! Origin ranges 19000-19999 belong to this file
//! (rulebpf_testkit::ports::FAULT_TESTS).

use std::{
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::Instant,
};

use aya::{
    maps::{Map, MapData, ProgramArray},
    programs::{CgroupSockAddr, CgroupSockAddrAttachType},
};

use crate::harness::*;

/// How many swaps the storm test makes at least: enough to have met the
/// 6.12 oops about once per VM run with the old entry programs.
const SWAPS: u64 = 1000;
/// Connects per family in the storm; swaps go on until both probes end.
const STORM_CONNECTS: u32 = 1500;

fn pinned_program(dir: &Path, pin: &str, attach: CgroupSockAddrAttachType) -> CgroupSockAddr {
    CgroupSockAddr::from_pin(dir.join(pin), attach)
        .unwrap_or_else(|e| panic!("opening {}/{pin}: {e}", dir.display()))
}

fn jump_map(dir: &Path, pin: &str) -> ProgramArray<MapData> {
    let data = MapData::from_pin(dir.join(pin)).unwrap();
    ProgramArray::try_from(Map::ProgramArray(data)).unwrap()
}

/// Issue 17, item 0: a rule-set swap patched kernel text (a direct tail
/// call re-written with text_poke_bp), and a 6.12 guest died on its int3
/// under connect load. Here the jump slots flip between two rule sets at
/// least [`SWAPS`] times while two processes in the cgroup connect over
/// IPv4 and IPv6 as fast as they can: every connect gets a port of one of
/// the two rule sets (never an OS port, never an error), and the kernel
/// survives (in the VM matrix a crash ends the guest and fails the suite
/// with its console).
#[test]
fn swaps_under_a_connect_storm_never_crash_nor_leak_a_connect() {
    let named = Named::new("storm");
    let cg = TestCgroup::new("storm");
    let v4 = Listener::on([127, 0, 0, 2]);
    let v6 = Listener::on(std::net::Ipv6Addr::LOCALHOST);
    let rules = |lo: u16| {
        format!(
            "127.0.0.2 {} : {lo}-{}\n::1 {} : {}-{}\n",
            v4.port(),
            lo + 9,
            v6.port(),
            lo + 10,
            lo + 19
        )
    };
    let file = cg.rules_file("r.ini", &rules(19000));
    let attach = |file: &Path| {
        rulebpf_ok(&[
            "attach",
            "--name",
            &named.name,
            "--cgroup",
            cg.arg(),
            file.to_str().unwrap(),
        ])
    };
    attach(&file);
    let dir = Path::new("/sys/fs/bpf/rulebpf").join(&named.name);
    let set = |generation: u32| dir.join(format!("set-{generation}"));
    // The first rule set's programs, held open: they outlive their pins.
    let a4 = pinned_program(&set(1), "prog-connect4", CgroupSockAddrAttachType::Connect4);
    let a6 = pinned_program(&set(1), "prog-connect6", CgroupSockAddrAttachType::Connect6);
    std::fs::write(&file, rules(19020)).unwrap();
    attach(&file);
    let b4 = pinned_program(&set(2), "prog-connect4", CgroupSockAddrAttachType::Connect4);
    let b6 = pinned_program(&set(2), "prog-connect6", CgroupSockAddrAttachType::Connect6);
    let mut jump4 = jump_map(&dir, "jump-connect4");
    let mut jump6 = jump_map(&dir, "jump-connect6");

    let storming = AtomicBool::new(true);
    let swaps = AtomicU64::new(0);
    let start = Instant::now();
    let (got4, got6) = thread::scope(|s| {
        let swapper = s.spawn(|| {
            let mut n = 0u64;
            while storming.load(Ordering::Relaxed) || n < SWAPS {
                let (p4, p6) = if n.is_multiple_of(2) {
                    (&a4, &a6)
                } else {
                    (&b4, &b6)
                };
                jump4.set(0, p4.fd().unwrap(), 0).unwrap();
                jump6.set(0, p6.fd().unwrap(), 0).unwrap();
                n += 1;
            }
            // What the records say is in force: rule set 2.
            jump4.set(0, b4.fd().unwrap(), 0).unwrap();
            jump6.set(0, b6.fd().unwrap(), 0).unwrap();
            swaps.store(n, Ordering::Relaxed);
        });
        let p4 = s.spawn(|| cg.probe(v4.addr, STORM_CONNECTS, &[]));
        let p6 = s.spawn(|| cg.probe(v6.addr, STORM_CONNECTS, &[]));
        let got = (p4.join().unwrap(), p6.join().unwrap());
        storming.store(false, Ordering::Relaxed);
        swapper.join().unwrap();
        got
    });
    let swaps = swaps.load(Ordering::Relaxed);
    eprintln!(
        "{swaps} swaps under {} connects in {:?}",
        2 * STORM_CONNECTS,
        start.elapsed()
    );
    assert!(swaps >= SWAPS);
    let ours = |ports: &[Probed], lo: u16| {
        ports.iter().all(|p| {
            matches!(p, Probed::Port(port)
                if (lo..lo + 10).contains(port) || (lo + 20..lo + 30).contains(port))
        })
    };
    assert!(ours(&got4, 19000), "IPv4: {got4:?}");
    assert!(ours(&got6, 19010), "IPv6: {got6:?}");
    v4.take(STORM_CONNECTS as usize);
    v6.take(STORM_CONNECTS as usize);
    // The instance is whole afterwards: rule set 2 in force, as recorded.
    let stats: serde_json::Value =
        serde_json::from_str(&rulebpf_ok(&["stats", "--json", "--name", &named.name])).unwrap();
    assert_eq!(stats[0]["generation"].as_u64(), Some(2), "{stats}");
    assert!(
        named.status()["attachments"][0]["standing"] == "in_force",
        "{}",
        named.status()
    );
}

/// `lines` rules toward addresses nobody connects to, then the rule of the
/// test's destination: a file cut short lacks the last one.
fn long_rules(lines: u32, last: &str) -> String {
    let mut text: String = (0..lines)
        .map(|i| format!("10.{}.{}.1 {} : 0\n", i / 250, i % 250, 1 + i % 1000))
        .collect();
    text.push_str(last);
    text
}

/// Issue 17, item 2: `run` read a rules file while it was being written in
/// place and put the part written so far in force (its destination's rule,
/// the last line, missing: connects left from OS ports). Here the file is
/// written in place twice while a process in the cgroup connects every few
/// milliseconds: once in two pieces with a pause between them, once
/// truncated and left empty for a while. Every connect gets a port of one
/// of the whole files, and exactly two reloads happen.
#[test]
fn run_applies_only_whole_files() {
    use std::io::Write as _;
    let cg = TestCgroup::new("whole");
    let server = Listener::on([127, 0, 0, 2]);
    let rule = |lo: u16| format!("127.0.0.2 {} : {lo}-{}\n", server.port(), lo + 9);
    let file = cg.rules_file("whole.ini", &long_rules(2000, &rule(19100)));
    let service = RunningService::start(&cg, &file, &[]);
    let generation = || cg.status()["rule_set"]["generation"].as_u64().unwrap();
    assert_eq!(generation(), 1);

    let probing = AtomicBool::new(true);
    let (ports, ()) = thread::scope(|s| {
        let prober = s.spawn(|| {
            let mut ports = Vec::new();
            while probing.load(Ordering::Relaxed) {
                ports.extend(cg.probe(server.addr, 1, &[]));
                thread::sleep(std::time::Duration::from_millis(5));
            }
            ports
        });
        let (cg, server) = (&cg, &server);
        let in_range = |lo: u16| {
            move || {
                let got = cg.probe(server.addr, 1, &[]);
                matches!(got[..], [Probed::Port(p)] if (lo..lo + 10).contains(&p))
            }
        };
        // In place, in two pieces, 0.6 s apart (3 settle times).
        let text = long_rules(2000, &rule(19110));
        let (head, tail) = text.split_at(text.len() / 2);
        let mut writer = std::fs::File::create(&file).unwrap();
        writer.write_all(head.as_bytes()).unwrap();
        thread::sleep(std::time::Duration::from_millis(600));
        writer.write_all(tail.as_bytes()).unwrap();
        drop(writer);
        wait_until(
            "the whole file to apply",
            std::time::Duration::from_secs(30),
            in_range(19110),
        );
        // Truncated, left empty for 0.6 s, then written.
        let mut writer = std::fs::File::create(&file).unwrap();
        thread::sleep(std::time::Duration::from_millis(600));
        writer
            .write_all(long_rules(2000, &rule(19120)).as_bytes())
            .unwrap();
        drop(writer);
        wait_until(
            "the rewritten file to apply",
            std::time::Duration::from_secs(30),
            in_range(19120),
        );
        probing.store(false, Ordering::Relaxed);
        (prober.join().unwrap(), ())
    });
    let stray: Vec<&Probed> = ports
        .iter()
        .filter(|p| !matches!(p, Probed::Port(port) if (19100..19130).contains(port)))
        .collect();
    assert!(
        stray.is_empty(),
        "{} of {} connects: {stray:?}",
        stray.len(),
        ports.len()
    );
    assert_eq!(generation(), 3, "{}", service.log_text());
    eprintln!(
        "{} connects during two in-place writes, all from the rules' ports",
        ports.len()
    );
    server.take(0);
}
