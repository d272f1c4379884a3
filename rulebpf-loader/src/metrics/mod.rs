//! Prometheus metrics of `rulebpf run` on `GET /metrics`: the kernel's
//! per-rule counters (read at scrape time from the pinned stats map, the
//! same numbers as `rulebpf stats`) and the service's own counters, in the
//! OpenMetrics text format of the `prometheus-client` crate.
//!
//! The endpoint faces whatever can reach its address, so every resource a
//! client can make it hold is bounded ([`Limits`]):
//!
//! * connections: at most `max_connections` at once; the next ones are
//!   closed as soon as they are accepted;
//! * time: the request head must arrive within `header_timeout` (hyper's
//!   `header_read_timeout`) and the whole exchange end within
//!   `request_timeout`; one request per connection (no keep-alive);
//! * memory: a request head is at most 16 KiB (hyper's `max_buf_size`);
//!   the exposition (34 MB for 100,000 rules) is rendered only for a valid
//!   `GET /metrics`, at most once per `render_interval`, and shared by every
//!   response: at most two renderings exist at once, however many clients
//!   read them slowly (the newest is served again rather than a third made);
//! * accept errors (EMFILE, ENFILE, ...) are logged and retried after
//!   100 ms: the endpoint never stops serving.

//!
//! `exposition` renders the text; `server` is the bounded HTTP endpoint.

mod exposition;
mod server;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use rulebpf_common::Outcome;

use tokio::net::TcpListener;

pub use exposition::exposition;
pub use server::Limits;

use crate::instance::Instance;

/// Counters the service keeps itself.
#[derive(Debug, Default)]
pub struct Metrics {
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    dns_refreshes: AtomicU64,
    dns_failures: AtomicU64,
    reattaches: AtomicU64,
    /// Decision events this service read (`--events-log`), by outcome.
    events: [AtomicU64; Outcome::ALL.len()],
    /// Events this service's log missed (it fell behind its reader).
    events_missed: AtomicU64,
    /// Connections whose origin port NAT rewrote, by rule line.
    nat_rewrites: Mutex<BTreeMap<u32, u64>>,
}

impl Metrics {
    pub fn reloaded(&self, ok: bool) {
        let counter = if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn reattached(&self, count: u64) {
        self.reattaches.fetch_add(count, Relaxed);
    }

    /// One decision event read (by its outcome's name).
    pub fn event(&self, outcome: &str, rewritten_line: Option<u32>) {
        if let Some(i) = Outcome::ALL.iter().position(|o| o.name() == outcome) {
            self.events[i].fetch_add(1, Relaxed);
        }
        if let Some(line) = rewritten_line
            && let Ok(mut rewrites) = self.nat_rewrites.lock()
        {
            *rewrites.entry(line).or_default() += 1;
        }
    }

    pub fn events_missed(&self, count: u64) {
        self.events_missed.fetch_add(count, Relaxed);
    }

    /// What the events families show, now (`ring`: the hooks' written and
    /// dropped counts, when the instance has event maps).
    fn event_figures(&self, ring: Option<(u64, u64)>) -> EventFigures {
        EventFigures {
            by_outcome: Outcome::ALL
                .iter()
                .zip(&self.events)
                .map(|(o, n)| (o.name(), n.load(Relaxed)))
                .collect(),
            missed: self.events_missed.load(Relaxed),
            ring,
            nat_rewrites: self
                .nat_rewrites
                .lock()
                .map(|r| r.iter().map(|(l, n)| (*l, *n)).collect())
                .unwrap_or_default(),
        }
    }

    pub fn dns_refreshed(&self, failures: u64) {
        self.dns_refreshes.fetch_add(1, Relaxed);
        self.dns_failures.fetch_add(failures, Relaxed);
    }
}

/// The decision-event counters of one scrape.
#[derive(Clone, Debug, Default)]
pub struct EventFigures {
    pub by_outcome: Vec<(&'static str, u64)>,
    /// Lines this service's reader could not keep up with.
    pub missed: u64,
    /// The hooks' events written and dropped (ring full).
    pub ring: Option<(u64, u64)>,
    /// Rule line -> connections whose origin port NAT rewrote.
    pub nat_rewrites: Vec<(u32, u64)>,
}

/// Answers scrapes for `instance` until the task is dropped.
pub async fn serve(listener: TcpListener, instance: Arc<Instance>, metrics: Arc<Metrics>) {
    let render = move || {
        let rows = instance.stats().map(|(_, rows)| rows);
        let events = metrics.event_figures(instance.event_counts().ok().flatten());
        exposition(
            instance.name().as_str(),
            rows.as_deref().ok(),
            &metrics,
            &events,
        )
    };
    server::serve_with(listener, Limits::default(), render).await
}
