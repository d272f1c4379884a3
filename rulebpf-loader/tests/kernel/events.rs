//! Decision events: what `rulebpf events` and `run --events-log` say about
//! each connect (who, where to, which rule, what happened), several
//! listeners sharing one reader, and NAT that could rewrite the origin
//! port. Origin ranges 17000-17999 belong to this file
//! (rulebpf_testkit::ports::EVENT_TESTS).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, SystemTime},
};

use serde_json::Value;

use crate::{agent::Agent, harness::*};

const EPERM: i32 = 1;

/// A `rulebpf events` process whose output lines arrive on a channel.
pub(crate) struct Events {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::path::PathBuf,
}

impl Events {
    /// Starts `rulebpf events ARGS` and waits until events reach it.
    pub(crate) fn start(cg: &TestCgroup, tag: &str, args: &[&str]) -> Self {
        let stderr = cg.rules_file(&format!("events-{tag}.err"), "");
        let mut child = Command::new(RULEBPF)
            .arg("events")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let events = Self {
            child,
            lines,
            stderr,
        };
        events.wait_for("listening to instance");
        events
    }

    fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_for(&self, text: &str) {
        wait_until(text, Duration::from_secs(10), || {
            self.stderr_text().contains(text)
        });
    }

    /// The next line as JSON (within 5 s).
    pub(crate) fn next(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("no event; stderr: {}", self.stderr_text()));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    /// Whether a line arrives within `wait`.
    fn quiet_for(&self, wait: Duration) -> bool {
        self.lines.recv_timeout(wait).is_err()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The names of the threads of process `pid` (the event names the
/// thread that connected).
fn comms_of(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| {
            fs::read_to_string(t.path().join("comm"))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect()
}

/// The cgroup path an event names for `cg`.
fn event_cgroup(cg: &TestCgroup) -> String {
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    let root = mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[2] == "cgroup2").then(|| f[1].to_string())
        })
        .unwrap();
    format!("/{}", cg.path.strip_prefix(root).unwrap().display())
}

#[test]
fn events_name_the_process_the_rule_the_port_and_the_outcome() {
    let allowed = Listener::on([127, 0, 0, 2]);
    let denied = Listener::on([127, 0, 0, 3]);
    let cg = TestCgroup::new("e-json");
    cg.attach(
        "127.0.0.2 * : 17000-17009   # to the partner\n127.0.0.3 * : deny\n",
        &[],
    );
    let events = Events::start(&cg, "json", &["--cgroup", cg.arg(), "--json"]);
    let mut agent = Agent::start(&cg.path);
    let before = SystemTime::now();
    let (_, port) = agent.tcp(allowed.addr).unwrap();
    assert_eq!(allowed.take(1), [port]);
    assert_eq!(agent.tcp(denied.addr), Err(EPERM));

    let pid = agent.pid();
    let bound = events.next();
    // serde_json's map is sorted: compare the sets of keys.
    let keys: Vec<&str> = bound
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = [
        "time",
        "instance",
        "cgroup",
        "pid",
        "comm",
        "uid",
        "protocol",
        "destination",
        "origin_port",
        "line",
        "remark",
        "outcome",
        "nat_port",
    ];
    expected.sort_unstable();
    assert_eq!(keys, expected, "{bound}");
    assert_eq!(bound["pid"], pid, "{bound}");
    assert!(
        comms_of(pid).contains(&bound["comm"].as_str().unwrap().to_string()),
        "{bound}"
    );
    assert_eq!(bound["uid"], 0);
    assert_eq!(bound["cgroup"], event_cgroup(&cg));
    assert_eq!(bound["protocol"], "tcp");
    assert_eq!(bound["destination"], allowed.addr.to_string());
    assert_eq!(bound["origin_port"], port, "the port the listener saw");
    assert_eq!(bound["line"], 1);
    assert_eq!(bound["remark"], "to the partner");
    assert_eq!(bound["outcome"], "bound");
    assert_eq!(bound["nat_port"], Value::Null);
    let time = humantime::parse_rfc3339(bound["time"].as_str().unwrap()).unwrap();
    let skew = match time.duration_since(before) {
        Ok(after) => after,
        Err(e) => e.duration(),
    };
    assert!(skew < Duration::from_secs(5), "{bound}");

    let refused = events.next();
    assert_eq!(refused["outcome"], "denied", "{refused}");
    assert_eq!(refused["line"], 2);
    assert_eq!(refused["destination"], denied.addr.to_string());
    assert_eq!(refused["origin_port"], 0);
    assert!(refused.get("remark").is_none(), "{refused}");
}

#[test]
fn listeners_share_one_reader_and_one_takes_over_when_it_dies() {
    let dest = Listener::on([127, 0, 0, 2]);
    let unmatched = Listener::on([127, 0, 0, 4]);
    let cg = TestCgroup::new("e-share");
    cg.attach("127.0.0.2 * : 17010-17019\n", &[]);
    let first = Events::start(&cg, "first", &["--cgroup", cg.arg(), "--json"]);
    first.wait_for("(reading the ring)");
    let second = Events::start(
        &cg,
        "second",
        &[
            "--cgroup",
            cg.arg(),
            "--json",
            "--outcome",
            "bound,no_match",
        ],
    );
    second.wait_for("(through the reader)");
    let mut agent = Agent::start(&cg.path);
    let (_, port) = agent.tcp(dest.addr).unwrap();
    agent.tcp(unmatched.addr).unwrap();
    // Both see the decision; only the one that asked sees no_match.
    assert_eq!(first.next()["origin_port"], port);
    assert_eq!(second.next()["origin_port"], port);
    let no_match = second.next();
    assert_eq!(no_match["outcome"], "no_match", "{no_match}");
    assert_eq!(no_match["line"], Value::Null);
    assert!(first.quiet_for(Duration::from_millis(300)));

    // The reader dies without a word: the other one takes over.
    drop(first);
    second.wait_for("(reading the ring)");
    let (_, port) = agent.tcp(dest.addr).unwrap();
    assert_eq!(second.next()["origin_port"], port);
    assert_eq!(dest.take(2).len(), 2);
}

#[test]
fn run_logs_every_decision_rotates_and_counts_them() {
    let dest = Listener::on([127, 0, 0, 2]);
    let cg = TestCgroup::new("e-log");
    let rules = cg.rules_file("r.ini", "127.0.0.2 * : 17020-17029\n127.0.0.3 * : deny\n");
    let log = rules.with_file_name("events.log");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = metrics.local_addr().unwrap();
    drop(metrics);
    let service = RunningService::start(
        &cg,
        &rules,
        &[
            "--events-log",
            log.to_str().unwrap(),
            "--events-log-size",
            "1K",
            "--events-log-keep",
            "2",
            "--metrics-listen",
            &addr.to_string(),
        ],
    );
    let mut agent = Agent::start(&cg.path);
    let mut ports = Vec::new();
    for _ in 0..12 {
        let (id, port) = agent.tcp(dest.addr).unwrap();
        ports.push(port);
        agent.close(id);
    }
    assert_eq!(agent.tcp("127.0.0.3:9".parse().unwrap()), Err(EPERM));
    assert_eq!(dest.take(12).len(), 12);
    let read = |p: &std::path::Path| fs::read_to_string(p).unwrap_or_default();
    let logged = || -> Vec<Value> {
        let mut files = vec![
            log.with_extension("log.2"),
            log.with_extension("log.1"),
            log.clone(),
        ];
        files.retain(|f| f.exists());
        files
            .iter()
            .flat_map(|f| read(f).lines().map(str::to_string).collect::<Vec<_>>())
            .map(|l| serde_json::from_str(&l).unwrap())
            .collect()
    };
    wait_until("13 logged decisions", Duration::from_secs(5), || {
        logged().last().is_some_and(|v| v["outcome"] == "denied")
    });
    // Rotated at 1 KiB (about 220 bytes a line), two old files kept: the
    // newest decisions are all there, in order.
    assert!(log.with_extension("log.1").exists());
    for file in [&log, &log.with_extension("log.1")] {
        assert!(fs::metadata(file).unwrap().len() <= 1024, "{file:?}");
    }
    let tail = logged();
    let bound: Vec<u64> = tail
        .iter()
        .filter(|v| v["outcome"] == "bound")
        .map(|v| v["origin_port"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = ports.iter().map(|&p| u64::from(p)).collect();
    assert!(expected.ends_with(&bound), "{bound:?} vs {expected:?}");
    let text = scrape(addr);
    let count = |outcome: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("rulebpf_events_total{")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {outcome} in\n{text}"))
    };
    assert_eq!(count("bound"), 12, "{text}");
    assert_eq!(count("denied"), 1, "{text}");
    drop(service);
}
