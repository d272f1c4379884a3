//! The `cgroup/connect4` and `cgroup/connect6` hooks: pick the origin port of
//! every new TCP connection and connected UDP socket made from the cgroup,
//! from rules the loader compiled into maps (layouts: `rulebpf-common`).
//!
//! Per connect the cost is fixed: one array read for the automaton's root,
//! one step per destination octet (4 for IPv4, 16 for IPv6), one LPM lookup on
//! `{table, port}`, then — only for a rule with an origin range — `bpf_bind()`
//! on ports of the range until one is free.
#![no_std]
#![no_main]
// atomic_xadd: the bpfel target exposes no Atomic*::fetch_add (see bind.rs).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod bind;

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::SockAddrContext,
};
use aya_log_ebpf::{debug, warn};
use rulebpf_common::{
    DFA_DEAD, DfaEdge, Family, POLICY_FALLBACK, PORT_KEY_BITS, PortKey, Protocol, RuleStats,
    Selector, Verdict,
};

use crate::bind::SockAddr;

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

/// connect() proceeds.
const ALLOW: i32 = 1;
/// connect() fails with the errno set by `bpf_set_retval` (else EPERM).
const REJECT: i32 = 0;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

#[cgroup_sock_addr(connect4)]
pub fn rulebpf_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn rulebpf_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

/// The tail both hooks share: log the decision, enforce it, log and answer
/// an exhausted range. A macro, not a function: aya-log's macros need the
/// address's concrete type (`[u8; 4]` or `[u8; 16]`).
macro_rules! apply {
    ($ctx:expr, $sk:expr, $verdict:expr, $dest:expr, $port:expr) => {{
        let (ctx, verdict, dest, port) = ($ctx, $verdict, $dest, $port);
        // Log calls cost one branch unless the loader enabled their level
        // (AYA_LOG_LEVEL is set at load: off for `attach`, --log-level for `run`).
        debug!(
            ctx,
            "connect {:i} port {} -> line {} origin {}-{}",
            dest,
            port,
            verdict.line,
            verdict.org_lo,
            verdict.org_hi
        );
        match enforce(ctx, $sk, &verdict) {
            Ok(ret) => Ok(ret),
            Err(errno) => {
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
    }};
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(connect) = handled(ctx, AF_INET) else {
        return Ok(ALLOW);
    };
    // Network order in memory: the native-endian bytes are the octets.
    let dest = connect.sa.user_ip4.to_ne_bytes();
    let port = connect.port;
    let Some(verdict) = decide(Selector::new(Family::Ipv4, connect.protocol), &dest, port) else {
        return Ok(ALLOW);
    };
    apply!(ctx, connect.sk, verdict, dest, port)
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(connect) = handled(ctx, AF_INET6) else {
        return Ok(ALLOW);
    };
    let words = connect.sa.user_ip6;
    let mut dest = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        dest[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let port = connect.port;
    // A dual-stack socket reaches an IPv4 peer at ::ffff:a.b.c.d; such a
    // connect() is an IPv4 connection and follows the IPv4 rules.
    let mapped = words[0] == 0 && words[1] == 0 && words[2] == 0xffff_u32.to_be();
    let verdict = if mapped {
        let mut v4 = [0u8; 4];
        v4.copy_from_slice(&dest[12..]);
        decide(Selector::new(Family::Ipv4, connect.protocol), &v4, port)
    } else {
        decide(Selector::new(Family::Ipv6, connect.protocol), &dest, port)
    };
    let Some(verdict) = verdict else {
        return Ok(ALLOW);
    };
    apply!(ctx, connect.sk, verdict, dest, port)
}

/// A connect() the hooks act on, as [`handled`] found it.
struct Connect<'a> {
    sa: &'a bpf_sock_addr,
    sk: &'a bpf_sock,
    protocol: Protocol,
    /// Destination port, host order.
    port: u16,
}

/// The prologue both hooks share: the connect() when it is one rulebpf acts
/// on — a destination of the hook's `family` (`AF_INET` for connect4,
/// `AF_INET6` for connect6), a TCP or UDP socket, no port bound yet.
#[inline(always)]
fn handled(ctx: &SockAddrContext, family: u32) -> Option<Connect<'_>> {
    // SAFETY: the kernel hands sock_addr programs a valid `bpf_sock_addr`.
    let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
    if sa.user_family != family {
        return None;
    }
    Some(Connect {
        sa,
        protocol: protocol(sa)?,
        sk: unbound_socket(sa)?,
        port: u16::from_be(sa.user_port as u16),
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

/// The connecting socket, unless the application bound a port itself (FTP
/// active mode binds L-1; a UDP socket that already sent has its port): then
/// it keeps it.
#[inline(always)]
fn unbound_socket(sa: &bpf_sock_addr) -> Option<&bpf_sock> {
    // SAFETY: `sk` is always set for sock_addr programs (PTR_TO_SOCKET).
    let sk = unsafe { &*sa.__bindgen_anon_1.sk };
    (sk.src_port == 0).then_some(sk)
}

/// Counts the match and, for a rule with an origin range, binds the socket.
/// `Err(errno)`: no port of the range could be bound.
#[inline(always)]
fn enforce(ctx: &SockAddrContext, sk: &bpf_sock, verdict: &Verdict) -> Result<i32, i32> {
    // The loader sizes the map to the rule count, so a missing slot is a
    // loader bug; the rule is still enforced, only not counted.
    // SAFETY: per-CPU slot, this program is the only writer on this CPU.
    let mut stats = RULEBPF_STATS
        .get_ptr_mut(verdict.rule)
        .map(|slot| unsafe { &mut *slot });
    if let Some(stats) = stats.as_mut() {
        stats.matched += 1;
    }
    if verdict.org_lo == 0 {
        return Ok(ALLOW);
    }
    // The bind address has the socket's family (a dual-stack socket going to
    // a v4-mapped peer binds as IPv6) and keeps an address the application
    // bound without a port (IP_BIND_ADDRESS_NO_PORT); "any" otherwise.
    let source = if sk.family == AF_INET6 {
        // Field by field: the verifier forbids pointer arithmetic on a
        // socket, so a copy of the array as a whole is refused.
        // SAFETY: reads of the kernel's bpf_sock context fields.
        let word = |i: usize| unsafe { core::ptr::read_volatile(&sk.src_ip6[i]) };
        SockAddr::ipv6([word(0), word(1), word(2), word(3)])
    } else {
        SockAddr::ipv4(sk.src_ip4)
    };
    let bound = bind::bind_in_range(ctx, source, verdict);
    if let Some(stats) = stats {
        match bound {
            Ok(()) => stats.bound += 1,
            Err(_) => stats.exhausted += 1,
        }
    }
    bound.map(|()| ALLOW)
}

/// The hook's answer when no port of the range was free: per the policy,
/// let the OS choose, or fail connect() with `errno`.
#[inline(always)]
fn exhausted(errno: i32) -> i32 {
    // SAFETY: plain read of a load-time constant.
    if unsafe { core::ptr::read_volatile(&RULEBPF_POLICY) } == POLICY_FALLBACK {
        return ALLOW;
    }
    // bpf_set_retval exists since 5.18; without it connect() gets EPERM.
    // https://github.com/torvalds/linux/blob/v6.1/kernel/bpf/cgroup.c#L2130
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_bind and bpf_set_retval are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
