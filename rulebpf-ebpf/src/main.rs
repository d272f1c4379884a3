//! The `cgroup/connect4` and `cgroup/connect6` hooks of a rule set: pick the
//! origin port of every new TCP connection and connected UDP socket made
//! from the cgroup, from rules the loader compiled into maps (layouts:
//! `rulebpf-common`). The instance's entry programs tail-call them.
//!
//! Per connect the cost is fixed: one array read for the automaton's root,
//! one step per destination octet (4 for IPv4, 16 for IPv6), one LPM lookup on
//! `{table, port}`, then — only for a rule with an origin range — `bpf_bind()`
//! on ports of the range until one is free (`bind.rs`). With port sharing
//! (the default) a port carries one socket per destination, as the kernel's
//! own connect() allocator does; the instance maps (`shared.rs`) record
//! which ports are busy toward which destination (`track.rs`).
//!
//! A socket the application bound itself keeps its port; it is still
//! matched against the rules and counted, by who chose the port (the
//! application, or the kernel for `bind(addr, 0)`), and `--app-bound
//! refuse` fails its connect() when the port is outside the rule's range.
#![no_std]
#![no_main]
// atomic_xadd: the bpfel target exposes no Atomic*::fetch_add (see bind.rs).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod bind;
mod events;
mod runtime;
mod shared;
mod track;

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::SockAddrContext,
};
use aya_log_ebpf::{debug, info, warn};
use rulebpf_common::{
    APP_BOUND_REFUSE, DFA_DEAD, DfaEdge, Family, Outcome, POLICY_FALLBACK, PORT_KEY_BITS, PortKey,
    Protocol, RuleStats, Selector, TupleKey, Verdict,
};

use crate::{
    bind::SockAddr,
    shared::{IPPROTO_TCP, IPPROTO_UDP, SOCK_DGRAM, SOCK_STREAM},
};

/// Start state per `Selector` (address family x protocol).
#[map]
static RULEBPF_ROOTS: Array<u32> = Array::with_max_entries(rulebpf_common::SELECTORS, 0);
/// Next state for octets whose transition differs from the default.
#[map]
static RULEBPF_DFA_EDGES: HashMap<DfaEdge, u32> = HashMap::with_max_entries(1, 0);
/// Default next state, indexed by state.
#[map]
static RULEBPF_DFA_DEFAULT: Array<u32> = Array::with_max_entries(1, 0);
/// `{port table, port}` -> the deciding rule and its origin range.
#[map]
static RULEBPF_PORTS: LpmTrie<PortKey, Verdict> = LpmTrie::with_max_entries(1, 0);
/// Per-rule counters, per CPU (no atomics on the hot path).
#[map]
static RULEBPF_STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(1, 0);
/// Per-rule rotating start of the origin-port search, shared by all CPUs.
#[map]
static RULEBPF_CURSOR: Array<u64> = Array::with_max_entries(1, 0);

/// `POLICY_STRICT` or `POLICY_FALLBACK`; set by the loader before loading.
#[unsafe(no_mangle)]
static RULEBPF_POLICY: u32 = 0;

/// 1 when the kernel has `bpf_set_retval` (5.18+); set by the loader. With 0
/// the call below is dead code the verifier never checks (a branch on a
/// frozen read-only global), so the program loads on 5.17 too.
#[unsafe(no_mangle)]
static RULEBPF_SET_RETVAL: u32 = 1;

/// 1: origin ports are shared among destinations (`--port-sharing on`, the
/// default); 0: one socket per origin port.
#[unsafe(no_mangle)]
static RULEBPF_SHARING: u32 = 1;

/// `APP_BOUND_KEEP` or `APP_BOUND_REFUSE`; set by the loader.
#[unsafe(no_mangle)]
static RULEBPF_APP_BOUND: u32 = 0;

/// Where `tw_substate` lies in the kernel's `struct tcp_timewait_sock`, read
/// by the loader from the kernel's BTF (0: unknown, and a timewait socket
/// keeps its tuple busy). A frozen constant, so the verifier checks the
/// read against the type at that offset (`track::reclaim_if_gone`).
#[unsafe(no_mangle)]
static RULEBPF_TW_SUBSTATE: u32 = 0;

/// connect() proceeds.
const ALLOW: i32 = 1;
/// connect() fails with the errno set by `bpf_set_retval` (else EPERM).
const REJECT: i32 = 0;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const EPERM: i32 = 1;

// The hooks twice: searching every port of a range with `bpf_loop`
// (5.17+), or at most `BOUNDED_CANDIDATES` ports without it (`bind.rs`). The
// loader loads one pair; the other is never shown to the kernel (a program
// that references a `bpf_loop` callback does not even load before 5.13).

#[cgroup_sock_addr(connect4)]
pub fn rulebpf_connect4(ctx: SockAddrContext) -> i32 {
    answer(try_connect4::<true>(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn rulebpf_connect6(ctx: SockAddrContext) -> i32 {
    answer(try_connect6::<true>(&ctx))
}

#[cgroup_sock_addr(connect4)]
pub fn rulebpf_connect4_bounded(ctx: SockAddrContext) -> i32 {
    answer(try_connect4::<false>(&ctx))
}

#[cgroup_sock_addr(connect6)]
pub fn rulebpf_connect6_bounded(ctx: SockAddrContext) -> i32 {
    answer(try_connect6::<false>(&ctx))
}

/// The program's return value, 1 or 0, as the verifier wants to see it
/// (a value that came back from a subprogram through memory has no known
/// range).
#[inline(always)]
fn answer(result: Result<i32, i32>) -> i32 {
    match result {
        Ok(ALLOW) | Err(ALLOW) => ALLOW,
        _ => REJECT,
    }
}

/// Records the decision for `rulebpf events` when a reader wants one of
/// this outcome (one map read otherwise: see `events.rs`).
macro_rules! record {
    ($ctx:expr, $tuple:expr, $outcome:expr, $verdict:expr, $origin:expr) => {{
        let outcome: Outcome = $outcome;
        if events::wanted(outcome) {
            let decision = events::Decision::new(outcome, $verdict, $origin);
            events::emit($ctx, $tuple, &decision);
        }
    }};
}

/// A connect() on a path a rule denies: counted, logged, refused with
/// EPERM, whoever bound the socket (a denied path is denied to an
/// application-bound socket too, and to a socket connected before).
macro_rules! deny {
    ($ctx:expr, $verdict:expr, $dest:expr, $port:expr, $tuple:expr) => {{
        let (ctx, verdict): (&SockAddrContext, &Verdict) = ($ctx, $verdict);
        if let Some(stats) = rule_stats(verdict) {
            stats.matched += 1;
            stats.denied += 1;
        }
        record!(
            ctx,
            $tuple,
            Outcome::Denied,
            Some(verdict),
            $tuple.origin_port
        );
        info!(
            ctx,
            "connect {:i} port {}: denied (line {})", $dest, $port, verdict.line
        );
        Err(refuse(EPERM))
    }};
}

/// The tail both hooks share: a socket the application bound is counted
/// (and kept, or refused); an unbound one is bound to a port of the range.
/// A macro, not a function: aya-log's macros need the address's concrete
/// type (`[u8; 4]` or `[u8; 16]`).
macro_rules! apply {
    ($every_port:ident, $ctx:expr, $connect:expr, $verdict:expr, $dest:expr, $tuple:expr) => {{
        let (ctx, connect, verdict, dest): (&SockAddrContext, &Connect, Verdict, _) =
            ($ctx, $connect, $verdict, $dest);
        let port = connect.port;
        // Log calls cost one branch unless the loader enabled their level
        // (AYA_LOG_LEVEL is set at load: off for `attach`, --log-level for `run`).
        if connect.src_port != 0 {
            let kept = app_bound(ctx, connect, &verdict, $tuple);
            let chosen_by = if kept.app_chose {
                "the application"
            } else {
                "the kernel"
            };
            let outcome = if kept.refused {
                Outcome::Refused
            } else if kept.app_chose {
                Outcome::AppChose
            } else {
                Outcome::KernelChose
            };
            record!(ctx, &$tuple, outcome, Some(&verdict), connect.src_port);
            if kept.refused {
                warn!(
                    ctx,
                    "connect {:i} port {}: refused (--app-bound refuse): origin port {}, chosen by {} at bind(), is outside {}-{} of line {}",
                    dest,
                    port,
                    connect.src_port,
                    chosen_by,
                    verdict.org_lo,
                    verdict.org_hi,
                    verdict.line
                );
                Err(refuse(EPERM))
            } else {
                info!(
                    ctx,
                    "connect {:i} port {}: origin port {} kept, chosen by {} at bind() before connect() (line {}, range {}-{})",
                    dest,
                    port,
                    connect.src_port,
                    chosen_by,
                    verdict.line,
                    verdict.org_lo,
                    verdict.org_hi
                );
                Ok(ALLOW)
            }
        } else {
            let tuple: TupleKey = $tuple;
            match enforce::<$every_port>(ctx, connect, &verdict, tuple) {
                Ok(origin) => {
                    let outcome = if origin == 0 {
                        Outcome::Zero
                    } else {
                        Outcome::Bound
                    };
                    record!(ctx, &tuple, outcome, Some(&verdict), origin);
                    debug!(
                        ctx,
                        "connect {:i} port {} -> line {}: origin port {} (range {}-{}; 0: the OS chooses)",
                        dest,
                        port,
                        verdict.line,
                        origin,
                        verdict.org_lo,
                        verdict.org_hi
                    );
                    Ok(ALLOW)
                }
                Err(errno) => {
                    let outcome = if fallback() {
                        Outcome::Fallback
                    } else {
                        Outcome::Exhausted
                    };
                    record!(ctx, &tuple, outcome, Some(&verdict), 0);
                    warn!(
                        ctx,
                        "connect {:i} port {}: no origin port of {}-{} usable (line {}, errno {})",
                        dest,
                        port,
                        verdict.org_lo,
                        verdict.org_hi,
                        verdict.line,
                        errno
                    );
                    Err(exhausted(errno))
                }
            }
        }
    }};
}

fn try_connect4<const EVERY_PORT: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(connect) = handled(ctx, AF_INET) else {
        return Ok(ALLOW);
    };
    let addr = connect.sa.user_ip4;
    let tuple = connect.tuple(Family::Ipv4, [addr, 0, 0, 0]);
    // Network order in memory: the native-endian bytes are the octets.
    let dest = addr.to_ne_bytes();
    let verdict = decide(
        Selector::new(Family::Ipv4, connect.protocol),
        &dest,
        connect.port,
    );
    if let Some(verdict) = &verdict
        && verdict.denies()
    {
        return deny!(ctx, verdict, dest, connect.port, &tuple);
    }
    if let Some(ret) = track::reconnect(ctx, &connect, &tuple) {
        return ret;
    }
    let Some(verdict) = verdict else {
        record!(ctx, &tuple, Outcome::NoMatch, None, tuple.origin_port);
        return Ok(ALLOW);
    };
    apply!(EVERY_PORT, ctx, &connect, verdict, dest, tuple)
}

fn try_connect6<const EVERY_PORT: bool>(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(connect) = handled(ctx, AF_INET6) else {
        return Ok(ALLOW);
    };
    let words = connect.sa.user_ip6;
    // A dual-stack socket reaches an IPv4 peer at ::ffff:a.b.c.d; such a
    // connect() is an IPv4 connection: it follows the IPv4 rules, and its
    // 4-tuple is an IPv4 one (the kernel hashes it as such).
    let mapped = words[0] == 0 && words[1] == 0 && words[2] == 0xffff_u32.to_be();
    let tuple = if mapped {
        connect.tuple(Family::Ipv4, [words[3], 0, 0, 0])
    } else {
        connect.tuple(Family::Ipv6, words)
    };
    let mut dest = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        dest[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let verdict = if mapped {
        let mut v4 = [0u8; 4];
        v4.copy_from_slice(&dest[12..]);
        decide(
            Selector::new(Family::Ipv4, connect.protocol),
            &v4,
            connect.port,
        )
    } else {
        decide(
            Selector::new(Family::Ipv6, connect.protocol),
            &dest,
            connect.port,
        )
    };
    if let Some(verdict) = &verdict
        && verdict.denies()
    {
        return deny!(ctx, verdict, dest, connect.port, &tuple);
    }
    // Kept apart from `apply!` (not one macro for both hooks): as early
    // returns the verifier walks about 13,000 instructions for connect6;
    // as one match expression, about 31,500.
    if let Some(ret) = track::reconnect(ctx, &connect, &tuple) {
        return ret;
    }
    let Some(verdict) = verdict else {
        record!(ctx, &tuple, Outcome::NoMatch, None, tuple.origin_port);
        return Ok(ALLOW);
    };
    apply!(EVERY_PORT, ctx, &connect, verdict, dest, tuple)
}

/// A connect() the hooks act on, as [`handled`] found it.
pub(crate) struct Connect<'a> {
    sa: &'a bpf_sock_addr,
    sk: &'a bpf_sock,
    pub(crate) protocol: Protocol,
    /// Destination port, host order.
    port: u16,
    /// The port the socket is bound to already (host order), or 0.
    pub(crate) src_port: u16,
}

impl Connect<'_> {
    /// This connection's key in `RULEBPF_TUPLES`, without its origin port.
    #[inline(always)]
    fn tuple(&self, family: Family, dest_addr: [u32; 4]) -> TupleKey {
        TupleKey {
            family: family as u8,
            protocol: self.protocol as u8,
            origin_port: self.src_port,
            dest_port: self.port,
            pad: 0,
            dest_addr,
        }
    }
}

/// The prologue both hooks share: the connect() when it is one rulebpf acts
/// on — a destination of the hook's `family` (`AF_INET` for connect4,
/// `AF_INET6` for connect6), a TCP or UDP socket.
#[inline(always)]
fn handled(ctx: &SockAddrContext, family: u32) -> Option<Connect<'_>> {
    // SAFETY: the kernel hands sock_addr programs a valid `bpf_sock_addr`.
    let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
    if sa.user_family != family {
        return None;
    }
    // SAFETY: `sk` is always set for sock_addr programs (PTR_TO_SOCKET).
    let sk = unsafe { &*sa.__bindgen_anon_1.sk };
    Some(Connect {
        sa,
        protocol: protocol(sa)?,
        sk,
        port: u16::from_be(sa.user_port as u16),
        // Host order in `bpf_sock`. An address bound without a port
        // (IP_BIND_ADDRESS_NO_PORT) reads 0: the hook binds a port and keeps
        // the address.
        src_port: sk.src_port as u16,
    })
}

/// TCP or UDP; `None` for anything else (raw, SCTP, ICMP sockets are left
/// alone).
#[inline(always)]
fn protocol(sa: &bpf_sock_addr) -> Option<Protocol> {
    match (sa.type_, sa.protocol) {
        (SOCK_STREAM, IPPROTO_TCP) => Some(Protocol::Tcp),
        (SOCK_DGRAM, IPPROTO_UDP) => Some(Protocol::Udp),
        _ => None,
    }
}

/// The rule's counters on this CPU (`None` only on a loader bug: the map is
/// sized to the rule count; the rule is still enforced, only not counted).
#[inline(always)]
fn rule_stats(verdict: &Verdict) -> Option<&'static mut RuleStats> {
    // SAFETY: per-CPU slot, this program is the only writer on this CPU.
    RULEBPF_STATS
        .get_ptr_mut(verdict.rule)
        .map(|slot| unsafe { &mut *slot })
}

/// Counts the match and, for a rule with an origin range, binds the socket.
/// `Ok(port)`: the origin port bound (0: the rule lets the OS choose);
/// `Err(errno)`: no port of the range could be bound.
#[inline(always)]
fn enforce<const EVERY_PORT: bool>(
    ctx: &SockAddrContext,
    connect: &Connect,
    verdict: &Verdict,
    tuple: TupleKey,
) -> Result<u16, i32> {
    if let Some(stats) = rule_stats(verdict) {
        stats.matched += 1;
    }
    if verdict.org_lo == 0 {
        return Ok(0);
    }
    // The bind address has the socket's family (a dual-stack socket going to
    // a v4-mapped peer binds as IPv6) and keeps an address the application
    // bound without a port (IP_BIND_ADDRESS_NO_PORT); "any" otherwise.
    let sk = connect.sk;
    let source = if sk.family == AF_INET6 {
        // Field by field: the verifier forbids pointer arithmetic on a
        // socket, so a copy of the array as a whole is refused.
        // SAFETY: reads of the kernel's bpf_sock context fields.
        let word = |i: usize| unsafe { core::ptr::read_volatile(&sk.src_ip6[i]) };
        SockAddr::ipv6([word(0), word(1), word(2), word(3)])
    } else {
        SockAddr::ipv4(sk.src_ip4)
    };
    // SAFETY: plain read of a load-time constant.
    let sharing = unsafe { core::ptr::read_volatile(&RULEBPF_SHARING) } == 1;
    let bound =
        bind::bind_in_range::<EVERY_PORT>(ctx, source, verdict, connect.protocol, tuple, sharing);
    // Looked up again rather than kept across the search: the verifier
    // would walk the search once for each outcome of the first lookup.
    if let Some(stats) = rule_stats(verdict) {
        match bound {
            Ok(_) => stats.bound += 1,
            Err(_) => stats.exhausted += 1,
        }
    }
    let bound = bound?;
    track::record_bound(ctx, &bound, verdict.key);
    Ok(bound.tuple.origin_port)
}

/// What [`app_bound`] found.
struct Kept {
    app_chose: bool,
    refused: bool,
}

/// The first connect() of a socket the application bound itself: counted
/// by who chose its port; refused when `--app-bound refuse` and the port is
/// outside the rule's range; otherwise kept (and, inside the range, its
/// 4-tuple recorded so that the hook's own sockets avoid it).
#[inline(always)]
fn app_bound(ctx: &SockAddrContext, connect: &Connect, verdict: &Verdict, tuple: TupleKey) -> Kept {
    let app_chose = track::app_chose(ctx);
    if track::first_count(ctx)
        && let Some(stats) = rule_stats(verdict)
    {
        stats.matched += 1;
        if app_chose {
            stats.app_chose += 1;
        } else {
            stats.kernel_chose += 1;
        }
    }
    let port = connect.src_port;
    let ranged = verdict.org_lo != 0;
    let inside = ranged && verdict.org_lo <= port && port <= verdict.org_hi;
    // SAFETY: plain read of a load-time constant.
    let refuse = unsafe { core::ptr::read_volatile(&RULEBPF_APP_BOUND) } == APP_BOUND_REFUSE;
    if ranged && !inside && refuse {
        return Kept {
            app_chose,
            refused: true,
        };
    }
    // SAFETY: plain read of a load-time constant.
    let sharing = unsafe { core::ptr::read_volatile(&RULEBPF_SHARING) } == 1;
    track::keep(ctx, &tuple, verdict.key, inside && sharing);
    Kept {
        app_chose,
        refused: false,
    }
}

/// The hook's answer when no port of the range was free: per the policy,
/// let the OS choose, or fail connect() with `errno`.
#[inline(always)]
fn exhausted(errno: i32) -> i32 {
    if fallback() {
        return ALLOW;
    }
    refuse(errno)
}

/// Whether the policy lets the OS choose when no port of a range is free.
#[inline(always)]
fn fallback() -> bool {
    // SAFETY: plain read of a load-time constant.
    let policy = unsafe { core::ptr::read_volatile(&RULEBPF_POLICY) };
    policy == POLICY_FALLBACK
}

/// Fails connect() with `errno` (with EPERM on kernels without
/// `bpf_set_retval`, before 5.18).
/// https://github.com/torvalds/linux/blob/v6.1/kernel/bpf/cgroup.c#L2130
#[inline(always)]
pub(crate) fn refuse(errno: i32) -> i32 {
    // SAFETY: plain read of a load-time constant.
    if unsafe { core::ptr::read_volatile(&RULEBPF_SET_RETVAL) } == 1 {
        unsafe { aya_ebpf::helpers::generated::bpf_set_retval(-errno) };
    }
    REJECT
}

/// The compiled first-match decision for a destination (`N` octets) and
/// port, or `None` (OS choice).
#[inline(always)]
fn decide<const N: usize>(selector: Selector, dest: &[u8; N], port: u16) -> Option<Verdict> {
    let mut state = *RULEBPF_ROOTS.get(selector as u32)?;
    // A bounded loop (N is 4 or 16): unrolled, or verified as a bounded loop.
    for &octet in dest {
        if state == DFA_DEAD {
            return None;
        }
        let edge = DfaEdge {
            state,
            octet: octet.into(),
        };
        // SAFETY: values are plain u32s.
        state = match unsafe { RULEBPF_DFA_EDGES.get(&edge) } {
            Some(next) => *next,
            None => *RULEBPF_DFA_DEFAULT.get(state)?,
        };
    }
    if state == DFA_DEAD {
        return None;
    }
    let key = Key::new(PORT_KEY_BITS, PortKey::new(state, port));
    RULEBPF_PORTS.get(&key).copied()
}
