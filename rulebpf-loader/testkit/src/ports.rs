//! Who uses which origin ports: the one table of the ranges that rule files
//! of the demo, the kernel tests and the bench hand out.
//!
//! Two rules keep every check meaningful:
//!
//! * **No two users share a range.** The kernel tests run in parallel, and
//!   CI runs the bench right after them: a port still held (a socket in
//!   TIME_WAIT, a test's probe with `--hold`) by one user must never be the
//!   port another user's assertion expects.
//! * **Every range lies below 32768**, outside the range Linux picks
//!   ephemeral ports from by default ([`OS_EPHEMERAL`], 32768-60999,
//!   `/proc/sys/net/ipv4/ip_local_port_range`). A port the server sees is
//!   then either rulebpf's choice or the OS's, never ambiguous: "no hook"
//!   and "hooked" can be told apart by the port alone.
//!
//! | slot | ports | used by |
//! |---|---|---|
//! | [`CRI_TEST`] | 11000-11099 | `cargo xtask cri-test`: the instance its annotated pods name |
//! | [`GUARD_TESTS`] | 11100-11199 | `rulebpf-loader/tests/kernel/guard.rs` |
//! | [`SEARCH_TESTS`] | 12000-16999 | `rulebpf-loader/tests/kernel/search.rs` |
//! | [`EVENT_TESTS`] | 17000-17999 | `rulebpf-loader/tests/kernel/events.rs` |
//! | [`PATH_TESTS`] | 18000-18999 | `rulebpf-loader/tests/kernel/paths.rs` |
//! | [`FAULT_TESTS`] | 19000-19999 | `rulebpf-loader/tests/kernel/faults.rs` |
//! | [`DEMO`] | 20000-20099 | `examples/tcpoport.ini`, which `cargo xtask demo` attaches |
//! | [`KERNEL_TESTS`] | 20100-21599 | `rulebpf-loader/tests/kernel/main.rs` |
//! | [`RESERVED`] | 21600-22099 | nobody yet: room for more kernel tests |
//! | [`SERVICE_TESTS`] | 22100-22999 | `rulebpf-loader/tests/kernel/service.rs` |
//! | [`FAMILY_TESTS`] | 23000-23499 | `rulebpf-loader/tests/kernel/families.rs` |
//! | [`SHARING_TESTS`] | 23500-23999 | `rulebpf-loader/tests/kernel/sharing.rs` |
//! | [`BENCH`] | 24000-31999 | `cargo xtask bench`: its rule and its nft SNAT range |
//!
//! A new user takes a free range, adds a slot here and to [`ALL`], and the
//! unit test below checks the table still holds together.

use std::{fmt, ops::RangeInclusive};

/// An inclusive range of origin ports and who hands it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSlot {
    pub name: &'static str,
    pub lo: u16,
    pub hi: u16,
}

impl PortSlot {
    pub const fn new(name: &'static str, lo: u16, hi: u16) -> Self {
        Self { name, lo, hi }
    }

    pub const fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }

    pub const fn range(&self) -> RangeInclusive<u16> {
        self.lo..=self.hi
    }

    /// Do the two ranges share a port?
    pub const fn overlaps(&self, other: &PortSlot) -> bool {
        self.lo <= other.hi && other.lo <= self.hi
    }
}

/// `lo-hi`, as a rule file writes an origin range.
impl fmt::Display for PortSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

/// `cargo xtask cri-test` (the instance its annotated pods name).
pub const CRI_TEST: PortSlot = PortSlot::new("cri-test", 11000, 11099);
/// `rulebpf-loader/tests/kernel/guard.rs` (the pods' guard).
pub const GUARD_TESTS: PortSlot = PortSlot::new("guard tests", 11100, 11199);
/// `rulebpf-loader/tests/kernel/search.rs` (the port search without
/// `bpf_loop`: ranges larger than one connect's candidates).
pub const SEARCH_TESTS: PortSlot = PortSlot::new("search tests", 12000, 16999);
/// `rulebpf-loader/tests/kernel/events.rs` (decision events, NAT).
pub const EVENT_TESTS: PortSlot = PortSlot::new("event tests", 17000, 17999);
/// `rulebpf-loader/tests/kernel/paths.rs` (deny, `*`, remarks).
pub const PATH_TESTS: PortSlot = PortSlot::new("path tests", 18000, 18999);
/// `rulebpf-loader/tests/kernel/faults.rs` (swaps under load, leaks, half-written files).
pub const FAULT_TESTS: PortSlot = PortSlot::new("fault tests", 19000, 19999);
/// `examples/tcpoport.ini`'s rule for the demo's destination (`cargo xtask demo`).
pub const DEMO: PortSlot = PortSlot::new("demo", 20000, 20099);
/// `rulebpf-loader/tests/kernel/enforcement.rs` and `cli.rs`.
pub const KERNEL_TESTS: PortSlot = PortSlot::new("kernel tests", 20100, 21599);
/// `rulebpf-loader/tests/kernel/containers.rs` (podman and the OCI hook).
pub const CONTAINER_TESTS: PortSlot = PortSlot::new("container tests", 21600, 21699);
/// `rulebpf-loader/tests/kernel/instances.rs` (names, attachments, run
/// following its paths, crashes, owners, the previous layout).
pub const INSTANCE_TESTS: PortSlot = PortSlot::new("instance tests", 21700, 21899);
/// `rulebpf-loader/tests/kernel/hardening.rs` (hostile directories, paths).
pub const HARDENING_TESTS: PortSlot = PortSlot::new("hardening tests", 21900, 21999);
/// `rulebpf-loader/tests/kernel/commands.rs` (commands that fail change
/// nothing; settings kept; counting once).
pub const COMMAND_TESTS: PortSlot = PortSlot::new("command tests", 22000, 22099);
/// `rulebpf-loader/tests/kernel/service.rs` (`rulebpf run`).
pub const SERVICE_TESTS: PortSlot = PortSlot::new("service tests", 22100, 22999);
/// `rulebpf-loader/tests/kernel/families.rs` (IPv6, UDP, prefixes, lists).
pub const FAMILY_TESTS: PortSlot = PortSlot::new("family tests", 23000, 23499);
/// `rulebpf-loader/tests/kernel/sharing.rs` (shared origin ports, occupancy,
/// application-bound sockets, reserved ports).
pub const SHARING_TESTS: PortSlot = PortSlot::new("sharing tests", 23500, 23999);
/// `cargo xtask bench`: the measured rule's origin range and the nft SNAT range.
pub const BENCH: PortSlot = PortSlot::new("bench", 24000, 31999);

/// Every slot of the table, in port order.
pub const ALL: [PortSlot; 16] = [
    CRI_TEST,
    GUARD_TESTS,
    SEARCH_TESTS,
    EVENT_TESTS,
    PATH_TESTS,
    FAULT_TESTS,
    DEMO,
    KERNEL_TESTS,
    CONTAINER_TESTS,
    INSTANCE_TESTS,
    HARDENING_TESTS,
    COMMAND_TESTS,
    SERVICE_TESTS,
    FAMILY_TESTS,
    SHARING_TESTS,
    BENCH,
];

/// Where Linux picks ephemeral ports by default (not a slot: nobody may
/// hand these out).
pub const OS_EPHEMERAL: PortSlot = PortSlot::new("Linux's default ephemeral range", 32768, 60999);

#[cfg(test)]
mod tests {
    use super::{ALL, OS_EPHEMERAL};

    #[test]
    fn slots_are_ordered_and_disjoint() {
        for slot in ALL {
            assert!(slot.lo <= slot.hi, "{}: {slot} is empty", slot.name);
        }
        for pair in ALL.windows(2) {
            assert!(
                pair[0].lo < pair[1].lo,
                "ALL is not in port order at {}",
                pair[1].name
            );
        }
        for (i, a) in ALL.iter().enumerate() {
            for b in &ALL[i + 1..] {
                assert!(!a.overlaps(b), "{} ({a}) overlaps {} ({b})", a.name, b.name);
            }
        }
    }

    #[test]
    fn slots_lie_below_the_ephemeral_range() {
        for slot in ALL {
            assert!(slot.hi < 32768, "{} ({slot}) reaches 32768", slot.name);
            assert!(!slot.overlaps(&OS_EPHEMERAL), "{} ({slot})", slot.name);
        }
    }

    #[test]
    fn contains_and_display() {
        let demo = super::DEMO;
        assert!(demo.contains(20000) && demo.contains(20099));
        assert!(!demo.contains(19999) && !demo.contains(20100));
        assert_eq!(demo.to_string(), "20000-20099");
        assert_eq!(demo.range(), 20000..=20099);
    }
}
