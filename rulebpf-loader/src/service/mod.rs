//! `rulebpf run`: the foreground service that keeps an instance's rules
//! current for months, and its cgroups attached.
//!
//! * **Start**: takes the instance's owner lock (one `run` per instance; a
//!   second one refuses to start), creates the instance or adopts it (its
//!   entry programs stay attached: no gap), puts the rules in force, attaches
//!   to the `--cgroup` paths that exist, then tells systemd it is ready
//!   (`Type=notify`).
//! * **Follows its paths** ([`follow`]): a cgroup that goes and comes
//!   back (a restarted unit) is attached again within milliseconds.
//! * **Live reload**: the rule file is watched (inotify on its directory, so
//!   editors that write a new file and rename it are seen too), and only a
//!   whole file is read: one written in place is waited for until its writer
//!   closes it ([`watch`]); SIGHUP forces a reload. An invalid file is
//!   logged with every `file:line:col` error and changes nothing.
//! * **DNS refresh**: every name is re-resolved once per refresh interval; a
//!   changed answer swaps in the recompiled rules; a failed lookup keeps the
//!   last good answer.
//! * **Reloads run off the signal path**: parsing, DNS and the kernel work
//!   run on a blocking thread, so SIGTERM and SIGHUP are acted on at once
//!   whatever a reload is doing. Stopping in the middle of one is safe: the
//!   instance is crash-consistent.
//! * **Kernel log**: aya-log lines of the hook are printed at `--log-level`.
//! * **Exit**: SIGTERM/SIGINT leave the rules in force (`--detach-on-exit`
//!   removes the instance). After `kill -9` they stay in force too.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use log::{error, info, warn};
use rulebpf_rules::{
    LoadLimits,
    resolve::{self, Names},
    rule::Rule,
    ruleset::{RuleFileError, RuleSet},
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    instance::{CommandLock, Instance, InstanceError},
    metrics::{self, Metrics},
    model::{
        name::InstanceName,
        options::{LoadOptions, Sharing},
        records::{AttachedBy, Reload, RuleInfo},
    },
    ops::put_in_force::{Done, Request, Settings, put_in_force_on},
    sys::{ephemeral, nat, notify::notify_systemd, time::unix_now},
};

pub mod events;
mod follow;
mod kernel_log;
mod watch;

use follow::Followed;
use kernel_log::{KernelLog, readable};

/// How to run the service.
#[derive(Clone, Debug)]
pub struct Options {
    pub name: InstanceName,
    /// Cgroup directories to attach to and follow (absolute paths).
    pub cgroups: Vec<PathBuf>,
    pub rules_path: PathBuf,
    /// The settings given; the ones not given stay as the instance has them.
    pub settings: Settings,
    /// Most verbose kernel log level compiled in (`--log-level`).
    pub kernel_log: log::LevelFilter,
    pub dns_refresh: Duration,
    pub metrics_listen: Option<SocketAddr>,
    pub detach_on_exit: bool,
    /// `--reserve-ports`: the rules' origin ranges reserved from the
    /// ephemeral ports after every reload (`None`: as the instance does).
    pub reserve_ports: Option<bool>,
    /// The tuple table of a new instance (`--tuple-capacity`).
    pub tuple_capacity: u32,
    /// How large a rules file and its compiled maps may be.
    pub limits: LoadLimits,
    /// `--events-log`: every decision, one JSON line each.
    pub events_log: Option<events::log_file::EventsLog>,
}

/// Why the service could not start, or a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Rules(#[from] RuleFileError),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Watch(#[from] watch::WatchError),
    #[error("the metrics listener on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("installing the {0} handler")]
    Signal(&'static str, #[source] std::io::Error),
    #[error("instance {0} was removed by another command (detach --force); stopping")]
    Removed(InstanceName),
    #[error("the events log {path}")]
    EventsLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// How many 1 s checks apart the occupancy warning is checked.
const OCCUPANCY_EVERY: u64 = 2;

/// What a reload produced, back on the service's task (`None`: nothing to
/// change, as after a DNS refresh with the same answers).
struct Reloaded {
    why: &'static str,
    result: Result<Option<(RuleSet, Done)>, ServiceError>,
}

/// What the service keeps between events.
struct Service {
    options: Options,
    /// The settings in force: those given, else the instance's (resolved
    /// once at start, so every reload keeps them).
    load: LoadOptions,
    reserve_ports: bool,
    instance: Arc<Instance>,
    /// The rules in force (as parsed), for DNS refreshes.
    rules: Vec<Rule>,
    /// Last good answer for every name.
    names: Names,
    /// The connect4 program this service put in force.
    in_force: Option<u32>,
    metrics: Arc<Metrics>,
    /// Rules with an origin range in force, by key, and the keys of those
    /// already warned about (`run` warns once per rule at 90 % occupancy).
    occupancy: Occupancy,
}

#[derive(Default)]
struct Occupancy {
    ranged: std::collections::HashMap<u64, RuleInfo>,
    warned: std::collections::HashSet<u64>,
}

pub async fn run(options: Options) -> Result<(), ServiceError> {
    // Handlers first: once the service says it is ready, a supervisor (or a
    // test) may send SIGTERM at once, and the default action would end the
    // process without --detach-on-exit's cleanup.
    let handler = |name, kind| signal(kind).map_err(|e| ServiceError::Signal(name, e));
    let mut hangup = handler("SIGHUP", SignalKind::hangup())?;
    let mut terminate = handler("SIGTERM", SignalKind::terminate())?;
    let mut interrupt = handler("SIGINT", SignalKind::interrupt())?;

    let existed = Instance::open(&options.name)?.is_some();
    let instance = Arc::new(Instance::create_with(
        &options.name,
        options.tuple_capacity,
    )?);
    let _owner = instance.take_ownership()?;
    let in_force = instance.in_force()?.set;
    let adopting = in_force.is_some();
    let load = options
        .settings
        .resolve(in_force.as_ref(), options.kernel_log);
    let reserve_ports = options
        .reserve_ports
        .unwrap_or(!instance.record()?.reserved_ports.is_empty());
    // The metrics address first: a busy one is refused before any rule
    // set changes.
    let metrics_listener = match options.metrics_listen {
        Some(addr) => Some((
            addr,
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServiceError::Metrics { addr, source })
                .inspect_err(|_| {
                    if !existed {
                        drop_new_instance(&instance);
                    }
                })?,
        )),
        None => None,
    };
    // The events log too: a path that cannot be written refuses the start.
    let events_log = match &options.events_log {
        Some(log) => Some(
            events::log_file::LogWriter::open(log.clone())
                .map_err(|source| ServiceError::EventsLog {
                    path: format!("{log:?}"),
                    source,
                })
                .inspect_err(|_| {
                    if !existed {
                        drop_new_instance(&instance);
                    }
                })?,
        ),
        None => None,
    };
    info!(
        "{} instance {} with {}",
        if adopting { "adopting" } else { "starting" },
        options.name,
        options.rules_path.display()
    );
    let mut service = Service {
        load,
        reserve_ports,
        instance: Arc::clone(&instance),
        rules: Vec::new(),
        names: Names::new(),
        in_force: None,
        metrics: Arc::new(Metrics::default()),
        occupancy: Occupancy::default(),
        options,
    };
    let first = reload_task(&service, "start").await;
    if let Err(e) = service.finish_reload(first) {
        if !adopting {
            // Nothing was in force: an instance this start made goes
            // again, so that a refused start leaves nothing behind.
            if !existed {
                drop(service);
                drop(_owner);
                drop_new_instance(&instance);
            }
            return Err(e);
        }
        error!(
            "keeping the rules already in force: {}",
            crate::with_causes(&e)
        );
    }

    let (file_tx, mut file_changed) = mpsc::channel::<()>(8);
    let _watcher = watch::watch(&service.options.rules_path, file_tx)?;
    let (cgroup_tx, mut cgroup_changed) = mpsc::channel::<()>(8);
    let mut followed = Followed::new(service.options.cgroups.clone(), cgroup_tx);
    // The first attach waits for the lock: `ready` means attached.
    match CommandLock::acquire(service.instance.name()) {
        Ok(lock) => service.follow_locked(&mut followed, lock),
        Err(e) => warn!("attaching: {}", crate::with_causes(&e)),
    }
    let mut dns_tick = tokio::time::interval(service.options.dns_refresh);
    dns_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    dns_tick.tick().await; // the first tick is immediate: names were just resolved
    let mut check_tick = tokio::time::interval(Duration::from_secs(1));
    check_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Occupancy walks the tuple table (up to its capacity, 65,536 keys by
    // default, some tens of milliseconds): every OCCUPANCY_EVERY checks.
    let mut checks: u64 = 0;
    if let Some((addr, listener)) = metrics_listener {
        info!("serving metrics on http://{addr}/metrics");
        tokio::spawn(metrics::serve(
            listener,
            Arc::clone(&service.instance),
            Arc::clone(&service.metrics),
        ));
    }
    let mut logger = service.kernel_logger();
    let _events = match events_log {
        Some(log) => events_to_log(&service.options.name, log, Arc::clone(&service.metrics)).await,
        None => None,
    };
    notify_systemd("READY=1");
    info!(
        "ready: instance {} in force, following {} cgroup path(s)",
        service.options.name,
        service.options.cgroups.len()
    );

    // One reload at a time; a trigger during one runs once it is done.
    let mut reloading: Option<JoinHandle<Reloaded>> = None;
    let mut pending: Option<&'static str> = None;
    let outcome = loop {
        if reloading.is_none()
            && let Some(why) = pending.take()
        {
            reloading = Some(spawn_reload(&service, why));
        }
        tokio::select! {
            _ = terminate.recv() => { info!("SIGTERM"); break Ok(()); }
            _ = interrupt.recv() => { info!("SIGINT"); break Ok(()); }
            _ = hangup.recv() => pending = Some("SIGHUP"),
            Some(()) = file_changed.recv() => {
                // The watcher reports a file closed by its writer and
                // settled (watch::SETTLE): reload at once.
                while file_changed.try_recv().is_ok() {}
                pending = Some("file changed");
            }
            Some(()) = cgroup_changed.recv() => service.follow(&mut followed),
            _ = check_tick.tick() => {
                service.follow(&mut followed);
                if checks.is_multiple_of(OCCUPANCY_EVERY) {
                    service.check_occupancy();
                    service.collect_gone();
                }
                checks += 1;
                if let Err(e) = service.check_owner() {
                    break Err(e);
                }
            }
            _ = dns_tick.tick() => {
                if reloading.is_none() {
                    reloading = Some(spawn_dns_refresh(&service));
                }
            }
            done = join(&mut reloading) => {
                reloading = None;
                if let Ok(done) = done && service.finish_reload(done).is_ok() {
                    logger = service.kernel_logger();
                }
            }
            guard = readable(&mut logger) => {
                if let Ok(mut guard) = guard {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            }
        }
    };
    notify_systemd("STOPPING=1");
    outcome?;

    if service.options.detach_on_exit {
        let name = service.options.name.clone();
        drop(service);
        drop(_owner);
        if let Some(instance) = Arc::into_inner(instance) {
            instance.remove()?;
        }
        info!("instance {name} removed (--detach-on-exit)");
    } else {
        info!("exiting; the rules stay in force");
    }
    Ok(())
}

/// Starts writing the instance's decisions to `log` and waits (at most
/// 2 s) until they reach it, so that `ready` means recorded. The task ends
/// with the returned guard.
async fn events_to_log(
    name: &InstanceName,
    mut log: events::log_file::LogWriter,
    metrics: Arc<Metrics>,
) -> Option<events::Stop> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    let name = name.clone();
    let task = tokio::spawn(async move {
        let mut line = Vec::new();
        let sink = |delivery: events::Delivery| {
            let wire = match delivery {
                events::Delivery::Wire(wire) => wire,
                events::Delivery::Flush => {
                    if let Err(e) = log.flush() {
                        warn!("events log: {e}");
                    }
                    return true;
                }
            };
            match wire {
                crate::model::event::Wire::Record(record) => {
                    let rewritten = record.nat_port.and(record.line);
                    metrics.event(&record.outcome, rewritten);
                    line.clear();
                    let _ = serde_json::to_writer(&mut line, &record);
                    if let Err(e) = log.write_line(&String::from_utf8_lossy(&line)) {
                        warn!("events log: {e}");
                    }
                }
                crate::model::event::Wire::Dropped { dropped } => metrics.events_missed(dropped),
            }
            true
        };
        let ready = |role| {
            info!("events: logging decisions ({role})");
            if let Some(tx) = ready_tx.take() {
                let _ = tx.send(());
            }
        };
        if let Err(e) = events::listen(&name, events::Wants::default(), sink, ready).await {
            error!("events: {}", crate::with_causes(&e));
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(2), ready_rx).await;
    Some(events::Stop(task))
}

/// Puts `set` in force in the service's instance with the settings in
/// force, under the command lock (so a reload and a command never
/// interleave).
fn put_in_force_locked(
    instance: &Instance,
    set: &RuleSet,
    load: LoadOptions,
    reserve: bool,
) -> Result<Done, InstanceError> {
    let _lock = CommandLock::acquire(instance.name())?;
    put_in_force_on(
        instance,
        &Request {
            name: instance.name(),
            set,
            settings: Settings {
                policy: Some(load.policy),
                sharing: Some(load.sharing),
                app_bound: Some(load.app_bound),
            },
            kernel_log: load.kernel_log,
            tuple_capacity: rulebpf_common::TUPLE_CAPACITY,
            reserve_ports: Some(reserve),
            cgroups: &[],
            by: AttachedBy::Run,
            force: true,
        },
    )
}

/// Removes an instance this service made and could not put in force.
fn drop_new_instance(instance: &Arc<Instance>) {
    let _lock = CommandLock::acquire(instance.name());
    if let Ok(Some(opened)) = Instance::open(instance.name())
        && let Err(e) = opened.remove()
    {
        warn!(
            "removing instance {}: {}",
            instance.name(),
            crate::with_causes(&e)
        );
    }
}

/// Waits for the reload in progress (forever when there is none).
async fn join(reloading: &mut Option<JoinHandle<Reloaded>>) -> Result<Reloaded, ()> {
    match reloading {
        Some(handle) => handle.await.map_err(drop),
        None => std::future::pending().await,
    }
}

/// Reads, parses, resolves, compiles and swaps in the rule file, on a
/// blocking thread.
fn spawn_reload(service: &Service, why: &'static str) -> JoinHandle<Reloaded> {
    let instance = Arc::clone(&service.instance);
    let path = service.options.rules_path.clone();
    let names = service.names.clone();
    let load = service.load;
    let reserve = service.reserve_ports;
    let limits = service.options.limits;
    tokio::task::spawn_blocking(move || Reloaded {
        why,
        result: (|| {
            let set = RuleSet::load_within(&path, &names, &limits)?;
            let done = put_in_force_locked(&instance, &set, load, reserve)?;
            Ok(Some((set, done)))
        })(),
    })
}

async fn reload_task(service: &Service, why: &'static str) -> Reloaded {
    spawn_reload(service, why)
        .await
        .unwrap_or_else(|e| Reloaded {
            why,
            result: Err(ServiceError::Signal(
                "reload",
                std::io::Error::other(e.to_string()),
            )),
        })
}

/// Re-resolves every name and, when an answer changed, swaps in the
/// recompiled rules, on a blocking thread.
fn spawn_dns_refresh(service: &Service) -> JoinHandle<Reloaded> {
    let instance = Arc::clone(&service.instance);
    let path = service.options.rules_path.clone();
    let rules = service.rules.clone();
    let last = service.names.clone();
    let load = service.load;
    let reserve = service.reserve_ports;
    let limits = service.options.limits;
    let metrics = Arc::clone(&service.metrics);
    tokio::task::spawn_blocking(move || {
        let answers = resolve::refresh(&rules, &last);
        for failure in answers.stale.iter().chain(&answers.unresolved) {
            warn!(
                "DNS refresh: {} did not resolve ({}); keeping its last answer",
                failure.name, failure.reason
            );
        }
        let failed = (answers.stale.len() + answers.unresolved.len()) as u64;
        metrics.dns_refreshed(failed);
        let _ = instance.update_service(|s| {
            s.dns_refreshes += 1;
            s.dns_failures += failed;
        });
        let result = if answers.names == last || resolve::names_in(&rules).is_empty() {
            Ok(None)
        } else {
            for (name, addrs) in &answers.names {
                if last.get(name) != Some(addrs) {
                    info!("DNS refresh: {name} now resolves to {addrs:?}");
                }
            }
            // Stale names were warned about above, at every refresh.
            RuleSet::from_parts_within(&path, rules, answers.names, answers.unresolved, &limits)
                .map_err(ServiceError::from)
                .and_then(|set| {
                    let done = put_in_force_locked(&instance, &set, load, reserve)?;
                    Ok(Some((set, done)))
                })
        };
        Reloaded {
            why: "DNS refresh",
            result,
        }
    })
}

impl Service {
    /// Logs and records a reload's outcome; remembers what is in force.
    fn finish_reload(&mut self, done: Reloaded) -> Result<(), ServiceError> {
        let why = done.why;
        match done.result {
            Ok(None) => Ok(()),
            Ok(Some((set, done))) => {
                for failure in &set.stale_names {
                    warn!(
                        "{} did not resolve ({}); keeping its last answer",
                        failure.name, failure.reason
                    );
                }
                for failure in &set.name_failures {
                    warn!("{} did not resolve: {}", failure.name, failure.reason);
                }
                self.metrics.reloaded(true);
                let r = &done.applied.record;
                info!(
                    "{why}: rules in force: {} rules, rule set {}, programs {}/{} (connect4/connect6)",
                    set.rules.len(),
                    r.generation,
                    r.programs.connect4.id,
                    r.programs.connect6.id,
                );
                self.in_force = Some(r.programs.connect4.id);
                let sharing = self.load.sharing == Sharing::On;
                let reserve = self.reserve_ports;
                for warning in ephemeral::warnings(&set, sharing, reserve)
                    .into_iter()
                    .chain(nat::warnings(&set))
                {
                    warn!("{warning}");
                }
                if reserve {
                    info!("reserved from the ephemeral ports: {:?}", done.reserved);
                }
                self.occupancy.ranged = rulebpf_rules::identity::rule_infos(&set)
                    .into_iter()
                    .filter(|r| r.ports > 0)
                    .map(|r| (r.key, r))
                    .collect();
                self.rules = set.rules;
                self.names = set.names;
                Ok(())
            }
            Err(e) => {
                self.metrics.reloaded(false);
                let message = crate::with_causes(&e);
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
                Err(e)
            }
        }
    }

    /// Attaches where a followed cgroup (re)appeared; counts re-attaches.
    /// Skipped while a command holds the command lock (the next check, at
    /// most a second later, attaches).
    fn follow(&self, followed: &mut Followed) {
        if let Some(lock) = CommandLock::try_acquire(self.instance.name()) {
            self.follow_locked(followed, lock);
        }
    }

    fn follow_locked(&self, followed: &mut Followed, _lock: CommandLock) {
        let reattached = followed.check(&self.instance);
        if reattached > 0 {
            self.metrics.reattached(reattached);
            let _ = self.instance.update_service(|s| s.reattaches += reattached);
        }
    }

    /// Removes the attachments of cgroups that are gone (a container whose
    /// start failed after the OCI hook attached it never gets poststop).
    /// Skipped while a command holds the command lock: the next check
    /// comes.
    fn collect_gone(&self) {
        let Some(_lock) = CommandLock::try_acquire(self.instance.name()) else {
            return;
        };
        match self.instance.collect_garbage() {
            Ok(removed) => {
                for a in removed {
                    info!(
                        "removed the attachment to {} (cgroup id {}, gone)",
                        a.cgroup.display(),
                        a.cgroup_id
                    );
                }
            }
            Err(e) => warn!(
                "collecting attachments of gone cgroups: {}",
                crate::with_causes(&e)
            ),
        }
    }

    /// Warns once per rule when its ports in use pass 90 % of its range.
    fn check_occupancy(&mut self) {
        let Ok(occupancy) = self.instance.occupancy() else {
            return;
        };
        for (key, o) in occupancy {
            let Some(rule) = self.occupancy.ranged.get(&key) else {
                continue;
            };
            if o.in_use * 10 >= u64::from(rule.ports) * 9 && self.occupancy.warned.insert(key) {
                let remark = rule
                    .remark
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                warn!(
                    "line {} (`{}`{remark}): {} of its {} origin ports in use (high-water {}); \
                     connects to a destination all of them serve fail with EADDRNOTAVAIL",
                    rule.line, rule.text, o.in_use, rule.ports, o.high_water
                );
            }
        }
    }

    /// Notices what other commands did with `--force`: the instance
    /// removed (the service stops), or other rules put in force (kept until
    /// this service's file changes or SIGHUP).
    fn check_owner(&mut self) -> Result<(), ServiceError> {
        if Instance::open(&self.options.name).ok().flatten().is_none() {
            return Err(ServiceError::Removed(self.options.name.clone()));
        }
        let now = self
            .instance
            .in_force()
            .ok()
            .and_then(|f| f.programs.connect4);
        if self.in_force.is_some() && now != self.in_force {
            warn!(
                "the rules of instance {} were replaced by another command (attach --force); \
                 they stay until the rules file changes or SIGHUP",
                self.options.name
            );
            self.in_force = now;
        }
        Ok(())
    }

    /// A reader of the kernel log of the rule set in force (none when the
    /// kernel log is off).
    fn kernel_logger(&self) -> Option<AsyncFd<KernelLog>> {
        if self.load.kernel_log == log::LevelFilter::Off {
            return None;
        }
        kernel_log::open(self.in_force?)
    }
}
