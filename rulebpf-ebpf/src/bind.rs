//! Binding a socket to a free origin port of a range with `bpf_bind()`.
//!
//! The search starts at a per-rule cursor that every connect advances, so
//! successive connections walk the range like the kernel walks its ephemeral
//! range, and every port of the range is tried once before giving up: a free
//! port is always found when one exists, whatever the range size.
//!
//! `bpf_bind()` is `__inet_bind()` (or `inet6_bind()`) on the connecting
//! socket; a port in use (by a live socket or one in TIME_WAIT) fails with
//! `-EADDRINUSE`.
//! https://github.com/torvalds/linux/blob/v6.12/net/core/filter.c#L5705

use core::{
    ffi::{c_long, c_void},
    intrinsics::{AtomicOrdering, atomic_xadd},
};

use aya_ebpf::{
    bindings::{bpf_sock_addr, sockaddr},
    helpers::generated::{bpf_bind, bpf_loop},
    programs::SockAddrContext,
};
use rulebpf_common::Verdict;

use crate::RULEBPF_CURSOR;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const EADDRINUSE: i32 = 98;
const EADDRNOTAVAIL: i32 = 99;

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
    addr: SockAddr,
    lo: u32,
    size: u32,
    start: u32,
    /// 0 once bound; else the last negative errno.
    result: i32,
}

/// Binds the socket to a free port of `verdict`'s range at `source` (the
/// address the application bound, or "any"). On failure returns the errno
/// for connect(): `EADDRNOTAVAIL` when every port is in use.
#[inline(always)]
pub(crate) fn bind_in_range(
    ctx: &SockAddrContext,
    source: SockAddr,
    verdict: &Verdict,
) -> Result<(), i32> {
    let lo = u32::from(verdict.org_lo);
    let size = u32::from(verdict.org_hi).wrapping_sub(lo).wrapping_add(1);
    let cursor = match RULEBPF_CURSOR.get_ptr_mut(verdict.rule) {
        Some(ptr) => {
            // Read, then advance with an atomic add whose result is unused: the
            // only atomic BPF cpu v1 (bpf-linker's default) has. Two racing
            // connects may start at the same port; the loser moves on.
            // SAFETY: an 8-byte aligned u64 in a map value, shared by all CPUs.
            unsafe {
                let start = core::ptr::read_volatile(ptr);
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(ptr, 1);
                start
            }
        }
        None => 0,
    };
    let mut search = Search {
        ctx: ctx.sock_addr,
        addr: source,
        lo,
        size,
        // checked_rem: no division-by-zero panic path for the verifier to see.
        start: cursor.checked_rem(u64::from(size)).unwrap_or(0) as u32,
        result: -EADDRINUSE,
    };
    // bpf_loop (5.17+) lets one connect try every port of a 65535-port range
    // without the verifier walking each iteration.
    unsafe {
        bpf_loop(
            size,
            try_candidate as *mut c_void,
            (&raw mut search).cast(),
            0,
        )
    };
    match search.result {
        0 => Ok(()),
        r if r == -EADDRINUSE => Err(EADDRNOTAVAIL),
        r => Err(-r),
    }
}

/// One candidate port; returns 1 to stop the loop, 0 to try the next.
unsafe extern "C" fn try_candidate(index: u64, search: *mut c_void) -> c_long {
    // SAFETY: `search` is the `Search` passed to bpf_loop above.
    let search = unsafe { &mut *search.cast::<Search>() };
    let mut offset = search.start.wrapping_add(index as u32);
    if offset >= search.size {
        offset -= search.size;
    }
    search.addr.port_be = ((search.lo + offset) as u16).to_be();
    let ret = unsafe {
        bpf_bind(
            search.ctx,
            (&raw mut search.addr).cast::<sockaddr>(),
            size_of::<SockAddr>() as i32,
        )
    };
    if ret as i32 == -EADDRINUSE {
        return 0;
    }
    search.result = ret as i32;
    1
}
