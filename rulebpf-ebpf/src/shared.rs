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
    btf_maps::{HashMap, LruHashMap, PerCpuArray, SkStorage},
    macros::btf_map,
};
use rulebpf_common::{
    COUNTERS, Counter, OCCUPANCY_CAPACITY, Occupancy, PortUse, SockState, TUPLE_CAPACITY, TupleKey,
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

/// TCP tuples -> the local address of the connection holding them, written
/// when the connection starts (`sockops`, `TCP_CONNECT_CB`: the route has
/// chosen the address) and removed with the tuple. A connect that finds a
/// tuple busy asks the kernel, with this address, whether the connection
/// still exists (`track::reclaim_if_gone`). LRU: an entry evicted under
/// pressure only makes its tuple count as busy until it is given back.
#[btf_map(pin_by_name)]
pub(crate) static RULEBPF_SOURCES: LruHashMap<TupleKey, [u32; 4], { TUPLE_CAPACITY as usize }> =
    LruHashMap::new();

/// Gives a tuple back: its source first, so that a connect racing with
/// this never reads the source of a connection that is gone while the
/// tuple already belongs to a new one.
#[inline(always)]
pub(crate) fn give_back(tuple: &TupleKey) {
    let _ = RULEBPF_SOURCES.remove(tuple);
    let _ = RULEBPF_TUPLES.remove(tuple);
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
