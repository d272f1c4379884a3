//! What the kernel tests stand on: a real cgroup v2 directory, a real
//! loopback listener (TCP, or UDP) that records the peer port of every
//! connection or datagram it receives, and the real `rulebpf` binary
//! (attach, probe, stats, ...).
//!
//! Nothing is mocked. Without root and BPF every test fails with a message
//! saying so: a skipped kernel test would be a silent lie in CI.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Child,
    process::{Command, Output},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use rulebpf_loader::sys::cgroup::{cgroup2_mount, mount_of_type};
use serde_json::Value;

pub const RULEBPF: &str = env!("CARGO_BIN_EXE_rulebpf");

/// The ephemeral range the OS picks from when rulebpf leaves a socket alone.
pub fn os_port_range() -> (u16, u16) {
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let mut it = text.split_whitespace().map(|v| v.parse().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

pub fn is_os_port(port: u16) -> bool {
    let (lo, hi) = os_port_range();
    (lo..=hi).contains(&port)
}

/// Fails the test (never skips it) when the kernel side cannot be exercised.
pub fn require_kernel() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "kernel tests need root (BPF, cgroups): run `sudo scripts/test.sh`"
    );
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        mount_of_type(&mounts, "cgroup2").is_some(),
        "kernel tests need a cgroup2 mount"
    );
    assert!(
        mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf")),
        "kernel tests need bpffs at /sys/fs/bpf: `mount -t bpf bpf /sys/fs/bpf`"
    );
}

fn cgroup2_root() -> PathBuf {
    cgroup2_mount().unwrap()
}

/// Whether the kernel under test has `feature` (a name of `rulebpf kernel
/// --json`), as rulebpf probed it; read once. Tests of behaviour that
/// depends on a feature assert what happens without it, never skip.
pub fn kernel_has(feature: &str) -> bool {
    static FEATURES: std::sync::OnceLock<Vec<(String, bool)>> = std::sync::OnceLock::new();
    let features = FEATURES.get_or_init(|| {
        let v: Value = serde_json::from_str(&rulebpf_ok(&["kernel", "--json"])).unwrap();
        v["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let name = f["name"].as_str().unwrap().to_string();
                (name, f["present"] == true)
            })
            .collect()
    });
    features
        .iter()
        .find(|(name, _)| name == feature)
        .unwrap_or_else(|| panic!("`rulebpf kernel` lists no feature {feature}"))
        .1
}

/// The errno of a connect() refused because no port of its range was
/// usable: EADDRNOTAVAIL, or EPERM where the hook cannot set it
/// (`bpf_set_retval`, Linux 5.18).
pub fn exhausted_errno() -> i32 {
    if kernel_has("bpf_set_retval") {
        libc::EADDRNOTAVAIL
    } else {
        libc::EPERM
    }
}

/// Whether origin ports are shared among destinations on this kernel
/// (Linux 6.0, and `bpf_loop`: the bounded search never shares).
pub fn kernel_shares_ports() -> bool {
    kernel_has("SO_REUSEADDR/SO_REUSEPORT from a connect hook") && kernel_has("bpf_loop")
}

/// Runs the CLI; returns its output (any exit status).
pub fn rulebpf(args: &[&str]) -> Output {
    Command::new(RULEBPF)
        .args(args)
        .output()
        .expect("running rulebpf")
}

/// Runs the CLI with extra environment variables; returns its output.
pub fn rulebpf_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(RULEBPF)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running rulebpf")
}

/// Runs the CLI and asserts exit status 0.
pub fn rulebpf_ok(args: &[&str]) -> String {
    let out = rulebpf(args);
    assert!(
        out.status.success(),
        "rulebpf {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A fresh cgroup for one test, detached and removed on drop.
pub struct TestCgroup {
    pub path: PathBuf,
    rules_dir: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        require_kernel();
        let leaf = format!("rulebpf-test-{}-{name}", std::process::id());
        let path = cgroup2_root().join(&leaf);
        let _ = fs::create_dir(&path);
        let rules_dir = std::env::temp_dir().join(&leaf);
        fs::create_dir_all(&rules_dir).unwrap();
        Self { path, rules_dir }
    }

    /// A child cgroup (created if needed); removed with its parent.
    pub fn child(&self, name: &str) -> PathBuf {
        let path = self.path.join(name);
        let _ = fs::create_dir(&path);
        path
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Writes `text` to a rule file of this test and returns its path.
    pub fn rules_file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.rules_dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    /// `rulebpf attach` with the rules in `text`; asserts success.
    pub fn attach(&self, text: &str, extra: &[&str]) -> String {
        let file = self.rules_file("tcpoport.ini", text);
        let mut args = vec!["attach", "--cgroup", self.arg()];
        args.extend_from_slice(extra);
        args.push(file.to_str().unwrap());
        rulebpf_ok(&args)
    }

    /// `rulebpf attach` with the rules in `text`, `env` set for rulebpf
    /// (what it assumes of the kernel); asserts success and returns what it
    /// warned (its stderr).
    pub fn attach_warned(&self, text: &str, env: &[(&str, &str)]) -> String {
        let file = self.rules_file("tcpoport.ini", text);
        let out = rulebpf_with_env(
            &["attach", "--cgroup", self.arg(), file.to_str().unwrap()],
            env,
        );
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// `rulebpf probe` from this cgroup.
    pub fn probe(&self, dest: SocketAddr, count: u32, extra: &[&str]) -> Vec<Probed> {
        probe_from(&self.path, dest, count, extra)
    }

    /// This cgroup's entry of `rulebpf status --json`.
    pub fn status(&self) -> Value {
        let v: Value = serde_json::from_str(&rulebpf_ok(&["status", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|i| {
                i["attachments"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|a| a["cgroup"].as_str() == Some(self.arg())))
            })
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Per-rule `(line, matched, bound, exhausted)` from `rulebpf stats --json`.
    pub fn stats(&self) -> Vec<(u64, u64, u64, u64)> {
        let out = rulebpf_ok(&["stats", "--json", "--cgroup", self.arg()]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v[0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let n = |k: &str| r[k].as_u64().unwrap();
                (n("line"), n("matched"), n("bound"), n("exhausted"))
            })
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = rulebpf(&["detach", "--cgroup", self.arg()]);
        rulebpf_testkit::cgroup::remove_tree(&self.path);
        let _ = fs::remove_dir_all(&self.rules_dir);
    }
}

/// Instance `name`'s entry of `rulebpf status --json` (Null: none).
pub fn instance_status(name: &str) -> Value {
    let v: Value = serde_json::from_str(&rulebpf_ok(&["status", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"].as_str() == Some(name))
        .cloned()
        .unwrap_or(Value::Null)
}

/// A named instance for one test (`t<pid>-<tag>`), removed on drop.
pub struct Named {
    pub name: String,
}

impl Named {
    pub fn new(tag: &str) -> Self {
        require_kernel();
        Self {
            name: format!("t{}-{tag}", std::process::id()),
        }
    }

    /// This instance's entry of `rulebpf status --json` (Null: none).
    pub fn status(&self) -> Value {
        instance_status(&self.name)
    }

    /// Everything pinned for this instance, as paths relative to its
    /// directory (empty when the directory is gone).
    pub fn pins(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                out.push(path.strip_prefix(base).unwrap().display().to_string());
                if path.is_dir() {
                    walk(&path, base, out);
                }
            }
        }
        let dir = Path::new("/sys/fs/bpf/rulebpf").join(&self.name);
        let mut out = Vec::new();
        walk(&dir, &dir, &mut out);
        out.sort();
        out
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        let _ = rulebpf(&["detach", "--name", &self.name, "--force"]);
    }
}

/// A fresh cgroup with the rules `rules(port)` attached (`extra`: more
/// `attach` arguments), where `port` is the port of `server`: the setup most
/// tests start from.
pub fn with_rules(
    name: &str,
    server: Listener,
    extra: &[&str],
    rules: impl FnOnce(u16) -> String,
) -> (TestCgroup, Listener) {
    let cg = TestCgroup::new(name);
    cg.attach(&rules(server.port()), extra);
    (cg, server)
}

/// One connect() of a probe: the origin port it got, or its errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probed {
    Port(u16),
    Errno(i32),
}

impl Probed {
    /// The port of a connect that must have succeeded.
    pub fn port(self) -> u16 {
        match self {
            Self::Port(p) => p,
            Self::Errno(e) => panic!("connect failed: errno {e}"),
        }
    }
}

/// The port of the only connect of a probe.
pub fn only_port(got: &[Probed]) -> u16 {
    match got {
        [one] => one.port(),
        other => panic!("expected one connection, got {other:?}"),
    }
}

/// `rulebpf probe --json` from `cgroup`.
pub fn probe_from(cgroup: &Path, dest: SocketAddr, count: u32, extra: &[&str]) -> Vec<Probed> {
    let count_arg = count.to_string();
    let dest_arg = dest.to_string();
    let mut args = vec![
        "probe",
        "--json",
        "--cgroup",
        cgroup.to_str().unwrap(),
        "--count",
        &count_arg,
    ];
    args.extend_from_slice(extra);
    args.push(&dest_arg);
    let out = rulebpf(&args);
    let probed = parse_probe(&String::from_utf8_lossy(&out.stdout));
    // `probe` exits 1 exactly when a connect failed.
    let failed = probed.iter().any(|p| matches!(p, Probed::Errno(_)));
    assert_eq!(
        out.status.code(),
        Some(if failed { 1 } else { 0 }),
        "rulebpf {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    probed
}

pub fn parse_probe(json: &str) -> Vec<Probed> {
    let v: Value = serde_json::from_str(json).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|o| match o.get("local_port") {
            Some(p) => Probed::Port(p.as_u64().unwrap() as u16),
            None => Probed::Errno(o["errno"].as_i64().unwrap() as i32),
        })
        .collect()
}

/// The port-recording listener the bench and the demo use too: TCP (closes
/// at once, so the server closes first) or UDP.
pub use rulebpf_testkit::Listener;

/// Adds a line to /etc/hosts for the life of the guard.
pub struct HostsEntry {
    line: String,
}

/// `rulebpf gc` acts on every instance: a test that runs it, or that
/// leaves an instance gc must not see (an unreadable record), holds this.
pub static GC: Mutex<()> = Mutex::new(());

/// Tests edit /etc/hosts in parallel: one read-modify-write at a time.
static HOSTS: Mutex<()> = Mutex::new(());

impl HostsEntry {
    pub fn add(ip: impl Into<IpAddr>, name: &str) -> Self {
        let _one_at_a_time = HOSTS.lock().unwrap();
        let line = format!("{} {name} # rulebpf test {}", ip.into(), std::process::id());
        let mut hosts = fs::read_to_string("/etc/hosts").unwrap();
        if !hosts.ends_with('\n') {
            hosts.push('\n');
        }
        hosts.push_str(&line);
        hosts.push('\n');
        fs::write("/etc/hosts", hosts).unwrap();
        Self { line }
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        let _one_at_a_time = HOSTS.lock().unwrap();
        if let Ok(hosts) = fs::read_to_string("/etc/hosts") {
            let kept: String = hosts
                .lines()
                .filter(|l| *l != self.line)
                .map(|l| format!("{l}\n"))
                .collect();
            let _ = fs::write("/etc/hosts", kept);
        }
    }
}

/// Polls `done` every 10 ms until it holds; returns how long that took.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

/// Whether the suite runs in `cargo xtask vm-test`'s guest (its init sets
/// `RULEBPF_VM_GUEST=1`): an emulated machine, where wall-clock bounds
/// measure qemu's scheduling more than rulebpf.
pub fn in_vm_guest() -> bool {
    std::env::var_os("RULEBPF_VM_GUEST").is_some_and(|v| v == "1")
}

/// Whether both connect hooks are attached to the cgroup at `path` (the
/// last two programs an instance attaches), asked of the kernel
/// (`BPF_PROG_QUERY`).
pub fn hooks_attached(path: &Path) -> bool {
    use rulebpf_loader::{
        model::program::{Hook, ProgramKind},
        sys::bpf::attached_programs,
    };
    use std::os::fd::AsFd as _;
    let Ok(dir) = fs::File::open(path) else {
        return false;
    };
    [Hook::Connect4, Hook::Connect6].into_iter().all(|hook| {
        attached_programs(dir.as_fd(), ProgramKind::Hook(hook)).is_ok_and(|ids| !ids.is_empty())
    })
}

/// A `rulebpf run` process for a test cgroup; SIGTERM on drop.
pub struct RunningService {
    pub child: Child,
    pub log: PathBuf,
}

impl RunningService {
    /// Starts `rulebpf run --cgroup CG EXTRA.. RULES` and waits until it
    /// manages the instance.
    pub fn start(cg: &TestCgroup, rules: &Path, extra: &[&str]) -> Self {
        let log = rules.with_extension(format!(
            "log.{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let child = Command::new(RULEBPF)
            .args(["run", "--cgroup", cg.arg()])
            .args(extra)
            .arg(rules)
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let pid = u64::from(child.id());
        let service = Self { child, log };
        // `ready:` is logged when systemd would be told READY=1: rules in
        // force, cgroups attached, metrics listening. A bound on a failure
        // only: loading a rule set takes seconds on 5.10 under TCG (the
        // verifier walks the bounded search's loop once per iteration).
        wait_until("the service to be ready", Duration::from_secs(60), || {
            service.log_text().contains("ready: instance")
        });
        assert_eq!(cg.status()["managed_by"].as_u64(), Some(pid));
        service
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Sends `signal` and waits for the process to end.
    pub fn stop(mut self, signal: i32) {
        self.signal(signal);
        let _ = self.child.wait();
        self.child = Command::new("true").spawn().unwrap();
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        let _ = self.child.wait();
    }
}

/// `GET /metrics` from a `rulebpf run --metrics-listen` endpoint.
pub fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    out
}

/// The value of the first sample of `metric` in a scrape.
pub fn sample(text: &str, metric: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(metric) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {metric} in\n{text}"))
}
