//! The endpoint: a bounded HTTP/1 server for `GET /metrics` (the bounds:
//! the module documentation of `crate::metrics`).

use std::{
    convert::Infallible,
    future::Future,
    io,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, Version, body::Incoming, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, info, warn};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Mutex, Semaphore},
};

/// What the endpoint lets one client, or all of them, make it hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub request_timeout: Duration,
    /// Scrapes closer together than this get the same rendering.
    pub render_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Prometheus servers scraping one gateway: a handful.
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            // 34 MB to a client on a slow link still fits.
            request_timeout: Duration::from_secs(60),
            render_interval: Duration::from_secs(1),
        }
    }
}

/// Where connections come from: a listener (or, in tests, one that fails).
pub(super) trait Accept: Send + 'static {
    fn accept(&self) -> impl Future<Output = io::Result<TcpStream>> + Send;
}

impl Accept for TcpListener {
    async fn accept(&self) -> io::Result<TcpStream> {
        TcpListener::accept(self).await.map(|(stream, _)| stream)
    }
}

/// The accept loop: `render` makes the exposition (a blocking call).
pub(super) async fn serve_with(
    listener: impl Accept,
    limits: Limits,
    render: impl Fn() -> String + Send + Sync + 'static,
) {
    let bodies = Arc::new(Bodies {
        render: Box::new(render),
        interval: limits.render_interval,
        cache: Mutex::new(Cache::default()),
    });
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let mut failures = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE), a connection reset
                // before it was accepted: none of it is lasting. The pending
                // connection stays queued; retry without spinning.
                if failures == 0 {
                    warn!("metrics: accepting a connection: {e}; retrying every 100 ms");
                }
                failures += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if failures > 0 {
            info!("metrics: accepting connections again after {failures} failed attempts");
            failures = 0;
        }
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            debug!(
                "metrics: more than {} connections; closing the new one",
                limits.max_connections
            );
            continue; // dropping the stream closes it
        };
        let bodies = Arc::clone(&bodies);
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request| respond(Arc::clone(&bodies), request));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            // Dropping the connection at the deadline closes it.
            let _ = tokio::time::timeout(limits.request_timeout, connection).await;
        });
    }
}

/// 200 with the exposition for `GET /metrics`, 404 for another path, 405
/// for another method; nothing is rendered for those.
async fn respond(
    bodies: Arc<Bodies>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status, body: Bytes| {
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        response
    };
    let mut response = if request.uri().path() != "/metrics" {
        reply(
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"only /metrics here\n"),
        )
    } else if request.method() != Method::GET {
        let mut response = reply(StatusCode::METHOD_NOT_ALLOWED, Bytes::new());
        let allow = header::HeaderValue::from_static("GET");
        response.headers_mut().insert(header::ALLOW, allow);
        response
    } else {
        let mut response = reply(StatusCode::OK, bodies.get().await);
        let content_type = header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        );
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
        response
    };
    // An HTTP/1.0 client gets an HTTP/1.0 answer (scripts parse it so).
    if request.version() == Version::HTTP_10 {
        *response.version_mut() = Version::HTTP_10;
    }
    Ok(response)
}

/// The renderings of the exposition, shared by every response.
struct Bodies {
    render: Box<dyn Fn() -> String + Send + Sync>,
    interval: Duration,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// The newest rendering and when it was made.
    newest: Option<(Instant, Bytes)>,
    /// Every rendering, alive while a response (or `newest`) holds it.
    alive: Vec<Weak<String>>,
}

/// Renderings alive at once at the most: what slow clients can pin.
const MAX_ALIVE: usize = 2;

/// A rendering as the bytes of a body; dropped with the last response
/// that holds it.
struct Shared(Arc<String>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl Bodies {
    /// The newest rendering, or a new one when it is older than the render
    /// interval and fewer than [`MAX_ALIVE`] exist. Concurrent scrapes wait
    /// for one rendering rather than each making their own.
    async fn get(self: &Arc<Self>) -> Bytes {
        let mut cache = self.cache.lock().await;
        cache.alive.retain(|text| text.strong_count() > 0);
        if let Some((at, body)) = &cache.newest
            && (at.elapsed() < self.interval || cache.alive.len() >= MAX_ALIVE)
        {
            return body.clone();
        }
        // The old one goes unless a response still holds it.
        cache.newest = None;
        let this = Arc::clone(self);
        // Reading 100,000 rules' counters is 100,000 bpf() calls: off the
        // runtime's threads.
        let text = tokio::task::spawn_blocking(move || (this.render)())
            .await
            .unwrap_or_else(|e| format!("# rendering failed: {e}\n# EOF\n"));
        let text = Arc::new(text);
        cache.alive.push(Arc::downgrade(&text));
        let body = Bytes::from_owner(Shared(text));
        cache.newest = Some((Instant::now(), body.clone()));
        body
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{Shutdown, SocketAddr},
        sync::atomic::{AtomicUsize, Ordering::SeqCst},
    };

    use super::*;

    /// Runs `f` (blocking sockets, as a scraper has) off the runtime.
    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::task::spawn_blocking(f).await.unwrap()
    }

    /// A TCP connection to `addr`.
    fn connect(addr: SocketAddr) -> std::net::TcpStream {
        std::net::TcpStream::connect(addr).unwrap()
    }

    /// An endpoint on 127.0.0.1 whose rendering is `body` and counts itself.
    struct Endpoint {
        addr: SocketAddr,
        renders: Arc<AtomicUsize>,
    }

    impl Endpoint {
        async fn start(limits: Limits, body: String) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            Self::serve(listener.local_addr().unwrap(), listener, limits, body)
        }

        fn serve(addr: SocketAddr, listener: impl Accept, limits: Limits, body: String) -> Self {
            let renders = Arc::new(AtomicUsize::new(0));
            let counted = Arc::clone(&renders);
            tokio::spawn(serve_with(listener, limits, move || {
                counted.fetch_add(1, SeqCst);
                body.clone()
            }));
            Self { addr, renders }
        }

        /// Sends `request` and reads the answer to its end, off the
        /// runtime (a plain blocking socket, as a scraper is).
        async fn ask(&self, request: &'static str) -> String {
            let addr = self.addr;
            blocking(move || {
                let mut stream = connect(addr);
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                stream.write_all(request.as_bytes()).unwrap();
                let mut answer = String::new();
                stream.read_to_string(&mut answer).unwrap();
                answer
            })
            .await
        }

        fn renders(&self) -> usize {
            self.renders.load(SeqCst)
        }
    }

    /// Whether the server closes `stream` (end of file) before the guard,
    /// which only keeps a broken server from hanging the test.
    fn closed_by_server(mut stream: std::net::TcpStream) -> bool {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut byte = [0u8; 1];
        matches!(stream.read(&mut byte), Ok(0))
    }

    #[tokio::test]
    async fn only_a_get_of_metrics_renders() {
        let endpoint = Endpoint::start(Limits::default(), "x_total 1\n".into()).await;
        let not_found = endpoint.ask("GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert!(
            not_found.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{not_found}"
        );
        let method = endpoint
            .ask("POST /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
            .await;
        assert!(
            method.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{method}"
        );
        assert!(method.contains("allow: GET\r\n"), "{method}");
        let garbage = endpoint.ask("HELLO\r\n\r\n").await;
        assert!(
            garbage.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{garbage}"
        );
        assert_eq!(endpoint.renders(), 0);

        // The request the kernel tests' scraper sends.
        let ok = endpoint.ask("GET /metrics HTTP/1.0\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.0 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nx_total 1\n"), "{ok}");
        assert!(
            ok.contains("content-type: application/openmetrics-text"),
            "{ok}"
        );
        let ok = endpoint
            .ask("GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
            .await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        // Within the render interval: the same rendering.
        assert_eq!(endpoint.renders(), 1);
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_at_once() {
        let limits = Limits {
            max_connections: 4,
            // Far beyond the guard of `closed_by_server`: only the cap can
            // close the fifth connection in time.
            header_timeout: Duration::from_secs(600),
            ..Limits::default()
        };
        let endpoint = Endpoint::start(limits, String::new()).await;
        let addr = endpoint.addr;
        let over_cap = blocking(move || {
            let _idle: Vec<_> = (0..4).map(|_| connect(addr)).collect();
            // Accepted after the four (the listen queue is in order).
            closed_by_server(connect(addr))
        })
        .await;
        assert!(over_cap);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_at_the_header_timeout() {
        let limits = Limits {
            header_timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let endpoint = Endpoint::start(limits, String::new()).await;
        let addr = endpoint.addr;
        let closed = blocking(move || {
            let idle: Vec<_> = (0..8).map(|_| connect(addr)).collect();
            // One sends half a request head and stops.
            (&idle[0])
                .write_all(b"GET /metrics HTTP/1.1\r\nHost:")
                .unwrap();
            idle.into_iter().all(closed_by_server)
        })
        .await;
        assert!(closed);
        assert_eq!(endpoint.renders(), 0);
    }

    /// A listener whose first accepts fail as when out of descriptors.
    struct Failing {
        listener: TcpListener,
        failures: AtomicUsize,
    }

    impl Accept for Failing {
        async fn accept(&self) -> io::Result<TcpStream> {
            let failed = self
                .failures
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1));
            if failed.is_ok() {
                return Err(io::Error::from_raw_os_error(libc::EMFILE));
            }
            Accept::accept(&self.listener).await
        }
    }

    #[tokio::test]
    async fn accept_errors_are_survived() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let failing = Failing {
            listener,
            failures: AtomicUsize::new(3),
        };
        let endpoint = Endpoint::serve(addr, failing, Limits::default(), "y 1\n".into());
        let ok = endpoint.ask("GET /metrics HTTP/1.0\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.0 200 OK\r\n"), "{ok}");
    }

    #[tokio::test]
    async fn slow_readers_pin_at_most_two_renderings() {
        // Every request may render (no interval), and each client reads
        // only the status line of a body far larger than the socket
        // buffers: each response stays in flight, holding its rendering.
        let limits = Limits {
            render_interval: Duration::ZERO,
            ..Limits::default()
        };
        let endpoint = Endpoint::start(limits, "#".repeat(32 << 20)).await;
        let addr = endpoint.addr;
        let readers = blocking(move || {
            (0..6)
                .map(|_| {
                    let mut stream = connect(addr);
                    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
                    let mut head = [0u8; 12];
                    stream.read_exact(&mut head).unwrap();
                    assert_eq!(&head, b"HTTP/1.0 200");
                    stream
                })
                .collect::<Vec<_>>()
        })
        .await;
        assert_eq!(endpoint.renders(), MAX_ALIVE);
        for stream in &readers {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}
