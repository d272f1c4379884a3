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

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::Relaxed},
};

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

    pub fn dns_refreshed(&self, failures: u64) {
        self.dns_refreshes.fetch_add(1, Relaxed);
        self.dns_failures.fetch_add(failures, Relaxed);
    }
}

/// Answers scrapes for `instance` until the task is dropped.
pub async fn serve(listener: TcpListener, instance: Arc<Instance>, metrics: Arc<Metrics>) {
    let render = move || {
        let rows = instance.stats().map(|(_, rows)| rows);
        exposition(instance.name().as_str(), rows.as_deref().ok(), &metrics)
    };
    server::serve_with(listener, Limits::default(), render).await
}
