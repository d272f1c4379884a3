//! A probe, not a hook: can a `cgroup/connect4` program set `SO_REUSEADDR`
//! and `SO_REUSEPORT` with `bpf_setsockopt()` (Linux 6.0+)? The loader
//! attaches it to a throw-away cgroup and connects a UDP socket from there:
//! connect() succeeds when both options were set, fails with EPERM when the
//! kernel refused one. No helper probe can tell: the helper exists since
//! 5.8, only the options it accepts changed.
//! https://github.com/torvalds/linux/blob/v6.12/net/core/filter.c (sol_socket_sockopt)
#![no_std]
#![no_main]

mod runtime;
use aya_ebpf::{
    helpers::generated::bpf_setsockopt, macros::cgroup_sock_addr, programs::SockAddrContext,
};

const SOL_SOCKET: i32 = 1;
const SO_REUSEADDR: i32 = 2;
const SO_REUSEPORT: i32 = 15;

#[cgroup_sock_addr(connect4)]
pub fn rulebpf_probe(ctx: SockAddrContext) -> i32 {
    let set = |option: i32| {
        let mut one: i32 = 1;
        // SAFETY: the program's context; `one` lives across the call.
        let ret = unsafe {
            bpf_setsockopt(
                ctx.sock_addr.cast(),
                SOL_SOCKET,
                option,
                (&raw mut one).cast(),
                size_of::<i32>() as i32,
            )
        };
        ret == 0
    };
    i32::from(set(SO_REUSEADDR) && set(SO_REUSEPORT))
}
