//! The stable programs of an instance: the entry programs, `cgroup/connect4`
//! and `cgroup/connect6`, that do nothing but tail-call the rule set in
//! force (slot `JUMP_SLOT` of their jump map), and the bookkeeping programs
//! that keep the instance maps (`shared.rs`) true whatever rule set is in
//! force: `cgroup/bind4`, `cgroup/bind6`, `cgroup/sock_release` and
//! `sockops` (for TCP: the end of a connection, which comes after its
//! socket's release when this side closes first).
//!
//! They are loaded once per instance, pinned, and attached to cgroups — by
//! rulebpf's links, by systemd's `BPFProgram=` at every start of a unit, by
//! the OCI hook for every new container. A new rule set is put in force by
//! writing its program into the jump map: one `bpf_map_update_elem` per hook,
//! atomic for every connect() (a tail call reads the slot once), and nothing
//! attached ever changes. The cost is one tail call per connect().
//!
//! An empty slot (no rule set loaded yet) lets the connect() proceed as if
//! rulebpf were not there: the tail call falls through.
//! https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/core.c#L2040
//!
//! The tail call's key is read at run time ([`jump_key`]), never a
//! constant: with a constant key the verifier records a poke descriptor and
//! the x86 JIT emits a *direct* jump into the slot's program, which every
//! slot update re-patches in kernel text with `text_poke_bp()` (an int3
//! first, then the jump). A 6.12 guest died on that int3 during a swap under
//! connect load. With a key the verifier cannot know, the JIT emits the
//! indirect tail call, which reads the slot at run time: a swap is a plain
//! pointer store and patches no code.
//! https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/verifier.c (record_func_key, do_misc_fixups)
//! https://github.com/torvalds/linux/blob/v6.12/arch/x86/net/bpf_jit_comp.c (emit_bpf_tail_call_indirect)
#![no_std]
#![no_main]
// atomic_xadd (shared.rs): the bpfel target exposes no Atomic*::fetch_add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod runtime;
mod shared;

use core::ptr;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        bpf_sock_addr,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_storage_get},
    macros::{cgroup_sock, cgroup_sock_addr, map, sock_ops},
    maps::ProgramArray,
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use rulebpf_common::{
    Counter, Family, JUMP_SLOT, PortUse, SOCK_APP_CHOSE, SOCK_COUNTED, SOCK_FIN_SENT,
    SOCK_FOLLOWED, SOCK_KERNEL_CHOSE, SOCK_OURS, SOCK_PORT, SOCK_RELEASED, SOCK_SOURCE, SOCK_TUPLE,
    SockState, TupleSource,
};

use crate::shared::{
    IPPROTO_TCP, IPPROTO_UDP, RULEBPF_OCCUPANCY, RULEBPF_PORT_USE, RULEBPF_SOCKS, RULEBPF_SOURCES,
    SOCK_DGRAM, SOCK_STREAM, atomic_add, count, give_back,
};

/// The connect4 program of the rule set in force.
#[map]
static RULEBPF_JUMP4: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// The connect6 program of the rule set in force.
#[map]
static RULEBPF_JUMP6: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// connect() proceeds.
const ALLOW: i32 = 1;

/// The jump slot's index, [`JUMP_SLOT`]. Never written, but a mutable global
/// lives in a writable map (`.bss`) that is not frozen, so the verifier
/// treats what it reads as unknown and the tail call stays indirect (see
/// the module documentation). A `static` without `mut` would be `.rodata`,
/// frozen, and known to the verifier again.
#[unsafe(no_mangle)]
static mut RULEBPF_JUMP_KEY: u32 = JUMP_SLOT;

/// 1 when sock_ops programs may call `bpf_get_netns_cookie` (5.15+); set by
/// the loader. With 0 a connection's source is written with namespace 0,
/// which no connect matches, so its tuple is never taken back early (only
/// shared tuples have sources, and sharing needs 6.0). A frozen constant:
/// the verifier never checks the dead call.
#[unsafe(no_mangle)]
static RULEBPF_SOCKOPS_NETNS: u32 = 1;

/// The key of the tail call, read at run time.
#[inline(always)]
fn jump_key() -> u32 {
    // SAFETY: an aligned read of a u32 global.
    unsafe { ptr::read_volatile(&raw const RULEBPF_JUMP_KEY) }
}

#[cgroup_sock_addr(connect4)]
pub fn rulebpf_entry4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the map and the context are valid; on success this does not return.
    unsafe { RULEBPF_JUMP4.tail_call(&ctx, jump_key()) };
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn rulebpf_entry6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    unsafe { RULEBPF_JUMP6.tail_call(&ctx, jump_key()) };
    ALLOW
}

/// `enum tcp_state` (include/net/tcp_states.h).
const TCP_FIN_WAIT1: u32 = 4;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_CLOSE: u32 = 7;

/// bind() proceeds (bind hooks: 1 = allow).
const BIND_ALLOW: i32 = 1;

#[cgroup_sock_addr(bind4)]
pub fn rulebpf_bind4(ctx: SockAddrContext) -> i32 {
    note_bind(&ctx);
    BIND_ALLOW
}

#[cgroup_sock_addr(bind6)]
pub fn rulebpf_bind6(ctx: SockAddrContext) -> i32 {
    note_bind(&ctx);
    BIND_ALLOW
}

/// Writes down who chose the port of a TCP or UDP socket the application
/// binds: the application (`bind(addr, P)`) or the kernel (`bind(addr, 0)`,
/// the port is picked right after this hook, before the destination is
/// known). The connect hooks count such sockets per rule. The hook's own
/// `bpf_bind()` does not come here: it calls `__inet_bind()` directly.
/// https://github.com/torvalds/linux/blob/v6.12/net/ipv4/af_inet.c (inet_bind)
#[inline(always)]
fn note_bind(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands sock_addr programs a valid `bpf_sock_addr`.
    let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
    let tcp_or_udp = matches!(
        (sa.type_, sa.protocol),
        (SOCK_STREAM, IPPROTO_TCP) | (SOCK_DGRAM, IPPROTO_UDP)
    );
    if !tcp_or_udp {
        return;
    }
    let chosen = if sa.user_port == 0 {
        SOCK_KERNEL_CHOSE
    } else {
        SOCK_APP_CHOSE
    };
    let state = RULEBPF_SOCKS.get_or_insert_ptr_mut(ctx, None);
    if !state.is_null() {
        // SAFETY: socket-local storage of this socket, valid while it lives.
        unsafe {
            (*state).flags = ((*state).flags & !(SOCK_APP_CHOSE | SOCK_KERNEL_CHOSE)) | chosen;
        }
    }
}

/// Undoes what the connect hooks recorded for a socket the hook bound (or
/// kept with its tuple): its entry in `RULEBPF_TUPLES` (the port is no
/// longer busy toward that destination) and its place in its rule's
/// `in_use`. Runs once per socket, at its last close, in `inet_release()`:
/// before a TCP socket enters TIME_WAIT, which the kernel itself resolves
/// at the next connect() with that 4-tuple (reused when the connection had
/// TCP timestamps). Only the socket-local storage is read: `src_port` is
/// not readable here, and after a failed connect() the destination reads 0.
/// https://github.com/torvalds/linux/blob/v6.12/net/ipv4/af_inet.c (inet_release)
#[cgroup_sock(sock_release)]
pub fn rulebpf_release(ctx: SockContext) -> i32 {
    // SAFETY: bpf_sk_storage_get takes the program's context (the socket)
    // in sock_release programs; no value to create.
    let state = unsafe {
        bpf_sk_storage_get(
            (&raw const RULEBPF_SOCKS).cast_mut().cast(),
            ctx.sock.cast(),
            ptr::null_mut(),
            0,
        )
    }
    .cast::<SockState>();
    if state.is_null() {
        return 1;
    }
    // SAFETY: this socket's storage; no other program runs on a socket
    // being released.
    let state = unsafe { &mut *state };
    // A TCP connection outlives its socket's release when it is not closed
    // yet (this side closes first: FIN_WAIT until the peer's FIN; the peer
    // closed first: LAST_ACK until our FIN is acknowledged): its 4-tuple
    // is busy until then, and the sock_ops program gives the tuple back
    // when the connection is closed. Otherwise it goes now.
    // SAFETY: a read of the context's `state` field.
    let open = unsafe { (*ctx.sock).state } != TCP_CLOSE;
    let followed = state.flags & SOCK_FOLLOWED != 0;
    if state.flags & SOCK_TUPLE != 0 && !(followed && open) {
        give_back(state);
        state.flags &= !SOCK_TUPLE;
    }
    // Once per socket: with the instance attached to a cgroup and to one
    // of its descendants, this program runs once for each attachment.
    if state.flags & SOCK_COUNTED != 0 {
        release_occupancy(state);
        state.flags &= !SOCK_COUNTED;
    }
    if state.flags & SOCK_OURS != 0 && state.flags & SOCK_RELEASED == 0 {
        count(Counter::Released);
        state.flags |= SOCK_RELEASED;
    }
    1
}

/// TCP connections of sockets with a tuple. At the active open (the route
/// has chosen the local address), asks the kernel to report the socket's
/// state changes (`BPF_SOCK_OPS_STATE_CB`) and writes the local address
/// down in `RULEBPF_SOURCES`. When this side sends its FIN, notes
/// `rcv_nxt`. At `TCP_CLOSE` (the full socket is gone: closed, reset, or
/// turned into a timewait socket) gives the tuple back, except when the
/// peer may still hold the connection: our FIN was acknowledged
/// (FIN_WAIT2) but the peer never sent its own (`rcv_nxt` unchanged since
/// our FIN; an orphan drops any data after close() with a reset, so only
/// a FIN moves it). Then the kernel keeps a timewait socket of substate
/// FIN_WAIT2 (`tcp_time_wait(sk, TCP_FIN_WAIT2, ...)` from `tcp_close()`
/// or on the ACK of our FIN), which a bound connect() would reuse at once
/// (`tcp_twsk_unique()` without `twp`), and its SYN would make us reset
/// the peer's half-closed connection. The tuple stays busy; the next
/// connect that meets it asks the kernel and takes it back once that
/// timewait socket is gone (`track::reclaim_if_gone`). A peer's FIN moves
/// `rcv_nxt`: an ordinary TIME_WAIT, which the kernel resolves at the next
/// connect() with that 4-tuple, and the tuple is given back now. Every
/// other callback returns at once.
/// https://github.com/torvalds/linux/blob/v6.12/net/ipv4/tcp.c (tcp_set_state, tcp_close)
/// https://github.com/torvalds/linux/blob/v6.12/net/ipv4/tcp_input.c (tcp_rcv_state_process, tcp_data_queue, tcp_fin)
#[sock_ops]
pub fn rulebpf_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    // Decided from the context alone, before the socket's storage is
    // looked up: most callbacks of a followed connection (SYN_SENT to
    // ESTABLISHED, CLOSE_WAIT, LAST_ACK, ...) change nothing here.
    let wanted = match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => true,
        BPF_SOCK_OPS_STATE_CB => matches!(ctx.arg(1), TCP_FIN_WAIT1 | TCP_FIN_WAIT2 | TCP_CLOSE),
        _ => false,
    };
    if !wanted {
        return 1;
    }
    // SAFETY: `sk` of a sock_ops context (a full socket for these ops).
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return 1;
    }
    // SAFETY: the socket's storage, if any; none is created.
    let state = unsafe {
        bpf_sk_storage_get(
            (&raw const RULEBPF_SOCKS).cast_mut().cast(),
            sk.cast(),
            ptr::null_mut(),
            0,
        )
    }
    .cast::<SockState>();
    if state.is_null() {
        return 1;
    }
    // SAFETY: this socket's storage, valid while the socket lives.
    let state = unsafe { &mut *state };
    if state.flags & SOCK_TUPLE == 0 {
        return 1;
    }
    // SAFETY: a read of the context (a full TCP socket for these ops).
    let rcv_nxt = unsafe { (*ctx.ops).rcv_nxt };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
        if ctx.set_cb_flags(flags as i32).is_ok() {
            state.flags |= SOCK_FOLLOWED;
        }
        // A socket bound to a device (SO_BINDTODEVICE, a VRF, an IPv6
        // link-local peer) is invisible to the connect hook's lookup, which
        // asks for no device: its tuple is never taken back early.
        // SAFETY: a read of the socket's `bound_dev_if` (a full socket).
        if unsafe { (*sk).bound_dev_if } != 0 {
            return 1;
        }
        // An IPv4 tuple may be a dual-stack socket's: its IPv4 address.
        let addr = if state.tuple.family == Family::Ipv4 as u8 {
            [ctx.local_ip4(), 0, 0, 0]
        } else {
            // Field by field: the verifier refuses a context pointer moved
            // to the array and read from there.
            // SAFETY: reads of the context's `local_ip6` words.
            let word = |i: usize| unsafe { ptr::read_volatile(&(*ctx.ops).local_ip6[i]) };
            [word(0), word(1), word(2), word(3)]
        };
        // SAFETY: a plain read of a load-time constant; the helpers take
        // the sock_ops context.
        let source = unsafe {
            let netns_known = ptr::read_volatile(&raw const RULEBPF_SOCKOPS_NETNS) == 1;
            TupleSource {
                addr,
                netns: if netns_known {
                    bpf_get_netns_cookie(ctx.ops.cast())
                } else {
                    0
                },
                socket: bpf_get_socket_cookie(ctx.ops.cast()),
            }
        };
        if RULEBPF_SOURCES.insert(&state.tuple, &source, 0).is_ok() {
            state.flags |= SOCK_SOURCE;
        }
        return 1;
    }
    let (old, new) = (ctx.arg(0), ctx.arg(1));
    if new == TCP_FIN_WAIT1 || new == TCP_FIN_WAIT2 {
        state.fin_rcv_nxt = rcv_nxt;
        state.flags |= SOCK_FIN_SENT;
    } else if new == TCP_CLOSE {
        let peer_silent = old == TCP_FIN_WAIT2
            && state.flags & SOCK_FIN_SENT != 0
            && rcv_nxt == state.fin_rcv_nxt;
        if !peer_silent {
            give_back(state);
        }
        state.flags &= !SOCK_TUPLE;
    }
    1
}

/// Gives back a released socket's place in its rule's occupancy: one socket
/// less, and one port less when it was the port's last socket (the delete
/// that succeeds decides, as the insert did in the connect hook).
#[inline(always)]
fn release_occupancy(state: &SockState) {
    let Some(occupancy) = RULEBPF_OCCUPANCY.get_ptr_mut(&state.rule_key) else {
        return;
    };
    // SAFETY: aligned u64s in map values shared by all CPUs; adding
    // 2^64 - 1 wraps to a subtraction.
    unsafe { atomic_add(&raw mut (*occupancy).sockets, u64::MAX) };
    if state.flags & SOCK_PORT == 0 {
        return;
    }
    let use_key = PortUse {
        rule_key: state.rule_key,
        port: state.tuple.origin_port,
        pad: [0; 3],
    };
    let Some(sockets) = RULEBPF_PORT_USE.get_ptr_mut(&use_key) else {
        return;
    };
    // SAFETY: as above.
    let last = unsafe {
        atomic_add(sockets, u64::MAX);
        core::ptr::read_volatile(sockets) == 0
    };
    if last && RULEBPF_PORT_USE.remove(&use_key).is_ok() {
        // SAFETY: as above.
        unsafe { atomic_add(&raw mut (*occupancy).in_use, u64::MAX) };
    }
}
