//! Binding a socket to a free origin port of a range with `bpf_bind()`.
//!
//! The search starts at a per-rule cursor that every connect advances (and
//! that skips what a search had to skip, so a block of busy ports is walked
//! once, not by every connect), so successive connections walk the range
//! like the kernel walks its ephemeral range, and every port of the range is
//! tried once before giving up: a free port is always found when one exists,
//! whatever the range size.
//!
//! `bpf_bind()` is `__inet_bind()` (or `inet6_bind()`) on the connecting
//! socket; a port in use fails with `-EADDRINUSE`.
//! https://github.com/torvalds/linux/blob/v6.12/net/core/filter.c#L5705
//!
//! **Port sharing** (the default; `--port-sharing off` binds one socket per
//! port). A TCP connection is unique by its 4-tuple, and the kernel's own
//! connect() allocator gives one port to many destinations; so does the
//! hook:
//!
//! 1. Before the search, `SO_REUSEADDR` (TCP) or `SO_REUSEPORT` (UDP) is set
//!    on the socket with `bpf_setsockopt()`. It takes effect at once
//!    (`sk->sk_reuse`), so the `bpf_bind()` below honours it: the bind does
//!    not conflict with the instance's other sockets on that port, connected
//!    or in TIME_WAIT (which keeps the flag), as long as none of them listens
//!    (`inet_bind_conflict()`). A socket without the flag (bound by another
//!    program, or by a rule set without sharing) still excludes the port.
//!    `bpf_setsockopt()` came to sock_addr programs in 5.8 (beecf11bc218),
//!    `SO_REUSEADDR` to its allowed options in 6.0 (7e41df5dbba2): before
//!    that it fails, and the socket is bound without sharing (counted).
//!    https://github.com/torvalds/linux/blob/v6.12/net/ipv4/inet_connection_sock.c (inet_bind_conflict)
//! 2. For each candidate port, the connection's tuple `(family, protocol,
//!    destination, destination port, origin port)` is inserted in
//!    `RULEBPF_TUPLES` with `BPF_NOEXIST`: atomic, so of two racing connects
//!    only one gets a port toward one destination. An existing entry means
//!    a live socket of the instance already goes from that port to that
//!    destination: next port. Without this, the clash would only be found by
//!    connect() after the hook returned (`__inet_check_established()`: TCP
//!    fails with EADDRNOTAVAIL although other ports are free; UDP does not
//!    check at all and two sockets would share one 4-tuple).
//! 3. `bpf_bind()`; `-EADDRINUSE` (a socket that does not share, a listener)
//!    takes the tuple back: next port.
//!
//! **Without `bpf_loop`** (before 5.17; the `_bounded` programs, chosen by
//! the loader from its probe) the search is a plain loop, which the
//! verifier walks iteration by iteration: it tries at most
//! [`BOUNDED_CANDIDATES`] ports from the cursor, and a failed search moves
//! the cursor past all it tried, so successive connects still cover the
//! whole range. A range of up to that many ports is searched whole by every
//! connect; in a larger one a connect can fail while a port is free
//! elsewhere, when the candidates it tries are all in use. Those kernels
//! cannot share ports (6.0), so that loop binds without sharing.
//!
//! A tuple found busy may belong to a connection that is gone: its close
//! went unseen (the bookkeeping programs were detached while it was
//! closing) or it was kept for a FIN_WAIT2 timewait socket (see the entry
//! object's `rulebpf_sockops`). `track::reclaim_if_gone` asks the kernel
//! for a socket with that 4-tuple (`bpf_skc_lookup_tcp`) and takes the
//! tuple back when there is none, or only an ordinary TIME_WAIT.
//!
//! The released socket's tuple goes at its last close (`sock_release`, in
//! the entry object), before TIME_WAIT. A TIME_WAIT socket with the same
//! 4-tuple is then resolved by the kernel at connect(): for a socket bound
//! before connect() (as the hook binds it) `tcp_twsk_unique()` is called
//! without `twp` and reuses the TIME_WAIT socket whenever that connection
//! used TCP timestamps (`tw_ts_recent_stamp`), whatever
//! `net.ipv4.tcp_tw_reuse` says; without timestamps, connect() fails with
//! EADDRNOTAVAIL for the 60 s of TIME_WAIT (other destinations are not
//! affected). Linux uses timestamps unless `net.ipv4.tcp_timestamps=0` or
//! the peer refuses them.
//! https://github.com/torvalds/linux/blob/v6.12/net/ipv4/inet_hashtables.c (__inet_hash_connect: check_established(..., NULL))
//! https://github.com/torvalds/linux/blob/v6.12/net/ipv4/tcp_ipv4.c (tcp_twsk_unique)
//!
//! UDP shares with `SO_REUSEPORT`, not `SO_REUSEADDR`: connected sockets on
//! one port each receive only their peer's datagrams and ICMP errors
//! (`compute_score()` prefers the connected socket), measured on 6.1, 6.12
//! and 6.18; `SO_REUSEPORT` only lets sockets of the same user share, while
//! with `SO_REUSEADDR` any local user could bind the port and take the
//! replies.

use core::ffi::{c_long, c_void};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, bpf_sock_addr, sockaddr},
    helpers::generated::{bpf_bind, bpf_loop, bpf_setsockopt},
    programs::SockAddrContext,
};
use rulebpf_common::{BOUNDED_CANDIDATES, Counter, Protocol, TupleKey, Verdict};

use crate::{
    RULEBPF_CURSOR,
    shared::{RULEBPF_TUPLES, atomic_add, count},
    track,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const EEXIST: i32 = 17;
const EADDRINUSE: i32 = 98;
const EADDRNOTAVAIL: i32 = 99;
const SOL_SOCKET: i32 = 1;
const SO_REUSEADDR: i32 = 2;
const SO_REUSEPORT: i32 = 15;

/// `struct sockaddr_in` and `struct sockaddr_in6` in one layout (aya's
/// bindings carry neither): both have the family, then the port. It is
/// always passed with the IPv6 length, a constant for the verifier; the
/// kernel only requires `addr_len >= sizeof(struct sockaddr_in)` for AF_INET.
#[repr(C)]
pub(crate) struct SockAddr {
    family: u16,
    port_be: u16,
    /// `sin_addr` (IPv4) or `sin6_flowinfo` (IPv6, 0).
    addr4_or_flowinfo: u32,
    /// `sin6_addr` (IPv6); `sin_zero` and unused for IPv4.
    addr6: [u32; 4],
    scope_id: u32,
}

impl SockAddr {
    pub(crate) fn ipv4(addr_be: u32) -> Self {
        Self {
            family: AF_INET,
            port_be: 0,
            addr4_or_flowinfo: addr_be,
            addr6: [0; 4],
            scope_id: 0,
        }
    }

    pub(crate) fn ipv6(addr_be: [u32; 4]) -> Self {
        Self {
            family: AF_INET6,
            port_be: 0,
            addr4_or_flowinfo: 0,
            addr6: addr_be,
            scope_id: 0,
        }
    }
}

/// State shared with the `bpf_loop` callback (lives on the hook's stack).
#[repr(C)]
struct Search {
    /// The hook's context: `bpf_bind` needs it. Kept first so it is spilled
    /// as a whole, aligned pointer and the verifier keeps its type.
    ctx: *mut bpf_sock_addr,
    /// The candidate's tuple (its origin port set per candidate).
    tuple: TupleKey,
    /// The rule's key: the value of the tuple's entry.
    key: u64,
    addr: SockAddr,
    lo: u32,
    size: u32,
    start: u32,
    /// 1: reserve each candidate's tuple before binding.
    sharing: u32,
    /// `Protocol` as `u32`.
    protocol: u32,
    /// 0 once bound; else the last negative errno.
    result: i32,
    /// The loop index of the last candidate tried.
    index: u32,
}

/// A socket bound by [`bind_in_range`].
pub(crate) struct Bound {
    /// Its tuple, with the origin port it got.
    pub(crate) tuple: TupleKey,
    /// The tuple is in `RULEBPF_TUPLES` (bound with sharing).
    pub(crate) tracked: bool,
}

/// Binds the socket to a free port of `verdict`'s range at `source` (the
/// address the application bound, or "any"), sharing ports among
/// destinations when `sharing`. `EVERY_PORT`: the search tries every port
/// of the range (`bpf_loop`); else at most [`BOUNDED_CANDIDATES`], without
/// sharing. On failure returns the errno for connect(): `EADDRNOTAVAIL`
/// when every port tried is in use (or busy toward the destination).
#[inline(always)]
pub(crate) fn bind_in_range<const EVERY_PORT: bool>(
    ctx: &SockAddrContext,
    source: SockAddr,
    verdict: &Verdict,
    protocol: Protocol,
    tuple: TupleKey,
    sharing: bool,
) -> Result<Bound, i32> {
    let start = take_start(verdict);
    if EVERY_PORT {
        search_every_port(ctx, source, verdict, start, protocol, tuple, sharing)
    } else {
        search_bounded(ctx.sock_addr, source, verdict, start, tuple)
    }
}

/// Where this connect's search starts in the range: the rule's cursor,
/// which it advances by one.
#[inline(always)]
fn take_start(verdict: &Verdict) -> u32 {
    let start = match RULEBPF_CURSOR.get_ptr_mut(verdict.rule) {
        Some(ptr) => {
            // Read, then advance with an atomic add whose result is unused: the
            // only atomic BPF cpu v1 (bpf-linker's default) has. Two racing
            // connects may start at the same port; the loser moves on.
            // SAFETY: an 8-byte aligned u64 in a map value, shared by all CPUs.
            unsafe {
                let start = core::ptr::read_volatile(ptr);
                atomic_add(ptr, 1);
                start
            }
        }
        None => 0,
    };
    // checked_rem: no division-by-zero panic path for the verifier to see.
    start
        .checked_rem(u64::from(verdict.range_size()))
        .unwrap_or(0) as u32
}

/// Moves the rule's cursor past `skipped` ports: what a search skipped,
/// the next one need not try again. (Looked up again: one pointer kept
/// across the search would double what the verifier walks.)
#[inline(always)]
fn skip(verdict: &Verdict, skipped: u32) {
    if let Some(ptr) = RULEBPF_CURSOR.get_ptr_mut(verdict.rule) {
        // SAFETY: as in `take_start`.
        unsafe { atomic_add(ptr, u64::from(skipped)) };
    }
}

/// connect()'s errno for a search that ended with `result` (a negative
/// errno of `bpf_bind`; `-EADDRINUSE`: every port tried was in use).
#[inline(always)]
fn failed(result: i32) -> i32 {
    if result == -EADDRINUSE {
        EADDRNOTAVAIL
    } else {
        -result
    }
}

/// The search with `bpf_loop` (5.17+): every port of the range, one
/// connect.
#[inline(always)]
fn search_every_port(
    ctx: &SockAddrContext,
    source: SockAddr,
    verdict: &Verdict,
    start: u32,
    protocol: Protocol,
    tuple: TupleKey,
    sharing: bool,
) -> Result<Bound, i32> {
    // A kernel that refuses the option (before 6.0) still gets the tuples
    // recorded: harmless, the socket just does not share its port.
    if sharing {
        share(ctx.sock_addr, protocol, true);
    }
    let mut search = Search {
        ctx: ctx.sock_addr,
        tuple,
        key: verdict.key,
        addr: source,
        lo: u32::from(verdict.org_lo),
        size: verdict.range_size(),
        start,
        sharing: u32::from(sharing),
        protocol: protocol as u32,
        result: -EADDRINUSE,
        index: 0,
    };
    // bpf_loop (5.17+) lets one connect try every port of a 65535-port range
    // without the verifier walking each iteration.
    unsafe {
        bpf_loop(
            search.size,
            try_candidate as *mut c_void,
            (&raw mut search).cast(),
            0,
        )
    };
    if search.result != 0 {
        return Err(failed(search.result));
    }
    // Most connects bind the cursor's own port: nothing to skip, and no
    // second atomic on the cursor's cache line, which every CPU writes.
    if search.index > 0 {
        skip(verdict, search.index);
    }
    Ok(Bound {
        tuple: search.tuple,
        tracked: search.sharing == 1,
    })
}

/// The search without `bpf_loop` (before 5.17): at most
/// [`BOUNDED_CANDIDATES`] ports from `start`, without sharing; a failed
/// search moves the cursor past all it tried.
#[inline(always)]
fn search_bounded(
    ctx: *mut bpf_sock_addr,
    source: SockAddr,
    verdict: &Verdict,
    start: u32,
    tuple: TupleKey,
) -> Result<Bound, i32> {
    let (lo, size) = (u32::from(verdict.org_lo), verdict.range_size());
    let mut addr = source;
    let result = bind_first_free(ctx, &mut addr, lo, size, start);
    if result != 0 {
        // Past all it tried: `take_start` moved the cursor by one already.
        // (Skipping one more would leave a port never tried when the range
        // is one more than the candidates, 1,025 ports.)
        skip(verdict, size.min(BOUNDED_CANDIDATES) - 1);
        return Err(failed(result));
    }
    // The port bound, read back from memory: the verifier knows nothing of
    // it, so every way out of the search continues as one state (see
    // `bind_first_free`).
    // SAFETY: a field of a local.
    let port = u16::from_be(unsafe { core::ptr::read_volatile(&raw const addr.port_be) });
    // Its place after `start`: the ports before it were in use.
    let offset = u32::from(port).wrapping_sub(lo);
    skip(
        verdict,
        if offset >= start {
            offset - start
        } else {
            offset + size - start
        },
    );
    let mut tuple = tuple;
    tuple.origin_port = port;
    Ok(Bound {
        tuple,
        tracked: false,
    })
}

/// The loop of [`search_bounded`]: the ports from `start` on, each bound
/// with `bpf_bind` until one is free. Returns the last result (0: bound);
/// `addr` holds the port tried last.
///
/// A function of its own so that its loop counter ends with it: the
/// verifier walks the loop once per iteration and tracks the counter
/// exactly (it decides the loop's end), so code after the loop that still
/// held the counter (or a port computed from it) would be walked again for
/// every iteration that can leave the loop, about 200,000 instructions in
/// all; returning only the helper's result, every exit continues as the
/// same state and is walked once.
#[inline(never)]
fn bind_first_free(
    ctx: *mut bpf_sock_addr,
    addr: &mut SockAddr,
    lo: u32,
    size: u32,
    start: u32,
) -> i32 {
    let mut result = -EADDRINUSE;
    let mut index = 0;
    // A constant bound, so the 5.10 verifier sees the loop end; the range
    // size ends it earlier.
    while index < BOUNDED_CANDIDATES && index < size {
        let mut offset = start + index;
        if offset >= size {
            offset -= size;
        }
        addr.port_be = ((lo + offset) as u16).to_be();
        // SAFETY: the hook's context and an address on the stack.
        result = unsafe {
            bpf_bind(
                ctx,
                (addr as *mut SockAddr).cast::<sockaddr>(),
                size_of::<SockAddr>() as i32,
            )
        } as i32;
        if result != -EADDRINUSE {
            break;
        }
        index += 1;
    }
    result
}

/// Sets (or clears) the option that lets the socket share its port:
/// `SO_REUSEADDR` for TCP, `SO_REUSEPORT` for UDP (see the module doc).
/// False when the kernel refuses it (before 6.0), counted.
#[inline(always)]
fn share(ctx: *mut bpf_sock_addr, protocol: Protocol, on: bool) -> bool {
    let option = match protocol {
        Protocol::Tcp => SO_REUSEADDR,
        Protocol::Udp => SO_REUSEPORT,
    };
    let mut value: i32 = on.into();
    // SAFETY: the hook's context; `value` lives across the call.
    let ret = unsafe {
        bpf_setsockopt(
            ctx.cast(),
            SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            size_of::<i32>() as i32,
        )
    };
    if ret != 0 && on {
        count(Counter::SharingUnavailable);
    }
    ret == 0
}

/// One candidate port; returns 1 to stop the loop, 0 to try the next.
unsafe extern "C" fn try_candidate(index: u64, search: *mut c_void) -> c_long {
    // SAFETY: `search` is the `Search` passed to bpf_loop above.
    let search = unsafe { &mut *search.cast::<Search>() };
    let mut offset = search.start.wrapping_add(index as u32);
    if offset >= search.size {
        offset -= search.size;
    }
    let port = (search.lo + offset) as u16;
    search.addr.port_be = port.to_be();
    search.tuple.origin_port = port;
    if search.sharing == 1 {
        match RULEBPF_TUPLES.insert(&search.tuple, &search.key, BPF_NOEXIST.into()) {
            Ok(()) => {}
            // Busy toward this destination, unless its connection is gone.
            Err(e) if e == -EEXIST => {
                if !track::reclaim_if_gone(search.ctx, &search.tuple, search.key) {
                    count(Counter::BusyToDestination);
                    return 0;
                }
            }
            // No room to record the socket: it is bound without sharing,
            // so that no other socket of the instance takes its port.
            Err(_) => {
                count(Counter::TuplesFull);
                let protocol = if search.protocol == Protocol::Udp as u32 {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                };
                share(search.ctx, protocol, false);
                search.sharing = 0;
            }
        }
    }
    let ret = unsafe {
        bpf_bind(
            search.ctx,
            (&raw mut search.addr).cast::<sockaddr>(),
            size_of::<SockAddr>() as i32,
        )
    } as i32;
    if ret != 0 && search.sharing == 1 {
        let _ = RULEBPF_TUPLES.remove(&search.tuple);
    }
    if ret == -EADDRINUSE {
        return 0;
    }
    search.result = ret;
    search.index = index as u32;
    1
}
