//! Prometheus metrics of `rulebpf run`, served as text format 0.0.4 on
//! `GET /metrics`: the kernel's per-rule counters (read at scrape time from
//! the pinned stats map, the same numbers as `rulebpf stats`) and the
//! service's reload and DNS counters.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use crate::{instance::Instance, stats::RuleRow};

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

/// Answers scrapes until the listener fails.
pub async fn serve(listener: TcpListener, instance: Arc<Instance>, metrics: Arc<Metrics>) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let body = render(&instance, &metrics);
        tokio::spawn(async move {
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).await.unwrap_or(0);
            let response = if request[..n].starts_with(b"GET /metrics") {
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
            };
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// The exposition text.
pub fn render(instance: &Instance, metrics: &Metrics) -> String {
    let mut out = String::new();
    let mut counter = |name: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    if let Ok((_, rows)) = instance.stats() {
        let name = escape(instance.name().as_str());
        let per_rule = |pick: fn(&RuleRow) -> u64| -> Vec<(String, u64)> {
            rows.iter()
                .map(|row| {
                    let labels = format!(
                        "{{instance=\"{name}\",line=\"{}\",rule=\"{}\"}}",
                        row.line,
                        escape(&row.text)
                    );
                    (labels, pick(row))
                })
                .collect()
        };
        counter(
            "rulebpf_rule_matched_total",
            "connect() calls the rule decided (since the rule was loaded).",
            &per_rule(|s| s.matched),
        );
        counter(
            "rulebpf_rule_bound_total",
            "Sockets bound to an origin port of the rule's range.",
            &per_rule(|s| s.bound),
        );
        counter(
            "rulebpf_rule_exhausted_total",
            "connect() calls for which no origin port of the range was free.",
            &per_rule(|s| s.exhausted),
        );
    }
    let plain = |v: &AtomicU64| vec![(String::new(), v.load(Relaxed))];
    counter(
        "rulebpf_reloads_total",
        "Rule sets swapped in by this service (start, file change, SIGHUP, DNS change).",
        &plain(&metrics.reloads_ok),
    );
    counter(
        "rulebpf_reload_failures_total",
        "Reloads refused (invalid file, kernel error); the rules in force stayed.",
        &plain(&metrics.reloads_failed),
    );
    counter(
        "rulebpf_dns_refreshes_total",
        "Periodic re-resolutions of the rules' DNS names.",
        &plain(&metrics.dns_refreshes),
    );
    counter(
        "rulebpf_reattach_total",
        "Followed cgroups attached again after they were re-created (a restarted unit).",
        &plain(&metrics.reattaches),
    );
    counter(
        "rulebpf_dns_failures_total",
        "Names that failed to resolve during refreshes (last answer kept).",
        &plain(&metrics.dns_failures),
    );
    out
}

/// Label values escape `\`, `"` and newlines.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a "b" \ c"#), r#"a \"b\" \\ c"#);
    }
}
