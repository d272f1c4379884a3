//! The bench's loopback server: one port-recording [`Listener`] (the kernel
//! tests' own) per destination port, 127.0.0.2:7400-7599.
//!
//! Every listener accepts and closes at once, so the server closes first and
//! TIME_WAIT never holds a client's origin port; the last port (bulk) first
//! reads the length-prefixed payload. Listeners do not record while rounds
//! are timed: only while a configuration is proved, on that round's port.
//!
//! The capacity scenario's server is another process (`xtask bench-server`,
//! [`run`]) in the scenario's network namespace, whose listeners can wait
//! for the client to close first.

use anyhow::Context as _;
use rulebpf_testkit::{Listener, Mode};

use super::{BULK_PORT, FIRST_PORT, SERVER_IP};

pub struct Server {
    /// The listener of port `FIRST_PORT + i` at index `i`.
    listeners: Vec<Listener>,
}

impl Server {
    pub fn start() -> anyhow::Result<Self> {
        let listeners = (FIRST_PORT..=BULK_PORT)
            .map(|port| {
                let mode = if port == BULK_PORT {
                    Mode::Bulk
                } else {
                    Mode::Tcp
                };
                let listener = Listener::bind((SERVER_IP, port).into(), mode)
                    .with_context(|| format!("listening on {SERVER_IP}:{port}"))?;
                listener.record(false);
                Ok(listener)
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { listeners })
    }

    /// The listener on destination port `port` (one of the server's).
    pub fn at(&self, port: u16) -> &Listener {
        &self.listeners[usize::from(port - FIRST_PORT)]
    }
}

/// `xtask bench-server`'s arguments: listeners in another network
/// namespace (the bench runs it with `nsenter --net=...`).
#[derive(clap::Args)]
pub struct Args {
    /// Where to listen (repeatable).
    #[arg(long, required = true)]
    listen: Vec<std::net::SocketAddr>,
    /// Wait for the client to close first (else: close at once).
    #[arg(long)]
    client_closes: bool,
}

/// Listens where `args` say, prints `ready`, and serves until its stdin
/// closes (the bench holds it open for as long as it needs the server).
pub fn run(args: &Args) -> anyhow::Result<()> {
    let mode = if args.client_closes {
        Mode::ClientCloses
    } else {
        Mode::Tcp
    };
    let _listeners = args
        .listen
        .iter()
        .map(|&addr| {
            let listener =
                Listener::bind(addr, mode).with_context(|| format!("listening on {addr}"))?;
            listener.record(false);
            Ok(listener)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!("ready");
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    Ok(())
}
