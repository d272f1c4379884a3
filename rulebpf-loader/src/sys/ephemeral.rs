//! Origin ranges beside the kernel's own port choices, in the network
//! namespace rulebpf runs in:
//!
//! * **Ephemeral overlap.** A rule's origin range inside
//!   `net.ipv4.ip_local_port_range` can be taken by any process's ephemeral
//!   ports (connect() without bind(), `bind(addr, 0)`): the seed's own
//!   example, 42000-43000, lies inside Linux's default 32768-60999. `check`
//!   and `attach` warn ([`warnings`]).
//! * **Reserving the ranges** (`--reserve-ports`): the origin ranges are
//!   added to `net.ipv4.ip_local_reserved_ports`, which the kernel's
//!   ephemeral choice skips; an explicit bind, as the hook's `bpf_bind()`,
//!   is not affected (`inet_is_local_reserved_port()` is only consulted
//!   where the kernel picks the port). Only ports that were not reserved
//!   already are added, and they are recorded: detach takes back exactly
//!   those ([`reconcile`]). The file is read, changed and written back: a
//!   concurrent writer may be overwritten, as with `sysctl -w`.
//!   https://github.com/torvalds/linux/blob/v6.12/net/ipv4/inet_connection_sock.c (inet_csk_find_open_port)
//! * **TCP timestamps.** A shared origin port reconnects to a destination
//!   whose TIME_WAIT it holds only when that connection used timestamps
//!   (see `rulebpf-ebpf/src/bind.rs`): with `net.ipv4.tcp_timestamps=0`
//!   such a connect() fails for 60 s; warned.

use std::{fs, io};

use rulebpf_rules::{rule::Origin, ruleset::RuleSet};

pub const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
pub const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
pub const TCP_TIMESTAMPS: &str = "/proc/sys/net/ipv4/tcp_timestamps";

/// An inclusive port range.
pub type Range = (u16, u16);

/// The kernel's ephemeral range (`ip_local_port_range`).
pub fn ephemeral_range() -> io::Result<Range> {
    let text = fs::read_to_string(PORT_RANGE)?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) => Ok((lo, hi)),
        _ => Err(io::Error::other(format!(
            "{PORT_RANGE}: unexpected `{}`",
            text.trim()
        ))),
    }
}

/// Every rule's origin range, with its line.
pub fn origin_ranges(set: &RuleSet) -> Vec<(u32, Range)> {
    set.rules
        .iter()
        .filter_map(|r| match r.origin {
            Origin::Os | Origin::Deny => None,
            Origin::Range(range) => Some((r.line, (range.lo, range.hi))),
        })
        .collect()
}

/// The origin ranges of `set`, merged: what `--reserve-ports` reserves.
pub fn wanted(set: &RuleSet) -> Vec<Range> {
    let mut ports = Ports::default();
    for (_, range) in origin_ranges(set) {
        ports.insert(range);
    }
    ports.ranges()
}

/// What an operator should know about `set` in this network namespace, one
/// line each: origin ranges the kernel may hand out as ephemeral ports
/// (unless reserved already, or `reserving` now; the first few named, all
/// counted), and TCP timestamps off with port sharing on.
pub fn warnings(set: &RuleSet, sharing: bool, reserving: bool) -> Vec<String> {
    const NAMED: usize = 5;
    let file = set.path.display();
    let mut out = Vec::new();
    if let (Ok((lo, hi)), false) = (ephemeral_range(), reserving) {
        let reserved = read_reserved().unwrap_or_default();
        let exposed: Vec<String> = origin_ranges(set)
            .into_iter()
            .filter(|&(_, (a, b))| (a.max(lo)..=b.min(hi)).any(|p| !reserved.contains(p)))
            .map(|(line, (a, b))| format!("line {line} ({a}-{b})"))
            .collect();
        if !exposed.is_empty() {
            let more = match exposed.len().saturating_sub(NAMED) {
                0 => String::new(),
                n => format!(" and {n} more"),
            };
            out.push(format!(
                "{file}: origin ports of {} lie in the ephemeral range {lo}-{hi} \
                 (net.ipv4.ip_local_port_range), where any process may get them for its own \
                 connections: {}{more}; `--reserve-ports` on attach or run reserves them \
                 (net.ipv4.ip_local_reserved_ports)",
                if exposed.len() == 1 {
                    "1 rule".to_string()
                } else {
                    format!("{} rules", exposed.len())
                },
                exposed[..exposed.len().min(NAMED)].join(", ")
            ));
        }
    }
    let timestamps_off = fs::read_to_string(TCP_TIMESTAMPS).is_ok_and(|t| t.trim() == "0");
    if sharing && timestamps_off && !origin_ranges(set).is_empty() {
        out.push(
            "net.ipv4.tcp_timestamps is 0: a shared origin port cannot reconnect to a \
             destination while its previous connection there is in TIME_WAIT (60 s after this \
             side closed first); connect() fails with EADDRNOTAVAIL meanwhile"
                .to_string(),
        );
    }
    out
}

/// Makes `net.ipv4.ip_local_reserved_ports` hold `wanted` and no longer
/// hold the ports of `ours` (what this instance added before) that are not
/// wanted. Ports reserved by someone else stay. Returns what this instance
/// has added now (to record; `wanted` empty: nothing).
pub fn reconcile(wanted: &[Range], ours: &[Range]) -> io::Result<Vec<Range>> {
    let current = read_reserved()?;
    let (mut want, mut mine) = (Ports::default(), Ports::default());
    wanted.iter().for_each(|&r| want.insert(r));
    ours.iter().for_each(|&r| mine.insert(r));
    let mut next = Ports::default();
    let mut added = Ports::default();
    for port in 0..=u16::MAX {
        let keep_others = current.contains(port) && !mine.contains(port);
        if want.contains(port) {
            next.set(port);
            if mine.contains(port) || !current.contains(port) {
                added.set(port);
            }
        } else if keep_others {
            next.set(port);
        }
    }
    if next != current {
        fs::write(RESERVED_PORTS, next.to_list())?;
    }
    Ok(added.ranges())
}

fn read_reserved() -> io::Result<Ports> {
    Ports::parse(&fs::read_to_string(RESERVED_PORTS)?)
}

/// A set of ports (a bit each).
#[derive(Clone, PartialEq, Eq)]
struct Ports(Box<[u64; 1024]>);

impl Default for Ports {
    fn default() -> Self {
        Self(Box::new([0; 1024]))
    }
}

impl Ports {
    fn contains(&self, port: u16) -> bool {
        self.0[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }

    fn set(&mut self, port: u16) {
        self.0[usize::from(port) / 64] |= 1 << (port % 64);
    }

    fn insert(&mut self, (lo, hi): Range) {
        (lo..=hi).for_each(|p| self.set(p));
    }

    /// The kernel's list form: `8080,9000-9010` (empty: none).
    fn parse(text: &str) -> io::Result<Self> {
        let mut ports = Self::default();
        for item in text.trim().split(',').filter(|i| !i.is_empty()) {
            let bad = || io::Error::other(format!("{RESERVED_PORTS}: unexpected `{item}`"));
            let (lo, hi) = item.split_once('-').unwrap_or((item, item));
            let lo = lo.trim().parse().map_err(|_| bad())?;
            let hi = hi.trim().parse().map_err(|_| bad())?;
            ports.insert((lo, hi));
        }
        Ok(ports)
    }

    fn ranges(&self) -> Vec<Range> {
        let mut out: Vec<Range> = Vec::new();
        for port in (0..=u16::MAX).filter(|&p| self.contains(p)) {
            match out.last_mut() {
                Some(last) if u32::from(last.1) + 1 == u32::from(port) => last.1 = port,
                _ => out.push((port, port)),
            }
        }
        out
    }

    fn to_list(&self) -> String {
        let items: Vec<String> = self
            .ranges()
            .into_iter()
            .map(|(lo, hi)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                }
            })
            .collect();
        // An empty write clears the list; the kernel wants a line.
        format!("{}\n", items.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::Ports;

    #[test]
    fn the_kernel_list_form_round_trips() {
        let ports = Ports::parse("8080,9000-9010\n").unwrap();
        assert!(ports.contains(8080) && ports.contains(9005) && !ports.contains(9011));
        assert_eq!(ports.ranges(), [(8080, 8080), (9000, 9010)]);
        assert_eq!(ports.to_list(), "8080,9000-9010\n");
        assert_eq!(Ports::parse("\n").unwrap().ranges(), []);
        assert!(Ports::parse("x").is_err());
    }
}
