//! Decision events for every listener of an instance: `rulebpf events`
//! (any number of them) and `rulebpf run --events-log`.
//!
//! A BPF ring buffer has one consumer position, so one process per
//! instance reads it: the first listener to take the instance's reader
//! lock (`/run/rulebpf/.events.NAME`). That *reader* turns events into
//! [`DecisionRecord`]s once and hands each to its own consumer and to every
//! other listener, which connect to the socket it serves
//! (`/run/rulebpf/events.NAME.sock`, root's directory, 0600) and say on
//! their first line whether they want `no_match` events too. When the
//! reader goes away, its listeners see the socket close and race for the
//! lock: one becomes the reader, the others connect to it. Events made in
//! that handover (milliseconds) are lost, as they are while nobody listens.
//!
//! Nothing a listener does can block a connect(): the hooks drop an event
//! when the ring is full (counted in the kernel), and the reader drops
//! lines for a listener whose queue is full (counted, and told to that
//! listener as `{"dropped": N}`). Memory is bounded by the ring and by
//! [`QUEUE`] lines per listener.

mod enrich;
pub mod log_file;
mod nat;

use std::{
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
    time::Duration,
};

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest, unix::AsyncFd},
    net::{UnixListener, UnixStream},
    sync::mpsc,
};

use crate::{
    instance::{
        Instance, InstanceError,
        events::{ReaderLock, events_socket},
    },
    kernel::events::{EventMapsError, EventRing, Wanted},
    model::{
        event::{DecisionRecord, Wire},
        name::InstanceName,
    },
    sys::cgroup::cgroup2_mount,
};

/// Stops a listening task when dropped (the ring's control word is
/// cleared as its reader goes).
pub struct Stop(pub tokio::task::JoinHandle<()>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Lines queued for one listener before the reader drops lines for it.
pub const QUEUE: usize = 4096;
/// How long a listener waits before racing for the lock again.
const RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("no instance {0}")]
    NoInstance(InstanceName),
    #[error(transparent)]
    Instance(#[from] InstanceError),
    #[error(transparent)]
    Maps(#[from] EventMapsError),
    #[error("serving the other listeners at {path}")]
    Socket {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the event ring")]
    Ring(#[source] std::io::Error),
}

/// What a listener asks for (sent as its first line to the reader).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wants {
    /// Also connects no rule matched (`--outcome no_match`).
    pub no_match: bool,
}

impl Wants {
    fn takes(self, record: &DecisionRecord) -> bool {
        self.no_match || record.outcome != "no_match"
    }
}

/// What a listener's sink gets.
#[derive(Debug)]
pub enum Delivery {
    Wire(Wire),
    /// The end of a batch: write out what was buffered.
    Flush,
}

/// How often the reader drains the ring: the hooks wake it only when a
/// quarter of the ring waits (`rulebpf-ebpf/src/events.rs`), so this is
/// the latency of an event on a quiet host.
const DRAIN_EVERY: Duration = Duration::from_millis(20);

/// How a listener gets the events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// It reads the ring and serves the others.
    Reader,
    /// Through the reader's socket.
    Listener,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Reader => "reading the ring",
            Self::Listener => "through the reader",
        })
    }
}

/// The first line the reader sends a listener it serves: from here on,
/// every event reaches it.
const ADMITTED: &str = "{\"dropped\":0}\n";

/// Listens to instance `name`'s decisions until `sink` returns false, as
/// the reader or through it (see the module documentation). `sink` gets
/// every record this listener wants, and the count of those it missed;
/// `ready` is told each time events start to reach this listener (again
/// after a handover).
pub async fn listen(
    name: &InstanceName,
    wants: Wants,
    mut sink: impl FnMut(Delivery) -> bool,
    mut ready: impl FnMut(Role),
) -> Result<(), EventsError> {
    loop {
        if let Some(lock) = ReaderLock::try_acquire(name)? {
            if !read(name, wants, &mut sink, &mut ready, lock).await? {
                return Ok(());
            }
        } else {
            match connect(name, wants).await {
                Ok(stream) => {
                    if !follow(stream, &mut sink, &mut ready).await {
                        return Ok(());
                    }
                }
                // The reader is starting (its socket not bound yet) or
                // just left: race again shortly.
                Err(e) => debug!("events: connecting to the reader: {e}"),
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn connect(name: &InstanceName, wants: Wants) -> std::io::Result<UnixStream> {
    let (_top, _, path) = events_socket(name).map_err(std::io::Error::other)?;
    let mut stream = UnixStream::connect(&path).await?;
    let mut hello = serde_json::to_vec(&wants).map_err(std::io::Error::other)?;
    hello.push(b'\n');
    stream.write_all(&hello).await?;
    Ok(stream)
}

/// A listener's side: records from the reader until it goes (true) or the
/// sink is done (false).
async fn follow(
    stream: UnixStream,
    sink: &mut impl FnMut(Delivery) -> bool,
    ready: &mut impl FnMut(Role),
) -> bool {
    let mut lines = BufReader::new(stream).lines();
    let mut admitted = false;
    while let Ok(Some(line)) = lines.next_line().await {
        if !admitted {
            admitted = true;
            ready(Role::Listener);
        }
        match serde_json::from_str::<Wire>(&line) {
            Ok(wire) => {
                if !sink(Delivery::Wire(wire)) {
                    return false;
                }
            }
            Err(e) => warn!("events: a line from the reader this version cannot read: {e}"),
        }
        // Nothing more read already: the end of what the reader sent.
        if lines.get_ref().buffer().is_empty() && !sink(Delivery::Flush) {
            return false;
        }
    }
    true
}

/// A listener the reader serves.
struct Listener {
    wants: Wants,
    lines: mpsc::Sender<Arc<str>>,
    /// Lines dropped since the listener was last told.
    dropped: u64,
    /// Sent [`ADMITTED`]: it gets every event from now on.
    admitted: bool,
}

impl Listener {
    /// Queues `line`; false once the listener is gone.
    fn offer(&mut self, line: &Arc<str>) -> bool {
        if self.dropped > 0 {
            let notice: Arc<str> = format!("{{\"dropped\":{}}}\n", self.dropped).into();
            match self.lines.try_send(notice) {
                Ok(()) => self.dropped = 0,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.dropped += 1;
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        match self.lines.try_send(line.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped += 1;
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// The ring's descriptor, for the reactor.
struct Readable(EventRing);

impl AsRawFd for Readable {
    fn as_raw_fd(&self) -> RawFd {
        self.0.ring.as_raw_fd()
    }
}

/// The reader's side: reads the ring, serves the other listeners, feeds
/// its own sink. Ok(false): the sink is done.
async fn read(
    name: &InstanceName,
    wants: Wants,
    sink: &mut impl FnMut(Delivery) -> bool,
    ready: &mut impl FnMut(Role),
    _lock: ReaderLock,
) -> Result<bool, EventsError> {
    let instance = Instance::open(name)?.ok_or_else(|| EventsError::NoInstance(name.clone()))?;
    let ring = instance.event_ring()?;
    let (top, file, path) = events_socket(name)?;
    let socket_error = |source| EventsError::Socket {
        path: top.display(&file).display().to_string(),
        source,
    };
    // A socket left by a reader that died: ours now (we hold the lock).
    top.remove(&file)
        .map_err(|e| socket_error(std::io::Error::other(e)))?;
    let server = UnixListener::bind(&path).map_err(socket_error)?;
    // SAFETY: the ring owns its map's fd and keeps it open for as long as
    // the AsyncFd that owns the ring lives.
    let mut ring = unsafe { AsyncFd::register_with_interest(Readable(ring), Interest::READABLE) }
        .map_err(|e| EventsError::Ring(e.into_parts().1))?;
    let mut enricher = enrich::Enricher::new(name.as_str(), cgroup2_mount().ok());
    let (joined_tx, mut joined) = mpsc::channel::<Listener>(16);
    let mut listeners: Vec<Listener> = Vec::new();
    let mut wanted = Wanted::default();
    let mut watch = nat::NatWatch::new();
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let now = Wanted {
            on: true,
            no_match: wants.no_match || listeners.iter().any(|l| l.wants.no_match),
        };
        if now != wanted {
            ring.get_mut().0.set_wanted(now)?;
            if !wanted.on {
                ready(Role::Reader);
            }
            wanted = now;
        }
        // Told only now that the hooks make what it asked for.
        if listeners.iter().any(|l| !l.admitted) {
            let admitted: Arc<str> = ADMITTED.into();
            listeners.retain_mut(|l| {
                l.admitted
                    || (l.offer(&admitted) && {
                        l.admitted = true;
                        true
                    })
            });
        }
        tokio::select! {
            accepted = server.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(admit(stream, joined_tx.clone()));
                }
            }
            Some(listener) = joined.recv() => listeners.push(listener),
            _ = tick.tick() => drain(&mut ring.get_mut().0, &mut enricher, &mut watch, &instance),
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(EventsError::Ring)?;
                drain(&mut guard.get_inner_mut().0, &mut enricher, &mut watch, &instance);
                guard.clear_ready();
            }
        }
        let ready = watch.ready();
        let any = !ready.is_empty();
        for record in ready {
            if !hand_out(record, wants, &mut listeners, sink) {
                return Ok(false);
            }
        }
        if any && !sink(Delivery::Flush) {
            return Ok(false);
        }
    }
}

/// Turns what waits in the ring into records, queued in `watch` (which
/// holds those whose NAT it must look up first).
fn drain(
    ring: &mut EventRing,
    enricher: &mut enrich::Enricher,
    watch: &mut nat::NatWatch,
    instance: &Instance,
) {
    enricher.new_batch();
    while let Some(event) = ring.next_event() {
        let Some(event) = event else { continue };
        watch.admit(enricher.record(&event, instance), &event);
    }
}

/// Gives `record` to every listener that wants it and to the reader's own
/// sink; false when the sink is done.
fn hand_out(
    record: DecisionRecord,
    wants: Wants,
    listeners: &mut Vec<Listener>,
    sink: &mut impl FnMut(Delivery) -> bool,
) -> bool {
    if !listeners.is_empty()
        && let Ok(mut json) = serde_json::to_string(&record)
    {
        json.push('\n');
        let line: Arc<str> = json.into();
        listeners.retain_mut(|l| !l.wants.takes(&record) || l.offer(&line));
    }
    !wants.takes(&record) || sink(Delivery::Wire(Wire::Record(Box::new(record))))
}

/// A new listener: its peer must be root; its first line says what it
/// wants; then a task writes its queue to it.
async fn admit(stream: UnixStream, joined: mpsc::Sender<Listener>) {
    if stream.peer_cred().map(|c| c.uid()).ok() != Some(0) {
        return;
    }
    let (read_half, mut write_half) = stream.into_split();
    let mut hello = String::new();
    let mut reader = BufReader::new(read_half);
    let read = tokio::time::timeout(Duration::from_secs(2), reader.read_line(&mut hello)).await;
    let Ok(Ok(_)) = read else { return };
    let wants: Wants = serde_json::from_str(hello.trim()).unwrap_or_default();
    let (lines, mut queue) = mpsc::channel::<Arc<str>>(QUEUE);
    if joined
        .send(Listener {
            wants,
            lines,
            dropped: 0,
            admitted: false,
        })
        .await
        .is_err()
    {
        return;
    }
    // What is queued goes out in one write.
    let mut batch = Vec::new();
    while let Some(line) = queue.recv().await {
        batch.clear();
        batch.extend_from_slice(line.as_bytes());
        while batch.len() < 64 * 1024
            && let Ok(line) = queue.try_recv()
        {
            batch.extend_from_slice(line.as_bytes());
        }
        if write_half.write_all(&batch).await.is_err() {
            return;
        }
    }
}
