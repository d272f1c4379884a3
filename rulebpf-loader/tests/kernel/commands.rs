//! Commands tried as an operator would: a command that fails changes
//! nothing (or says what it changed), an instance keeps its settings, one
//! bad record blocks no cleanup, commands on one instance wait for each
//! other, and what the hook counts and logs is true. Origin ranges
//! 22000-22099 belong to this file (rulebpf_testkit::ports::COMMAND_TESTS).

use std::{
    fs,
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::harness::*;

const EPERM: i32 = 1;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The instance's record directory (where `rulebpf` keeps instance.json).
fn records(name: &str) -> std::path::PathBuf {
    Path::new("/run/rulebpf").join(name)
}

#[test]
fn detach_of_an_unknown_instance_fails_like_stats() {
    let name = Named::new("nosuch");
    for command in [["detach", "--name"], ["stats", "--name"]] {
        let out = rulebpf(&[command[0], command[1], &name.name]);
        assert_eq!(out.status.code(), Some(1), "{command:?}: {out:?}");
        assert!(
            stderr(&out).contains(&format!("no instance named {}", name.name)),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn a_refused_attach_leaves_no_instance_behind() {
    let cg = TestCgroup::new("c-refused");
    cg.attach("127.0.0.2 * : 22000\n", &[]);
    let other = Named::new("c-refused");
    let rules = cg.rules_file("other.ini", "127.0.0.2 * : 22001\n");
    let out = rulebpf(&[
        "attach",
        "--name",
        &other.name,
        "--cgroup",
        cg.arg(),
        rules.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr(&out).contains("already has rulebpf hooks"),
        "{out:?}"
    );
    assert_eq!(
        other.status(),
        Value::Null,
        "a refused attach made an instance"
    );
    assert!(other.pins().is_empty(), "pins left: {:?}", other.pins());
    assert!(!records(&other.name).exists());
}

#[test]
fn a_refused_run_leaves_no_instance_behind() {
    let cg = TestCgroup::new("c-run-bad");
    let named = Named::new("c-run-bad");
    let bad = cg.rules_file("bad.ini", "127.0.0.2 * : 70000\n");
    let out = rulebpf(&["run", "--name", &named.name, bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(named.status(), Value::Null, "{}", stderr(&out));
    assert!(named.pins().is_empty(), "pins left: {:?}", named.pins());

    // A busy metrics address is refused before any rule set changes.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let good = cg.rules_file("good.ini", "127.0.0.2 * : 22002\n");
    let run_on_busy_address = || {
        let args = ["run", "--name", &named.name, "--metrics-listen", &addr];
        let out = rulebpf(&[&args[..], &[good.to_str().unwrap()]].concat());
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        out
    };
    let out = run_on_busy_address();
    assert_eq!(named.status(), Value::Null, "{}", stderr(&out));

    let rules = cg.rules_file("r.ini", "127.0.0.2 * : 22003\n");
    rulebpf_ok(&["attach", "--name", &named.name, rules.to_str().unwrap()]);
    let generation = named.status()["rule_set"]["generation"].as_u64();
    let out = run_on_busy_address();
    assert_eq!(
        named.status()["rule_set"]["generation"].as_u64(),
        generation,
        "the rules in force changed: {}",
        stderr(&out)
    );
}

#[test]
fn an_instance_keeps_its_settings_until_a_flag_changes_them() {
    let named = Named::new("c-settings");
    let cg = TestCgroup::new("c-settings");
    let rules = cg.rules_file("r.ini", "127.0.0.2 * : 22010-22011\n");
    let rules = rules.to_str().unwrap();
    rulebpf_ok(&[
        "attach",
        "--name",
        &named.name,
        "--policy",
        "fallback",
        "--app-bound",
        "refuse",
        "--port-sharing",
        "off",
        rules,
    ]);
    let out = rulebpf_ok(&["attach", "--name", &named.name, rules]);
    assert!(
        out.contains("policy fallback, port sharing off, app-bound refuse"),
        "{out}"
    );
    let set = &named.status()["rule_set"];
    assert_eq!(set["policy"], "fallback", "{set}");
    assert_eq!(set["sharing"], "off", "{set}");
    assert_eq!(set["app_bound"], "refuse", "{set}");

    // One flag changes one setting.
    let out = rulebpf_ok(&["attach", "--name", &named.name, "--policy", "strict", rules]);
    assert!(
        out.contains("policy strict, port sharing off, app-bound refuse"),
        "{out}"
    );
}

#[test]
fn a_corrupt_record_refuses_before_the_swap_and_blocks_no_cleanup() {
    let _gc = GC.lock().unwrap_or_else(|e| e.into_inner());
    let server = Listener::on([127, 0, 0, 2]);
    let (cg, server) = with_rules("c-corrupt", server, &[], |_| {
        "127.0.0.2 * : 22020\n".to_string()
    });
    let name = cg.status()["name"].as_str().unwrap().to_string();
    // Removed whatever happens below: left corrupt, it would fail every gc.
    let _remove = Named { name: name.clone() };
    // Another instance, whose garbage gc must still collect.
    let gone = TestCgroup::new("c-corrupt-gone");
    gone.attach("127.0.0.2 * : 22021\n", &[]);
    let gone_name = gone.status()["name"].as_str().unwrap().to_string();
    fs::remove_dir(&gone.path).unwrap();

    fs::write(records(&name).join("instance.json"), "{\"garbage\": ").unwrap();
    let v2 = cg.rules_file("v2.ini", "127.0.0.2 * : 22022\n");
    let out = rulebpf(&["attach", "--name", &name, v2.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr(&out).contains("not a rulebpf record"), "{out:?}");
    assert_eq!(
        only_port(&cg.probe(server.addr, 1, &[])),
        22020,
        "the refused attach swapped its rules in"
    );

    // gc collects the rest and says which instance it could not read.
    let out = rulebpf(&["gc"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(instance_status(&gone_name), Value::Null, "{out:?}");
    assert!(stderr(&out).contains(&name), "{out:?}");

    // detach --cgroup removes the hooks whatever the record says.
    rulebpf_ok(&["detach", "--cgroup", cg.arg()]);
    assert!(is_os_port(only_port(&cg.probe(server.addr, 1, &[]))));
    // And the instance itself goes.
    rulebpf_ok(&["detach", "--name", &name, "--force"]);
    assert!(!Path::new("/sys/fs/bpf/rulebpf").join(&name).exists());
}

#[test]
fn commands_on_one_instance_wait_for_each_other() {
    let named = Named::new("c-race");
    let cg = TestCgroup::new("c-race");
    let rules = cg.rules_file("r.ini", "127.0.0.2 * : 22030-22039\n");
    // Ten seconds of racing, and at least four of each command however
    // slow a load is (seconds on 5.10 under TCG).
    let deadline = Instant::now() + Duration::from_secs(10);
    let give_up = Instant::now() + Duration::from_secs(120);
    let racing =
        move |runs: u32| Instant::now() < give_up && (Instant::now() < deadline || runs < 4);
    let attach = {
        let (name, cgroup, rules) = (
            named.name.clone(),
            cg.arg().to_string(),
            rules.to_str().unwrap().to_string(),
        );
        thread::spawn(move || {
            let mut failures = Vec::new();
            let mut runs = 0;
            while racing(runs) {
                let out = rulebpf(&[
                    "attach", "--force", "--name", &name, "--cgroup", &cgroup, &rules,
                ]);
                runs += 1;
                if !out.status.success() {
                    failures.push(stderr(&out));
                }
            }
            (runs, failures)
        })
    };
    let mut detaches = 0;
    let mut failures = Vec::new();
    while racing(detaches) {
        let out = rulebpf(&["detach", "--name", &named.name, "--force"]);
        detaches += 1;
        let text = stderr(&out);
        if !out.status.success() && !text.contains("no instance named") {
            failures.push(text);
        }
    }
    let (attaches, attach_failures) = attach.join().unwrap();
    assert!(
        attaches > 3 && detaches > 3,
        "{attaches} attaches, {detaches} detaches"
    );
    assert!(
        attach_failures.is_empty(),
        "attach failed: {attach_failures:#?}"
    );
    assert!(failures.is_empty(), "detach failed: {failures:#?}");
    // Whatever came last, the state is whole.
    rulebpf_ok(&[
        "attach",
        "--name",
        &named.name,
        "--cgroup",
        cg.arg(),
        rules.to_str().unwrap(),
    ]);
    assert_eq!(named.status()["attachments"][0]["standing"], "in_force");
}

#[test]
fn explain_takes_a_name() {
    let name = format!("t{}-explain.test", std::process::id());
    let _hosts = HostsEntry::add([127, 0, 0, 9], &name);
    let cg = TestCgroup::new("c-explain");
    let rules = cg.rules_file("r.ini", "127.0.0.9 9110 : 22040\n");
    let out = rulebpf_ok(&["explain", rules.to_str().unwrap(), &format!("{name}:9110")]);
    assert!(out.contains(&format!("{name} is 127.0.0.9")), "{out}");
    assert!(out.contains("line 1 decides"), "{out}");
    assert!(out.contains("origin port: 22040"), "{out}");
    let out = rulebpf(&["explain", rules.to_str().unwrap(), "no-such-host.invalid:1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn the_debug_log_names_the_port_chosen() {
    let server = Listener::on([127, 0, 0, 2]);
    let cg = TestCgroup::new("c-debug");
    let rules = cg.rules_file("r.ini", "127.0.0.2 * : 22050-22059\n");
    let service = RunningService::start(&cg, &rules, &["--log-level", "debug"]);
    let port = only_port(&cg.probe(server.addr, 1, &[]));
    wait_until("the debug line", Duration::from_secs(5), || {
        service
            .log_text()
            .contains(&format!("-> line 1: origin port {port} (range 22050-22059"))
    });
}

/// `(matched, kernel_chose)` of rule 0, and the instance's `released`.
fn counted(cg: &TestCgroup) -> (u64, u64, u64) {
    let out = rulebpf_ok(&["stats", "--json", "--cgroup", cg.arg()]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let rule = &v[0]["rules"][0];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    (
        n(&rule["matched"]),
        n(&rule["kernel_chose"]),
        n(&v[0]["counters"]["released"]),
    )
}

#[test]
fn a_socket_is_counted_once_whatever_runs_the_hook_twice() {
    let server = Listener::on([127, 0, 0, 2]);
    let (cg, server) = with_rules("c-once", server, &["--app-bound", "refuse"], |_| {
        "127.0.0.2 * : 22060-22069\n".to_string()
    });
    // The same instance on a descendant too: the kernel runs both
    // attachments' programs for every connect from it.
    let inner = cg.child("inner");
    let name = cg.status()["name"].as_str().unwrap().to_string();
    // Attached twice, it outlives the detach of its own cgroup.
    let _remove = Named { name: name.clone() };
    let rules = cg.rules_file("tcpoport.ini", "127.0.0.2 * : 22060-22069\n");
    rulebpf_ok(&[
        "attach",
        "--name",
        &name,
        "--cgroup",
        inner.to_str().unwrap(),
        rules.to_str().unwrap(),
    ]);
    // bind(addr, 0) before connect(): the kernel chose the port, outside
    // the range: refused, and counted once.
    let got = probe_from(&inner, server.addr, 1, &["--bind-port", "0"]);
    assert_eq!(got, [Probed::Errno(EPERM)]);
    assert_eq!(counted(&cg).0, 1, "matched");
    assert_eq!(counted(&cg).1, 1, "kernel_chose");
    // A socket the hook bound is released once.
    let port = only_port(&probe_from(&inner, server.addr, 1, &[]));
    assert!((22060..=22069).contains(&port));
    wait_until("the release", Duration::from_secs(5), || {
        counted(&cg).2 >= 1
    });
    thread::sleep(Duration::from_millis(200));
    assert_eq!(counted(&cg).2, 1, "released");
}

/// A process in a cgroup of its own, as a container's first process is.
struct Container {
    child: std::process::Child,
    cgroup: std::path::PathBuf,
}

impl Container {
    fn start(parent: &TestCgroup, id: &str) -> Self {
        let cgroup = parent.child(id);
        let child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        fs::write(cgroup.join("cgroup.procs"), child.id().to_string()).unwrap();
        Self { child, cgroup }
    }

    /// `rulebpf oci-hook STAGE` with this container's state on stdin.
    fn hook(&self, stage: &str, id: &str, instance: &str) -> std::process::Output {
        use std::io::Write as _;
        let state = serde_json::json!({
            "ociVersion": "1.0.2",
            "id": id,
            "status": "creating",
            "pid": self.child.id(),
            "bundle": "/",
            "annotations": { "io.rulebpf.instance": instance },
        });
        let mut hook = Command::new(RULEBPF)
            .args(["oci-hook", stage])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        hook.stdin
            .take()
            .unwrap()
            .write_all(state.to_string().as_bytes())
            .unwrap();
        hook.wait_with_output().unwrap()
    }

    /// The container's start failed after createRuntime: its process and
    /// cgroup are gone, and no poststop comes.
    fn fail(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        fs::remove_dir(&self.cgroup).unwrap();
    }
}

#[test]
fn a_container_that_never_started_is_collected_by_the_next_hook() {
    let named = Named::new("c-oci");
    let parent = TestCgroup::new("c-oci");
    let rules = parent.rules_file("r.ini", "127.0.0.2 * : 22070\n");
    rulebpf_ok(&["attach", "--name", &named.name, rules.to_str().unwrap()]);
    let failed = Container::start(&parent, "failed");
    let out = failed.hook("createRuntime", "failed", &named.name);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(named.status()["attachments"].as_array().unwrap().len(), 1);
    failed.fail();

    let next = Container::start(&parent, "next");
    let out = next.hook("createRuntime", "next", &named.name);
    assert!(out.status.success(), "{out:?}");
    let attachments = named.status()["attachments"].clone();
    let attachments = attachments.as_array().unwrap();
    assert_eq!(attachments.len(), 1, "{attachments:?}");
    assert_eq!(attachments[0]["by"]["container"]["id"], "next");
    let out = next.hook("poststop", "next", &named.name);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(named.status()["attachments"], serde_json::json!([]));
    next.fail();
}
