//! `rulebpf oci-hook STAGE`: an OCI runtime hook that attaches a named
//! instance to a container's cgroup before the container's program runs,
//! and removes that attachment when the container is gone.
//!
//! ```text
//! podman run --annotation io.rulebpf.instance=gateway IMAGE ...
//!   podman/CRI-O: hooks.d entry matches the annotation  (contrib/oci/*.json, oci-hooks(5))
//!   runtime (crun, runc): create namespaces + cgroup, process waits
//!   createRuntime hook: rulebpf oci-hook createRuntime   <- state JSON on stdin
//!       instance `gateway` attached to /proc/<pid>/cgroup's cgroup v2 directory
//!   runtime: pivot_root, exec the container's program   <- its first connect() is covered
//!   ...
//!   poststop hook: rulebpf oci-hook poststop              <- the attachment is removed
//! ```
//!
//! This module is the part that needs no kernel: reading the state the
//! runtime writes on stdin, finding the container's cgroup, and deciding
//! what to do ([`plan`]). The caller wires the [`HookAction`] to the
//! instance API.
//!
//! # Why `createRuntime`
//!
//! The [OCI runtime spec] calls `createRuntime` hooks "as part of the create
//! operation after the runtime environment has been created (according to
//! the configuration in config.json) but before the `pivot_root` or any
//! equivalent operation has been executed", in the runtime namespace (so
//! /proc, /sys/fs/bpf and the cgroup2 mount are the host's). The user's
//! program is only executed later, at `start`: rules attached here cover its
//! very first connect(). The spec leaves open whether cgroups exist yet
//! ("Other operations such as cgroups ... might not have been performed");
//! crun 1.8 and runc 1.1 (under podman 4.3) both have the container process
//! in its own cgroup by then — measured: at createRuntime the state's `pid`
//! is crun's child or `runc init`, already in `/libpod_parent/libpod-<id>`.
//! [`plan`] still checks it, see below. The other stages do not fit:
//! `createContainer` and `startContainer` run in the container's namespaces
//! (its /proc, no bpffs), `poststart` runs after the program started, and
//! `prestart` is the deprecated alias of the same moment as `createRuntime`.
//!
//! # Exit status: fail closed, but only for annotated containers
//!
//! * A failing `createRuntime` hook makes the runtime "generate an error,
//!   stop the container, and continue the lifecycle at step 12" (delete)
//!   ([runtime lifecycle]): `podman run` fails with status 126 and the
//!   container's program never runs. That is what an annotated container
//!   must get when its rules cannot be put in force — it asked for them, and
//!   running it without them would open connections from any port.
//! * A container **without** the annotation must never be affected. The
//!   hooks.d entries only inject the hook when the annotation matches
//!   (`when.annotations`, [oci-hooks(5)]), and [`plan`] still returns
//!   [`HookAction::Nothing`] for such a state: exit 0.
//! * Closed only while the hook is installed: podman silently drops a
//!   hooks.d entry whose `hook.path` does not exist (measured with 4.3.1),
//!   and without the entry the annotation is just a label.
//! * A failing `poststop` hook only makes the runtime "log a warning"; the
//!   container is removed anyway. A failed detach leaves a pinned link, which
//!   keeps the dead cgroup's kernel memory alive: report it loudly, but it
//!   harms no connection.
//! * Where the message goes: runc puts the hook's stderr into its error
//!   (`error running hook: exit status 1, stdout: , stderr: ...`); crun 1.8
//!   only says `error executing hook ... (exit code: 1)` unless the container
//!   carries the annotation `run.oci.hooks.stderr=FILE` ([crun(1)]); podman
//!   runs `poststop` itself, its output is not shown at all. Hence the
//!   errors here carry everything needed on one line.
//!
//! # The container's cgroup
//!
//! The kernel's view wins: the `0::` line of `/proc/<pid>/cgroup` (the
//! cgroup v2 line, present on hybrid hosts too), joined to the cgroup2 mount
//! of the hook's mount namespace. The bundle's `linux.cgroupsPath` is what
//! the runtime was asked for, not where the process is (with the systemd
//! driver it is not even a path: `machine.slice:libpod:<id>`), so it is not
//! used. Two checks keep an odd runtime from widening the rules to more than
//! the container: the cgroup must not be the root, and it must not contain
//! the hook itself (the runtime's cgroup). Measured: podman
//! `--cgroups=disabled` leaves the container process in the caller's cgroup,
//! the very cgroup the hook runs in; attaching there would give the caller's
//! shell and every later child of it the container's rules.
//!
//! # poststop
//!
//! The state has no `pid` then (the process is gone) and the cgroup has been
//! removed already (measured with podman, which runs `poststop` itself from
//! `podman container cleanup`); the annotation is still in the state. The
//! attachment is found by the container id recorded with it at
//! createRuntime ([`HookAction::Detach`]).
//!
//! [OCI runtime spec]: https://github.com/opencontainers/runtime-spec/blob/main/config.md#createruntime-hooks
//! [runtime lifecycle]: https://github.com/opencontainers/runtime-spec/blob/main/runtime.md#lifecycle
//! [oci-hooks(5)]: https://github.com/containers/podman/blob/main/pkg/hooks/docs/oci-hooks.5.md
//! [crun(1)]: https://github.com/containers/crun/blob/main/crun.1.md

use std::{
    collections::BTreeMap,
    fmt, fs,
    io::{self, Read},
    path::{Component, Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use crate::{
    model::name::{InstanceName, NameError},
    sys::cgroup::{self, CgroupError},
};

/// The annotation that names the instance a container gets:
/// `podman run --annotation io.rulebpf.instance=gateway ...`.
pub const ANNOTATION: &str = "io.rulebpf.instance";

/// The most state JSON read from stdin. Podman's is under 1 KiB; the
/// annotations are most of it (Kubernetes caps them at 256 KiB in all).
pub const MAX_STATE_BYTES: u64 = 1 << 20;

/// The container state the runtime writes to a hook's stdin
/// ([runtime spec, State](https://github.com/opencontainers/runtime-spec/blob/main/runtime.md#state)).
/// Unknown fields (crun adds `root`) are ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OciState {
    pub oci_version: String,
    /// Unique on the host; podman and CRI-O use 64 hex digits.
    pub id: String,
    /// `creating` (runc at createRuntime), `created` (crun at createRuntime),
    /// `running`, `stopped` (poststop). Informational only.
    #[serde(default)]
    pub status: String,
    /// The container process as the host sees it; absent at poststop.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The bundle directory (config.json, usually the rootfs).
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The hook stages `rulebpf oci-hook` handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Attach: the container's cgroup exists, its program has not started.
    CreateRuntime,
    /// Detach: the container is gone.
    Poststop,
}

impl Stage {
    /// The name as the runtime spec and hooks.d write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CreateRuntime => "createRuntime",
            Self::Poststop => "poststop",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stage {
    type Err = OciError;

    /// `createRuntime` or `poststop`; the other OCI stages are refused with
    /// the reason they cannot work.
    fn from_str(s: &str) -> Result<Self, OciError> {
        let why = match s {
            "createRuntime" => return Ok(Self::CreateRuntime),
            "poststop" => return Ok(Self::Poststop),
            "prestart" => "deprecated by the runtime spec; use createRuntime (the same moment)",
            "createContainer" | "startContainer" => {
                "it runs in the container's namespaces, where /proc and /sys/fs/bpf are the \
                 container's; use createRuntime"
            }
            "poststart" => {
                "it runs after the container's program started, which may have connected \
                 already; use createRuntime"
            }
            _ => {
                return Err(OciError::UnknownStage(s.to_owned()));
            }
        };
        Err(OciError::UnsupportedStage {
            stage: s.to_owned(),
            why,
        })
    }
}

/// What the hook does for one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookAction {
    /// Attach `instance` to the cgroup v2 directory `cgroup`, recording that
    /// it was done for `container` (the id poststop will look for).
    Attach {
        instance: InstanceName,
        cgroup: PathBuf,
        container: String,
    },
    /// Remove the attachment of `instance` recorded for `container` (its
    /// cgroup is usually gone already). No such attachment: nothing to do.
    Detach {
        instance: InstanceName,
        container: String,
    },
    /// Exit 0 without touching anything.
    Nothing(Skip),
}

/// Why a hook invocation does nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The container does not carry [`ANNOTATION`] (or carries it empty):
    /// it is none of rulebpf's business.
    NotAnnotated { container: String },
    /// poststop for a container whose annotation is no instance name: its
    /// createRuntime refused it, so nothing was attached.
    BadInstanceName { container: String, name: String },
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAnnotated { container } => {
                write!(f, "container {container} has no {ANNOTATION} annotation")
            }
            Self::BadInstanceName { container, name } => write!(
                f,
                "container {container}: `{name}` is no instance name, nothing was attached"
            ),
        }
    }
}

/// Why the hook cannot do its job. Every message names the container or the
/// pid, since it may end up in a runtime's log with nothing else around it.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("reading the container state from stdin")]
    ReadState(#[source] io::Error),
    #[error(
        "no container state on stdin: `rulebpf oci-hook` is run by an OCI runtime \
         (podman, CRI-O) from a hooks.d entry, see contrib/oci/"
    )]
    EmptyState,
    #[error("the container state on stdin is larger than {limit} bytes")]
    StateTooLarge { limit: u64 },
    #[error("the container state on stdin is not OCI state JSON")]
    BadState(#[source] serde_json::Error),
    #[error("unknown hook stage `{0}`: rulebpf handles createRuntime and poststop")]
    UnknownStage(String),
    #[error("hook stage `{stage}` cannot work: {why}")]
    UnsupportedStage { stage: String, why: &'static str },
    #[error("container {container}: annotation {ANNOTATION}=`{name}`")]
    BadInstanceName {
        container: String,
        name: String,
        #[source]
        source: NameError,
    },
    #[error("container {container}: the state has no pid, so its cgroup cannot be found")]
    NoPid { container: String },
    #[error(transparent)]
    Cgroup2(#[from] CgroupError),
    #[error("container process {pid} is gone before its createRuntime hook finished")]
    ProcessGone { pid: u32 },
    #[error("reading /proc/{pid}/cgroup")]
    ProcCgroup {
        pid: Pid,
        #[source]
        source: io::Error,
    },
    #[error(
        "/proc/{pid}/cgroup has no cgroup v2 line (`0::/...`): this kernel has no cgroup v2, \
         which rulebpf needs"
    )]
    NoUnifiedLine { pid: Pid },
    #[error("process {pid} is in a deleted cgroup ({path})")]
    DeletedCgroup { pid: Pid, path: String },
    #[error(
        "process {pid} is in cgroup {path}, outside this hook's cgroup namespace: run the \
         hook in the runtime's namespaces (hooks.d, not inside a container)"
    )]
    OutsideNamespace { pid: Pid, path: String },
    #[error(
        "container {container} is in the root cgroup: attaching there would give every \
         process on the host its rules; run it with a cgroup of its own (not --cgroups=disabled)"
    )]
    RootCgroup { container: String },
    #[error(
        "container {container} is in cgroup {}, which holds this hook (the runtime) too: the \
         runtime has not given the container a cgroup of its own (--cgroups=disabled?); \
         attaching there would give the runtime and its other children the rules",
        cgroup.display()
    )]
    RuntimeCgroup { container: String, cgroup: PathBuf },
}

impl OciError {
    /// Whether the runtime or the caller gave us something wrong (exit 2),
    /// rather than the host failing (exit 1). Either way a createRuntime
    /// hook then fails and the container does not start.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::EmptyState
                | Self::StateTooLarge { .. }
                | Self::BadState(_)
                | Self::UnknownStage(_)
                | Self::UnsupportedStage { .. }
                | Self::BadInstanceName { .. }
                | Self::NoPid { .. }
        )
    }
}

/// A process in messages: a container's pid, or the hook itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pid {
    Of(u32),
    /// `/proc/self`: the hook, which runs in its runtime's cgroup.
    This,
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Of(pid) => write!(f, "{pid}"),
            Self::This => f.write_str("self"),
        }
    }
}

/// Reads the state the runtime writes to stdin: at most
/// [`MAX_STATE_BYTES`], one JSON object.
pub fn read_state(input: impl Read) -> Result<OciState, OciError> {
    let mut bytes = Vec::new();
    input
        .take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(OciError::ReadState)?;
    parse_state(&bytes)
}

/// Parses state JSON (see [`read_state`]).
pub fn parse_state(bytes: &[u8]) -> Result<OciState, OciError> {
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(OciError::StateTooLarge {
            limit: MAX_STATE_BYTES,
        });
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(OciError::EmptyState);
    }
    serde_json::from_slice(bytes).map_err(OciError::BadState)
}

/// The instance a container asks for: its [`ANNOTATION`], when present and
/// not empty (hooks.d matches `.+`, so an empty value is "not asked").
pub fn instance_name(state: &OciState) -> Option<&str> {
    state
        .annotations
        .get(ANNOTATION)
        .map(String::as_str)
        .filter(|name| !name.is_empty())
}

/// The cgroup v2 directory of process `pid`: the `0::` line of
/// /proc/PID/cgroup joined to `cgroup2_mount` (the hook's view of the
/// hierarchy; see [`cgroup::cgroup2_mount`]).
pub fn cgroup_of_pid(pid: u32, cgroup2_mount: &Path) -> Result<PathBuf, OciError> {
    let text = System.proc_cgroup(Pid::Of(pid))?;
    cgroup_in(&text, Pid::Of(pid), cgroup2_mount)
}

/// [`cgroup::unified_line`] of `proc_cgroup` as a directory under `cgroup2_mount`,
/// refusing what cannot be that directory.
fn cgroup_in(proc_cgroup: &str, pid: Pid, cgroup2_mount: &Path) -> Result<PathBuf, OciError> {
    let path = cgroup::unified_line(proc_cgroup).ok_or(OciError::NoUnifiedLine { pid })?;
    // The kernel appends this to the v2 path of a removed cgroup (a
    // process can outlive its cgroup's rmdir only as a zombie).
    if path.ends_with(" (deleted)") {
        return Err(OciError::DeletedCgroup {
            pid,
            path: path.to_owned(),
        });
    }
    // Paths are relative to the reader's cgroup namespace root: a process
    // outside it shows as `/../..`. That is no directory under our mount.
    let relative = Path::new(path);
    if !relative.is_absolute()
        || relative
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(OciError::OutsideNamespace {
            pid,
            path: path.to_owned(),
        });
    }
    Ok(cgroup2_mount.join(relative.strip_prefix("/").unwrap_or(relative)))
}

/// What [`plan`] reads from the host. [`System`] reads /proc and
/// /proc/mounts; the unit tests answer from captured files.
pub trait Host {
    /// The text of /proc/PID/cgroup, or /proc/self/cgroup for [`Pid::This`].
    fn proc_cgroup(&self, pid: Pid) -> Result<String, OciError>;
    /// Where cgroup2 is mounted in the hook's mount namespace.
    fn cgroup2_mount(&self) -> Result<PathBuf, OciError>;
}

/// The host the hook runs on.
#[derive(Clone, Copy, Debug, Default)]
pub struct System;

impl Host for System {
    fn proc_cgroup(&self, pid: Pid) -> Result<String, OciError> {
        let path = match pid {
            Pid::Of(n) => format!("/proc/{n}/cgroup"),
            Pid::This => "/proc/self/cgroup".to_owned(),
        };
        fs::read_to_string(path).map_err(|source| match (pid, source.raw_os_error()) {
            // ESRCH: the pid directory exists but the task is exiting.
            (Pid::Of(n), _) if source.kind() == io::ErrorKind::NotFound => {
                OciError::ProcessGone { pid: n }
            }
            (Pid::Of(n), Some(libc::ESRCH)) => OciError::ProcessGone { pid: n },
            _ => OciError::ProcCgroup { pid, source },
        })
    }

    fn cgroup2_mount(&self) -> Result<PathBuf, OciError> {
        Ok(cgroup::cgroup2_mount()?)
    }
}

/// Decides what the hook does at `stage` for the container `state`
/// describes. `Err` at createRuntime makes the runtime refuse to start the
/// container (see the module doc); it is only returned for a container that
/// carries the annotation.
pub fn plan(stage: Stage, state: &OciState, host: &impl Host) -> Result<HookAction, OciError> {
    let container = state.id.clone();
    let Some(name) = instance_name(state) else {
        return Ok(HookAction::Nothing(Skip::NotAnnotated { container }));
    };
    let instance = match (InstanceName::new(name), stage) {
        (Ok(instance), _) => instance,
        (Err(_), Stage::Poststop) => {
            return Ok(HookAction::Nothing(Skip::BadInstanceName {
                container,
                name: name.to_owned(),
            }));
        }
        (Err(source), Stage::CreateRuntime) => {
            return Err(OciError::BadInstanceName {
                container,
                name: name.to_owned(),
                source,
            });
        }
    };
    match stage {
        Stage::Poststop => Ok(HookAction::Detach {
            instance,
            container,
        }),
        Stage::CreateRuntime => {
            // 0 is no process (a runtime that leaves the field zeroed).
            let pid = state
                .pid
                .filter(|&pid| pid != 0)
                .ok_or_else(|| OciError::NoPid {
                    container: container.clone(),
                })?;
            let mount = host.cgroup2_mount()?;
            let cgroup = cgroup_in(&host.proc_cgroup(Pid::Of(pid))?, Pid::Of(pid), &mount)?;
            if cgroup == mount {
                return Err(OciError::RootCgroup { container });
            }
            let hook = cgroup_in(&host.proc_cgroup(Pid::This)?, Pid::This, &mount)?;
            if hook.starts_with(&cgroup) {
                return Err(OciError::RuntimeCgroup { container, cgroup });
            }
            Ok(HookAction::Attach {
                instance,
                cgroup,
                container,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured on the development VM (Linux 6.18, Debian 12): podman 4.3.1
    // with runc 1.1.5 and crun 1.8.1, `podman run --rm --annotation
    // io.rulebpf.instance=gateway ...`, by a hook that copied its stdin.
    // runc says `creating` at createRuntime, crun `created` and adds `root`.
    const RUNC_CREATE_RUNTIME: &str = r#"{"ociVersion":"1.0.2-dev","id":"51940a16f34095d6f3999bed7ecbe1a03f822bc3694f97aa01f0d69a01ceec88","status":"creating","pid":10017,"bundle":"/var/lib/containers/storage/overlay-containers/51940a16f34095d6f3999bed7ecbe1a03f822bc3694f97aa01f0d69a01ceec88/userdata","annotations":{"io.container.manager":"libpod","io.kubernetes.cri-o.Created":"2026-11-21T11:56:39.747515917Z","io.kubernetes.cri-o.TTY":"false","io.podman.annotations.autoremove":"TRUE","io.podman.annotations.init":"FALSE","io.podman.annotations.privileged":"FALSE","io.podman.annotations.publish-all":"FALSE","io.rulebpf.instance":"gateway","org.opencontainers.image.stopSignal":"15"}}"#;
    const CRUN_CREATE_RUNTIME: &str = r#"{"ociVersion":"1.0","id":"0fc12f18ae792b328b21ddc7ba086d75c862ed05aa1d6231d13ed6bb5e3024e3","pid":10138,"root":"/var/lib/containers/storage/overlay/8868ba70a8196a7a0b7e616747adb09db78275378b8e76fde952cd475f5d058e/merged","bundle":"/var/lib/containers/storage/overlay-containers/0fc12f18ae792b328b21ddc7ba086d75c862ed05aa1d6231d13ed6bb5e3024e3/userdata","status":"created","annotations":{"io.container.manager":"libpod","io.kubernetes.cri-o.Created":"2026-11-21T11:56:40.182380166Z","io.kubernetes.cri-o.TTY":"false","io.podman.annotations.autoremove":"TRUE","io.podman.annotations.init":"FALSE","io.podman.annotations.privileged":"TRUE","io.podman.annotations.publish-all":"FALSE","io.rulebpf.instance":"gateway","org.opencontainers.image.stopSignal":"15"}}"#;
    // podman runs poststop itself (`podman container cleanup`): no pid, the
    // annotation still there.
    const PODMAN_POSTSTOP: &str = r#"{"ociVersion":"1.0.2-dev","id":"0fc12f18ae792b328b21ddc7ba086d75c862ed05aa1d6231d13ed6bb5e3024e3","status":"stopped","bundle":"/var/lib/containers/storage/overlay-containers/0fc12f18ae792b328b21ddc7ba086d75c862ed05aa1d6231d13ed6bb5e3024e3/userdata","annotations":{"io.kubernetes.cri-o.TTY":"false","io.podman.annotations.autoremove":"TRUE","io.podman.annotations.init":"FALSE","io.podman.annotations.privileged":"TRUE","io.podman.annotations.publish-all":"FALSE","io.rulebpf.instance":"gateway"}}"#;
    // /proc/10017/cgroup of the runc container above, on a hybrid host
    // (podman in a mount namespace with cgroup2 at /sys/fs/cgroup).
    const HYBRID_PROC_CGROUP: &str = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n6:freezer:/\n\
        5:devices:/\n4:memory:/process_api/6d4f56cde0d7338e163a4e3d13d0c453\n3:cpuset:/\n\
        2:cpuacct:/\n1:cpu:/\n\
        0::/libpod_parent/libpod-51940a16f34095d6f3999bed7ecbe1a03f822bc3694f97aa01f0d69a01ceec88\n";
    const RUNC_ID: &str = "51940a16f34095d6f3999bed7ecbe1a03f822bc3694f97aa01f0d69a01ceec88";

    /// A host answering from fixed texts.
    struct Fake {
        mount: &'static str,
        container: Result<&'static str, fn() -> OciError>,
        hook: &'static str,
    }

    impl Fake {
        fn new(container: &'static str) -> Self {
            Self {
                mount: "/sys/fs/cgroup",
                container: Ok(container),
                hook: "0::/\n",
            }
        }
    }

    impl Host for Fake {
        fn proc_cgroup(&self, pid: Pid) -> Result<String, OciError> {
            match pid {
                Pid::This => Ok(self.hook.to_owned()),
                Pid::Of(_) => self.container.map(str::to_owned).map_err(|e| e()),
            }
        }
        fn cgroup2_mount(&self) -> Result<PathBuf, OciError> {
            Ok(PathBuf::from(self.mount))
        }
    }

    fn state(json: &str) -> OciState {
        parse_state(json.as_bytes()).unwrap()
    }

    fn name(s: &str) -> InstanceName {
        InstanceName::new(s).unwrap()
    }

    #[test]
    fn reads_the_state_runc_and_crun_write_at_create_runtime() {
        let runc = state(RUNC_CREATE_RUNTIME);
        assert_eq!(runc.id, RUNC_ID);
        assert_eq!(runc.status, "creating");
        assert_eq!(runc.pid, Some(10017));
        assert_eq!(instance_name(&runc), Some("gateway"));
        let crun = state(CRUN_CREATE_RUNTIME);
        assert_eq!((crun.status.as_str(), crun.pid), ("created", Some(10138)));
        assert_eq!(crun.oci_version, "1.0");
        assert!(crun.bundle.unwrap().ends_with("userdata"));
    }

    #[test]
    fn reads_podmans_poststop_state_without_a_pid() {
        let stop = state(PODMAN_POSTSTOP);
        assert_eq!((stop.status.as_str(), stop.pid), ("stopped", None));
        assert_eq!(instance_name(&stop), Some("gateway"));
    }

    #[test]
    fn refuses_what_is_not_one_state_object_with_the_reason() {
        let read = |bytes: &[u8]| read_state(bytes).unwrap_err();
        assert!(matches!(read(b""), OciError::EmptyState));
        assert!(matches!(read(b" \n"), OciError::EmptyState));
        assert!(matches!(read(b"{not json"), OciError::BadState(_)));
        let missing_id = read(br#"{"ociVersion":"1.0.2","status":"creating"}"#);
        let OciError::BadState(e) = &missing_id else {
            panic!("{missing_id:?}")
        };
        assert!(e.to_string().contains("missing field `id`"), "{e}");
        assert!(missing_id.is_bad_input());
        // A stream longer than the limit is refused, not read to its end.
        let huge = io::repeat(b' ').take(10 * MAX_STATE_BYTES);
        assert!(matches!(
            read_state(huge).unwrap_err(),
            OciError::StateTooLarge {
                limit: MAX_STATE_BYTES
            }
        ));
        let mut padded = RUNC_CREATE_RUNTIME.as_bytes().to_vec();
        padded.resize(MAX_STATE_BYTES as usize, b' ');
        assert_eq!(read_state(&padded[..]).unwrap().id, RUNC_ID);
    }

    #[test]
    fn an_empty_annotation_asks_for_nothing() {
        let mut s = state(RUNC_CREATE_RUNTIME);
        s.annotations.insert(ANNOTATION.into(), String::new());
        assert_eq!(instance_name(&s), None);
        s.annotations.remove(ANNOTATION);
        assert_eq!(instance_name(&s), None);
    }

    #[test]
    fn stages_are_parsed_and_the_wrong_ones_explained() {
        assert_eq!(
            "createRuntime".parse::<Stage>().unwrap(),
            Stage::CreateRuntime
        );
        assert_eq!("poststop".parse::<Stage>().unwrap(), Stage::Poststop);
        assert_eq!(Stage::CreateRuntime.to_string(), "createRuntime");
        let why = |s: &str| s.parse::<Stage>().unwrap_err().to_string();
        assert!(why("poststart").contains("after the container's program started"));
        assert!(why("createContainer").contains("container's namespaces"));
        assert!(why("startContainer").contains("container's namespaces"));
        assert!(why("prestart").contains("deprecated"));
        assert_eq!(
            why("createruntime"),
            "unknown hook stage `createruntime`: rulebpf handles createRuntime and poststop"
        );
        assert!("prestart".parse::<Stage>().unwrap_err().is_bad_input());
    }

    #[test]
    fn finds_the_v2_line_among_v1_lines() {
        let mount = Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            cgroup_in(HYBRID_PROC_CGROUP, Pid::Of(1), mount).unwrap(),
            mount.join(format!("libpod_parent/libpod-{RUNC_ID}"))
        );
        assert_eq!(
            cgroup_in(
                "0::/system.slice/x.scope\n",
                Pid::Of(1),
                Path::new("/sys/fs/cgroup")
            )
            .unwrap(),
            Path::new("/sys/fs/cgroup/system.slice/x.scope")
        );
        assert_eq!(cgroup::unified_line("0::/\n"), Some("/"));
    }

    #[test]
    fn refuses_cgroup_lines_that_name_no_directory_of_ours() {
        let mount = Path::new("/sys/fs/cgroup");
        let err = |text: &str| cgroup_in(text, Pid::Of(7), mount).unwrap_err();
        assert!(matches!(
            err("4:memory:/a\n1:cpu:/\n"),
            OciError::NoUnifiedLine { pid: Pid::Of(7) }
        ));
        assert!(matches!(
            err("0::/gone (deleted)\n"),
            OciError::DeletedCgroup { .. }
        ));
        // What a process in another cgroup namespace's subtree looks like
        // (measured: a createContainer hook reading the host's pid 1).
        assert!(matches!(
            err("0::/../..\n"),
            OciError::OutsideNamespace { .. }
        ));
        assert!(matches!(
            err("0::relative\n"),
            OciError::OutsideNamespace { .. }
        ));
    }

    #[test]
    fn create_runtime_attaches_the_named_instance_to_the_containers_cgroup() {
        let action = plan(
            Stage::CreateRuntime,
            &state(RUNC_CREATE_RUNTIME),
            &Fake::new(HYBRID_PROC_CGROUP),
        )
        .unwrap();
        assert_eq!(
            action,
            HookAction::Attach {
                instance: name("gateway"),
                cgroup: PathBuf::from(format!("/sys/fs/cgroup/libpod_parent/libpod-{RUNC_ID}")),
                container: RUNC_ID.into(),
            }
        );
    }

    #[test]
    fn a_container_without_the_annotation_is_left_alone_at_every_stage() {
        let mut s = state(CRUN_CREATE_RUNTIME);
        s.annotations.remove(ANNOTATION);
        // Not even /proc is read: a host that fails on every question.
        struct Refusing;
        impl Host for Refusing {
            fn proc_cgroup(&self, _: Pid) -> Result<String, OciError> {
                panic!("read /proc for an unannotated container")
            }
            fn cgroup2_mount(&self) -> Result<PathBuf, OciError> {
                panic!("read /proc/mounts for an unannotated container")
            }
        }
        for stage in [Stage::CreateRuntime, Stage::Poststop] {
            let action = plan(stage, &s, &Refusing).unwrap();
            let HookAction::Nothing(skip) = action else {
                panic!("{action:?}")
            };
            assert_eq!(
                skip,
                Skip::NotAnnotated {
                    container: s.id.clone()
                }
            );
            assert!(
                skip.to_string()
                    .contains("no io.rulebpf.instance annotation")
            );
        }
    }

    #[test]
    fn create_runtime_fails_closed_for_an_annotated_container() {
        let s = state(RUNC_CREATE_RUNTIME);
        let fail = |s: &OciState, host: &Fake| plan(Stage::CreateRuntime, s, host).unwrap_err();

        let mut bad = s.clone();
        bad.annotations.insert(ANNOTATION.into(), "a/b".into());
        let e = fail(&bad, &Fake::new(HYBRID_PROC_CGROUP));
        assert!(matches!(e, OciError::BadInstanceName { .. }), "{e:?}");
        assert!(e.to_string().contains(RUNC_ID));

        let mut no_pid = s.clone();
        no_pid.pid = None;
        assert!(matches!(
            fail(&no_pid, &Fake::new(HYBRID_PROC_CGROUP)),
            OciError::NoPid { .. }
        ));
        no_pid.pid = Some(0);
        assert!(matches!(
            fail(&no_pid, &Fake::new(HYBRID_PROC_CGROUP)),
            OciError::NoPid { .. }
        ));

        let gone = Fake {
            container: Err(|| OciError::ProcessGone { pid: 10017 }),
            ..Fake::new("")
        };
        assert!(matches!(
            fail(&s, &gone),
            OciError::ProcessGone { pid: 10017 }
        ));
    }

    #[test]
    fn never_widens_the_rules_beyond_the_container() {
        let s = state(CRUN_CREATE_RUNTIME);
        let fail = |host: Fake| plan(Stage::CreateRuntime, &s, &host).unwrap_err();
        // In the root cgroup: every process on the host.
        assert!(matches!(
            fail(Fake::new("0::/\n")),
            OciError::RootCgroup { .. }
        ));
        // Measured with `podman --cgroups=disabled` from a shell in
        // /oci-exp-shell: the container stays in the caller's cgroup, where
        // the hook runs too.
        let shared = Fake {
            hook: "0::/oci-exp-shell\n",
            ..Fake::new("0::/oci-exp-shell\n")
        };
        let e = fail(shared);
        assert!(matches!(e, OciError::RuntimeCgroup { .. }), "{e:?}");
        assert!(
            e.to_string().contains("/sys/fs/cgroup/oci-exp-shell"),
            "{e}"
        );
        // A container cgroup above the runtime's would cover it as well.
        let above = Fake {
            hook: "0::/pod/conmon\n",
            ..Fake::new("0::/pod\n")
        };
        assert!(matches!(fail(above), OciError::RuntimeCgroup { .. }));
        // Beside or below the runtime's cgroup is fine.
        let beside = Fake {
            hook: "0::/pod/conmon\n",
            ..Fake::new("0::/pod/ctr\n")
        };
        assert!(plan(Stage::CreateRuntime, &s, &beside).is_ok());
        let below = Fake {
            hook: "0::/user.slice/session.scope\n",
            ..Fake::new("0::/user.slice/session.scope/libpod-x\n")
        };
        assert!(plan(Stage::CreateRuntime, &s, &below).is_ok());
    }

    #[test]
    fn poststop_detaches_what_create_runtime_attached_for_the_container() {
        let s = state(PODMAN_POSTSTOP);
        let action = plan(Stage::Poststop, &s, &Fake::new("unused")).unwrap();
        assert_eq!(
            action,
            HookAction::Detach {
                instance: name("gateway"),
                container: s.id.clone(),
            }
        );
        // A name createRuntime refused: nothing was attached, nothing to do.
        let mut bad = s.clone();
        bad.annotations.insert(ANNOTATION.into(), "../x".into());
        assert!(matches!(
            plan(Stage::Poststop, &bad, &Fake::new("unused")).unwrap(),
            HookAction::Nothing(Skip::BadInstanceName { .. })
        ));
    }

    #[test]
    fn reads_its_own_cgroup_from_proc() {
        // Whatever this test process's cgroup, the v2 line is there and it
        // lies under the mount.
        let text = System.proc_cgroup(Pid::This).unwrap();
        let mount = Path::new("/mnt/cgroup2");
        assert!(
            cgroup_in(&text, Pid::This, mount)
                .unwrap()
                .starts_with(mount)
        );
        assert!(matches!(
            cgroup_of_pid(u32::MAX, mount).unwrap_err(),
            OciError::ProcessGone { pid: u32::MAX }
        ));
    }
}
