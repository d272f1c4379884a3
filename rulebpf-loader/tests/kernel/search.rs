//! The port search on kernels without `bpf_loop` (before 5.17): one
//! connect tries at most `BOUNDED_CANDIDATES` (1024) ports from the rule's
//! cursor. Forced with `RULEBPF_ASSUME_NO_LOOP=1` where the kernel has the
//! helper, so the bounded programs meet the real verifier everywhere; on
//! 5.10 it is the search in force. Origin ranges 12000-16999 belong to this
//! file (`rulebpf_testkit::ports::SEARCH_TESTS`).
//!
//! Ports are held by sockets this test binds outside the cgroup (plain
//! `bind()`, no `SO_REUSEADDR`): the hook's `bpf_bind()` meets them as it
//! would meet any other program's.

use std::net::{Ipv4Addr, SocketAddrV4};

use rulebpf_common::BOUNDED_CANDIDATES;

use crate::harness::*;

/// Binds every port of `lo..=hi` but `free` (TCP, any address): what an
/// almost full range looks like to the hook.
fn hold_all_but(lo: u16, hi: u16, free: u16) -> Vec<socket2::Socket> {
    raise_open_files();
    (lo..=hi)
        .filter(|&p| p != free)
        .map(|port| {
            let socket = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .unwrap();
            socket
                .bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())
                .unwrap_or_else(|e| panic!("holding port {port}: {e}"));
            socket
        })
        .collect()
}

/// Lets this process hold the sockets of the tests of this file at once
/// (several thousand; root may raise the limit).
fn raise_open_files() {
    const WANT: libc::rlim_t = 65_536;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur >= WANT {
            return;
        }
        let hard = limit.rlim_max;
        limit.rlim_cur = WANT;
        limit.rlim_max = hard.max(WANT);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            return;
        }
        // Without CAP_SYS_RESOURCE (a container): as far as the hard limit.
        limit.rlim_cur = hard;
        limit.rlim_max = hard;
        let ret = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    }
}

/// `attach` with the bounded search, whatever the kernel has.
fn attach_bounded(cg: &TestCgroup, rules: &str) {
    let stderr = cg.attach_warned(rules, &[("RULEBPF_ASSUME_NO_LOOP", "1")]);
    assert!(stderr.contains("no bpf_loop (Linux 5.17)"), "{stderr}");
}

/// A range no larger than one connect's candidates is searched whole: the
/// one free port of 1,000 is found by the first connect, wherever it is.
#[test]
fn without_bpf_loop_a_range_of_up_to_1024_ports_is_searched_whole() {
    let (lo, hi, free) = (12000, 12999, 12977);
    assert!(u32::from(hi - lo + 1) <= BOUNDED_CANDIDATES);
    let cg = TestCgroup::new("bounded-whole");
    let server = Listener::on([127, 0, 0, 2]);
    let _held = hold_all_but(lo, hi, free);
    attach_bounded(&cg, &format!("127.0.0.2 {} : {lo}-{hi}\n", server.port()));
    let got = cg.probe(server.addr, 2, &["--hold"]);
    assert_eq!(got, [Probed::Port(free), Probed::Errno(exhausted_errno())]);
    assert_eq!(server.take(1), [free]);
    assert_eq!(cg.stats(), [(1, 2, 1, 1)]);
}

/// In a larger range the first connect tries ports 0..1024 of the range
/// (its cursor starts at 0) and fails although one port further on is
/// free: the window the bounded search leaves. It moves the cursor past
/// what it tried, so the next connect finds the port. One port more than
/// the candidates, the free one last: a cursor moved one port too far
/// would wrap onto the first port again and never try the last.
#[test]
fn without_bpf_loop_a_larger_range_can_refuse_once_and_the_next_connect_finds_the_port() {
    let (lo, hi, free) = (13000, 14024, 14024);
    assert_eq!(u32::from(hi - lo) + 1, BOUNDED_CANDIDATES + 1);
    let cg = TestCgroup::new("bounded-window");
    let server = Listener::on([127, 0, 0, 2]);
    let _held = hold_all_but(lo, hi, free);
    attach_bounded(&cg, &format!("127.0.0.2 {} : {lo}-{hi}\n", server.port()));
    let got = cg.probe(server.addr, 2, &["--hold"]);
    assert_eq!(got, [Probed::Errno(exhausted_errno()), Probed::Port(free)]);
    assert_eq!(server.take(1), [free]);
    assert_eq!(cg.stats(), [(1, 2, 1, 1)]);
}

/// The search the kernel gives: with `bpf_loop` the first connect finds
/// the one free port of 1,500 wherever it is; without it (5.10) it is the
/// second, as above.
#[test]
fn the_kernels_own_search_finds_the_one_free_port_of_a_large_range() {
    let (lo, hi, free) = (14500, 15999, 15900);
    let cg = TestCgroup::new("search-own");
    let server = Listener::on([127, 0, 0, 2]);
    let _held = hold_all_but(lo, hi, free);
    cg.attach(&format!("127.0.0.2 {} : {lo}-{hi}\n", server.port()), &[]);
    let got = cg.probe(server.addr, 2, &["--hold"]);
    if kernel_has("bpf_loop") {
        assert_eq!(got, [Probed::Port(free), Probed::Errno(exhausted_errno())]);
    } else {
        assert_eq!(got, [Probed::Errno(exhausted_errno()), Probed::Port(free)]);
    }
    assert_eq!(server.take(1), [free]);
    assert_eq!(cg.stats(), [(1, 2, 1, 1)]);
}
