//! Decision events: one [`Event`] per connect() the rule-set hooks decide
//! on, written to the instance's ring buffer while a reader listens
//! (`rulebpf events`, `run --events-log`).
//!
//! Nobody listening costs one array read per connect: the reader sets
//! `RULEBPF_EVENT_CONTROL` while it reads and clears it when it stops. A
//! full ring (a reader that fell behind) never blocks a connect(): the
//! event is dropped and counted (`RULEBPF_EVENT_COUNTS`).
//!
//! Ring buffers are 5.8+; the task helpers (`bpf_get_current_comm` and
//! friends) reach sock_addr programs through `sock_addr_func_proto` on
//! 5.10 already (probed; the events tests pass on Debian 11's 5.10), and
//! through `cgroup_current_func_proto` since 6.1.
//! https://github.com/torvalds/linux/blob/v5.10/net/core/filter.c (sock_addr_func_proto)
//! https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/cgroup.c (cgroup_current_func_proto)
//! https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/ringbuf.c (bpf_ringbuf_reserve)

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    btf_maps::{Array, PerCpuArray, RingBuf},
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_ktime_get_boot_ns, bpf_ringbuf_query,
    },
    macros::btf_map,
    programs::SockAddrContext,
};
use rulebpf_common::{
    EVENT_COUNTS, EVENT_RING_BYTES, EVENTS_NO_MATCH, EVENTS_ON, Event, EventCount, Outcome,
    TupleKey, Verdict,
};

/// 1: events may be made; 0: their code is dead, and the verifier removes
/// it (a branch on a frozen read-only global), as if compiled out. Set by
/// the loader.
#[unsafe(no_mangle)]
static RULEBPF_EVENTS_ON: u32 = 1;

#[btf_map(pin_by_name)]
static RULEBPF_EVENTS: RingBuf<Event, { EVENT_RING_BYTES as usize }> = RingBuf::new();

#[btf_map(pin_by_name)]
static RULEBPF_EVENT_CONTROL: Array<u32, 1> = Array::new();

#[btf_map(pin_by_name)]
static RULEBPF_EVENT_COUNTS: PerCpuArray<u64, { EVENT_COUNTS as usize }> = PerCpuArray::new();

/// Whether a reader wants an event with this outcome: the one map read a
/// connect pays when nobody listens.
#[inline(always)]
pub(crate) fn wanted(outcome: Outcome) -> bool {
    // SAFETY: plain read of a load-time constant.
    if unsafe { core::ptr::read_volatile(&RULEBPF_EVENTS_ON) } == 0 {
        return false;
    }
    let Some(flags) = RULEBPF_EVENT_CONTROL.get(0) else {
        return false;
    };
    let flags = *flags;
    flags & EVENTS_ON != 0 && (outcome != Outcome::NoMatch || flags & EVENTS_NO_MATCH != 0)
}

/// What the hook decided, for [`emit`].
pub(crate) struct Decision {
    pub(crate) outcome: Outcome,
    /// The origin port bound or kept (0: the OS chooses).
    pub(crate) origin_port: u16,
    pub(crate) rule: u32,
    pub(crate) line: u32,
    pub(crate) key: u64,
}

impl Decision {
    #[inline(always)]
    pub(crate) fn new(outcome: Outcome, verdict: Option<&Verdict>, origin_port: u16) -> Self {
        match verdict {
            Some(v) => Self {
                outcome,
                origin_port,
                rule: v.rule,
                line: v.line,
                key: v.key,
            },
            None => Self {
                outcome,
                origin_port,
                rule: u32::MAX,
                line: 0,
                key: 0,
            },
        }
    }
}

/// Records `decision` for the connect() to `tuple`'s destination when a
/// reader wants it. A subprogram of its own: the verifier walks it once
/// per call site, not once per path through the hook.
#[inline(never)]
pub(crate) fn emit(ctx: &SockAddrContext, tuple: &TupleKey, decision: &Decision) {
    if !wanted(decision.outcome) {
        return;
    }
    let Some(mut entry) = RULEBPF_EVENTS.reserve(0) else {
        count(EventCount::Dropped);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` is the reserved record, ours until submitted; every
    // field is written (the struct has no padding).
    unsafe {
        (*event).boot_ns = bpf_ktime_get_boot_ns();
        (*event).cgroup_id = bpf_get_current_cgroup_id();
        (*event).pid_tgid = bpf_get_current_pid_tgid();
        (*event).uid_gid = bpf_get_current_uid_gid();
        (*event).netns_cookie = bpf_get_netns_cookie(ctx.sock_addr.cast());
        (*event).rule_key = decision.key;
        (*event).dest_addr = tuple.dest_addr;
        (*event).comm = [0; 16];
        bpf_get_current_comm((&raw mut (*event).comm).cast::<c_void>(), 16);
        (*event).line = decision.line;
        (*event).dest_port = tuple.dest_port;
        (*event).origin_port = decision.origin_port;
        (*event).family = tuple.family;
        (*event).protocol = tuple.protocol;
        (*event).outcome = decision.outcome as u8;
        (*event).pad = 0;
        (*event).rule = decision.rule;
    }
    entry.submit(wakeup());
    count(EventCount::Written);
}

/// `bpf_ringbuf_submit` flags: the reader is not woken per event (a
/// wakeup per connect would cost more than the event: a context switch on
/// a busy core); it drains the ring every few milliseconds, and is woken
/// at once when a quarter of the ring is waiting.
/// https://github.com/torvalds/linux/blob/v6.12/kernel/bpf/ringbuf.c (bpf_ringbuf_commit)
#[inline(always)]
fn wakeup() -> u64 {
    let ring = core::ptr::from_ref(&RULEBPF_EVENTS).cast_mut().cast();
    // SAFETY: the ring buffer map, as the helper wants it.
    let waiting = unsafe { bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA.into()) };
    if waiting >= u64::from(EVENT_RING_BYTES / 4) {
        BPF_RB_FORCE_WAKEUP.into()
    } else {
        BPF_RB_NO_WAKEUP.into()
    }
}

#[inline(always)]
fn count(which: EventCount) {
    if let Some(slot) = RULEBPF_EVENT_COUNTS.get_ptr_mut(which as u32) {
        // SAFETY: this CPU's slot; programs do not migrate while running.
        unsafe { *slot += 1 };
    }
}
