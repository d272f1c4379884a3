//! The stable entry programs of an instance: `cgroup/connect4` and
//! `cgroup/connect6` programs that do nothing but tail-call the rule set in
//! force (slot `JUMP_SLOT` of their jump map).
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
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{cgroup_sock_addr, map},
    maps::ProgramArray,
    programs::SockAddrContext,
};
use rulebpf_common::JUMP_SLOT;

/// The connect4 program of the rule set in force.
#[map]
static RULEBPF_JUMP4: ProgramArray = ProgramArray::with_max_entries(1, 0);
/// The connect6 program of the rule set in force.
#[map]
static RULEBPF_JUMP6: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// connect() proceeds.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn rulebpf_entry4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the map and the context are valid; on success this does not return.
    unsafe { RULEBPF_JUMP4.tail_call(&ctx, JUMP_SLOT) };
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn rulebpf_entry6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    unsafe { RULEBPF_JUMP6.tail_call(&ctx, JUMP_SLOT) };
    ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
