//! `cargo xtask cri-test`: rulebpf's NRI plugin under a real containerd,
//! driven through its CRI socket as the kubelet drives it (RunPodSandbox,
//! CreateContainer, StartContainer, StopPodSandbox, RemovePodSandbox),
//! without a cluster or a registry: containerd is Debian's, the one image
//! is built here (`image.rs`), the pods use the host's network (no CNI).
//!
//! Pods annotated `io.rulebpf.instance` each run one container whose first
//! action is a connect to a listener here; the port the listener sees must
//! be the rule's for every annotated pod and the OS's for every other one.
//! Halfway, the plugin is killed and started again. At the end every pod
//! is removed and the instance must list no attachment. The last line
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
/// The pods' parent cgroup (cgroupfs driver), as the kubelet's `kubepods`.
const PODS_CGROUP: &str = "rulebpf-cri-test";
const ANNOTATED: usize = 20;
const BARE: usize = 5;

pub fn run() -> anyhow::Result<()> {
    let rulebpf = Rulebpf::built()?;
    let cache = target_dir().join("cri");
    let bin = containerd::fetch(&cache)?;
    let image_tar = cache.join("busybox-oci.tar");
    image::write(IMAGE, &image_tar)?;
    let server = Listener::on([127, 0, 0, 2]);
    let rules = cache.join("cri-test.ini");
    fs::write(
        &rules,
        format!("127.0.0.2 {} : {}\n", server.port(), ports::CRI_TEST),
    )?;
    rulebpf.show(&["attach", "--name", INSTANCE, path_arg(&rules)?])?;
    let result = (|| {
        let containerd = Containerd::start(&bin, Path::new(RUN_DIR), IMAGE)?;
        let outcome = with_containerd(&rulebpf, &containerd, &image_tar, &server);
        if outcome.is_err() {
            eprintln!("containerd's log, last lines:\n{}", containerd.log_tail());
        }
        outcome
    })();
    let _ = rulebpf.command(&["detach", "--name", INSTANCE]).output();
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
    /// How long RunPodSandbox took, with the annotation (the plugin
    /// attached the instance) and without.
    run_pod_ms: [Vec<f64>; 2],
}

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
            eprintln!("cri-test: restarting the plugin");
            agent = agent.restart(rulebpf, &containerd.nri_socket, &ready)?;
        }
        // Every fifth pod carries no annotation.
        let annotated = i % 5 != 4;
        let uid = format!("cri-test-{i}");
        let parent = format!("/{PODS_CGROUP}/pod{uid}");
        let annotations: &[(&str, &str)] = if annotated {
            &[("io.rulebpf.instance", INSTANCE)]
        } else {
            &[]
        };
        let pod = Pod {
            name: &uid,
            uid: &uid,
            namespace: "default",
            annotations,
            cgroup_parent: &parent,
        };
        let start = Instant::now();
        let answer = cri.call(
            &format!("{}/RunPodSandbox", api::RUNTIME),
            &api::run_pod(&pod),
        );
        let took = start.elapsed();
        let pod_id = match answer {
            Ok(answer) => api::string_field(&answer, 1)?,
            Err(e) => {
                eprintln!("cri-test: pod {uid} refused: {e:#}");
                tally.refused += 1;
                continue;
            }
        };
        tally.run_pod_ms[usize::from(annotated)].push(took.as_secs_f64() * 1e3);
        pods.push(pod_id.clone());
        let command = [
            "/bin/busybox",
            "sh",
            "-c",
            &format!("echo {uid} | /bin/busybox nc 127.0.0.2 {}", server.port()),
        ];
        let container = api::string_field(
            &cri.call(
                &format!("{}/CreateContainer", api::RUNTIME),
                &api::create_container(&pod_id, &pod, "client", IMAGE, &command),
            )?,
            1,
        )?;
        cri.call(
            &format!("{}/StartContainer", api::RUNTIME),
            &api::by_id(&container),
        )?;
        let seen = server.take_within(1, Duration::from_secs(20));
        let &[port] = seen.as_slice() else {
            bail!("pod {uid}: the listener saw {seen:?}, not one connection");
        };
        let from_rule = ports::CRI_TEST.contains(port);
        eprintln!(
            "cri-test: pod {uid} ({}): origin port {port}, RunPodSandbox {:.0} ms",
            if annotated {
                "annotated"
            } else {
                "no annotation"
            },
            took.as_secs_f64() * 1e3
        );
        if annotated {
            tally.annotated += 1;
            if from_rule {
                tally.rule_ports += 1;
            } else {
                tally.escaped += 1;
            }
        } else {
            tally.bare += 1;
            ensure!(
                !from_rule,
                "pod {uid} has no annotation but left from rule port {port}"
            );
            tally.os_ports += 1;
        }
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
    drop(agent);
    let attach_ms = attach_times()?;
    ensure!(
        tally.escaped == 0 && tally.refused == 0,
        "{} annotated pods left from OS ports, {} pods refused",
        tally.escaped,
        tally.refused
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
         {} rule ports, {} OS ports without annotation, {} refused; containerd {version}; \
         RunPodSandbox median {:.0} ms annotated, {:.0} ms without, of which the plugin's \
         attach (in force before RunPodSandbox returns) median {:.1} ms, max {:.1} ms; \
         attachments left after removal: {attachments}",
        tally.annotated + tally.bare,
        tally.annotated,
        tally.bare,
        tally.escaped,
        tally.rule_ports,
        tally.os_ports,
        tally.refused,
        median(&tally.run_pod_ms[1]),
        median(&tally.run_pod_ms[0]),
        median(&attach_ms),
        attach_ms.iter().copied().fold(0.0, f64::max),
    ))
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

    /// Kills the plugin (SIGKILL: a crash) and starts it again.
    fn restart(mut self, rulebpf: &Rulebpf, socket: &Path, ready: &Path) -> anyhow::Result<Self> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Self::start(rulebpf, socket, ready)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        remove_tree(&root);
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

fn path_arg(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("a non-UTF-8 path")
}
