//! What a rule is and what it matches, independent of how it was written:
//! [`Rule`] and its parts, as [`crate::grammar`] produces them and
//! [`crate::compile`] and [`crate::first_match()`] read them.

use std::{fmt, net::IpAddr, ops::RangeInclusive};

use rulebpf_common::{Family, Protocol};

/// One rule, as written on one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// 1-based line number in the file.
    pub line: u32,
    /// The rule's text with surrounding whitespace removed, for reports
    /// (its remark left out: a changed remark is the same rule).
    pub text: String,
    /// What the comment after the rule on its line says
    /// (`10.1.1.1 22 : 64000-64099  # SFTP to the partner`).
    pub remark: Option<String>,
    pub negated: bool,
    pub dest: Dest,
    pub dest_ports: PortSet,
    pub origin: Origin,
    pub protocols: Protocols,
}

impl Rule {
    /// Whether the rule denies every destination of every protocol (`* * :
    /// deny tcp+udp`): what follows it is never reached, and what precedes
    /// it is the whole list of allowed paths.
    pub fn denies_everything(&self) -> bool {
        self.dest == Dest::Any
            && !self.negated
            && self.dest_ports.is_any()
            && self.protocols == Protocols::BOTH
            && self.origin == Origin::Deny
    }

    /// Whether the rule speaks about destinations of `family` at all. Names
    /// cover both families; patterns their own.
    pub fn covers_family(&self, family: Family) -> bool {
        match &self.dest {
            Dest::Pattern(p) => p.family() == family,
            Dest::Name(_) | Dest::Any => true,
        }
    }
}

/// What a rule's `DEST_IP` field names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    /// An address, an octet pattern or a prefix.
    Pattern(AddrPattern),
    /// A DNS name, resolved by the loader (see `resolve`).
    Name(String),
    /// `*`: every IPv4 and every IPv6 address.
    Any,
}

/// An address pattern: each octet of the address matches an inclusive range of
/// values. A literal octet is the range `v..=v`, `*` is `0..=255`; a prefix
/// `/n` fixes the first `n` bits, which is one range per octet too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddrPattern {
    V4([OctetRange; 4]),
    V6([OctetRange; 16]),
}

/// An inclusive range of octet values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OctetRange {
    pub lo: u8,
    pub hi: u8,
}

impl OctetRange {
    pub const ANY: Self = Self { lo: 0, hi: 255 };

    pub const fn exact(v: u8) -> Self {
        Self { lo: v, hi: v }
    }

    pub const fn is_any(self) -> bool {
        self.lo == 0 && self.hi == 255
    }

    pub const fn contains(self, v: u8) -> bool {
        self.lo <= v && v <= self.hi
    }
}

impl AddrPattern {
    /// Every address of `family`.
    pub fn any(family: Family) -> Self {
        match family {
            Family::Ipv4 => Self::V4([OctetRange::ANY; 4]),
            Family::Ipv6 => Self::V6([OctetRange::ANY; 16]),
        }
    }

    /// Exactly one address (an IPv4-mapped IPv6 address is an IPv4 one).
    pub fn exact(addr: IpAddr) -> Self {
        match canonical(addr) {
            IpAddr::V4(a) => Self::V4(a.octets().map(OctetRange::exact)),
            IpAddr::V6(a) => Self::V6(a.octets().map(OctetRange::exact)),
        }
    }

    /// The addresses whose first `len` bits are those of `addr`.
    pub fn prefix(addr: IpAddr, len: u8) -> Self {
        fn octets<const N: usize>(bytes: [u8; N], len: u8) -> [OctetRange; N] {
            let mut out = [OctetRange::ANY; N];
            for (k, (slot, byte)) in out.iter_mut().zip(bytes).enumerate() {
                let fixed = (i32::from(len) - 8 * k as i32).clamp(0, 8) as u32;
                // `fixed` leading bits of the octet are given, the rest are free.
                let free = u8::MAX.checked_shr(fixed).unwrap_or(0);
                *slot = OctetRange {
                    lo: byte & !free,
                    hi: byte | free,
                };
            }
            out
        }
        match addr {
            IpAddr::V4(a) => Self::V4(octets(a.octets(), len)),
            IpAddr::V6(a) => Self::V6(octets(a.octets(), len)),
        }
    }

    pub fn octets(&self) -> &[OctetRange] {
        match self {
            Self::V4(o) => o,
            Self::V6(o) => o,
        }
    }

    pub const fn family(&self) -> Family {
        match self {
            Self::V4(_) => Family::Ipv4,
            Self::V6(_) => Family::Ipv6,
        }
    }

    /// Whether `addr` (after [`canonical`]) is of this family and matches.
    pub fn matches(&self, addr: IpAddr) -> bool {
        let bytes = octets_of(canonical(addr));
        bytes.len() == self.octets().len()
            && self
                .octets()
                .iter()
                .zip(bytes)
                .all(|(range, v)| range.contains(v))
    }
}

/// The address a destination is matched as: an IPv4-mapped IPv6 address
/// (`::ffff:10.1.1.1`, what a dual-stack socket connects to for an IPv4 peer)
/// is the IPv4 address, and goes through the IPv4 rules.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The family `addr` is matched as (see [`canonical`]).
pub fn family_of(addr: IpAddr) -> Family {
    match canonical(addr) {
        IpAddr::V4(_) => Family::Ipv4,
        IpAddr::V6(_) => Family::Ipv6,
    }
}

/// The octets of an address, in network order.
pub fn octets_of(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// An inclusive port range; `*` is `0..=65535`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub const ANY: Self = Self {
        lo: 0,
        hi: u16::MAX,
    };

    pub const fn contains(self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }

    pub const fn is_any(self) -> bool {
        self.lo == 0 && self.hi == u16::MAX
    }

    /// Number of ports in the range.
    pub const fn size(self) -> u32 {
        self.hi as u32 - self.lo as u32 + 1
    }

    pub fn as_range(self) -> RangeInclusive<u16> {
        self.lo..=self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            f.write_str("*")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// The destination ports of a rule: one or more ranges, as written
/// (`389,636,3268-3269`); a port is in the set when any range holds it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PortSet(Vec<PortRange>);

impl PortSet {
    pub fn any() -> Self {
        Self(vec![PortRange::ANY])
    }

    /// A set of the given ranges; `None` when there are none.
    pub fn new(ranges: Vec<PortRange>) -> Option<Self> {
        (!ranges.is_empty()).then_some(Self(ranges))
    }

    pub fn ranges(&self) -> &[PortRange] {
        &self.0
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(port))
    }

    /// The set as sorted, disjoint, non-adjacent ranges.
    pub fn normalized(&self) -> Vec<PortRange> {
        let mut sorted = self.0.clone();
        sorted.sort_unstable_by_key(|r| r.lo);
        let mut out: Vec<PortRange> = Vec::with_capacity(sorted.len());
        for r in sorted {
            match out.last_mut() {
                Some(last) if u32::from(r.lo) <= u32::from(last.hi) + 1 => {
                    last.hi = last.hi.max(r.hi)
                }
                _ => out.push(r),
            }
        }
        out
    }

    /// Whether every port is in the set.
    pub fn is_any(&self) -> bool {
        self.normalized() == [PortRange::ANY]
    }

    /// The ports outside the set, as sorted disjoint ranges.
    pub fn complement(&self) -> Vec<PortRange> {
        let mut out = Vec::new();
        let mut next = 0u32;
        for r in self.normalized() {
            if u32::from(r.lo) > next {
                out.push(PortRange {
                    lo: next as u16,
                    hi: r.lo - 1,
                });
            }
            next = u32::from(r.hi) + 1;
        }
        if next <= u32::from(u16::MAX) {
            out.push(PortRange {
                lo: next as u16,
                hi: u16::MAX,
            });
        }
        out
    }
}

impl From<PortRange> for PortSet {
    fn from(range: PortRange) -> Self {
        Self(vec![range])
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            r.fmt(f)?;
        }
        Ok(())
    }
}

/// The protocols a rule applies to. UDP means connected UDP sockets: the hook
/// runs at connect(), so an unconnected `sendto()` is never given a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Protocols {
    pub tcp: bool,
    pub udp: bool,
}

impl Protocols {
    pub const TCP: Self = Self {
        tcp: true,
        udp: false,
    };
    pub const UDP: Self = Self {
        tcp: false,
        udp: true,
    };
    pub const BOTH: Self = Self {
        tcp: true,
        udp: true,
    };

    pub const fn covers(self, protocol: Protocol) -> bool {
        match protocol {
            Protocol::Tcp => self.tcp,
            Protocol::Udp => self.udp,
        }
    }
}

impl fmt::Display for Protocols {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match (self.tcp, self.udp) {
            (true, true) => "tcp+udp",
            (false, true) => "udp",
            _ => "tcp",
        })
    }
}

/// What a matching rule does with the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// `0`: leave the socket alone; the OS chooses the port.
    Os,
    /// Bind to a free port of this range (never port 0).
    Range(PortRange),
    /// `deny`: connect() fails with EPERM.
    Deny,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Os => f.write_str("0 (OS choice)"),
            Self::Range(range) => range.fmt(f),
            Self::Deny => f.write_str("deny"),
        }
    }
}
