//! The instance maps (layouts and roles: `rulebpf-common`), declared once
//! here for both objects: the entry object creates them and pins them in the
//! instance's directory, every rule-set object opens the pins (pinned by
//! name; the loader points both at the same directory). Declared
//! identically by construction, they survive rule-set swaps: a socket bound
//! under one rule set is released against the same entries under the next.
//!
//! BTF map definitions: socket-local storage requires BTF for its key and
//! value, and the loader compares type, sizes, flags and capacity of a pin
//! before reusing it.
//! https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/bpf_local_storage.c (bpf_local_storage_map_alloc_check)

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{HashMap, PerCpuArray, SkStorage},
    macros::btf_map,
};
use rulebpf_common::{
    COUNTERS, Counter, OCCUPANCY_CAPACITY, Occupancy, PortUse, SOCK_SOURCE, SockState,
    TUPLE_CAPACITY, TupleKey, TupleSource,
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

/// The sockets the hooks handle: `type` and `protocol` of a TCP or UDP one.
pub(crate) const SOCK_STREAM: u32 = 1;
pub(crate) const SOCK_DGRAM: u32 = 2;
pub(crate) const IPPROTO_TCP: u32 = 6;
pub(crate) const IPPROTO_UDP: u32 = 17;

/// Live sockets bound with port sharing -> the key of the rule they were
/// bound under. Not preallocated: an idle instance costs nothing; the
/// loader may give it another capacity.
#[btf_map(pin_by_name)]
pub(crate) static RULEBPF_TUPLES: HashMap<TupleKey, u64, { TUPLE_CAPACITY as usize }, NO_PREALLOC> =
    HashMap::new();

/// TCP tuples -> how to find the connection holding them ([`TupleSource`]),
/// written when the connection starts (`sockops`, `TCP_CONNECT_CB`: the
/// route has chosen the local address). A connect that finds a tuple busy
/// asks the kernel, with this, whether the connection still exists
/// (`track::reclaim_if_gone`). Its keys are a subset of `RULEBPF_TUPLES`'s
/// (same capacity, not preallocated either).
#[btf_map(pin_by_name)]
pub(crate) static RULEBPF_SOURCES: HashMap<
    TupleKey,
    TupleSource,
    { TUPLE_CAPACITY as usize },
    NO_PREALLOC,
> = HashMap::new();

/// Gives back the tuple of a socket whose connection is over. When the
/// socket's source was written down, removing that entry decides: a
/// connect that found the connection gone may have removed it first and
/// taken the tuple over (`track::reclaim_if_gone`), and then the tuple is
/// not ours to remove any more.
#[inline(always)]
pub(crate) fn give_back(state: &mut SockState) {
    if state.flags & SOCK_SOURCE != 0 {
        state.flags &= !SOCK_SOURCE;
        if RULEBPF_SOURCES.remove(&state.tuple).is_err() {
            return;
        }
    }
    let _ = RULEBPF_TUPLES.remove(&state.tuple);
}

/// What the release of a socket must undo, and what the bind hooks saw.
#[btf_map(pin_by_name)]
pub(crate) static RULEBPF_SOCKS: SkStorage<SockState> = SkStorage::new();

/// Rule key -> live sockets bound under the rule.
#[btf_map(pin_by_name)]
pub(crate) static RULEBPF_OCCUPANCY: HashMap<
    u64,
    Occupancy,
    { OCCUPANCY_CAPACITY as usize },
    NO_PREALLOC,
> = HashMap::new();

/// `{rule key, port}` -> live sockets on that port: the first makes the
/// port count in the rule's `in_use`, the last gives it back.
#[btf_map(pin_by_name)]
pub(crate) static RULEBPF_PORT_USE: HashMap<
    PortUse,
    u64,
    { OCCUPANCY_CAPACITY as usize },
    NO_PREALLOC,
> = HashMap::new();

/// The instance counters, per CPU.
#[btf_map(pin_by_name)]
pub(crate) static RULEBPF_COUNTERS: PerCpuArray<u64, { COUNTERS as usize }> = PerCpuArray::new();

/// `*target += n` for all CPUs at once: a non-fetching atomic add, the only
/// atomic of BPF cpu v1 (bpf-linker's default); `n = u64::MAX` subtracts 1.
///
/// # Safety
/// `target` points to an aligned `u64` in a map value.
#[inline(always)]
pub(crate) unsafe fn atomic_add(target: *mut u64, n: u64) {
    // SAFETY: the caller's promise.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(target, n) };
}

/// Adds one to an instance counter (this CPU's slot: no atomics needed).
#[inline(always)]
pub(crate) fn count(counter: Counter) {
    if let Some(slot) = RULEBPF_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's slot; programs do not migrate while running.
        unsafe { *slot += 1 };
    }
}
