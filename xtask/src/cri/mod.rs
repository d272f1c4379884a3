//! `cargo xtask cri-test`: rulebpf's NRI plugin under a real containerd,
//! driven through its CRI socket as the kubelet drives it (RunPodSandbox,
//! CreateContainer, StartContainer, StopPodSandbox, RemovePodSandbox),
//! without a cluster or a registry: containerd is Debian's, the one image
//! is built here (`image.rs`), the pods use the host's network (no CNI).
//!
//! Pods annotated `io.rulebpf.instance` each run one container whose first
//! action is a connect to a listener here; the port the listener sees must
//! be the rule's for every annotated pod and the OS's for every other one.
//! The plugin runs with its guard on the pods' parent cgroup. Halfway, it
//! is killed; two pods started meanwhile (one annotated) must not get out
//! (the guard refuses their connects) and must get their ports once the
//! plugin is back. At the end every pod is removed and the instance must
//! list no attachment. The last line
//! sums it up: `cri-test: N pods, ...`.

mod api;
mod containerd;
mod grpc;
mod image;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use rulebpf_testkit::{Listener, ports};

use self::{api::Pod, containerd::Containerd, grpc::Client};
use crate::{rulebpf::Rulebpf, target_dir};

/// The image of the sandboxes and of the clients.
const IMAGE: &str = "localhost/rulebpf/busybox:test";
/// The instance the annotated pods name.
const INSTANCE: &str = "cri-test";
/// Where containerd keeps everything of this run.
const RUN_DIR: &str = "/run/rulebpf-cri-test";
/// rulebpf's pins (the default of `RULEBPF_PIN_DIR`).
const PIN_DIR: &str = "/sys/fs/bpf/rulebpf";
/// The pods' parent cgroup (cgroupfs driver), as the kubelet's `kubepods`.
const PODS_CGROUP: &str = "rulebpf-cri-test";
const ANNOTATED: usize = 20;
const BARE: usize = 5;

pub use containerd::DEFAULT_SUITE;

/// Runs the test against the containerd of Debian `suite`.
pub fn run(suite: &str) -> anyhow::Result<()> {
    let rulebpf = Rulebpf::built()?;
    let cache = target_dir().join("cri");
    let bin = containerd::fetch(&cache, suite)?;
    let image_tar = cache.join("busybox-oci.tar");
    image::write(IMAGE, &image_tar)?;
    let server = Listener::on([127, 0, 0, 2]);
    let rules = cache.join("cri-test.ini");
    fs::write(
        &rules,
        format!("127.0.0.2 {} : {}\n", server.port(), ports::CRI_TEST),
    )?;
    rulebpf.show(&["attach", "--name", INSTANCE, path_arg(&rules)?])?;
    // The pods' parent, which the kubelet makes at its start (`kubepods`):
    // the plugin's guard goes there.
    fs::create_dir_all(rulebpf.cgroup2_mount()?.join(PODS_CGROUP))?;
    let result = (|| {
        let containerd = Containerd::start(&bin, Path::new(RUN_DIR), IMAGE)?;
        let outcome = with_containerd(&rulebpf, &containerd, &image_tar, &server);
        if outcome.is_err() {
            eprintln!("containerd's log, last lines:\n{}", containerd.log_tail());
        }
        outcome
    })();
    let _ = rulebpf.command(&["detach", "--name", INSTANCE]).output();
    let _ = rulebpf
        .command(&["nri", "--guard", PODS_CGROUP, "--remove-guard"])
        .output();
    remove_pod_cgroups();
    let summary = result?;
    println!("{summary}");
    Ok(())
}

/// What the pods saw.
#[derive(Default)]
struct Tally {
    annotated: usize,
    bare: usize,
    rule_ports: usize,
    /// Annotated pods whose connect left from a port outside the rule's
    /// range: escapes.
    escaped: usize,
    os_ports: usize,
    /// Pods the runtime refused (RunPodSandbox failed).
    refused: usize,
    /// Pods started while the plugin was down whose first connect the
    /// guard refused, and of them, those that got their port from a
    /// second container once the plugin was back.
    held: usize,
    held_then_served: usize,
    /// How long RunPodSandbox took, with the annotation (the plugin
    /// attached the instance) and without.
    run_pod_ms: [Vec<f64>; 2],
}

impl Tally {
    /// Counts the port a pod's connect left from.
    fn saw(&mut self, uid: &str, annotated: bool, port: u16) -> anyhow::Result<()> {
        let from_rule = ports::CRI_TEST.contains(port);
        if annotated {
            self.annotated += 1;
            if from_rule {
                self.rule_ports += 1;
            } else {
                self.escaped += 1;
            }
        } else {
            self.bare += 1;
            ensure!(
                !from_rule,
                "pod {uid} has no annotation but left from rule port {port}"
            );
            self.os_ports += 1;
        }
        Ok(())
    }
}

/// One pod of the test and what the kubelet would pass for it.
struct TestPod {
    uid: String,
    parent: String,
    annotated: bool,
}

impl TestPod {
    fn new(i: usize, annotated: bool) -> Self {
        let uid = format!("cri-test-{i}");
        let parent = format!("/{PODS_CGROUP}/pod{uid}");
        Self {
            uid,
            parent,
            annotated,
        }
    }

    fn config(&self) -> Pod<'_> {
        let annotations: &[(&str, &str)] = if self.annotated {
            &[("io.rulebpf.instance", INSTANCE)]
        } else {
            &[]
        };
        Pod {
            name: &self.uid,
            uid: &self.uid,
            namespace: "default",
            annotations,
            cgroup_parent: &self.parent,
        }
    }

    fn kind(&self) -> &'static str {
        if self.annotated {
            "annotated"
        } else {
            "no annotation"
        }
    }
}

/// RunPodSandbox; the pod's id and how long the call took.
fn run_pod(cri: &Client, pod: &TestPod) -> anyhow::Result<(String, Duration)> {
    let start = Instant::now();
    let answer = cri.call(
        &format!("{}/RunPodSandbox", api::RUNTIME),
        &api::run_pod(&pod.config()),
    )?;
    Ok((api::string_field(&answer, 1)?, start.elapsed()))
}

/// Creates and starts a container in the pod whose first action is a
/// connect to `server`; the origin port the server saw, or `None` when no
/// connection came within `wait`.
fn connect_from(
    cri: &Client,
    server: &Listener,
    pod_id: &str,
    pod: &TestPod,
    name: &str,
    wait: Duration,
) -> anyhow::Result<Option<u16>> {
    let command = [
        "/bin/busybox",
        "sh",
        "-c",
        &format!(
            "echo {} | /bin/busybox nc 127.0.0.2 {}",
            pod.uid,
            server.port()
        ),
    ];
    let container = api::string_field(
        &cri.call(
            &format!("{}/CreateContainer", api::RUNTIME),
            &api::create_container(pod_id, &pod.config(), name, IMAGE, &command),
        )?,
        1,
    )?;
    cri.call(
        &format!("{}/StartContainer", api::RUNTIME),
        &api::by_id(&container),
    )?;
    match server.take_within(1, wait).as_slice() {
        [] => Ok(None),
        &[port] => Ok(Some(port)),
        more => bail!(
            "pod {}: the listener saw {more:?}, not one connection",
            pod.uid
        ),
    }
}

/// How long a pod's connect may take to reach the listener; and how long
/// the test waits to be sure a refused one never comes.
const CONNECT_WAIT: Duration = Duration::from_secs(20);
const REFUSED_WAIT: Duration = Duration::from_secs(3);

fn with_containerd(
    rulebpf: &Rulebpf,
    containerd: &Containerd,
    image_tar: &Path,
    server: &Listener,
) -> anyhow::Result<String> {
    containerd.import(image_tar)?;
    let cri = Client::new(containerd.socket.clone())?;
    let version = api::string_field(
        &cri.call(&format!("{}/Version", api::RUNTIME), &api::version())?,
        3,
    )?;
    wait_for_image(&cri)?;
    let ready = containerd.dir.join("nri-ready");
    let _ = fs::remove_file(target_dir().join("cri/nri.log"));
    let mut agent = Agent::start(rulebpf, &containerd.nri_socket, &ready)?;
    let mut tally = Tally::default();
    let mut pods = Vec::new();
    for i in 0..ANNOTATED + BARE {
        if i == (ANNOTATED + BARE) / 2 {
            agent = while_plugin_down(
                rulebpf, containerd, &cri, server, agent, &mut tally, &mut pods,
            )?;
        }
        // Every fifth pod carries no annotation.
        let pod = TestPod::new(i, i % 5 != 4);
        let (pod_id, took) = match run_pod(&cri, &pod) {
            Ok(started) => started,
            Err(e) => {
                eprintln!("cri-test: pod {} refused: {e:#}", pod.uid);
                tally.refused += 1;
                continue;
            }
        };
        tally.run_pod_ms[usize::from(pod.annotated)].push(took.as_secs_f64() * 1e3);
        pods.push(pod_id.clone());
        let port = connect_from(&cri, server, &pod_id, &pod, "client", CONNECT_WAIT)?
            .with_context(|| format!("pod {}: no connection came", pod.uid))?;
        eprintln!(
            "cri-test: pod {} ({}): origin port {port}, RunPodSandbox {:.0} ms",
            pod.uid,
            pod.kind(),
            took.as_secs_f64() * 1e3
        );
        tally.saw(&pod.uid, pod.annotated, port)?;
    }
    for pod_id in &pods {
        cri.call(
            &format!("{}/StopPodSandbox", api::RUNTIME),
            &api::by_id(pod_id),
        )?;
        cri.call(
            &format!("{}/RemovePodSandbox", api::RUNTIME),
            &api::by_id(pod_id),
        )?;
    }
    // The plugin detaches at RemovePodSandbox, before the runtime answers.
    let status = rulebpf.json(&["status", "--json"])?;
    let attachments = status
        .as_array()
        .and_then(|all| all.iter().find(|i| i["name"] == INSTANCE))
        .map(|i| i["attachments"].as_array().map_or(0, Vec::len))
        .context("the instance is gone from status")?;
    // Nor pins: each attachment's links live in a `cg-ID` directory of the
    // instance's pins.
    let pins: Vec<String> = fs::read_dir(Path::new(PIN_DIR).join(INSTANCE))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("cg-"))
        .collect();
    drop(agent);
    let attach_ms = attach_times()?;
    let guard_refused = guard_refused()?;
    ensure!(
        guard_refused >= 2,
        "the guard counted {guard_refused} refused connects; the held pods' were not its"
    );
    ensure!(
        pins.is_empty(),
        "attachment pins left after every pod was removed: {pins:?}"
    );
    ensure!(
        tally.escaped == 0 && tally.refused == 0,
        "{} annotated pods left from OS ports, {} pods refused",
        tally.escaped,
        tally.refused
    );
    ensure!(
        tally.held == 2 && tally.held_then_served == 2,
        "of the 2 pods started while the plugin was down, {} were held and {} served after",
        tally.held,
        tally.held_then_served
    );
    ensure!(
        attachments == 0,
        "{attachments} attachments left after every pod was removed"
    );
    let median = |ms: &[f64]| {
        let mut ms = ms.to_vec();
        ms.sort_by(f64::total_cmp);
        ms.get(ms.len() / 2).copied().unwrap_or(0.0)
    };
    Ok(format!(
        "cri-test: {} pods ({} annotated, {} without), {} OS ports among annotated pods, \
         {} rule ports, {} OS ports without annotation, {} refused; plugin killed: {} pods \
         started meanwhile held by the guard, {} served once it was back; containerd {version}; \
         RunPodSandbox median {:.0} ms annotated, {:.0} ms without, of which the plugin's \
         attach (in force before RunPodSandbox returns) median {:.1} ms, max {:.1} ms; \
         attachments and their pins left after removal: {attachments}",
        tally.annotated + tally.bare,
        tally.annotated,
        tally.bare,
        tally.escaped,
        tally.rule_ports,
        tally.os_ports,
        tally.refused,
        tally.held,
        tally.held_then_served,
        median(&tally.run_pod_ms[1]),
        median(&tally.run_pod_ms[0]),
        median(&attach_ms),
        attach_ms.iter().copied().fold(0.0, f64::max),
    ))
}

/// The plugin killed (a crash): one annotated pod and one without are
/// started meanwhile, which the runtime does without asking anyone. Their
/// first connects must not leave (the guard refuses them); once the plugin
/// is back (it finds them at Synchronize), a second container in each must
/// get its port: the rule's, the OS's.
fn while_plugin_down(
    rulebpf: &Rulebpf,
    containerd: &Containerd,
    cri: &Client,
    server: &Listener,
    mut agent: Agent,
    tally: &mut Tally,
    pods: &mut Vec<String>,
) -> anyhow::Result<Agent> {
    eprintln!("cri-test: killing the plugin");
    agent.kill();
    let mut held = Vec::new();
    for (i, annotated) in [(100, true), (101, false)] {
        let pod = TestPod::new(i, annotated);
        let (pod_id, _) = run_pod(cri, &pod)?;
        pods.push(pod_id.clone());
        match connect_from(cri, server, &pod_id, &pod, "first", REFUSED_WAIT)? {
            None => {
                eprintln!(
                    "cri-test: pod {} ({}), plugin down: connect refused",
                    pod.uid,
                    pod.kind()
                );
                tally.held += 1;
            }
            Some(port) => {
                eprintln!(
                    "cri-test: pod {} ({}), plugin down: left from {port}",
                    pod.uid,
                    pod.kind()
                );
                if annotated && !ports::CRI_TEST.contains(port) {
                    tally.escaped += 1;
                }
            }
        }
        held.push((pod, pod_id));
    }
    let agent = Agent::start(
        rulebpf,
        &containerd.nri_socket,
        &containerd.dir.join("nri-ready"),
    )?;
    for (pod, pod_id) in &held {
        let port = connect_from(cri, server, pod_id, pod, "second", CONNECT_WAIT)?
            .with_context(|| format!("pod {}: no connection once the plugin was back", pod.uid))?;
        eprintln!(
            "cri-test: pod {} ({}), plugin back: origin port {port}",
            pod.uid,
            pod.kind()
        );
        tally.saw(&pod.uid, pod.annotated, port)?;
        tally.held_then_served += 1;
    }
    Ok(agent)
}

/// How long each of the plugin's attaches took, from its log (`... in
/// force on cgroup ... (2.1 ms)`), over both of its runs.
fn attach_times() -> anyhow::Result<Vec<f64>> {
    let log = fs::read_to_string(target_dir().join("cri/nri.log"))?;
    Ok(log
        .lines()
        .filter(|l| l.contains(" in force on cgroup "))
        .filter_map(|l| l.rsplit_once('(')?.1.strip_suffix(" ms)")?.parse().ok())
        .collect())
}

/// What the plugin's guard had refused when it last synchronized (its log:
/// `... it has refused N connects ...`).
fn guard_refused() -> anyhow::Result<u64> {
    let log = fs::read_to_string(target_dir().join("cri/nri.log"))?;
    Ok(log
        .lines()
        .rev()
        .find_map(|l| {
            l.split_once("it has refused ")?
                .1
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0))
}

/// The CRI sees an imported image once containerd's image event reached
/// it.
fn wait_for_image(cri: &Client) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let answer = cri.call(
            &format!("{}/ImageStatus", api::IMAGES),
            &api::image_status(IMAGE),
        )?;
        if api::has_field(&answer, 1)? {
            return Ok(());
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the CRI never saw {IMAGE}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `rulebpf nri`, connected to the test's containerd.
struct Agent {
    child: Child,
}

impl Agent {
    /// Starts the plugin; returns once it has handled the pods already
    /// there (its ready file): before that, the runtime would start pods
    /// without asking it.
    fn start(rulebpf: &Rulebpf, socket: &Path, ready: &Path) -> anyhow::Result<Self> {
        let _ = fs::remove_file(ready);
        // Appended to: both runs of the plugin are read at the end.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(target_dir().join("cri/nri.log"))?;
        let child = rulebpf
            .command(&[
                "nri",
                "--socket",
                path_arg(socket)?,
                "--ready-file",
                path_arg(ready)?,
                "--guard",
                PODS_CGROUP,
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting rulebpf nri")?;
        let agent = Self { child };
        let start = Instant::now();
        while !ready.exists() {
            if start.elapsed() > Duration::from_secs(20) {
                bail!(
                    "rulebpf nri not synchronized after 20 s:\n{}",
                    fs::read_to_string(target_dir().join("cri/nri.log")).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(agent)
    }

    /// Kills the plugin (SIGKILL: a crash).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The pods' cgroups the runtime's cgroupfs driver made (in the cgroup2
/// tree and, on a hybrid host, in every v1 hierarchy), deepest first: what
/// the kubelet removes after a pod.
fn remove_pod_cgroups() {
    let Ok(mounts) = fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    let mut roots: Vec<PathBuf> = vec![PathBuf::from("/sys/fs/cgroup").join(PODS_CGROUP)];
    roots.extend(mounts.flatten().map(|e| e.path().join(PODS_CGROUP)));
    for root in roots {
        rulebpf_testkit::cgroup::remove_tree(&root);
    }
}

fn path_arg(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("a non-UTF-8 path")
}
