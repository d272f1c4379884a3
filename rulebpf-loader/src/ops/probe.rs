//! `rulebpf probe`: connect from inside a cgroup, as the gateway would, and
//! report the origin port each connection got (or the error). TCP, or a
//! connected UDP socket that sends one datagram; IPv4, IPv6, or IPv4 through a
//! dual-stack IPv6 socket (as Java and many Go programs connect).
//!
//! This is how an operator checks a rule without touching the service, and
//! how the integration tests and the demo act as "a program in the cgroup".
//! The process moves itself into the cgroup first (cgroup v2 moves all its
//! threads), so the hook sees its connects exactly as the service's.

use std::{
    fs,
    io::Read as _,
    net::{SocketAddr, SocketAddrV6, TcpStream},
    time::Duration,
};

use rulebpf_common::Protocol;
use serde::Serialize;
use socket2::{Domain, Socket, Type};

use crate::sys::cgroup::Cgroup;

/// How to probe.
#[derive(Clone, Debug)]
pub struct Probe {
    pub dest: SocketAddr,
    /// TCP, or a connected UDP socket that sends one datagram.
    pub protocol: Protocol,
    /// Reach an IPv4 destination through an AF_INET6 socket at its
    /// IPv4-mapped address (`::ffff:a.b.c.d`).
    pub dual_stack: bool,
    /// Connections to make, one after the other.
    pub count: u32,
    /// Keep every connection open until all are made (they then need
    /// distinct origin ports: this is how range capacity is tested).
    pub hold: bool,
    /// With `hold`: close them only when standard input ends.
    pub hold_until_eof: bool,
    /// TCP: close at once, this side first, instead of waiting for the peer.
    pub close_first: bool,
    /// Bind this port before connect(), as an application that picks its own
    /// origin port does (FTP active mode binds L-1).
    pub bind_port: Option<u16>,
}

/// What one connect() gave.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Outcome {
    Connected { local_port: u16 },
    Failed { errno: i32, error: String },
}

/// This process could not join the cgroup.
#[derive(Debug, thiserror::Error)]
#[error("joining {} (writing our pid to {})", cgroup.display(), procs.display())]
pub struct EnterError {
    cgroup: std::path::PathBuf,
    procs: std::path::PathBuf,
    #[source]
    source: std::io::Error,
}

/// Moves this process into `cgroup`.
pub fn enter(cgroup: &Cgroup) -> Result<(), EnterError> {
    let procs = cgroup.path.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string()).map_err(|source| EnterError {
        cgroup: cgroup.path.clone(),
        procs,
        source,
    })
}

/// Makes the connections and reports each one.
pub fn run(probe: &Probe) -> Vec<Outcome> {
    let mut open = Vec::new();
    let mut outcomes = Vec::new();
    for _ in 0..probe.count {
        match connect(probe) {
            Ok(socket) => {
                let local_port = socket
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .map_or(0, |a| a.port());
                outcomes.push(Outcome::Connected { local_port });
                if probe.hold {
                    open.push(socket);
                } else {
                    finish(probe, socket);
                }
            }
            Err(e) => outcomes.push(Outcome::Failed {
                errno: e.raw_os_error().unwrap_or(0),
                error: e.to_string(),
            }),
        }
    }
    if probe.hold_until_eof {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    }
    open.into_iter().for_each(|s| finish(probe, s));
    outcomes
}

/// The address connect() is given: the IPv4-mapped form on a dual-stack socket.
fn target(probe: &Probe) -> SocketAddr {
    match probe.dest {
        SocketAddr::V4(v4) if probe.dual_stack => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        dest => dest,
    }
}

fn connect(probe: &Probe) -> std::io::Result<Socket> {
    let target = target(probe);
    let domain = Domain::for_address(target);
    let (kind, protocol) = match probe.protocol {
        Protocol::Tcp => (Type::STREAM, socket2::Protocol::TCP),
        Protocol::Udp => (Type::DGRAM, socket2::Protocol::UDP),
    };
    let socket = Socket::new(domain, kind, Some(protocol))?;
    if target.is_ipv6() {
        // Dual-stack whatever the sysctl says, as Java sets it.
        socket.set_only_v6(false)?;
    }
    if let Some(port) = probe.bind_port {
        socket.set_reuse_address(true)?;
        let any = match target {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], port)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], port)),
        };
        socket.bind(&any.into())?;
    }
    socket.connect(&target.into())?;
    if probe.protocol == Protocol::Udp {
        // The peer learns the origin port from the datagram.
        socket.send(b"rulebpf probe")?;
    }
    Ok(socket)
}

/// Ends a connection: TCP waits for the peer to close first (unless
/// `close_first`); UDP just closes.
fn finish(probe: &Probe, socket: Socket) {
    if probe.protocol == Protocol::Tcp && !probe.close_first {
        close_after_peer(socket.into());
    }
}

/// Waits (briefly) for the peer to close first, so that the TIME_WAIT state
/// lands on the peer and the origin port is free again at once.
fn close_after_peer(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 64];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}
