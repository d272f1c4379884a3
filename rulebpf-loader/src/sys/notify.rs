//! `sd_notify`: how a `Type=notify` service tells systemd it is ready or
//! stopping.

/// Tells systemd how the service stands (`Type=notify`), when it runs under
/// systemd: a datagram to `$NOTIFY_SOCKET` (an abstract socket when it
/// starts with `@`).
/// https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html
pub fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt as _;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy();
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(path.as_ref()),
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let addr = addr?;
        socket.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        log::warn!("telling systemd {state}: {e}");
    }
}
