//! The `cgroup/connect4` hook: picks the origin port of every new TCP
//! connection made from the cgroup, from rules the loader compiled into maps
//! (layouts: `rulebpf-common`).
//!
//! Per connect the cost is fixed: 4 automaton steps over the destination's
//! octets, one LPM lookup on `{table, port}`, then — only for a rule with an
//! origin range — `bpf_bind()` on ports of the range until one is free.
#![no_std]
#![no_main]
// atomic_xadd: the bpfel target exposes no Atomic*::fetch_add (see bind.rs).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod bind;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    macros::{cgroup_sock_addr, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::SockAddrContext,
};
use aya_log_ebpf::{debug, warn};
use rulebpf_common::{
    DFA_DEAD, DFA_ROOT, DfaEdge, POLICY_FALLBACK, PORT_KEY_BITS, PortKey, RuleStats, Verdict,
};

/// Next state for octets whose transition differs from the default.
#[map]
static RULEBPF_DFA_EDGES: HashMap<DfaEdge, u32> = HashMap::with_max_entries(1, 0);
/// Default next state, indexed by state.
#[map]
static RULEBPF_DFA_DEFAULT: Array<u32> = Array::with_max_entries(1, 0);
/// `{port table, port}` -> the deciding rule and its origin range.
#[map]
static RULEBPF_PORTS: LpmTrie<PortKey, Verdict> = LpmTrie::with_max_entries(1, 0);
/// Per-rule counters, per CPU (no atomics on the hot path).
#[map]
static RULEBPF_STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(1, 0);
/// Per-rule rotating start of the origin-port search, shared by all CPUs.
#[map]
static RULEBPF_CURSOR: Array<u64> = Array::with_max_entries(1, 0);

/// `POLICY_STRICT` or `POLICY_FALLBACK`; set by the loader before loading.
#[unsafe(no_mangle)]
static RULEBPF_POLICY: u32 = 0;

/// connect() proceeds.
const ALLOW: i32 = 1;
/// connect() fails with the errno set by `bpf_set_retval` (else EPERM).
const REJECT: i32 = 0;

const AF_INET: u32 = 2;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[cgroup_sock_addr(connect4)]
pub fn rulebpf_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(ret) | Err(ret) => ret,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    // SAFETY: the kernel hands connect4 a valid `bpf_sock_addr`.
    let sa: &bpf_sock_addr = unsafe { &*ctx.sock_addr };
    if sa.user_family != AF_INET || sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return Ok(ALLOW);
    }
    // SAFETY: `sk` is always set for sock_addr programs (PTR_TO_SOCKET).
    let sk = unsafe { &*sa.__bindgen_anon_1.sk };
    if sk.src_port != 0 {
        // The application bound a port itself (FTP active mode binds L-1): keep it.
        return Ok(ALLOW);
    }
    let dest = u32::from_be(sa.user_ip4);
    let port = u16::from_be(sa.user_port as u16);
    let Some(verdict) = decide(dest, port) else {
        return Ok(ALLOW);
    };
    // Log calls cost one branch unless the loader enabled their level
    // (AYA_LOG_LEVEL is set at load: off for `attach`, --log-level for `run`).
    debug!(
        ctx,
        "connect {:i}:{} -> line {} origin {}-{}",
        dest,
        port,
        verdict.line,
        verdict.org_lo,
        verdict.org_hi
    );
    let stats = RULEBPF_STATS.get_ptr_mut(verdict.rule).ok_or(ALLOW)?;
    // SAFETY: per-CPU slot, this program is the only writer on this CPU.
    let stats = unsafe { &mut *stats };
    stats.matched += 1;
    if verdict.org_lo == 0 {
        return Ok(ALLOW);
    }
    // Keep an address the application bound without a port
    // (IP_BIND_ADDRESS_NO_PORT); 0 otherwise.
    let source = sk.src_ip4;
    match bind::bind_in_range(ctx, source, &verdict) {
        Ok(()) => {
            stats.bound += 1;
            Ok(ALLOW)
        }
        Err(errno) => {
            stats.exhausted += 1;
            warn!(
                ctx,
                "connect {:i}:{}: no origin port of {}-{} usable (line {}, errno {})",
                dest,
                port,
                verdict.org_lo,
                verdict.org_hi,
                verdict.line,
                errno
            );
            // SAFETY: plain read of a load-time constant.
            if unsafe { core::ptr::read_volatile(&RULEBPF_POLICY) } == POLICY_FALLBACK {
                return Ok(ALLOW);
            }
            // bpf_set_retval exists since 5.18; without it connect() gets EPERM.
            // https://github.com/torvalds/linux/blob/v6.1/kernel/bpf/cgroup.c#L2130
            unsafe { aya_ebpf::helpers::generated::bpf_set_retval(-errno) };
            Err(REJECT)
        }
    }
}

/// The compiled first-match decision for `dest:port`, or `None` (OS choice).
#[inline(always)]
fn decide(dest: u32, port: u16) -> Option<Verdict> {
    let mut state = DFA_ROOT;
    let mut shift = 24;
    // Four steps, unrolled by the compiler: the verifier sees no loop.
    while shift >= 0 {
        let edge = DfaEdge {
            state,
            octet: (dest >> shift) & 0xff,
        };
        // SAFETY: values are plain u32s.
        state = match unsafe { RULEBPF_DFA_EDGES.get(&edge) } {
            Some(next) => *next,
            None => *RULEBPF_DFA_DEFAULT.get(state)?,
        };
        if state == DFA_DEAD {
            return None;
        }
        shift -= 8;
    }
    let key = Key::new(PORT_KEY_BITS, PortKey::new(state, port));
    RULEBPF_PORTS.get(&key).copied()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_bind and bpf_set_retval are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
