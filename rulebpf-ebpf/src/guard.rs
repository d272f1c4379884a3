//! The pods' guard: `cgroup/connect4` and `cgroup/connect6` on the parent
//! cgroup of a node's pods (`kubepods`), attached with
//! `BPF_F_ALLOW_OVERRIDE`, refusing (EPERM) the connects of a pod the NRI
//! plugin has not seen.
//!
//! Why: a pod started while the plugin is not connected is started by the
//! runtime without asking it (NRI has no required plugins), so its
//! connects would leave from OS ports. With the guard, such a pod's
//! connects are refused until the plugin, reconnected, finds the pod in
//! the runtime's `Synchronize` and writes its cgroup id into
//! `RULEBPF_GUARD_PODS` (a pod without the annotation) or attaches its
//! instance (an annotated one).
//!
//! A pod with its instance attached never runs the guard: an attachment
//! without `BPF_F_ALLOW_MULTI` (the guard's) is left out of the effective
//! programs of any descendant cgroup that has programs of its own for
//! that hook, and instances attach their own `connect4`/`connect6`.
//! https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/cgroup.c (compute_effective_progs, hierarchy_allows_attach)
//!
//! The pod's cgroup is found from the connecting task's: its ancestor one
//! or two levels below the guarded cgroup (`kubepods/pod<uid>` for
//! Guaranteed pods, `kubepods/burstable/pod<uid>` and `.../besteffort/...`
//! for the others; the systemd driver's slices nest the same way).
#![no_std]
#![no_main]

mod runtime;

use core::ptr;

use aya_ebpf::{
    helpers::generated::bpf_get_current_ancestor_cgroup_id,
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, PerCpuArray},
    programs::SockAddrContext,
};

/// Pod cgroup ids the plugin has seen (the value is unused). Pinned by
/// name beside the guard's programs: it outlives the plugin.
#[map]
static RULEBPF_GUARD_PODS: HashMap<u64, u8> = HashMap::pinned(65_536, 0);

/// Connects refused, per CPU (slot 0).
#[map]
static RULEBPF_GUARD_REFUSED: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// The guarded cgroup's level (the root is 0), set by the loader.
#[unsafe(no_mangle)]
static RULEBPF_GUARD_LEVEL: u32 = 0;

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn rulebpf_guard4(_ctx: SockAddrContext) -> i32 {
    guard()
}

#[cgroup_sock_addr(connect6)]
pub fn rulebpf_guard6(_ctx: SockAddrContext) -> i32 {
    guard()
}

#[inline(always)]
fn guard() -> i32 {
    // SAFETY: plain read of a load-time constant.
    let level = unsafe { ptr::read_volatile(&raw const RULEBPF_GUARD_LEVEL) };
    for below in 1..=2 {
        // SAFETY: a helper of cgroup sock_addr programs (5.7+); 0 when the
        // task's cgroup is not that deep.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id((level + below) as i32) };
        // SAFETY: the value is a plain byte, never read.
        if id != 0 && unsafe { RULEBPF_GUARD_PODS.get(&id) }.is_some() {
            return ALLOW;
        }
    }
    if let Some(refused) = RULEBPF_GUARD_REFUSED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe { *refused += 1 };
    }
    REFUSE
}
