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
//!
//! **Instance maps** ([`shared_map_names`]) outlive rule sets: created with
//! the entry object, pinned in the instance's directory, and reused by every
//! rule set (pinned by name), so the bookkeeping of live sockets survives a
//! swap. `RULEBPF_TUPLES` holds a [`TupleKey`] per live socket the hook bound
//! with port sharing (what makes a port "busy toward a destination"),
//! `RULEBPF_SOCKS` the [`SockState`] of each such socket (socket-local
//! storage, read back when the socket is released), `RULEBPF_OCCUPANCY` the
//! [`Occupancy`] of each rule by its [`Verdict::key`], and
//! `RULEBPF_COUNTERS` the instance's [`Counter`]s.
#![no_std]

/// Name of the connect4 program in the object file.
pub const PROGRAM_CONNECT4: &str = "rulebpf_connect4";
/// Name of the connect6 program in the object file.
pub const PROGRAM_CONNECT6: &str = "rulebpf_connect6";
/// The same hooks for kernels without `bpf_loop` (before 5.17): the port
/// search tries at most [`BOUNDED_CANDIDATES`] ports per connect.
pub const PROGRAM_CONNECT4_BOUNDED: &str = "rulebpf_connect4_bounded";
/// See [`PROGRAM_CONNECT4_BOUNDED`].
pub const PROGRAM_CONNECT6_BOUNDED: &str = "rulebpf_connect6_bounded";
/// How many ports one connect tries without `bpf_loop`: a loop the verifier
/// walks iteration by iteration. A range of at most this many ports is
/// searched whole by every connect, as with `bpf_loop`; a larger one from
/// the rule's cursor on, which every search moves past what it tried.
pub const BOUNDED_CANDIDATES: u32 = 1024;

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

/// The bookkeeping programs of the entry object, attached beside the entry
/// programs: they keep the instance maps true whatever rule set is in force.
pub const PROGRAM_BIND4: &str = "rulebpf_bind4";
/// See [`PROGRAM_BIND4`].
pub const PROGRAM_BIND6: &str = "rulebpf_bind6";
/// See [`PROGRAM_BIND4`]; 15 bytes, what the kernel keeps of a name.
pub const PROGRAM_RELEASE: &str = "rulebpf_release";
/// See [`PROGRAM_BIND4`].
pub const PROGRAM_SOCKOPS: &str = "rulebpf_sockops";

/// Map names, as the loader finds them in the object file.
pub mod map_names {
    pub const ROOTS: &str = "RULEBPF_ROOTS";
    pub const DFA_EDGES: &str = "RULEBPF_DFA_EDGES";
    pub const DFA_DEFAULT: &str = "RULEBPF_DFA_DEFAULT";
    pub const PORTS: &str = "RULEBPF_PORTS";
    pub const STATS: &str = "RULEBPF_STATS";
    pub const CURSOR: &str = "RULEBPF_CURSOR";
}

/// The instance maps: declared identically (pinned by name) in the entry
/// object and in every rule-set object, created once per instance.
pub mod shared_map_names {
    /// [`super::TupleKey`] -> rule key (`u64`): live sockets bound with port
    /// sharing, by protocol, destination and origin port.
    pub const TUPLES: &str = "RULEBPF_TUPLES";
    /// Socket-local storage: [`super::SockState`].
    pub const SOCKS: &str = "RULEBPF_SOCKS";
    /// Rule key (`u64`) -> [`super::Occupancy`].
    pub const OCCUPANCY: &str = "RULEBPF_OCCUPANCY";
    /// [`super::PortUse`] -> sockets on that port of that rule (`u64`).
    pub const PORT_USE: &str = "RULEBPF_PORT_USE";
    /// Per-CPU `u64` counters, indexed by [`super::Counter`].
    pub const COUNTERS: &str = "RULEBPF_COUNTERS";
    /// [`super::TupleKey`] -> [`super::TupleSource`] of the TCP connection
    /// holding that tuple: what a connect that finds the tuple busy needs to
    /// ask the kernel whether the connection still exists.
    pub const SOURCES: &str = "RULEBPF_SOURCES";
    pub const ALL: [&str; 6] = [TUPLES, SOCKS, OCCUPANCY, PORT_USE, COUNTERS, SOURCES];
}

/// The decision-event maps of an instance (`rulebpf events`): created by
/// the first rule set loaded (pinned by name in the instance's directory,
/// like the instance maps) and shared by every rule set after it. The
/// entry object does not declare them: an instance made before events
/// existed gets them with its next rule set.
pub mod event_map_names {
    /// BPF ring buffer of [`super::Event`]s.
    pub const EVENTS: &str = "RULEBPF_EVENTS";
    /// `u32` array of one: [`super::EVENTS_ON`] | [`super::EVENTS_NO_MATCH`],
    /// written by the reader. 0: nobody listens, no event is made.
    pub const CONTROL: &str = "RULEBPF_EVENT_CONTROL";
    /// Per-CPU `u64`s indexed by [`super::EventCount`].
    pub const COUNTS: &str = "RULEBPF_EVENT_COUNTS";
    pub const ALL: [&str; 3] = [EVENTS, CONTROL, COUNTS];
}

/// Whether a map of a rule-set object belongs to the instance (pinned once
/// in the instance's directory, shared by every rule set).
pub fn is_instance_map(name: &str) -> bool {
    shared_map_names::ALL.contains(&name) || event_map_names::ALL.contains(&name)
}

/// Bytes of `RULEBPF_EVENTS` (a power of two): about 2,500 events a reader
/// has not read yet before the hook counts drops.
pub const EVENT_RING_BYTES: u32 = 256 * 1024;

/// `RULEBPF_EVENT_CONTROL` bit: a reader listens; the hooks make events.
pub const EVENTS_ON: u32 = 1;
/// `RULEBPF_EVENT_CONTROL` bit: also make [`Outcome::NoMatch`] events.
pub const EVENTS_NO_MATCH: u32 = 2;

/// Entries of `RULEBPF_EVENT_COUNTS`, per CPU.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventCount {
    /// Events written to the ring.
    Written = 0,
    /// Events lost because the ring was full (the reader fell behind).
    Dropped = 1,
}

/// Entries of `RULEBPF_EVENT_COUNTS`.
pub const EVENT_COUNTS: u32 = 2;

/// What the hook did with one connect(): the `outcome` of an [`Event`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Bound to an origin port of the rule's range.
    Bound = 1,
    /// The rule says `deny`: refused with EPERM.
    Denied = 2,
    /// No port of the range was free: connect() failed (policy strict).
    Exhausted = 3,
    /// No port of the range was free: the OS chose one (policy fallback).
    Fallback = 4,
    /// The application bound the port itself before connect(): kept.
    AppChose = 5,
    /// The kernel chose the port at bind(addr, 0) or a send before connect().
    KernelChose = 6,
    /// The rule's origin is 0: the OS chooses.
    Zero = 7,
    /// No rule matched (made only when a reader asks for it).
    NoMatch = 8,
    /// An application-bound port outside the range, `--app-bound refuse`.
    Refused = 9,
}

impl Outcome {
    pub const ALL: [Self; 9] = [
        Self::Bound,
        Self::Denied,
        Self::Exhausted,
        Self::Fallback,
        Self::AppChose,
        Self::KernelChose,
        Self::Zero,
        Self::NoMatch,
        Self::Refused,
    ];

    /// snake_case, as `rulebpf events` and the metrics name it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Bound => "bound",
            Self::Denied => "denied",
            Self::Exhausted => "exhausted",
            Self::Fallback => "fallback",
            Self::AppChose => "app_chose",
            Self::KernelChose => "kernel_chose",
            Self::Zero => "zero",
            Self::NoMatch => "no_match",
            Self::Refused => "refused",
        }
    }

    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|o| *o as u8 == value)
    }
}

/// One decision of a connect hook, as the ring buffer carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_boot_ns()`: CLOCK_BOOTTIME, nanoseconds.
    pub boot_ns: u64,
    /// `bpf_get_current_cgroup_id()`: the connecting task's cgroup v2 id.
    pub cgroup_id: u64,
    /// `bpf_get_current_pid_tgid()`: tgid (the process) in the high half.
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid()`: uid in the low half.
    pub uid_gid: u64,
    /// `bpf_get_netns_cookie()` of the socket's network namespace.
    pub netns_cookie: u64,
    /// The deciding rule's [`Verdict::key`] (0: no rule).
    pub rule_key: u64,
    /// Destination, network order; IPv4 in the first word.
    pub dest_addr: [u32; 4],
    /// `bpf_get_current_comm()`: the task's name, NUL-padded.
    pub comm: [u8; 16],
    /// The rule's line (0: no rule).
    pub line: u32,
    /// Destination port, host order.
    pub dest_port: u16,
    /// The origin port bound or kept, host order (0: the OS chooses later).
    pub origin_port: u16,
    /// [`Family`] as `u8` (an IPv4-mapped destination is IPv4).
    pub family: u8,
    /// [`Protocol`] as `u8`.
    pub protocol: u8,
    /// [`Outcome`] as `u8`.
    pub outcome: u8,
    pub pad: u8,
    /// The deciding rule's index in its rule set (`u32::MAX`: no rule).
    pub rule: u32,
}

// The ring buffer's record: no padding the hook would leave unwritten.
const _: () = assert!(core::mem::size_of::<Event>() == 96);

/// Entries of `RULEBPF_TUPLES` unless the instance is created with another
/// capacity: live shared sockets of the instance.
pub const TUPLE_CAPACITY: u32 = 65_536;
/// Entries of `RULEBPF_OCCUPANCY` (rules that bound a socket) and of
/// `RULEBPF_PORT_USE` (ports with a socket, per rule).
pub const OCCUPANCY_CAPACITY: u32 = 65_536;

/// Names of the read-only globals the loader sets before the program loads.
pub mod global_names {
    /// `u32`: [`super::POLICY_STRICT`] or [`super::POLICY_FALLBACK`].
    pub const POLICY: &str = "RULEBPF_POLICY";
    /// `u32`: 1 when the kernel has `bpf_set_retval` (5.18+), else 0.
    pub const SET_RETVAL: &str = "RULEBPF_SET_RETVAL";
    /// `u32`: 1 to share origin ports among destinations (the default), 0
    /// for one socket per origin port.
    pub const SHARING: &str = "RULEBPF_SHARING";
    /// `u32`: [`super::APP_BOUND_KEEP`] or [`super::APP_BOUND_REFUSE`].
    pub const APP_BOUND: &str = "RULEBPF_APP_BOUND";
    /// `u32`: the byte offset of `tw_substate` in the kernel's `struct
    /// tcp_timewait_sock` (from its BTF), 0 when unknown.
    pub const TW_SUBSTATE: &str = "RULEBPF_TW_SUBSTATE";
    /// `u32`: 1 (the default) when the hooks may make decision events; 0
    /// removes their code at load (the verifier drops the branch).
    pub const EVENTS_ON: &str = "RULEBPF_EVENTS_ON";
    /// `u32` (entry object): 1 when sock_ops programs may call
    /// `bpf_get_netns_cookie` (5.15+), else 0.
    pub const SOCKOPS_NETNS: &str = "RULEBPF_SOCKOPS_NETNS";
}

/// A socket the application bound outside the rule's range keeps its port.
pub const APP_BOUND_KEEP: u32 = 0;
/// A socket the application bound outside the rule's range fails connect()
/// with `EPERM`.
pub const APP_BOUND_REFUSE: u32 = 1;

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

/// `Verdict::flags`: the rule says `deny`: connect() fails with EPERM.
pub const VERDICT_DENY: u32 = 1;

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
    /// [`VERDICT_DENY`], or 0 (also keeps `key` aligned, no padding bytes).
    pub flags: u32,
    /// The rule's stable identity across rule sets (its text and which
    /// occurrence of that text it is), set by the loader: the key of
    /// `RULEBPF_OCCUPANCY` and of the sockets bound under the rule.
    pub key: u64,
}

impl Verdict {
    /// A verdict without its key (the loader sets it when filling the map).
    pub const fn new(rule: u32, line: u32, org_lo: u16, org_hi: u16) -> Self {
        Self {
            rule,
            line,
            org_lo,
            org_hi,
            flags: 0,
            key: 0,
        }
    }

    /// The verdict of a `deny` rule: no origin range, connect() refused.
    pub const fn deny(rule: u32, line: u32) -> Self {
        let mut verdict = Self::new(rule, line, 0, 0);
        verdict.flags = VERDICT_DENY;
        verdict
    }

    /// Whether the rule says `deny`.
    pub const fn denies(&self) -> bool {
        self.flags & VERDICT_DENY != 0
    }

    /// Ports in the origin range (0 for "the OS chooses").
    pub const fn range_size(&self) -> u32 {
        if self.org_lo == 0 {
            0
        } else {
            self.org_hi as u32 - self.org_lo as u32 + 1
        }
    }
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
    /// Sockets the application had bound to a port it chose (`bind(addr,
    /// P)`) before connect(): kept (or refused, `--app-bound refuse`).
    pub app_chose: u64,
    /// Sockets bound before connect() to a port the kernel chose: `bind(addr,
    /// 0)`, or a UDP socket that sent before it connected.
    pub kernel_chose: u64,
    /// connect() calls refused because the rule says `deny`.
    pub denied: u64,
}

/// Key of `RULEBPF_TUPLES`: a live socket the hook bound with port sharing,
/// as the kernel tells connections apart (the local address aside: one
/// entry per origin port and destination, whatever the source address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    /// [`Family`] as `u8`: an IPv4-mapped destination is IPv4.
    pub family: u8,
    /// [`Protocol`] as `u8`.
    pub protocol: u8,
    /// Host order.
    pub origin_port: u16,
    /// Host order.
    pub dest_port: u16,
    pub pad: u16,
    /// Network order; an IPv4 address in the first word, the rest 0.
    pub dest_addr: [u32; 4],
}

/// Value of `RULEBPF_SOURCES`: how to find the TCP connection that holds a
/// tuple, written by the `sockops` program when the connection starts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TupleSource {
    /// The connection's local address, network order (IPv4: the first word).
    pub addr: [u32; 4],
    /// Its network namespace (`bpf_get_netns_cookie`): the kernel's lookup
    /// is per namespace, the tuple table per instance.
    pub netns: u64,
    /// Its socket (`bpf_get_socket_cookie`): a connect that found the tuple
    /// stale checks it is still the same entry before taking it.
    pub socket: u64,
}

/// Value of `RULEBPF_SOCKS` (socket-local storage): what the release of a
/// socket must undo, and what the bind hooks saw.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// The socket's entry in `RULEBPF_TUPLES` (valid with [`SOCK_TUPLE`]).
    pub tuple: TupleKey,
    /// The rule it was bound under (valid with [`SOCK_COUNTED`]).
    pub rule_key: u64,
    /// `SOCK_*` flags.
    pub flags: u32,
    /// TCP: `rcv_nxt` when this side sent its FIN (valid with
    /// [`SOCK_FIN_SENT`]); unchanged at the close, the peer never sent its
    /// own FIN.
    pub fin_rcv_nxt: u32,
}

/// The hook bound this socket to an origin port.
pub const SOCK_OURS: u32 = 1;
/// `SockState::tuple` is in `RULEBPF_TUPLES`: delete it at release.
pub const SOCK_TUPLE: u32 = 1 << 1;
/// The socket counts in its rule's `Occupancy::sockets`: subtract at release.
pub const SOCK_COUNTED: u32 = 1 << 2;
/// bind() with a port: the application chose it.
pub const SOCK_APP_CHOSE: u32 = 1 << 3;
/// bind() with port 0: the kernel chose it.
pub const SOCK_KERNEL_CHOSE: u32 = 1 << 4;
/// A socket the application bound, counted at its first connect(): later
/// connects (a UDP socket connecting elsewhere) only move its tuple.
pub const SOCK_KEPT: u32 = 1 << 5;
/// The socket holds a reference in `RULEBPF_PORT_USE`: give it back at
/// release (the last one frees the port in `Occupancy::in_use`).
pub const SOCK_PORT: u32 = 1 << 6;
/// A TCP socket whose state changes the sock_ops program follows: its
/// tuple goes when the connection is closed (the full socket gone), not
/// when the application closes it.
pub const SOCK_FOLLOWED: u32 = 1 << 7;
/// The `sockops` program wrote this socket's [`TupleSource`]: whoever
/// removes that entry (the socket at its close, or a connect that found the
/// connection gone) gives the tuple back or takes it over, never both.
pub const SOCK_SOURCE: u32 = 1 << 9;
/// This side of a followed TCP connection sent its FIN
/// (`SockState::fin_rcv_nxt` is set).
pub const SOCK_FIN_SENT: u32 = 1 << 8;
/// `SockState::flags`: an application-bound socket was counted (matched,
/// app_chose or kernel_chose) at a connect(); later connect()s of it, and
/// the runs of the same instance attached to a descendant cgroup, count
/// nothing more.
pub const SOCK_APP_COUNTED: u32 = 1 << 10;
/// `SockState::flags`: the release of a socket the hook bound was counted.
pub const SOCK_RELEASED: u32 = 1 << 11;

/// Value of `RULEBPF_OCCUPANCY`: what a rule's range holds now.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// Ports of the range with at least one live socket the hook bound
    /// (with sharing a port serves one socket per destination).
    pub in_use: u64,
    /// The most `in_use` has been since the instance was created (read
    /// after each increment: may miss a concurrent peak, never overstates).
    pub high_water: u64,
    /// Live sockets the hook bound under the rule.
    pub sockets: u64,
}

/// Key of `RULEBPF_PORT_USE`: one port of one rule's range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortUse {
    pub rule_key: u64,
    pub port: u16,
    pub pad: [u16; 3],
}

/// The instance counters (`RULEBPF_COUNTERS`, per CPU, index = value).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `RULEBPF_TUPLES` was full: the socket was bound without sharing.
    TuplesFull = 0,
    /// `RULEBPF_OCCUPANCY` was full: a rule's sockets are not counted.
    OccupancyFull = 1,
    /// `bpf_setsockopt(SO_REUSEADDR/SO_REUSEPORT)` failed (Linux < 6.0): the
    /// socket was bound without sharing.
    SharingUnavailable = 2,
    /// Ports skipped because a live socket of the instance already goes
    /// from them to the destination.
    BusyToDestination = 3,
    /// Sockets released that the hook had bound.
    Released = 4,
    /// No socket-local storage could be made for a bound socket: it is not
    /// tracked (its port is not shared).
    StorageFailed = 5,
    /// A reconnect of a socket the hook bound, to a destination that
    /// socket's port is already busy toward: refused with EADDRNOTAVAIL.
    RekeyRefused = 6,
    /// A busy tuple whose TCP connection no longer existed (its close went
    /// unseen, or a FIN_WAIT2 it was kept for ended), given to a new
    /// connect.
    Reclaimed = 7,
}

impl Counter {
    pub const ALL: [Self; 8] = [
        Self::TuplesFull,
        Self::OccupancyFull,
        Self::SharingUnavailable,
        Self::BusyToDestination,
        Self::Released,
        Self::StorageFailed,
        Self::RekeyRefused,
        Self::Reclaimed,
    ];

    /// snake_case, as `stats --json` and the metrics name it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::TuplesFull => "tuples_full",
            Self::OccupancyFull => "occupancy_full",
            Self::SharingUnavailable => "sharing_unavailable",
            Self::BusyToDestination => "busy_to_destination",
            Self::Released => "released",
            Self::StorageFailed => "storage_failed",
            Self::RekeyRefused => "rekey_refused",
            Self::Reclaimed => "reclaimed",
        }
    }
}

/// Entries of `RULEBPF_COUNTERS` (full: more would change the pinned map
/// of existing instances).
pub const COUNTERS: u32 = 8;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are `repr(C)` plain integers without padding.
    unsafe impl aya::Pod for super::DfaEdge {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::Verdict {}
    unsafe impl aya::Pod for super::RuleStats {}
    unsafe impl aya::Pod for super::TupleKey {}
    unsafe impl aya::Pod for super::SockState {}
    unsafe impl aya::Pod for super::Occupancy {}
    unsafe impl aya::Pod for super::PortUse {}
    unsafe impl aya::Pod for super::TupleSource {}
    unsafe impl aya::Pod for super::Event {}
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
    fn shared_layouts_have_no_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<Verdict>(), 24);
        assert_eq!(size_of::<TupleKey>(), 24);
        assert_eq!(size_of::<SockState>(), 40);
        assert_eq!(size_of::<Occupancy>(), 24);
        assert_eq!(size_of::<PortUse>(), 16);
        assert_eq!(size_of::<RuleStats>(), 48);
        assert_eq!(Verdict::new(0, 1, 5, 9).range_size(), 5);
        assert_eq!(Verdict::new(0, 1, 0, 0).range_size(), 0);
        assert!(Verdict::deny(0, 1).denies() && !Verdict::new(0, 1, 0, 0).denies());
        assert_eq!(Verdict::deny(0, 1).range_size(), 0);
    }

    #[test]
    fn protocols_print_as_the_rule_file_writes_them() {
        assert_eq!(Protocol::Tcp.to_string(), "tcp");
        assert_eq!(Protocol::Udp.to_string(), "udp");
    }
}
