//! A loopback server that writes down the peer port of every TCP connection
//! or UDP datagram it receives: the origin port rulebpf chose, as the other
//! end of the wire saw it. Kernel tests assert on it, the bench proves each
//! configuration with it, the demo prints what it saw.
//!
//! * TCP ([`Mode::Tcp`]): accept, record the peer port, close at once. The
//!   **server closes first**, so TIME_WAIT is held by the server's socket and
//!   never by the client's origin port: a range of N ports can be reused
//!   right away, which the tests and the bench's connect loop rely on. A
//!   client learns the connection is over by reading end-of-file.
//! * Bulk TCP ([`Mode::Bulk`]): as TCP, but before closing read an 8-byte
//!   big-endian length and then that many bytes. The length prefix is what
//!   lets the server (not the client) close first after a transfer too.
//! * Client closes ([`Mode::ClientCloses`]): as TCP, but read until the
//!   client closes, then close: the **client closes first**, and TIME_WAIT
//!   lands on the client's origin port (what a gateway that ends its own
//!   connections sees; the capacity tests and bench use it).
//! * UDP ([`Mode::Udp`]): record the sender port of each datagram.
//!
//! Each listener serves its socket on a thread of its own for the rest of the
//! process: it is never stopped, so a port once bound stays taken (tests use
//! OS-picked ports, the bench binds its ports once).

use std::{
    io::{self, Read as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// How long [`Listener::take`] waits for the connections it expects.
pub const TAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the listener does with each connection or datagram, after recording
/// its peer port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// TCP: close the connection at once (the server closes first).
    Tcp,
    /// TCP: read an 8-byte big-endian length, then that many bytes, then close.
    Bulk,
    /// TCP: read until the client closes, then close (the client closes first).
    ClientCloses,
    /// UDP: nothing more (datagrams are read and dropped).
    Udp,
}

/// A port-recording loopback server; see the module doc.
pub struct Listener {
    /// Where it listens (the port the OS picked, when asked for port 0).
    pub addr: SocketAddr,
    seen: Arc<Seen>,
}

/// The peer ports recorded so far, shared with the serving thread.
struct Seen {
    /// Off: peers are served but not written down (the bench's timed rounds
    /// need no record of tens of thousands of connections).
    recording: AtomicBool,
    ports: Mutex<Vec<u16>>,
}

impl Seen {
    fn record(&self, port: u16) {
        if self.recording.load(Ordering::Relaxed) {
            self.ports.lock().unwrap().push(port);
        }
    }
}

impl Listener {
    /// Listens on `addr` (port 0: the OS picks) in `mode`, recording from the
    /// start.
    pub fn bind(addr: SocketAddr, mode: Mode) -> io::Result<Self> {
        let seen = Arc::new(Seen {
            recording: AtomicBool::new(true),
            ports: Mutex::new(Vec::new()),
        });
        let sink = Arc::clone(&seen);
        let addr = if mode == Mode::Udp {
            let socket = UdpSocket::bind(addr)?;
            let addr = socket.local_addr()?;
            thread::spawn(move || serve_udp(&socket, &sink));
            addr
        } else {
            let listener = TcpListener::bind(addr)?;
            let addr = listener.local_addr()?;
            thread::spawn(move || serve_tcp(&listener, mode, &sink));
            addr
        };
        Ok(Self { addr, seen })
    }

    /// A TCP listener on `ip` (IPv4 octets or an IPv6 address) at a port the
    /// OS picks: unique per test. Panics when it cannot listen.
    pub fn on(ip: impl Into<IpAddr>) -> Self {
        Self::on_port(ip, 0)
    }

    /// A TCP listener on `ip:port` (port 0: the OS picks). Panics when it
    /// cannot listen.
    pub fn on_port(ip: impl Into<IpAddr>, port: u16) -> Self {
        Self::bind_or_panic(SocketAddr::new(ip.into(), port), Mode::Tcp)
    }

    /// A UDP socket on `ip` (at a port the OS picks) that records the sender
    /// port of each datagram. Panics when it cannot bind.
    pub fn udp(ip: impl Into<IpAddr>) -> Self {
        Self::bind_or_panic(SocketAddr::new(ip.into(), 0), Mode::Udp)
    }

    fn bind_or_panic(addr: SocketAddr, mode: Mode) -> Self {
        Self::bind(addr, mode).unwrap_or_else(|e| panic!("listening on {addr} ({mode:?}): {e}"))
    }

    /// Starts or stops writing peer ports down (on from the start).
    pub fn record(&self, on: bool) {
        self.seen.recording.store(on, Ordering::Relaxed);
    }

    /// Waits (up to [`TAKE_TIMEOUT`]) until `n` peers have been recorded;
    /// returns every recorded peer port in arrival order and forgets them.
    /// Panics when fewer than `n` arrive in time.
    pub fn take(&self, n: usize) -> Vec<u16> {
        let seen = self.take_within(n, TAKE_TIMEOUT);
        assert!(
            seen.len() >= n,
            "listener {} saw fewer than {n} connections",
            self.addr
        );
        seen
    }

    /// Waits up to `timeout` until `n` peers have been recorded; returns
    /// every recorded peer port in arrival order (fewer than `n` when the
    /// time ran out) and forgets them.
    pub fn take_within(&self, n: usize, timeout: Duration) -> Vec<u16> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut ports = self.seen.ports.lock().unwrap();
                if ports.len() >= n || Instant::now() >= deadline {
                    return ports.drain(..).collect();
                }
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

fn serve_tcp(listener: &TcpListener, mode: Mode, seen: &Seen) {
    for stream in listener.incoming().flatten() {
        if let Ok(peer) = stream.peer_addr() {
            seen.record(peer.port());
        }
        match mode {
            Mode::Bulk => drain_announced(stream),
            Mode::ClientCloses => {
                let _ = io::copy(&mut &stream, &mut io::sink());
            }
            Mode::Tcp | Mode::Udp => {}
        }
        // The stream drops here: the server closes first.
    }
}

/// Reads the 8-byte big-endian length, then that many bytes (fewer if the
/// client goes away first).
fn drain_announced(mut stream: TcpStream) {
    let mut len = [0u8; 8];
    if stream.read_exact(&mut len).is_ok() {
        let _ = io::copy(
            &mut (&mut stream).take(u64::from_be_bytes(len)),
            &mut io::sink(),
        );
    }
}

fn serve_udp(socket: &UdpSocket, seen: &Seen) {
    let mut buf = [0u8; 512];
    while let Ok((_, from)) = socket.recv_from(&mut buf) {
        seen.record(from.port());
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{Ipv4Addr, TcpStream, UdpSocket},
        time::Duration,
    };

    use super::{Listener, Mode};

    const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

    /// Connects, waits for the server's close (end-of-file) and returns the
    /// origin port the connection had.
    fn connect_until_closed(listener: &Listener) -> u16 {
        let mut stream = TcpStream::connect(listener.addr).unwrap();
        let port = stream.local_addr().unwrap().port();
        assert_eq!(
            stream.read(&mut [0u8; 1]).unwrap(),
            0,
            "server closes first"
        );
        port
    }

    #[test]
    fn tcp_records_each_peer_port_in_order_and_closes_first() {
        let listener = Listener::on(LOOPBACK);
        assert_ne!(listener.port(), 0, "the OS picked a port");
        assert_eq!(listener.addr.ip(), LOOPBACK);
        let ports: Vec<u16> = (0..3).map(|_| connect_until_closed(&listener)).collect();
        assert_eq!(listener.take(3), ports);
        // Taken means forgotten.
        assert_eq!(listener.take_within(1, Duration::from_millis(20)), []);
    }

    #[test]
    fn on_port_listens_where_asked() {
        // A port that was free a moment ago.
        let port = std::net::TcpListener::bind((LOOPBACK, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listener = Listener::on_port(LOOPBACK, port);
        assert_eq!(listener.port(), port);
        let origin = connect_until_closed(&listener);
        assert_eq!(listener.take(1), [origin]);
    }

    #[test]
    fn udp_records_the_sender_port_of_each_datagram() {
        let listener = Listener::udp(LOOPBACK);
        let client = UdpSocket::bind((LOOPBACK, 0)).unwrap();
        client.send_to(b"one", listener.addr).unwrap();
        client.send_to(b"two", listener.addr).unwrap();
        let port = client.local_addr().unwrap().port();
        assert_eq!(listener.take(2), [port, port]);
    }

    #[test]
    fn bulk_reads_the_announced_bytes_then_closes() {
        let listener = Listener::bind((LOOPBACK, 0).into(), Mode::Bulk).unwrap();
        let mut stream = TcpStream::connect(listener.addr).unwrap();
        let origin = stream.local_addr().unwrap().port();
        let payload = vec![0x5a_u8; 1 << 20];
        stream
            .write_all(&(payload.len() as u64).to_be_bytes())
            .unwrap();
        stream.write_all(&payload).unwrap();
        // The server closes once it has read all of it, not before.
        assert_eq!(stream.read(&mut [0u8; 1]).unwrap(), 0);
        assert_eq!(listener.take(1), [origin]);
    }

    #[test]
    fn client_closes_waits_for_the_clients_close() {
        let listener = Listener::bind((LOOPBACK, 0).into(), Mode::ClientCloses).unwrap();
        let mut stream = TcpStream::connect(listener.addr).unwrap();
        let origin = stream.local_addr().unwrap().port();
        stream.write_all(b"still open").unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        // The server has not closed: the read times out.
        assert!(stream.read(&mut [0u8; 1]).is_err());
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        stream.set_read_timeout(None).unwrap();
        assert_eq!(stream.read(&mut [0u8; 1]).unwrap(), 0, "then it closes");
        assert_eq!(listener.take(1), [origin]);
    }

    #[test]
    fn not_recording_serves_without_writing_down() {
        let listener = Listener::on(LOOPBACK);
        listener.record(false);
        connect_until_closed(&listener);
        assert_eq!(listener.take_within(1, Duration::from_millis(50)), []);
        listener.record(true);
        let origin = connect_until_closed(&listener);
        assert_eq!(listener.take(1), [origin]);
    }

    #[test]
    fn take_within_returns_what_came_when_time_runs_out() {
        let listener = Listener::on(LOOPBACK);
        let origin = connect_until_closed(&listener);
        assert_eq!(listener.take_within(2, Duration::from_millis(50)), [origin]);
    }
}
