//! The connect side of the instance's bookkeeping (`shared.rs`): what a
//! socket the hook bound leaves behind, so that its release (the entry
//! object's `sock_release` program) can undo it, and so that no other
//! socket is bound to the same port toward the same destination.
//!
//! * **Bound by the hook**: socket-local storage with the socket's tuple and
//!   rule key; the rule's `sockets` goes up by one, and its `in_use` (ports
//!   with a socket) when the port had none (the high-water mark follows).
//! * **Bound by the application**: at its first connect() the socket is
//!   counted (`app_chose` / `kernel_chose`, from what the bind hooks wrote
//!   down) and, when its port lies in the rule's range, its tuple is
//!   recorded too: the hook's own sockets then avoid that 4-tuple.
//! * **Connecting again** (a UDP socket may connect() any number of times,
//!   a TCP one after a failed attempt): the socket's tuple moves to the new
//!   destination; when its port is already busy toward that destination
//!   the connect() fails with EADDRNOTAVAIL, as the kernel's own check
//!   does for TCP (UDP has none: two sockets with one 4-tuple would split
//!   the replies). A `connect(AF_UNSPEC)` runs no hook: the old tuple
//!   stays until the socket is released.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, bpf_sock_addr, bpf_sock_tuple},
    helpers::generated::{
        bpf_get_netns_cookie, bpf_sk_release, bpf_skc_lookup_tcp, bpf_skc_to_tcp_timewait_sock,
    },
    programs::SockAddrContext,
};
use rulebpf_common::{
    Counter, Family, Occupancy, PortUse, Protocol, SOCK_APP_CHOSE, SOCK_APP_COUNTED, SOCK_COUNTED,
    SOCK_KEPT, SOCK_OURS, SOCK_PORT, SOCK_TUPLE, TupleKey,
};

use crate::{
    ALLOW, Connect,
    bind::Bound,
    refuse,
    shared::{
        RULEBPF_OCCUPANCY, RULEBPF_PORT_USE, RULEBPF_SOCKS, RULEBPF_SOURCES, RULEBPF_TUPLES,
        atomic_add, count, give_back,
    },
};

const EEXIST: i32 = 17;
const EADDRNOTAVAIL: i32 = 99;

/// Records a socket the hook just bound: its storage (tuple, rule key) and
/// its place in the rule's occupancy. Without storage (out of memory) the
/// socket cannot be released against the maps: its tuple is dropped now.
#[inline(never)]
pub(crate) fn record_bound(ctx: &SockAddrContext, bound: &Bound, key: u64) {
    let state = RULEBPF_SOCKS.get_or_insert_ptr_mut(ctx, None);
    if state.is_null() {
        if bound.tracked {
            let _ = RULEBPF_TUPLES.remove(&bound.tuple);
        }
        count(Counter::StorageFailed);
        return;
    }
    let mut flags = SOCK_OURS | occupy(key, bound.tuple.origin_port);
    if bound.tracked {
        flags |= SOCK_TUPLE;
    }
    // SAFETY: this socket's storage, valid while the socket lives.
    unsafe {
        (*state).tuple = bound.tuple;
        (*state).rule_key = key;
        (*state).flags = flags;
    }
}

/// One more socket on `port` of rule `key`: `sockets += 1`, and when it is
/// the port's first, `in_use += 1` (the high-water mark follows). Returns
/// what the release must give back (`SOCK_COUNTED`, `SOCK_PORT`).
///
/// BPF cpu v1 has no fetching atomics, so who is first is decided by the
/// map: the insert with `BPF_NOEXIST` that succeeds (and, at release, the
/// delete that succeeds). A socket that comes while the last one of its
/// port is being released may go uncounted: `in_use` can read low, never
/// high.
#[inline(always)]
fn occupy(key: u64, port: u16) -> u32 {
    let Some(slot) = occupancy(key) else {
        count(Counter::OccupancyFull);
        return 0;
    };
    // SAFETY: aligned u64s in a map value shared by all CPUs.
    unsafe { atomic_add(&raw mut (*slot).sockets, 1) };
    let use_key = PortUse {
        rule_key: key,
        port,
        pad: [0; 3],
    };
    match RULEBPF_PORT_USE.insert(&use_key, &1, BPF_NOEXIST.into()) {
        Ok(()) => {
            // SAFETY: as above. Increment, then a read: under concurrency
            // the high-water mark may miss a peak by a few, never overstate.
            unsafe {
                atomic_add(&raw mut (*slot).in_use, 1);
                let now = core::ptr::read_volatile(&raw const (*slot).in_use);
                if now > core::ptr::read_volatile(&raw const (*slot).high_water) {
                    core::ptr::write_volatile(&raw mut (*slot).high_water, now);
                }
            }
            SOCK_COUNTED | SOCK_PORT
        }
        Err(e) if e == -EEXIST => match RULEBPF_PORT_USE.get_ptr_mut(&use_key) {
            Some(sockets) => {
                // SAFETY: as above.
                unsafe { atomic_add(sockets, 1) };
                SOCK_COUNTED | SOCK_PORT
            }
            // Its last socket was released meanwhile.
            None => SOCK_COUNTED,
        },
        Err(_) => {
            count(Counter::OccupancyFull);
            SOCK_COUNTED
        }
    }
}

/// Rule `key`'s occupancy, created at its first socket; `None` when the
/// map is full.
#[inline(always)]
fn occupancy(key: u64) -> Option<*mut Occupancy> {
    if let Some(slot) = RULEBPF_OCCUPANCY.get_ptr_mut(&key) {
        return Some(slot);
    }
    // Another CPU may create it first: then this insert fails and the
    // lookup finds theirs.
    let _ = RULEBPF_OCCUPANCY.insert(&key, &Occupancy::default(), BPF_NOEXIST.into());
    RULEBPF_OCCUPANCY.get_ptr_mut(&key)
}

/// Whether the application chose the port of this bound socket (the bind
/// hooks wrote it down); false when the kernel did (`bind(addr, 0)`, or an
/// implicit bind: a UDP socket that sent before connecting).
#[inline(always)]
pub(crate) fn app_chose(ctx: &SockAddrContext) -> bool {
    let state = RULEBPF_SOCKS.get_ptr_mut(ctx);
    // SAFETY: this socket's storage, valid while the socket lives.
    !state.is_null() && unsafe { (*state).flags } & SOCK_APP_CHOSE != 0
}

/// Whether this connect() is the first to count the application-bound
/// socket (a refused connect() may be tried again, and an instance
/// attached to a cgroup and to a descendant runs twice per connect()).
#[inline(always)]
pub(crate) fn first_count(ctx: &SockAddrContext) -> bool {
    let state = RULEBPF_SOCKS.get_or_insert_ptr_mut(ctx, None);
    if state.is_null() {
        return true;
    }
    // SAFETY: this socket's storage, valid while the socket lives.
    unsafe {
        if (*state).flags & SOCK_APP_COUNTED != 0 {
            return false;
        }
        (*state).flags |= SOCK_APP_COUNTED;
    }
    true
}

/// Marks an application-bound socket as counted and, with `track`, records
/// its tuple (first come: when the tuple is taken, the kernel's own check
/// decides for TCP).
#[inline(never)]
pub(crate) fn keep(ctx: &SockAddrContext, tuple: &TupleKey, key: u64, track: bool) {
    let state = RULEBPF_SOCKS.get_or_insert_ptr_mut(ctx, None);
    if state.is_null() {
        return;
    }
    let mut flags = SOCK_KEPT;
    if track
        && RULEBPF_TUPLES
            .insert(tuple, &key, BPF_NOEXIST.into())
            .is_ok()
    {
        flags |= SOCK_TUPLE;
    }
    // SAFETY: this socket's storage, valid while the socket lives.
    unsafe {
        (*state).tuple = *tuple;
        (*state).rule_key = key;
        (*state).flags |= flags;
    }
}

/// A connect() of a bound socket seen before (bound by the hook, or kept
/// at its first connect()): `Some(answer)` with its tuple moved to this
/// destination; `None` for a socket seen for the first time.
#[inline(never)]
pub(crate) fn reconnect(
    ctx: &SockAddrContext,
    connect: &Connect,
    tuple: &TupleKey,
) -> Option<Result<i32, i32>> {
    if connect.src_port == 0 {
        return None;
    }
    let state = RULEBPF_SOCKS.get_ptr_mut(ctx);
    if state.is_null() {
        return None;
    }
    // SAFETY: this socket's storage, valid while the socket lives.
    let state = unsafe { &mut *state };
    if state.flags & (SOCK_OURS | SOCK_KEPT) == 0 {
        return None;
    }
    if state.flags & SOCK_TUPLE == 0 || state.tuple == *tuple {
        return Some(Ok(ALLOW));
    }
    match RULEBPF_TUPLES.insert(tuple, &state.rule_key, BPF_NOEXIST.into()) {
        Ok(()) => {
            give_back(state);
            state.tuple = *tuple;
        }
        Err(e) if e == -EEXIST => {
            count(Counter::RekeyRefused);
            return Some(Err(refuse(EADDRNOTAVAIL)));
        }
        Err(_) => {
            // Full: the socket goes on untracked rather than wrongly.
            give_back(state);
            state.flags &= !SOCK_TUPLE;
            count(Counter::TuplesFull);
        }
    }
    Some(Ok(ALLOW))
}

/// `BPF_F_CURRENT_NETNS`: look in the network namespace of the socket that
/// connects.
const CURRENT_NETNS: u64 = u64::MAX;

/// `TCP_TIME_WAIT` of `enum tcp_state`: a timewait socket's substate once
/// the peer's FIN came.
const TCP_TIME_WAIT: u8 = 6;

/// Whether `sk` (a socket the lookup found) is a timewait socket whose
/// peer has closed too (substate `TCP_TIME_WAIT`, not `TCP_FIN_WAIT2`).
/// `bpf_sock.state` reads `TCP_TIME_WAIT` for both, so the substate is
/// read at the offset the loader found in the kernel's BTF; unknown, the
/// answer is no (busy).
/// https://github.com/torvalds/linux/blob/v6.12/net/ipv4/tcp_minisocks.c (tcp_timewait_state_process)
#[inline(always)]
fn timewait_after_peer_fin(sk: *mut c_void) -> bool {
    // SAFETY: plain read of a load-time constant.
    let offset = unsafe { core::ptr::read_volatile(&crate::RULEBPF_TW_SUBSTATE) };
    if offset == 0 {
        return false;
    }
    // SAFETY: `sk` is the referenced socket of the lookup.
    let tw = unsafe { bpf_skc_to_tcp_timewait_sock(sk) };
    if tw.is_null() {
        // A full or request socket: the connection exists.
        return false;
    }
    // SAFETY: a byte inside the timewait socket; the verifier checks the
    // offset against the kernel's type.
    let substate = unsafe { *tw.cast::<u8>().add(offset as usize) };
    substate == TCP_TIME_WAIT
}

/// A tuple found busy toward this destination may belong to a connection
/// that no longer exists: its close went unseen (the bookkeeping programs
/// were detached from its cgroup while it was closing) or it was kept for a
/// FIN_WAIT2 timewait socket that has ended since (see `rulebpf_sockops`).
/// For a TCP tuple whose source is known, in the network namespace of the
/// connecting socket, asks the kernel for a socket with that 4-tuple,
/// timewait and request sockets included; when there is none, or only an
/// ordinary TIME_WAIT, the tuple is taken over for `key` (true). Anything
/// else stays busy: UDP (released at close, never later), a connection
/// still starting (no source yet), one bound to a device, one in another
/// network namespace.
///
/// Who takes the tuple is decided by removing its source entry, which
/// succeeds once: for one of two racing connects, or for the connection's
/// own close (`shared::give_back`), never for two. The tuple's entry is
/// overwritten in place, never absent in between, so no third connect can
/// insert it meanwhile.
/// https://github.com/torvalds/linux/blob/v6.12/net/core/filter.c (bpf_skc_lookup_tcp, __bpf_skc_lookup)
#[inline(never)]
pub(crate) fn reclaim_if_gone(ctx: *mut bpf_sock_addr, tuple: &TupleKey, key: u64) -> bool {
    if tuple.protocol != Protocol::Tcp as u8 {
        return false;
    }
    let Some(source) = RULEBPF_SOURCES.get_ptr(tuple) else {
        return false;
    };
    // SAFETY: a plain-data map value.
    let source = unsafe { *source };
    // SAFETY: the hook's context.
    if source.netns != unsafe { bpf_get_netns_cookie(ctx.cast()) } {
        return false;
    }
    // The tuple as the peer's packets carry it: from the destination to us.
    // SAFETY: a plain-data union, zeroed.
    let mut lookup: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if tuple.family == Family::Ipv4 as u8 {
        // SAFETY: writes to the union's IPv4 member.
        unsafe {
            let v4 = &mut lookup.__bindgen_anon_1.ipv4;
            v4.saddr = tuple.dest_addr[0];
            v4.daddr = source.addr[0];
            v4.sport = tuple.dest_port.to_be();
            v4.dport = tuple.origin_port.to_be();
            size_of_val(v4)
        }
    } else {
        // SAFETY: writes to the union's IPv6 member.
        unsafe {
            let v6 = &mut lookup.__bindgen_anon_1.ipv6;
            v6.saddr = tuple.dest_addr;
            v6.daddr = source.addr;
            v6.sport = tuple.dest_port.to_be();
            v6.dport = tuple.origin_port.to_be();
            size_of_val(v6)
        }
    };
    // SAFETY: the hook's context and a tuple on the stack of `size` bytes.
    let sk = unsafe { bpf_skc_lookup_tcp(ctx.cast(), &mut lookup, size as u32, CURRENT_NETNS, 0) };
    if !sk.is_null() {
        let after_peer_fin = timewait_after_peer_fin(sk.cast());
        // SAFETY: the reference the lookup took.
        unsafe { bpf_sk_release(sk.cast()) };
        if !after_peer_fin {
            return false;
        }
        // An ordinary TIME_WAIT (the peer's FIN came after the tuple was
        // kept): the kernel resolves it at connect(), as for any other.
    }
    // Still the source that was checked (not a new connection's, written
    // since by one that got the tuple in between), and the removal decides.
    let now = RULEBPF_SOURCES.get_ptr(tuple);
    // SAFETY: a plain-data map value.
    if now.is_none_or(|now| unsafe { (*now).socket } != source.socket)
        || RULEBPF_SOURCES.remove(tuple).is_err()
    {
        return false;
    }
    if RULEBPF_TUPLES.insert(tuple, &key, BPF_ANY.into()).is_err() {
        return false;
    }
    count(Counter::Reclaimed);
    true
}
