//! Map layouts shared by the connect4/connect6 hooks (`rulebpf-ebpf`) and the
//! loader.
//!
//! The loader compiles an ordered rule list into three lookup structures; the
//! hooks walk them in a fixed number of steps, whatever the number of rules:
//!
//! 1. **Destination address: an automaton, one step per octet** (4 for IPv4,
//!    16 for IPv6). `RULEBPF_ROOTS[selector]` is the start state for the
//!    socket's [`Selector`] (address family x protocol); each step looks up
//!    [`DfaEdge`] `{state, octet}` in `RULEBPF_DFA_EDGES` and, when absent, takes
//!    `RULEBPF_DFA_DEFAULT[state]` (the "any other octet" transition). After the
//!    last octet the state number is a *port table* id. [`DFA_DEAD`] at any
//!    step means "no rule can match this address".
//! 2. **Destination port: an LPM trie keyed by `{table, port}`** (`RULEBPF_PORTS`).
//!    Each table's port intervals are stored as disjoint prefixes, so the
//!    longest-prefix match of `{table, port}/48` is the interval holding the port.
//!    The value is the [`Verdict`]: which rule decided and its origin range.
//! 3. **Per-rule state**, indexed by [`Verdict::rule`]: `RULEBPF_STATS`
//!    (per-CPU [`RuleStats`]) and `RULEBPF_CURSOR` (`u64`, the rotating start of
//!    the origin-port search, shared by all CPUs; the BPF target has 64-bit
//!    atomics only).
//!
//! First-match order and negation are resolved entirely by the compiler; the
//! hook never sees a rule list.
#![no_std]

/// Name of the connect4 program in the object file.
pub const PROGRAM_CONNECT4: &str = "rulebpf_connect4";
/// Name of the connect6 program in the object file.
pub const PROGRAM_CONNECT6: &str = "rulebpf_connect6";

/// The stable entry programs of an instance (object `rulebpf-entry`): what
/// is attached to cgroups (and named in systemd's `BPFProgram=`). Each one
/// tail-calls slot [`JUMP_SLOT`] of its jump map, where the loader puts the
/// rule set in force; swapping rule sets never touches the attachments.
/// The kernel's program name is the first 15 bytes of these names: every
/// program of rulebpf starts with [`PROGRAM_PREFIX`].
pub const PROGRAM_ENTRY4: &str = "rulebpf_entry4";
/// See [`PROGRAM_ENTRY4`].
pub const PROGRAM_ENTRY6: &str = "rulebpf_entry6";
/// How a program of rulebpf is recognised among the programs attached to a
/// cgroup (the kernel keeps 15 bytes of a program's name).
pub const PROGRAM_PREFIX: &str = "rulebpf_";

/// The jump maps of the entry object (`BPF_MAP_TYPE_PROG_ARRAY`, one slot
/// each): one per hook, because the kernel only lets programs of one attach
/// type share a program array.
pub mod jump_names {
    pub const CONNECT4: &str = "RULEBPF_JUMP4";
    pub const CONNECT6: &str = "RULEBPF_JUMP6";
}

/// The slot of a jump map that holds the rule set in force.
pub const JUMP_SLOT: u32 = 0;

/// Map names, as the loader finds them in the object file.
pub mod map_names {
    pub const ROOTS: &str = "RULEBPF_ROOTS";
    pub const DFA_EDGES: &str = "RULEBPF_DFA_EDGES";
    pub const DFA_DEFAULT: &str = "RULEBPF_DFA_DEFAULT";
    pub const PORTS: &str = "RULEBPF_PORTS";
    pub const STATS: &str = "RULEBPF_STATS";
    pub const CURSOR: &str = "RULEBPF_CURSOR";
}

/// Names of the read-only globals the loader sets before the program loads.
pub mod global_names {
    /// `u32`: [`super::POLICY_STRICT`] or [`super::POLICY_FALLBACK`].
    pub const POLICY: &str = "RULEBPF_POLICY";
    /// `u32`: 1 when the kernel has `bpf_set_retval` (5.18+), else 0.
    pub const SET_RETVAL: &str = "RULEBPF_SET_RETVAL";
}

/// No free port in the range: `connect()` fails with `EADDRNOTAVAIL`.
pub const POLICY_STRICT: u32 = 0;
/// No free port in the range: leave the socket alone, the OS picks a port.
pub const POLICY_FALLBACK: u32 = 1;

/// Transition target meaning "no rule matches any address on this path".
pub const DFA_DEAD: u32 = u32::MAX;

/// The address family of a destination, as the rules see it: an IPv4-mapped
/// IPv6 destination (`::ffff:a.b.c.d`) is IPv4.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ipv4 = 0,
    Ipv6 = 1,
}

impl Family {
    /// Octets in an address of this family: the automaton's steps.
    pub const fn octets(self) -> usize {
        match self {
            Self::Ipv4 => 4,
            Self::Ipv6 => 16,
        }
    }
}

/// The protocol of a connecting socket; the hooks handle these two only.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp = 0,
    Udp = 1,
}

impl core::fmt::Display for Protocol {
    /// `tcp` or `udp`, as the rule file and the CLI write it.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// Which automaton a connect() walks: the destination's [`Family`] and the
/// socket's [`Protocol`]. The value is the index into `RULEBPF_ROOTS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    Ipv4Tcp = 0,
    Ipv4Udp = 1,
    Ipv6Tcp = 2,
    Ipv6Udp = 3,
}

impl Selector {
    pub const ALL: [Self; 4] = [Self::Ipv4Tcp, Self::Ipv4Udp, Self::Ipv6Tcp, Self::Ipv6Udp];

    pub const fn new(family: Family, protocol: Protocol) -> Self {
        match (family, protocol) {
            (Family::Ipv4, Protocol::Tcp) => Self::Ipv4Tcp,
            (Family::Ipv4, Protocol::Udp) => Self::Ipv4Udp,
            (Family::Ipv6, Protocol::Tcp) => Self::Ipv6Tcp,
            (Family::Ipv6, Protocol::Udp) => Self::Ipv6Udp,
        }
    }

    pub const fn family(self) -> Family {
        match self {
            Self::Ipv4Tcp | Self::Ipv4Udp => Family::Ipv4,
            Self::Ipv6Tcp | Self::Ipv6Udp => Family::Ipv6,
        }
    }

    pub const fn protocol(self) -> Protocol {
        match self {
            Self::Ipv4Tcp | Self::Ipv6Tcp => Protocol::Tcp,
            Self::Ipv4Udp | Self::Ipv6Udp => Protocol::Udp,
        }
    }
}

/// Entries of `RULEBPF_ROOTS`.
pub const SELECTORS: u32 = 4;

/// Key of `RULEBPF_DFA_EDGES` (hash map, value: next state as `u32`).
///
/// Only octets whose next state differs from the state's default are stored.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DfaEdge {
    pub state: u32,
    /// The octet value, 0..=255, widened so the key has no padding.
    pub octet: u32,
}

/// Data of the `RULEBPF_PORTS` LPM trie key, big-endian so that prefixes
/// compare bit by bit: the first 32 bits select the table, the next 16 the port.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub table_be: [u8; 4],
    pub port_be: [u8; 2],
}

/// Bits in a [`PortKey`]: a full-length lookup uses this prefix length.
pub const PORT_KEY_BITS: u32 = 48;

impl PortKey {
    pub const fn new(table: u32, port: u16) -> Self {
        Self {
            table_be: table.to_be_bytes(),
            port_be: port.to_be_bytes(),
        }
    }
}

/// Value of `RULEBPF_PORTS`: the decision for a destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Verdict {
    /// Index of the deciding rule in the compiled rule list (not its line):
    /// the index into `RULEBPF_STATS` and `RULEBPF_CURSOR`.
    pub rule: u32,
    /// The rule's line in its file, for the kernel log.
    pub line: u32,
    /// First origin port; `0` means "let the OS choose".
    pub org_lo: u16,
    /// Last origin port (inclusive); equal to `org_lo` for a single port.
    pub org_hi: u16,
}

/// Value of `RULEBPF_STATS` (per-CPU array indexed by rule).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    /// connect() calls this rule decided.
    pub matched: u64,
    /// Sockets bound to an origin port of the rule's range.
    pub bound: u64,
    /// connect() calls for which no port of the range could be bound.
    pub exhausted: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are `repr(C)` plain integers without padding.
    unsafe impl aya::Pod for super::DfaEdge {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::Verdict {}
    unsafe impl aya::Pod for super::RuleStats {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::ToString;

    use super::*;

    #[test]
    fn a_selector_is_its_family_and_protocol() {
        assert_eq!(Selector::ALL.len(), SELECTORS as usize);
        for selector in Selector::ALL {
            assert_eq!(
                Selector::new(selector.family(), selector.protocol()),
                selector
            );
        }
        assert_eq!(Selector::new(Family::Ipv6, Protocol::Udp) as u32, 3);
    }

    #[test]
    fn protocols_print_as_the_rule_file_writes_them() {
        assert_eq!(Protocol::Tcp.to_string(), "tcp");
        assert_eq!(Protocol::Udp.to_string(), "udp");
    }
}
