//! `rulebpf run`: the foreground service that keeps a cgroup's rules current
//! for months.
//!
//! * **Start**: attaches, or adopts the instance already pinned for the cgroup.
//!   Adopting is a swap on the existing link, so enforcement never has a gap.
//! * **Live reload**: the rule file's directory is watched (inotify), so
//!   editors that write a new file and rename it are seen too; SIGHUP forces a
//!   reload. An invalid file is logged with every `file:line:col` error and
//!   changes nothing.
//! * **DNS refresh**: every name is re-resolved once per refresh interval;
//!   a changed answer swaps in the recompiled rules; a failed lookup keeps the
//!   last good answer.
//! * **Kernel log**: aya-log lines of the hook are printed at `--log-level`.
//! * **Exit**: SIGTERM/SIGINT leave the rules in force (`--detach-on-exit`
//!   removes them). After `kill -9` they stay in force too, being pinned.
//!
//! Every change goes through [`Instance::apply`]: one atomic swap.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use aya_log::EbpfLogger;
use log::{error, info, warn};
use notify::Watcher as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use rulebpf_rules::{
    resolve::{self, Names},
    rule::Rule,
    ruleset::{RuleFileError, RuleSet},
};

use crate::{
    cgroup::Cgroup,
    instance::{Applied, Instance, InstanceError},
    metrics::{self, Metrics},
    object::LoadOptions,
    state::{Reload, unix_now},
};

/// The reader of the hook's aya-log ring buffer, printing through `log`.
type KernelLog = EbpfLogger<&'static dyn log::Log>;

/// How to run the service.
#[derive(Clone, Debug)]
pub struct Options {
    pub cgroup: Cgroup,
    pub rules_path: PathBuf,
    pub load: LoadOptions,
    pub dns_refresh: Duration,
    pub metrics_listen: Option<SocketAddr>,
    pub detach_on_exit: bool,
}

/// Why the service could not start, or a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Rules(#[from] RuleFileError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error("watching {} for changes", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("the metrics listener on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("installing the {0} handler")]
    Signal(&'static str, #[source] std::io::Error),
}

/// What the service keeps between events.
struct Service {
    options: Options,
    instance: Instance,
    /// The rules in force (as parsed), for DNS refreshes.
    rules: Vec<Rule>,
    /// Last good answer for every name.
    names: Names,
    metrics: Arc<Metrics>,
}

pub async fn run(options: Options) -> Result<(), ServiceError> {
    // Handlers first: once the pid is recorded below, a supervisor (or a
    // test) may send SIGTERM at once, and the default action would end the
    // process without --detach-on-exit's cleanup.
    let handler = |name, kind| signal(kind).map_err(|e| ServiceError::Signal(name, e));
    let mut hangup = handler("SIGHUP", SignalKind::hangup())?;
    let mut terminate = handler("SIGTERM", SignalKind::terminate())?;
    let mut interrupt = handler("SIGINT", SignalKind::interrupt())?;
    let instance = Instance::of(&options.cgroup);
    let adopting = instance.is_attached();
    let mut service = Service {
        instance: instance.clone(),
        rules: Vec::new(),
        names: Names::new(),
        metrics: Arc::new(Metrics::default()),
        options,
    };
    let cgroup = service.options.cgroup.path.display().to_string();
    info!(
        "{} {cgroup} with {}",
        if adopting {
            "adopting the rules in force on"
        } else {
            "attaching to"
        },
        service.options.rules_path.display()
    );
    if let Err(e) = service.reload("start") {
        if !adopting {
            return Err(e);
        }
        error!(
            "keeping the rules already in force: {}",
            crate::with_causes(&e)
        );
    }
    let (changed_tx, mut changed) = mpsc::channel::<()>(8);
    let _watcher = watch(&service.options.rules_path, changed_tx)?;
    let mut dns_tick = tokio::time::interval(service.options.dns_refresh);
    dns_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    dns_tick.tick().await; // the first tick is immediate: names were just resolved
    if let Some(addr) = service.options.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServiceError::Metrics { addr, source })?;
        info!("serving metrics on http://{addr}/metrics");
        tokio::spawn(metrics::serve(
            listener,
            service.instance.clone(),
            Arc::clone(&service.metrics),
        ));
    }
    let mut logger = service.kernel_logger();
    // Recorded last: `status` says "managed by" once the service answers
    // (signals, file changes, metrics).
    let pid = std::process::id();
    instance.update_service(|s| s.pid = Some(pid))?;

    loop {
        tokio::select! {
            _ = terminate.recv() => { info!("SIGTERM"); break; }
            _ = interrupt.recv() => { info!("SIGINT"); break; }
            _ = hangup.recv() => {
                if service.reload("SIGHUP").is_ok() { logger = service.kernel_logger(); }
            }
            Some(()) = changed.recv() => {
                // Editors write in several steps: let them finish.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while changed.try_recv().is_ok() {}
                if service.reload("file changed").is_ok() { logger = service.kernel_logger(); }
            }
            _ = dns_tick.tick() => {
                if service.refresh_dns().await { logger = service.kernel_logger(); }
            }
            guard = readable(&mut logger) => {
                if let Ok(mut guard) = guard {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            }
        }
    }

    if service.options.detach_on_exit {
        instance.detach()?;
        info!("detached from {cgroup} (--detach-on-exit)");
    } else {
        instance.update_service(|s| s.pid = None)?;
        info!("exiting; the rules stay in force on {cgroup}");
    }
    Ok(())
}

impl Service {
    /// Reads, parses, resolves, compiles and swaps in the rule file.
    fn reload(&mut self, why: &str) -> Result<(), ServiceError> {
        let result = self.try_reload();
        match &result {
            Ok(summary) => {
                self.metrics.reloaded(true);
                info!("{why}: rules in force: {summary}");
            }
            Err(e) => {
                self.metrics.reloaded(false);
                let message = crate::with_causes(e);
                for line in message.lines() {
                    error!("{why}: {line}");
                }
                error!("{why}: nothing changed; the rules in force stay");
                let at = unix_now();
                let _ = self.instance.update_service(|s| {
                    s.last_reload = Some(Reload {
                        at,
                        ok: false,
                        message,
                    })
                });
            }
        }
        result.map(drop)
    }

    fn try_reload(&mut self) -> Result<String, ServiceError> {
        let set = RuleSet::load_keeping(&self.options.rules_path, &self.names)?;
        for failure in &set.stale_names {
            warn!(
                "{} did not resolve ({}); keeping its last answer",
                failure.name, failure.reason
            );
        }
        for failure in &set.name_failures {
            warn!("{} did not resolve: {}", failure.name, failure.reason);
        }
        let applied = self.swap_in(set)?;
        Ok(format!(
            "{} rules, rule set {}, programs {}/{} (connect4/connect6)",
            self.rules.len(),
            applied.state.rule_set.generation,
            applied.state.rule_set.programs.connect4.id,
            applied.state.rule_set.programs.connect6.id,
        ))
    }

    /// Puts `set` in force and remembers what it was built from.
    fn swap_in(&mut self, set: RuleSet) -> Result<Applied, ServiceError> {
        let applied = self
            .instance
            .apply(&self.options.cgroup, &set, self.options.load)?;
        self.rules = set.rules;
        self.names = set.names;
        Ok(applied)
    }

    /// Re-resolves every name; swaps in new rules if an answer changed.
    /// Returns true when the rules were swapped.
    async fn refresh_dns(&mut self) -> bool {
        let wanted = resolve::names_in(&self.rules);
        if wanted.is_empty() {
            return false;
        }
        let (fresh, failures) = tokio::task::spawn_blocking(move || resolve::resolve_all(&wanted))
            .await
            .unwrap_or_default();
        let answers = resolve::keep_last_good(fresh, failures, &self.names);
        for failure in answers.stale.iter().chain(&answers.unresolved) {
            warn!(
                "DNS refresh: {} did not resolve ({}); keeping its last answer",
                failure.name, failure.reason
            );
        }
        let failed = (answers.stale.len() + answers.unresolved.len()) as u64;
        self.metrics.dns_refreshed(failed);
        let _ = self.instance.update_service(|s| {
            s.dns_refreshes += 1;
            s.dns_failures += failed;
        });
        if answers.names == self.names {
            return false;
        }
        for (name, addrs) in &answers.names {
            if self.names.get(name) != Some(addrs) {
                info!("DNS refresh: {name} now resolves to {addrs:?}");
            }
        }
        let swapped = RuleSet::from_parts(
            &self.options.rules_path,
            self.rules.clone(),
            answers.names,
            answers.unresolved,
        )
        .map_err(ServiceError::from)
        .and_then(|set| self.swap_in(set));
        match swapped {
            Ok(applied) => {
                self.metrics.reloaded(true);
                info!(
                    "DNS refresh: rules swapped in (rule set {})",
                    applied.state.rule_set.generation
                );
                true
            }
            Err(e) => {
                self.metrics.reloaded(false);
                error!(
                    "DNS refresh: could not swap the rules: {}",
                    crate::with_causes(&e)
                );
                false
            }
        }
    }

    /// A reader of the kernel log of the program in force (none when the
    /// kernel log is off).
    fn kernel_logger(&self) -> Option<AsyncFd<KernelLog>> {
        if self.options.load.kernel_log == log::LevelFilter::Off {
            return None;
        }
        // The log ring buffer is one map shared by both programs.
        let program_id = self.instance.state().ok()??.rule_set.programs.connect4.id;
        let logger = match EbpfLogger::init_from_id(program_id) {
            Ok(logger) => logger,
            Err(e) => {
                warn!("kernel log unavailable: {e}");
                return None;
            }
        };
        // SAFETY: the logger owns its ring buffer fd and keeps it open for as
        // long as the AsyncFd that owns the logger lives.
        match unsafe { AsyncFd::register(logger) } {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!("kernel log unavailable: {e}");
                None
            }
        }
    }
}

/// Waits until the kernel log has lines (forever when there is no log).
async fn readable<'a>(
    logger: &'a mut Option<AsyncFd<KernelLog>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'a, KernelLog>> {
    match logger {
        Some(fd) => fd.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// Watches the directory of `path` and signals changes to that file.
fn watch(
    path: &Path,
    changed: mpsc::Sender<()>,
) -> Result<notify::RecommendedWatcher, ServiceError> {
    let error = |source| ServiceError::Watch {
        path: path.to_path_buf(),
        source,
    };
    let path = std::path::absolute(path).map_err(|e| error(e.into()))?;
    // A file that exists has a name and a directory (the service read it).
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(error(notify::Error::path_not_found()));
    };
    let (dir, name) = (dir.to_path_buf(), name.to_owned());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !event.kind.is_access()
            && event.paths.iter().any(|p| p.file_name() == Some(&name))
        {
            let _ = changed.try_send(());
        }
    })
    .map_err(error)?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .map_err(error)?;
    Ok(watcher)
}
