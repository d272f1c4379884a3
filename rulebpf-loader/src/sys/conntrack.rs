//! The connection tracking table of a network namespace, read over
//! ctnetlink (`NETLINK_NETFILTER`, a dump of `IPCTNL_MSG_CT_GET`): what
//! source NAT did to each connection's origin port. A connection's
//! original tuple carries the port the socket bound; its reply tuple's
//! destination port is the port the wire saw after `snat`/`masquerade`.
//! https://github.com/torvalds/linux/blob/v6.12/net/netfilter/nf_conntrack_netlink.c (ctnetlink_dump_table)
//! https://github.com/torvalds/linux/blob/v6.12/include/uapi/linux/netfilter/nfnetlink_conntrack.h

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_TYPE_MASK: u16 = 0x3fff;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TIMEOUT: u16 = 7;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
/// `SO_NETNS_COOKIE` (5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// One direction of a tracked connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    pub protocol: u8,
    pub src: Option<IpAddr>,
    pub src_port: u16,
    pub dst: Option<IpAddr>,
    pub dst_port: u16,
}

/// A tracked connection: as it left the socket, and as replies come back
/// (after NAT, the reply's destination is the translated source).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub original: Tuple,
    pub reply: Tuple,
    /// Seconds left before the entry expires: of two entries with the same
    /// original tuple but for the source address (a TIME_WAIT one from an
    /// earlier connection), the newer has more.
    pub timeout: u32,
}

/// A ctnetlink socket, bound to the network namespace it was made in.
pub struct Conntrack {
    fd: OwnedFd,
}

impl Conntrack {
    /// A socket in the caller's network namespace.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A slow reader must not lose a dump: 4 MiB of receive buffer.
        let size: libc::c_int = 4 << 20;
        // SAFETY: a valid int option.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        Ok(Self { fd })
    }

    /// A socket in the network namespace `netns` (an open `/proc/PID/ns/net`)
    /// and that namespace's cookie: made on a thread that enters it, so the
    /// caller stays where it is.
    pub fn open_in(netns: File) -> io::Result<(Self, u64)> {
        std::thread::spawn(move || {
            // SAFETY: setns(2) on this thread only, with a namespace fd.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok((Self::open()?, own_netns_cookie()?))
        })
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?
    }

    /// Every tracked connection of the namespace.
    pub fn dump(&self) -> io::Result<Vec<Entry>> {
        let mut request = Vec::with_capacity(20);
        request.extend_from_slice(&20u32.to_ne_bytes());
        request
            .extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
        request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        request.extend_from_slice(&1u32.to_ne_bytes()); // seq
        request.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
        request.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]); // nfgenmsg: every family
        // SAFETY: sending a buffer we own to the kernel (address 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                (&raw const kernel).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut entries = Vec::new();
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            // SAFETY: receiving into a buffer we own.
            let got = unsafe {
                libc::recv(
                    self.fd.as_fd().as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if got < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buffer[..got as usize];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
                if len < 16 || len > rest.len() {
                    return Err(io::Error::other("a truncated netlink message"));
                }
                match kind {
                    NLMSG_DONE => return Ok(entries),
                    NLMSG_ERROR => {
                        let errno = i32::from_ne_bytes(rest[16..20].try_into().unwrap());
                        if errno == 0 {
                            return Ok(entries);
                        }
                        return Err(io::Error::from_raw_os_error(-errno));
                    }
                    _ => {
                        // After nlmsghdr (16) and nfgenmsg (4): attributes.
                        if let Some(entry) = rest.get(20..len).and_then(entry) {
                            entries.push(entry);
                        }
                    }
                }
                rest = &rest[align(len).min(rest.len())..];
            }
        }
    }
}

/// The cookie of the caller's network namespace (what
/// `bpf_get_netns_cookie()` gives the hooks).
pub fn own_netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a u64 option into a u64.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// The attributes of `bytes`: (type without flags, payload).
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > bytes.len() {
            return None;
        }
        let payload = &bytes[4..len];
        bytes = &bytes[align(len).min(bytes.len())..];
        Some((kind, payload))
    })
}

fn entry(bytes: &[u8]) -> Option<Entry> {
    let mut entry = Entry::default();
    for (kind, payload) in attributes(bytes) {
        match kind {
            CTA_TUPLE_ORIG => entry.original = tuple(payload),
            CTA_TUPLE_REPLY => entry.reply = tuple(payload),
            CTA_TIMEOUT => {
                if let Ok(bytes) = <[u8; 4]>::try_from(payload) {
                    entry.timeout = u32::from_be_bytes(bytes);
                }
            }
            _ => {}
        }
    }
    (entry.original.protocol != 0).then_some(entry)
}

fn tuple(bytes: &[u8]) -> Tuple {
    let mut t = Tuple::default();
    for (kind, payload) in attributes(bytes) {
        match kind {
            CTA_TUPLE_IP => {
                for (kind, addr) in attributes(payload) {
                    let ip = match addr.len() {
                        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(addr).unwrap())),
                        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(addr).unwrap())),
                        _ => continue,
                    };
                    match kind {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => t.src = Some(ip),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => t.dst = Some(ip),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (kind, value) in attributes(payload) {
                    match (kind, value) {
                        (CTA_PROTO_NUM, [n, ..]) => t.protocol = *n,
                        (CTA_PROTO_SRC_PORT, [a, b, ..]) => {
                            t.src_port = u16::from_be_bytes([*a, *b])
                        }
                        (CTA_PROTO_DST_PORT, [a, b, ..]) => {
                            t.dst_port = u16::from_be_bytes([*a, *b])
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | 0x8000, &parts.concat())
    }

    fn tuple_attr(kind: u16, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        nested(
            kind,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[attr(CTA_IP_V4_SRC, &src), attr(CTA_IP_V4_DST, &dst)],
                ),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[6]),
                        attr(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    #[test]
    fn reads_both_tuples_of_a_masqueraded_connection() {
        let bytes = [
            tuple_attr(CTA_TUPLE_ORIG, [10, 0, 0, 2], 17001, [203, 0, 113, 7], 21),
            tuple_attr(
                CTA_TUPLE_REPLY,
                [203, 0, 113, 7],
                21,
                [198, 51, 100, 1],
                40123,
            ),
            attr(CTA_TIMEOUT, &120u32.to_be_bytes()),
        ]
        .concat();
        let e = entry(&bytes).unwrap();
        assert_eq!(e.original.src_port, 17001);
        assert_eq!(e.original.dst, Some("203.0.113.7".parse().unwrap()));
        assert_eq!(e.original.dst_port, 21);
        assert_eq!(e.reply.dst_port, 40123);
        assert_eq!(e.reply.dst, Some("198.51.100.1".parse().unwrap()));
        assert_eq!(e.original.protocol, 6);
        assert_eq!(e.timeout, 120);
    }
}
