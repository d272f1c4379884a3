//! `rulebpf nri`: the Kubernetes agent, an NRI plugin of the container
//! runtime, reconnecting whenever the runtime restarts.

use std::{cell::RefCell, path::PathBuf, thread, time::Duration};

use clap::Args;
use rulebpf_loader::{
    instance,
    integrations::nri::{
        plugin::{DEFAULT_SOCKET, Ended, Plugin},
        pods::{Scope, Selector},
    },
    kernel::guard::{self, Guard},
    sys::cgroup::{Cgroup, cgroup2_mount},
};

use super::CliError;

#[derive(Args, Debug)]
pub struct NriArgs {
    /// The runtime's NRI socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Only pods with this label too (KEY=VALUE), besides the annotation.
    #[arg(long, value_parser = parse_selector)]
    selector: Option<Selector>,
    /// Only pods of this namespace may name an instance (repeatable; none:
    /// every namespace). An annotated pod of another one is refused: the
    /// annotation is written by whoever writes the pod.
    #[arg(long = "namespace")]
    namespaces: Vec<String>,
    /// The plugin's two-digit index: its place among the runtime's NRI
    /// plugins.
    #[arg(long, default_value = "50", value_parser = parse_index)]
    index: String,
    /// Written once the pods already running were handled (a readiness
    /// probe can test for it).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// The parent cgroup of the node's pods (the kubelet's `kubepods`, or
    /// `kubepods.slice`): a guard there refuses the connects of pods the
    /// plugin has not seen (started while it was down) until it finds
    /// them. Attached once the running pods are admitted; it stays when
    /// the plugin stops (`--remove-guard` takes it off).
    #[arg(long)]
    guard: Option<PathBuf>,
    /// Take the guard off --guard CG (and remove its pinned map), then
    /// exit.
    #[arg(long, requires = "guard")]
    remove_guard: bool,
    /// error, warn, info (a line per pod it acts on) or debug.
    #[arg(long, default_value = "info")]
    log_level: log::LevelFilter,
}

/// How long to wait before connecting again to a runtime that closed the
/// socket or is not there (yet).
const RECONNECT: Duration = Duration::from_secs(1);

pub fn nri(args: NriArgs) -> Result<(), CliError> {
    super::service_logger(args.log_level);
    if args.remove_guard {
        let path = args.guard.as_deref().expect("required by clap");
        let cgroup = Cgroup::resolve(path)?;
        let removed = guard::remove(&cgroup)?;
        instance::remove_guard_dir()?;
        println!(
            "pods' guard off {} ({removed} programs)",
            cgroup.path.display()
        );
        return Ok(());
    }
    let guard = match &args.guard {
        Some(path) => {
            let cgroup = Cgroup::resolve(path)?;
            let guard = Guard::load(&instance::guard_dir()?, &cgroup, &cgroup2_mount()?)?;
            Some(RefCell::new(guard))
        }
        None => None,
    };
    let plugin = Plugin {
        socket: args.socket,
        name: "rulebpf".into(),
        index: args.index,
        scope: Scope {
            selector: args.selector,
            namespaces: args.namespaces,
        },
        ready_file: args.ready_file,
        guard,
        synced: RefCell::default(),
        sandboxes: RefCell::default(),
    };
    if let Some(ready) = &plugin.ready_file {
        // Left by a plugin that was killed: not ready until synchronized.
        let _ = std::fs::remove_file(ready);
    }
    loop {
        match plugin.serve() {
            Ok(Ended::Shutdown) => {
                log::info!("the runtime asked the plugin to stop");
                return Ok(());
            }
            Ok(Ended::Closed) => {
                log::warn!("the runtime closed the NRI connection; connecting again")
            }
            Err(e) => log::warn!("{e}; connecting again in {RECONNECT:?}"),
        }
        if let Some(ready) = &plugin.ready_file {
            // Not ready while not connected: pods started now are not seen.
            let _ = std::fs::remove_file(ready);
        }
        thread::sleep(RECONNECT);
    }
}

fn parse_selector(text: &str) -> Result<Selector, String> {
    let (key, value) = text
        .split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{text:?}: expected KEY=VALUE"))?;
    Ok(Selector {
        key: key.into(),
        value: value.into(),
    })
}

fn parse_index(text: &str) -> Result<String, String> {
    if text.len() == 2 && text.bytes().all(|b| b.is_ascii_digit()) {
        Ok(text.into())
    } else {
        Err(format!("{text:?}: the index is two digits, 00 to 99"))
    }
}
