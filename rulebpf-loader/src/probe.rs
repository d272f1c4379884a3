//! `rulebpf probe`: connect from inside a cgroup, as the gateway would, and
//! report the origin port each connection got (or the error).
//!
//! This is how an operator checks a rule without touching the service, and
//! how the integration tests and the demo act as "a program in the cgroup".
//! The process moves itself into the cgroup first (cgroup v2 moves all its
//! threads), so the hook sees its connects exactly as the service's.

use std::{
    fs,
    io::Read as _,
    net::{SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::Context as _;
use serde::Serialize;
use socket2::{Domain, Socket, Type};

use crate::cgroup::Cgroup;

/// How to probe.
#[derive(Clone, Debug)]
pub struct Probe {
    pub dest: SocketAddrV4,
    /// Connections to make, one after the other.
    pub count: u32,
    /// Keep every connection open until all are made (they then need
    /// distinct origin ports: this is how range capacity is tested).
    pub hold: bool,
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

/// Moves this process into `cgroup`.
pub fn enter(cgroup: &Cgroup) -> anyhow::Result<()> {
    let procs = cgroup.path.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("joining {}", procs.display()))
}

/// Makes the connections and reports each one.
pub fn run(probe: &Probe) -> Vec<Outcome> {
    let mut open = Vec::new();
    let mut outcomes = Vec::new();
    for _ in 0..probe.count {
        match connect(probe) {
            Ok(stream) => {
                let local_port = stream.local_addr().map_or(0, |a| a.port());
                outcomes.push(Outcome::Connected { local_port });
                if probe.hold {
                    open.push(stream);
                } else {
                    close_after_peer(stream);
                }
            }
            Err(e) => outcomes.push(Outcome::Failed {
                errno: e.raw_os_error().unwrap_or(0),
                error: e.to_string(),
            }),
        }
    }
    open.into_iter().for_each(close_after_peer);
    outcomes
}

fn connect(probe: &Probe) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    if let Some(port) = probe.bind_port {
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
    }
    socket.connect(&SocketAddr::V4(probe.dest).into())?;
    Ok(socket.into())
}

/// Waits (briefly) for the peer to close first, so that the TIME_WAIT state
/// lands on the peer and the origin port is free again at once.
fn close_after_peer(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 64];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}
