//! The bench's loopback server: one port-recording [`Listener`] (the kernel
//! tests' own) per destination port, 127.0.0.2:7400-7599.
//!
//! Every listener accepts and closes at once, so the server closes first and
//! TIME_WAIT never holds a client's origin port; the last port (bulk) first
//! reads the length-prefixed payload. Listeners do not record while rounds
//! are timed: only while a configuration is proved, on that round's port.

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
