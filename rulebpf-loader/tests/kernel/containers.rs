//! Containers get a named instance's rules from their first connect(),
//! through the OCI hook: podman reads the hooks.d entries shipped in
//! `contrib/oci/` (only their `hook.path` is pointed at the binary under
//! test), the runtime runs `rulebpf oci-hook createRuntime` after the
//! container's cgroup exists and before its program starts, and `rulebpf
//! oci-hook poststop` removes the attachment when the container is gone.
//! Origin ranges 21600-21699 belong to this file
//! (rulebpf_testkit::ports::CONTAINER_TESTS).
//!
//! Nothing is pulled (there may be no registry): the image is one static
//! busybox imported by `tests/containers/image.sh`. Each container's one
//! program is busybox `nc` to a listener on 127.0.0.2 (`--network host`, so
//! the listener of this process is reachable), so the port the listener
//! sees is the container's first connect.
//!
//! Podman runs through `tests/containers/podman-cgroup2.sh`: on a hybrid
//! host (cgroup v1 controllers at /sys/fs/cgroup, cgroup2 at
//! /sys/fs/cgroup/unified) podman and the runtimes would drive cgroup v1;
//! the script gives them a private mount namespace in which cgroup2 is
//! /sys/fs/cgroup (see the script). On a pure cgroup v2 host it changes
//! nothing. Without podman these tests fail, saying what to install.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use rulebpf_testkit::ports::CONTAINER_TESTS;
use serde_json::Value;

use crate::harness::*;

const IMAGE: &str = "localhost/rulebpf-busybox";

fn containers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/containers")
}

/// The runtimes podman can use here (at least one, or the test fails).
fn runtimes() -> Vec<&'static str> {
    let present = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let podman = present("podman");
    let found: Vec<_> = ["crun", "runc"]
        .into_iter()
        .filter(|r| present(r))
        .collect();
    assert!(
        podman && !found.is_empty(),
        "the container tests need podman and crun or runc: \
         `apt-get install podman crun runc` (scripts/setup.sh installs them)"
    );
    found
}

/// Builds the busybox image unless it is there.
fn require_image() {
    let out = Command::new(containers_dir().join("image.sh"))
        .output()
        .expect("running tests/containers/image.sh");
    assert!(
        out.status.success(),
        "building {IMAGE}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process has CAP_SYS_RESOURCE (bit 24 of CapEff).
fn has_cap_sys_resource() -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap();
    eff & (1 << 24) != 0
}

/// A hooks.d directory holding `contrib/oci/*.json` as shipped, except that
/// `hook.path` is the binary under test (see [`hook_command`]). Removed on
/// drop.
struct HooksDir(PathBuf);

/// `hook.path` and the arguments before the shipped ones' `oci-hook STAGE`.
///
/// On a hybrid host podman runs in podman-cgroup2.sh's mount namespace, and
/// so would the hook: it would record the container's cgroup as
/// /sys/fs/cgroup/X, a path that does not exist outside, where the cgroup is
/// /sys/fs/cgroup/unified/X. A `rulebpf gc` run meanwhile by another test
/// (instances.rs) would take the live attachment for a gone cgroup and
/// remove it. So there the hook is started through nsenter in this
/// process's mount namespace: the same /proc/PID/cgroup (the cgroup
/// namespace is not changed), the host's cgroup2 mount, paths the rest of
/// the suite sees.
fn hook_command() -> (String, Vec<String>) {
    let rulebpf = (RULEBPF.to_string(), vec!["rulebpf".to_string()]);
    let Ok(mount) = rulebpf_loader::sys::cgroup::cgroup2_mount() else {
        return rulebpf;
    };
    if mount == Path::new("/sys/fs/cgroup") {
        return rulebpf; // podman-cgroup2.sh runs podman as is
    }
    let nsenter = Command::new("sh")
        .args(["-c", "command -v nsenter"])
        .output()
        .unwrap();
    assert!(nsenter.status.success(), "nsenter (util-linux) is missing");
    let path = String::from_utf8(nsenter.stdout)
        .unwrap()
        .trim()
        .to_string();
    let args = vec![
        "nsenter".into(),
        format!("--mount=/proc/{}/ns/mnt", std::process::id()),
        "--".into(),
        RULEBPF.into(),
    ];
    (path, args)
}

impl HooksDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rulebpf-hooks-{}-{tag}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/oci");
        let (hook_path, hook_argv) = hook_command();
        let mut count = 0;
        for entry in fs::read_dir(&contrib).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let mut hook: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(
                hook["hook"]["path"],
                "/usr/bin/rulebpf",
                "{}",
                path.display()
            );
            // args[0] is argv[0] ("rulebpf"), then `oci-hook STAGE`.
            let shipped: Vec<Value> = hook["hook"]["args"].as_array().unwrap()[1..].to_vec();
            hook["hook"]["path"] = hook_path.clone().into();
            hook["hook"]["args"] = hook_argv
                .iter()
                .map(|a| Value::from(a.as_str()))
                .chain(shipped)
                .collect();
            fs::write(dir.join(path.file_name().unwrap()), hook.to_string()).unwrap();
            count += 1;
        }
        assert_eq!(
            count, 2,
            "contrib/oci: one entry for createRuntime, one for poststop"
        );
        Self(dir)
    }
}

impl Drop for HooksDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `podman run --rm` of `script` in the busybox image, with the hooks of
/// `hooks`, under `runtime`, with `io.rulebpf.instance=NAME` when given.
fn podman_run(hooks: &HooksDir, runtime: &str, instance: Option<&str>, script: &str) -> Output {
    podman_command(hooks, runtime, instance, script)
        .output()
        .expect("running podman")
}

/// The command [`podman_run`] runs.
fn podman_command(
    hooks: &HooksDir,
    runtime: &str,
    instance: Option<&str>,
    script: &str,
) -> Command {
    podman_command_on("host", hooks, runtime, instance, script)
}

/// [`podman_command`] on podman network `network` (`host`, `bridge`).
fn podman_command_on(
    network: &str,
    hooks: &HooksDir,
    runtime: &str,
    instance: Option<&str>,
    script: &str,
) -> Command {
    let mut cmd = Command::new(containers_dir().join("podman-cgroup2.sh"));
    cmd.arg("podman")
        .arg("--hooks-dir")
        .arg(&hooks.0)
        // No systemd to ask for scopes (PID 1 need not be systemd).
        .args(["--cgroup-manager", "cgroupfs", "--runtime", runtime])
        .args(["run", "--rm", "--network", network])
        // A hybrid host's cgroup2 hierarchy has no pids controller (it is
        // bound to v1); podman's default pids limit would need it.
        .args(["--pids-limit", "-1"])
        // Podman's default limits (1048576) are raises, which need
        // CAP_SYS_RESOURCE; lowering needs nothing, and nc needs little.
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ]);
    if runtime == "crun" && !has_cap_sys_resource() {
        // crun 1.8 raises RLIMIT_MEMLOCK for its device-filter program and
        // fails without CAP_SYS_RESOURCE; a privileged container has no
        // device filter. Nothing of what is tested here depends on it.
        cmd.arg("--privileged");
    }
    if let Some(name) = instance {
        cmd.args(["--annotation", &format!("io.rulebpf.instance={name}")]);
    }
    cmd.args([IMAGE, "sh", "-c", script]);
    cmd
}

/// What every test here starts from.
struct Setup {
    runtimes: Vec<&'static str>,
    server: Listener,
    hooks: HooksDir,
}

/// Fails unless root, bpffs, cgroup2, podman and a runtime are there; builds
/// the image if needed; a listener on 127.0.0.2 and the shipped hooks.
fn setup(tag: &str) -> Setup {
    require_kernel();
    let runtimes = runtimes();
    require_image();
    Setup {
        runtimes,
        server: Listener::on([127, 0, 0, 2]),
        hooks: HooksDir::new(tag),
    }
}

fn connect_script(server: &Listener) -> String {
    format!("nc 127.0.0.2 {} </dev/null", server.port())
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn twenty_containers_in_a_row_connect_from_the_rule_port_and_leave_nothing() {
    let named = Named::new("oci");
    let Setup {
        runtimes,
        server,
        hooks,
    } = setup("twenty");
    let rules = std::env::temp_dir().join(format!("{}.ini", named.name));
    fs::write(
        &rules,
        format!("127.0.0.2 {} : {CONTAINER_TESTS}\n", server.port()),
    )
    .unwrap();
    // Loaded and pinned, attached to no cgroup: the hook adds the cgroups.
    rulebpf_ok(&["attach", "--name", &named.name, rules.to_str().unwrap()]);
    let own_pins = named.pins();

    let start = Instant::now();
    for i in 0..20 {
        let runtime = runtimes[i % runtimes.len()];
        let out = podman_run(&hooks, runtime, Some(&named.name), &connect_script(&server));
        assert!(
            out.status.success(),
            "container {i} ({runtime}): {}",
            text(&out)
        );
        let seen = server.take(1);
        assert!(
            matches!(seen[..], [port] if CONTAINER_TESTS.contains(port)),
            "container {i} ({runtime}): its first connect came from {seen:?}, \
             not from {CONTAINER_TESTS}"
        );
    }
    let took = start.elapsed();
    eprintln!(
        "20 containers ({}) with the OCI hook: {took:?}, {:?} each",
        runtimes.join(", "),
        took / 20
    );

    // While one runs, status shows its attachment: in force, by the
    // container.
    let mut running = podman_command(
        &hooks,
        runtimes[0],
        Some(&named.name),
        &format!("{}; sleep 2", connect_script(&server)),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("running podman");
    let seen = server.take(1);
    assert!(
        matches!(seen[..], [port] if CONTAINER_TESTS.contains(port)),
        "{seen:?}"
    );
    let status = named.status();
    let attachment = &status["attachments"][0];
    assert_eq!(attachment["standing"], "in_force", "{status}");
    let id = attachment["by"]["container"]["id"]
        .as_str()
        .unwrap_or_default();
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{status}"
    );
    assert!(running.wait().unwrap().success());

    // Every container's poststop removed its attachment; the instance is
    // as `attach --name` left it.
    let status = named.status();
    assert_eq!(
        status["attachments"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    assert_eq!(named.pins(), own_pins);
    let _ = fs::remove_file(rules);
}

#[test]
fn a_container_without_the_annotation_is_left_alone() {
    let Setup {
        runtimes,
        server,
        hooks,
    } = setup("plain");
    for runtime in runtimes {
        let out = podman_run(&hooks, runtime, None, &connect_script(&server));
        assert!(out.status.success(), "{runtime}: {}", text(&out));
        let port = only_port_of(&server.take(1));
        assert!(is_os_port(port), "{runtime}: port {port}");
    }
}

/// Fail closed: a container that asks for rules it cannot get (here: an
/// instance that does not exist) is not started at all.
#[test]
fn an_annotated_container_that_cannot_get_its_rules_does_not_start() {
    let Setup {
        runtimes,
        server,
        hooks,
    } = setup("closed");
    let missing = format!("t{}-no-such-instance", std::process::id());
    for runtime in runtimes {
        let out = podman_run(&hooks, runtime, Some(&missing), &connect_script(&server));
        assert!(
            !out.status.success(),
            "{runtime} started it: {}",
            text(&out)
        );
        let seen = server.take_within(1, Duration::from_millis(500));
        assert!(
            seen.is_empty(),
            "{runtime}: the container connected: {seen:?}"
        );
    }
}

fn only_port_of(seen: &[u16]) -> u16 {
    match seen {
        [port] => *port,
        other => panic!("expected one connection, saw {other:?}"),
    }
}

/// A server beyond the host: a network namespace behind a veth pair
/// (host 203.0.113.1/24, server 203.0.113.2/24, documentation addresses), so
/// that a bridged container's connection to it is forwarded by the host,
/// where podman's network masquerades it.
struct Beyond {
    netns: String,
    host_link: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<u16>>>,
    port: u16,
}

impl Beyond {
    const SERVER: &str = "203.0.113.2";

    fn new() -> Self {
        let id = std::process::id() % 1_000_000;
        let (netns, host_link, far) =
            (format!("rbb{id}"), format!("rbb{id}h"), format!("rbb{id}s"));
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", text(&out));
        };
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &host_link, "type", "veth", "peer", "name", &far,
        ]);
        ip(&["link", "set", &far, "netns", &netns]);
        ip(&["addr", "add", "203.0.113.1/24", "dev", &host_link]);
        ip(&["link", "set", &host_link, "up"]);
        ip(&["-n", &netns, "addr", "add", "203.0.113.2/24", "dev", &far]);
        ip(&["-n", &netns, "link", "set", &far, "up"]);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let path = format!("/run/netns/{netns}");
        let record = std::sync::Arc::clone(&seen);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd as _;
            let ns = fs::File::open(path).unwrap();
            // SAFETY: setns on this thread only, with a namespace file.
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let listener = std::net::TcpListener::bind((Self::SERVER, 0)).unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            for stream in listener.incoming().flatten() {
                record
                    .lock()
                    .unwrap()
                    .push(stream.peer_addr().unwrap().port());
            }
        });
        let port = rx.recv().unwrap();
        Self {
            netns,
            host_link,
            seen,
            port,
        }
    }

    fn seen(&self) -> Vec<u16> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Beyond {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

#[test]
fn behind_the_bridge_masquerade_each_event_has_the_port_the_wire_saw() {
    let named = Named::new("oci-nat");
    let Setup {
        runtimes, hooks, ..
    } = setup("nat");
    let beyond = Beyond::new();
    let files = TestCgroup::new("c-nat");
    let rules = files.rules_file(
        "r.ini",
        &format!("{} {} : 21650-21659\n", Beyond::SERVER, beyond.port),
    );
    rulebpf_ok(&["attach", "--name", &named.name, rules.to_str().unwrap()]);
    let events = crate::events::Events::start(&files, "bridge", &["--name", &named.name, "--json"]);
    let script = format!("nc {} {} </dev/null", Beyond::SERVER, beyond.port);
    for i in 0..3 {
        let out = podman_command_on("bridge", &hooks, runtimes[0], Some(&named.name), &script)
            .output()
            .expect("running podman");
        assert!(out.status.success(), "container {i}: {}", text(&out));
    }
    wait_until(
        "the server to see 3 connections",
        Duration::from_secs(5),
        || beyond.seen().len() == 3,
    );
    for (i, on_wire) in beyond.seen().into_iter().enumerate() {
        let event = events.next();
        let origin = event["origin_port"].as_u64().unwrap() as u16;
        assert!((21650..=21659).contains(&origin), "container {i}: {event}");
        assert_eq!(event["comm"], "nc", "{event}");
        assert!(
            event["cgroup"].as_str().unwrap().contains("libpod"),
            "{event}"
        );
        // The bridge's masquerade keeps the port unless the translated
        // source already uses it toward the server; either way the event
        // says what left the host.
        let expected = if on_wire == origin {
            Value::Null
        } else {
            Value::from(on_wire)
        };
        assert_eq!(
            event["nat_port"], expected,
            "container {i}: {event}, wire {on_wire}"
        );
    }
}
