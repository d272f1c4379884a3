//! `rulebpf nri`: one connection to the runtime's NRI socket, served until
//! the runtime closes it.
//!
//! The plugin registers (`Runtime.RegisterPlugin` on connection 2) and
//! serves the runtime's calls on connection 1: `Configure` (it subscribes
//! to the run, stop and remove events of pods), `Synchronize` (the pods
//! already there: annotated ones get their instance, as at their start),
//! `StateChange` (one pod event), `Shutdown`. The runtime calls one plugin
//! at a time and waits for each answer, so one thread, reading and
//! answering in turn, is all it takes; the answer to `RunPodSandbox` is
//! sent once the instance is in force (or the error that makes the runtime
//! refuse the pod).
//!
//! The runtime's `Configure` may arrive before its answer to
//! `RegisterPlugin`: both connections are read by the same loop.
//!
//! With the pods' guard (`--guard`, `kernel::guard`), every pod the plugin
//! sees starting or running is admitted (its cgroup id written into the
//! guard's pinned map) once its instance, if annotated, is in force, and
//! forgotten at its removal; pods the runtime started while the plugin was
//! away are refused by the guard until the plugin, back, finds them at
//! `Synchronize`.
//! https://github.com/containerd/nri/blob/v0.8.0/pkg/adaptation/plugin.go

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    fs,
    io::{self, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Instant,
};

use super::{
    api::{self, Configure, Event, StateChange, Synchronize},
    pods::{self, PodError, Scope},
    ttrpc::{
        CODE_UNIMPLEMENTED, CODE_UNKNOWN, Demux, Message, PLUGIN_CONN, RUNTIME_CONN, Request,
        Response, Status, WireError,
    },
};
use crate::{kernel::guard::Guard, sys::cgroup::Cgroup};

/// The runtime's NRI socket, unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/nri/nri.sock";

#[derive(Debug, thiserror::Error)]
pub enum NriError {
    #[error(
        "connecting to the runtime's NRI socket {path}: {source} (is NRI enabled in the runtime's configuration?)"
    )]
    Connect { path: PathBuf, source: io::Error },
    #[error("NRI connection: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the runtime refused the plugin's registration: {} (code {})", .0.message, .0.code)]
    Registration(Status),
}

/// Who the plugin is and what it acts on.
pub struct Plugin {
    pub socket: PathBuf,
    /// The plugin's name and two-digit index, which orders plugins.
    pub name: String,
    pub index: String,
    pub scope: Scope,
    /// Written once the pods already there were handled (a readiness
    /// probe's file).
    pub ready_file: Option<PathBuf>,
    /// The pods' guard, when installed.
    pub guard: Option<RefCell<Guard>>,
    /// Pod cgroups admitted during a synchronization (it may come in
    /// parts): the guard forgets the others at its end.
    pub synced: RefCell<HashSet<u64>>,
    /// Sandbox id -> the cgroup id admitted for it: a removed sandbox is
    /// forgotten by id (its cgroup may be gone already), and a pod cgroup
    /// stays admitted while another sandbox of it lives (the kubelet
    /// re-creates a pod's sandbox in the same cgroup).
    pub sandboxes: RefCell<HashMap<String, u64>>,
}

/// How a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The runtime closed the socket (it stopped or restarted).
    Closed,
    /// The runtime asked the plugin to stop (`Shutdown`).
    Shutdown,
}

impl Plugin {
    /// Serves one connection to the runtime.
    pub fn serve(&self) -> Result<Ended, NriError> {
        let mut socket = UnixStream::connect(&self.socket).map_err(|source| NriError::Connect {
            path: self.socket.clone(),
            source,
        })?;
        let register = Message::Request {
            stream: 1,
            request: Request {
                service: api::RUNTIME_SERVICE.into(),
                method: "RegisterPlugin".into(),
                payload: api::register_plugin(&self.name, &self.index),
                timeout_nano: 0,
            },
        };
        socket.write_all(&register.frames(RUNTIME_CONN))?;
        // What a connection cut in the middle of a synchronization knew.
        self.synced.take();
        self.sandboxes.take();
        let mut demux = Demux::new();
        let mut buf = vec![0; 64 << 10];
        loop {
            let n = socket.read(&mut buf)?;
            if n == 0 {
                return Ok(Ended::Closed);
            }
            for (conn, message) in demux.feed(&buf[..n])? {
                match (conn, message) {
                    (PLUGIN_CONN, Message::Request { stream, request }) => {
                        let (response, shutdown) = self.answer(&request);
                        socket.write_all(
                            &Message::Response { stream, response }.frames(PLUGIN_CONN),
                        )?;
                        if shutdown {
                            return Ok(Ended::Shutdown);
                        }
                    }
                    (RUNTIME_CONN, Message::Response { response, .. }) => {
                        if let Some(status) = response.failure() {
                            return Err(NriError::Registration(status.clone()));
                        }
                        log::info!(
                            "registered with the runtime as {}-{}",
                            self.index,
                            self.name
                        );
                    }
                    // Nothing else is spoken on these connections.
                    (conn, message) => log::debug!("ignored on NRI connection {conn}: {message:?}"),
                }
            }
        }
    }

    /// The answer to one call of the runtime, and whether to stop.
    fn answer(&self, request: &Request) -> (Response, bool) {
        if request.service != api::PLUGIN_SERVICE {
            return (unimplemented(request), false);
        }
        let answered = match request.method.as_str() {
            "Configure" => Configure::decode(&request.payload).map(|c| {
                log::info!("runtime {} {}", c.runtime_name, c.runtime_version);
                Response::ok(api::configure_response(&[
                    Event::RunPodSandbox,
                    Event::StopPodSandbox,
                    Event::RemovePodSandbox,
                ]))
            }),
            "Synchronize" => Synchronize::decode(&request.payload).map(|s| self.synchronize(&s)),
            "StateChange" => StateChange::decode(&request.payload).map(|c| self.state_change(&c)),
            "Shutdown" => return (Response::ok(Vec::new()), true),
            // Later NRI versions call RunPodSandbox and the like directly,
            // and fall back to StateChange on this answer.
            _ => return (unimplemented(request), false),
        };
        let response = answered.unwrap_or_else(|e| {
            log::error!("NRI {}: {e}", request.method);
            Response::error(CODE_UNKNOWN, e.to_string())
        });
        (response, false)
    }

    /// The pods already there: each annotated one gets its instance as at
    /// its start. A failure cannot refuse a running pod: it is logged.
    fn synchronize(&self, sync: &Synchronize) -> Response {
        for pod in &sync.pods {
            match pods::plan(Event::RunPodSandbox, pod, &self.scope)
                .and_then(|action| self.act(pod, action))
                .and_then(|attached| self.admit(pod, attached))
            {
                Ok(Some(id)) => {
                    self.synced.borrow_mut().insert(id);
                }
                Ok(None) => {}
                Err(e) => log::error!("pod {}/{} already running: {e}", pod.namespace, pod.name),
            }
        }
        if !sync.more
            && let Some(guard) = &self.guard
        {
            let mut guard = guard.borrow_mut();
            guard.retain(&self.synced.take());
            // Only now: every running pod is admitted.
            if let Err(e) = guard.attach() {
                log::error!("{e}");
                return Response::error(CODE_UNKNOWN, e.to_string());
            }
            log::info!(
                "pods' guard in force on {}; it has refused {} connects of pods not seen yet",
                guard.cgroup().path.display(),
                guard.refused()
            );
        }
        // The last part of a synchronization (NRI v0.8+ sends it in parts;
        // v0.6 in one, without `more`).
        if !sync.more
            && let Some(ready) = &self.ready_file
            && let Err(e) = write_ready(ready)
        {
            log::error!("writing {}: {e}", ready.display());
        }
        Response::ok(api::synchronize_response(sync.more))
    }

    /// One pod event; an error refuses the pod's start.
    fn state_change(&self, change: &StateChange) -> Response {
        let Some(event) = change.event else {
            return Response::ok(Vec::new());
        };
        let pod = &change.pod;
        let done = pods::plan(event, pod, &self.scope)
            .and_then(|a| self.act(pod, a))
            .and_then(|attached| match event {
                Event::RunPodSandbox => self.admit(pod, attached).map(drop),
                Event::RemovePodSandbox => {
                    self.forget(pod);
                    Ok(())
                }
                Event::StopPodSandbox => Ok(()),
            });
        match done {
            Ok(()) => Response::ok(Vec::new()),
            Err(e) => {
                log::error!("pod {}/{}: {e}", pod.namespace, pod.name);
                Response::error(CODE_UNKNOWN, format!("rulebpf: {e}"))
            }
        }
    }

    fn act(
        &self,
        pod: &api::PodSandbox,
        action: pods::PodAction,
    ) -> Result<Option<Cgroup>, PodError> {
        let said = match &action {
            pods::PodAction::Attach {
                instance, cgroup, ..
            } => Some(format!(
                "instance {instance} in force on cgroup {}",
                cgroup.display()
            )),
            pods::PodAction::Detach { instance, .. } => {
                Some(format!("instance {instance} detached"))
            }
            pods::PodAction::Nothing => None,
        };
        let start = Instant::now();
        let attached = pods::act(action)?;
        if let Some(said) = said {
            log::info!(
                "pod {}/{} ({}): {said} ({:.1} ms)",
                pod.namespace,
                pod.name,
                pod.id,
                start.elapsed().as_secs_f64() * 1e3
            );
        }
        Ok(attached)
    }
}

impl Plugin {
    /// Lets `pod` past the guard: its cgroup id, or `None` without a guard
    /// or for a pod outside any known cgroup (no cgroup parent: the
    /// runtime's default cgroup, which the guard does not cover). An error
    /// (the guard's map refused the entry) refuses the pod: started, all
    /// its connects would be refused. `attached`: the pod's cgroup as its
    /// instance was just attached to it (the same cgroup, not resolved
    /// again).
    fn admit(
        &self,
        pod: &api::PodSandbox,
        attached: Option<Cgroup>,
    ) -> Result<Option<u64>, PodError> {
        let Some(guard) = &self.guard else {
            return Ok(None);
        };
        let Some(cgroup) = attached.or_else(|| {
            pods::pod_cgroup(pod)
                .ok()
                .and_then(|relative| Cgroup::resolve(&relative).ok())
        }) else {
            return Ok(None);
        };
        guard
            .borrow_mut()
            .admit(cgroup.id)
            .map_err(|e| PodError::Guard {
                pod: pod.id.clone(),
                source: Box::new(e),
            })?;
        self.sandboxes
            .borrow_mut()
            .insert(pod.id.clone(), cgroup.id);
        Ok(Some(cgroup.id))
    }

    /// A removed sandbox: its cgroup leaves the guard's map unless another
    /// sandbox of the same pod cgroup lives.
    fn forget(&self, pod: &api::PodSandbox) {
        let Some(guard) = &self.guard else {
            return;
        };
        let mut sandboxes = self.sandboxes.borrow_mut();
        let Some(id) = sandboxes.remove(&pod.id) else {
            return;
        };
        if !sandboxes.values().any(|&other| other == id) {
            guard.borrow_mut().forget(id);
        }
    }
}

fn unimplemented(request: &Request) -> Response {
    Response::error(
        CODE_UNIMPLEMENTED,
        format!("{}/{} is not implemented", request.service, request.method),
    )
}

/// The readiness file, created root-only (its content says nothing secret,
/// but nothing here is written world-readable by accident).
fn write_ready(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?
        .write_all(b"synchronized\n")
}
