//! Faults a production gateway meets: rule-set swaps under connect load.
//! Origin ranges 19000-19999 belong to this file
//! (rulebpf_testkit::ports::FAULT_TESTS).

use std::{
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::Instant,
};

use aya::{
    maps::{Map, MapData, ProgramArray},
    programs::{CgroupSockAddr, CgroupSockAddrAttachType},
};

use crate::harness::*;

/// How many swaps the storm test makes at least: enough to have met the
/// 6.12 oops about once per VM run with the old entry programs.
const SWAPS: u64 = 1000;
/// Connects per family in the storm; swaps go on until both probes end.
const STORM_CONNECTS: u32 = 1500;

fn pinned_program(dir: &Path, pin: &str, attach: CgroupSockAddrAttachType) -> CgroupSockAddr {
    CgroupSockAddr::from_pin(dir.join(pin), attach)
        .unwrap_or_else(|e| panic!("opening {}/{pin}: {e}", dir.display()))
}

fn jump_map(dir: &Path, pin: &str) -> ProgramArray<MapData> {
    let data = MapData::from_pin(dir.join(pin)).unwrap();
    ProgramArray::try_from(Map::ProgramArray(data)).unwrap()
}

/// Issue 17, item 0: a rule-set swap patched kernel text (a direct tail
/// call re-written with text_poke_bp), and a 6.12 guest died on its int3
/// under connect load. Here the jump slots flip between two rule sets at
/// least [`SWAPS`] times while two processes in the cgroup connect over
/// IPv4 and IPv6 as fast as they can: every connect gets a port of one of
/// the two rule sets (never an OS port, never an error), and the kernel
/// survives (in the VM matrix a crash ends the guest and fails the suite
/// with its console).
#[test]
fn swaps_under_a_connect_storm_never_crash_nor_leak_a_connect() {
    let named = Named::new("storm");
    let cg = TestCgroup::new("storm");
    let v4 = Listener::on([127, 0, 0, 2]);
    let v6 = Listener::on(std::net::Ipv6Addr::LOCALHOST);
    // 50 ports per family and rule set: 1,500 connects still reuse each
    // port 30 times, and the few ports that FINs the kernel dropped under
    // load keep in LAST_ACK until a loss probe (the upgrade test of
    // instances.rs tells how) cannot fill the range.
    let rules = |lo: u16| {
        format!(
            "127.0.0.2 {} : {lo}-{}\n::1 {} : {}-{}\n",
            v4.port(),
            lo + 49,
            v6.port(),
            lo + 50,
            lo + 99
        )
    };
    let file = cg.rules_file("r.ini", &rules(19000));
    let attach = |file: &Path| {
        rulebpf_ok(&[
            "attach",
            "--name",
            &named.name,
            "--cgroup",
            cg.arg(),
            file.to_str().unwrap(),
        ])
    };
    attach(&file);
    let dir = Path::new("/sys/fs/bpf/rulebpf").join(&named.name);
    let set = |generation: u32| dir.join(format!("set-{generation}"));
    // The first rule set's programs, held open: they outlive their pins.
    let a4 = pinned_program(&set(1), "prog-connect4", CgroupSockAddrAttachType::Connect4);
    let a6 = pinned_program(&set(1), "prog-connect6", CgroupSockAddrAttachType::Connect6);
    std::fs::write(&file, rules(19600)).unwrap();
    attach(&file);
    let b4 = pinned_program(&set(2), "prog-connect4", CgroupSockAddrAttachType::Connect4);
    let b6 = pinned_program(&set(2), "prog-connect6", CgroupSockAddrAttachType::Connect6);
    let mut jump4 = jump_map(&dir, "jump-connect4");
    let mut jump6 = jump_map(&dir, "jump-connect6");

    let storming = AtomicBool::new(true);
    let swaps = AtomicU64::new(0);
    let start = Instant::now();
    let (got4, got6) = thread::scope(|s| {
        let swapper = s.spawn(|| {
            let mut n = 0u64;
            while storming.load(Ordering::Relaxed) || n < SWAPS {
                let (p4, p6) = if n.is_multiple_of(2) {
                    (&a4, &a6)
                } else {
                    (&b4, &b6)
                };
                jump4.set(0, p4.fd().unwrap(), 0).unwrap();
                jump6.set(0, p6.fd().unwrap(), 0).unwrap();
                n += 1;
            }
            // What the records say is in force: rule set 2.
            jump4.set(0, b4.fd().unwrap(), 0).unwrap();
            jump6.set(0, b6.fd().unwrap(), 0).unwrap();
            swaps.store(n, Ordering::Relaxed);
        });
        let p4 = s.spawn(|| cg.probe(v4.addr, STORM_CONNECTS, &[]));
        let p6 = s.spawn(|| cg.probe(v6.addr, STORM_CONNECTS, &[]));
        let got = (p4.join().unwrap(), p6.join().unwrap());
        storming.store(false, Ordering::Relaxed);
        swapper.join().unwrap();
        got
    });
    let swaps = swaps.load(Ordering::Relaxed);
    eprintln!(
        "{swaps} swaps under {} connects in {:?}",
        2 * STORM_CONNECTS,
        start.elapsed()
    );
    assert!(swaps >= SWAPS);
    let ours = |ports: &[Probed], lo: u16| {
        ports.iter().all(|p| {
            matches!(p, Probed::Port(port)
                if (lo..lo + 50).contains(port) || (lo + 600..lo + 650).contains(port))
        })
    };
    assert!(ours(&got4, 19000), "IPv4: {got4:?}");
    assert!(ours(&got6, 19050), "IPv6: {got6:?}");
    v4.take(STORM_CONNECTS as usize);
    v6.take(STORM_CONNECTS as usize);
    // The instance is whole afterwards: rule set 2 in force, as recorded.
    let stats: serde_json::Value =
        serde_json::from_str(&rulebpf_ok(&["stats", "--json", "--name", &named.name])).unwrap();
    assert_eq!(stats[0]["generation"].as_u64(), Some(2), "{stats}");
    assert!(
        named.status()["attachments"][0]["standing"] == "in_force",
        "{}",
        named.status()
    );
}

/// `lines` rules toward addresses nobody connects to, then the rule of the
/// test's destination: a file cut short lacks the last one.
fn long_rules(lines: u32, last: &str) -> String {
    let mut text: String = (0..lines)
        .map(|i| format!("10.{}.{}.1 {} : 0\n", i / 250, i % 250, 1 + i % 1000))
        .collect();
    text.push_str(last);
    text
}

/// Issue 17, item 2: `run` read a rules file while it was being written in
/// place and put the part written so far in force (its destination's rule,
/// the last line, missing: connects left from OS ports). Here the file is
/// written in place twice while a process in the cgroup connects every few
/// milliseconds: once in two pieces with a pause between them, once
/// truncated and left empty for a while. Every connect gets a port of one
/// of the whole files, and exactly two reloads happen.
#[test]
fn run_applies_only_whole_files() {
    use std::io::Write as _;
    let cg = TestCgroup::new("whole");
    let server = Listener::on([127, 0, 0, 2]);
    let rule = |lo: u16| format!("127.0.0.2 {} : {lo}-{}\n", server.port(), lo + 9);
    let file = cg.rules_file("whole.ini", &long_rules(2000, &rule(19100)));
    let service = RunningService::start(&cg, &file, &[]);
    let generation = || cg.status()["rule_set"]["generation"].as_u64().unwrap();
    assert_eq!(generation(), 1);

    let probing = AtomicBool::new(true);
    let (ports, ()) = thread::scope(|s| {
        let prober = s.spawn(|| {
            let mut ports = Vec::new();
            while probing.load(Ordering::Relaxed) {
                ports.extend(cg.probe(server.addr, 1, &[]));
                thread::sleep(std::time::Duration::from_millis(5));
            }
            ports
        });
        let (cg, server) = (&cg, &server);
        let in_range = |lo: u16| {
            move || {
                let got = cg.probe(server.addr, 1, &[]);
                matches!(got[..], [Probed::Port(p)] if (lo..lo + 10).contains(&p))
            }
        };
        // In place, in two pieces, 0.6 s apart (3 settle times).
        let text = long_rules(2000, &rule(19110));
        let (head, tail) = text.split_at(text.len() / 2);
        let mut writer = std::fs::File::create(&file).unwrap();
        writer.write_all(head.as_bytes()).unwrap();
        thread::sleep(std::time::Duration::from_millis(600));
        writer.write_all(tail.as_bytes()).unwrap();
        drop(writer);
        wait_until(
            "the whole file to apply",
            std::time::Duration::from_secs(30),
            in_range(19110),
        );
        // Truncated, left empty for 0.6 s, then written.
        let mut writer = std::fs::File::create(&file).unwrap();
        thread::sleep(std::time::Duration::from_millis(600));
        writer
            .write_all(long_rules(2000, &rule(19120)).as_bytes())
            .unwrap();
        drop(writer);
        wait_until(
            "the rewritten file to apply",
            std::time::Duration::from_secs(30),
            in_range(19120),
        );
        probing.store(false, Ordering::Relaxed);
        (prober.join().unwrap(), ())
    });
    let stray: Vec<&Probed> = ports
        .iter()
        .filter(|p| !matches!(p, Probed::Port(port) if (19100..19130).contains(port)))
        .collect();
    assert!(
        stray.is_empty(),
        "{} of {} connects: {stray:?}",
        stray.len(),
        ports.len()
    );
    assert_eq!(generation(), 3, "{}", service.log_text());
    eprintln!(
        "{} connects during two in-place writes, all from the rules' ports",
        ports.len()
    );
    server.take(0);
}

/// A TCP peer that accepts and keeps every connection open, never closing
/// its side (a server slow to close, or gone quiet).
struct HoldingPeer {
    addr: std::net::SocketAddr,
    held: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl HoldingPeer {
    fn on(listener: std::net::TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = std::sync::Arc::clone(&held);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                keep.lock().unwrap().push(stream);
            }
        });
        Self { addr, held }
    }

    fn wait_for(&self, n: usize) {
        wait_until(
            "the peer to accept",
            std::time::Duration::from_secs(20),
            || self.held.lock().unwrap().len() >= n,
        );
    }

    /// `tcpi_state` of each held connection, in accept order.
    fn states(&self) -> Vec<u8> {
        use std::os::fd::AsRawFd as _;
        let held = self.held.lock().unwrap();
        held.iter()
            .map(|s| {
                // SAFETY: getsockopt(TCP_INFO) into a zeroed tcp_info of its size.
                let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
                let rc = unsafe {
                    libc::getsockopt(
                        s.as_raw_fd(),
                        libc::IPPROTO_TCP,
                        libc::TCP_INFO,
                        (&raw mut info).cast(),
                        &mut len,
                    )
                };
                assert_eq!(rc, 0);
                info.tcpi_state
            })
            .collect()
    }
}

/// `enum tcp_state`.
const TCP_FIN_WAIT2: u8 = 5;
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE_WAIT: u8 = 8;

/// Waits (up to 30 s: a FIN retransmission may take seconds) until every
/// port of `local` has one IPv4 TCP socket toward `remote_port`, in `state`.
fn wait_for_states(what: &str, local: std::ops::RangeInclusive<u16>, remote_port: u16, state: u8) {
    let want = vec![state; local.len()];
    wait_until(what, std::time::Duration::from_secs(30), || {
        our_states(local.clone(), remote_port) == want
    });
}

/// The origin ports of connects that must all have succeeded, sorted.
fn sorted_ports(probed: &[Probed]) -> Vec<u16> {
    let mut ports: Vec<u16> = probed.iter().map(|p| p.port()).collect();
    ports.sort();
    ports
}

/// The state of each IPv4 TCP socket of ours from `local` ports to
/// `remote_port`, by local port, from /proc/net/tcp: a timewait socket
/// shows its substate there (FIN_WAIT2, or TIME_WAIT once the peer's FIN
/// came).
/// https://github.com/torvalds/linux/blob/v6.12/net/ipv4/tcp_ipv4.c (get_timewait4_sock)
fn our_states(local: std::ops::RangeInclusive<u16>, remote_port: u16) -> Vec<u8> {
    our_sockets(local, remote_port, |f| {
        u8::from_str_radix(f[3], 16).unwrap()
    })
}

/// `read` of the /proc/net/tcp fields of each IPv4 TCP socket of ours from
/// `local` ports to `remote_port`, by local port.
fn our_sockets<T>(
    local: std::ops::RangeInclusive<u16>,
    remote_port: u16,
    read: impl Fn(&[&str]) -> T,
) -> Vec<T> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |field: &str| u16::from_str_radix(field.rsplit(':').next().unwrap(), 16).unwrap();
    let mut found: Vec<(u16, T)> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (l, r) = (port(f[1]), port(f[2]));
            (local.contains(&l) && r == remote_port).then(|| (l, read(&f)))
        })
        .collect();
    found.sort_by_key(|(l, _)| *l);
    found.into_iter().map(|(_, value)| value).collect()
}

/// Issue 17, item 3: a connection this side closed first while the peer
/// kept its side open ends here as a timewait socket of substate
/// FIN_WAIT2, and its 4-tuple was handed out again at once: the new SYN
/// met the peer's CLOSE_WAIT socket, which our side then reset. Here two
/// connections over a two-port range are closed by us and held by the
/// peer; a third connect finds both 4-tuples still held and fails
/// (EADDRNOTAVAIL, strict policy) instead of resetting the peer, whose
/// sockets all stay in CLOSE_WAIT.
#[test]
fn a_tuple_the_peer_still_holds_is_not_handed_out_again() {
    let cg = TestCgroup::new("finwait2");
    let peer = HoldingPeer::on(std::net::TcpListener::bind("127.0.0.7:0").unwrap());
    cg.attach(
        &format!("127.0.0.7 {} : 19200-19201\n", peer.addr.port()),
        &[],
    );
    let first = cg.probe(peer.addr, 2, &["--close-first"]);
    assert_eq!(sorted_ports(&first), [19200, 19201]);
    peer.wait_for(2);
    wait_until(
        "the peer to see both FINs",
        std::time::Duration::from_secs(10),
        || peer.states() == [TCP_CLOSE_WAIT, TCP_CLOSE_WAIT],
    );

    // Once the peer has acknowledged our FIN, the kernel turns each of our
    // orphaned sockets into a timewait socket of substate FIN_WAIT2 —
    // unless the ACK came in the moment between `__tcp_close()`'s check
    // and `tcp_close()`'s `release_sock()`: processed from the backlog of
    // a socket still owned by the closing process, it leaves a full
    // socket in FIN_WAIT2 under its keepalive timer (tcp_input.c, "Bad
    // case"). Both hold the tuple while the peer holds the connection.
    // https://github.com/torvalds/linux/blob/v6.12/net/ipv4/tcp.c (__tcp_close, tcp_close)
    // https://github.com/torvalds/linux/blob/v6.12/net/ipv4/tcp_input.c (tcp_rcv_state_process, TCP_FIN_WAIT1)
    wait_for_states(
        "the peer to acknowledge our FINs",
        19200..=19201,
        peer.addr.port(),
        TCP_FIN_WAIT2,
    );
    let timewait = our_timers(19200..=19201, peer.addr.port())
        .iter()
        .filter(|&&timer| timer == TIMER_TIMEWAIT)
        .count() as u64;
    let third = cg.probe(peer.addr, 1, &["--close-first"]);
    assert_eq!(third, [Probed::Errno(exhausted_errno())]);
    assert_eq!(
        peer.states(),
        [TCP_CLOSE_WAIT, TCP_CLOSE_WAIT],
        "a held connection was reset"
    );

    // The peer closes: ordinary TIME_WAITs, which the kernel reuses (TCP
    // timestamps): both ports serve this destination again at once. A
    // timewait socket's tuple is taken back by the next connect that meets
    // it (`reclaimed`); a full socket sees the peer's FIN itself, and the
    // sock_ops program gives its tuple back then.
    peer.held.lock().unwrap().clear();
    wait_for_states(
        "our side to see the peer's FINs",
        19200..=19201,
        peer.addr.port(),
        TCP_TIME_WAIT,
    );
    let before = our_sockets(19200..=19201, peer.addr.port(), |f| f.join(" "));
    let again = cg.probe(peer.addr, 2, &["--close-first"]);
    if !kernel_shares_ports() {
        // Bound without SO_REUSEADDR, a socket cannot take a port a
        // timewait socket holds: the ports come back when TIME_WAIT ends
        // (60 s), not before, and nothing is reclaimed.
        assert_eq!(again, [Probed::Errno(exhausted_errno()); 2]);
        assert_eq!(reclaimed(&cg), 0);
        return;
    }
    assert_eq!(sorted_ports(&again), [19200, 19201]);
    assert_eq!(
        reclaimed(&cg),
        timewait,
        "timewait sockets among our two FIN_WAIT2 ones: {timewait}; /proc/net/tcp \
         before the connects:\n{before:#?}\n{}",
        rulebpf_ok(&["stats", "--json", "--cgroup", cg.arg()])
    );
}

/// /proc/net/tcp's `tr` (which timer runs) of a timewait socket; a full
/// socket shows 1 (retransmit), 2 (keepalive, also a full FIN_WAIT2
/// orphan's) or 4 (zero window probe).
/// https://github.com/torvalds/linux/blob/v6.12/net/ipv4/tcp_ipv4.c (get_tcp4_sock, get_timewait4_sock)
const TIMER_TIMEWAIT: u8 = 3;

/// The `tr` of each IPv4 TCP socket of ours from `local` ports to
/// `remote_port`, by local port.
fn our_timers(local: std::ops::RangeInclusive<u16>, remote_port: u16) -> Vec<u8> {
    our_sockets(local, remote_port, |f| {
        u8::from_str_radix(f[5].split(':').next().unwrap(), 16).unwrap()
    })
}

/// The instance counter `reclaimed` of `cg`.
fn reclaimed(cg: &TestCgroup) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&rulebpf_ok(&["stats", "--json", "--cgroup", cg.arg()])).unwrap();
    stats[0]["counters"]["reclaimed"]
        .as_u64()
        .unwrap_or_else(|| panic!("{stats}"))
}

/// Drops every packet that arrives for the sockets of a cgroup while the
/// returned link is open: a `cgroup_skb/ingress` program of two
/// instructions (`r0 = 0; exit`), link-attached. How a lossy or silent
/// peer looks from this side; closing the link lifts it, even after the
/// cgroup is removed (the link holds it).
fn drop_ingress(cgroup: &std::path::Path) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    // include/uapi/linux/bpf.h
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
    const BPF_CGROUP_INET_INGRESS: u32 = 0;
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    #[repr(C)]
    #[derive(Default)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }
    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::os::fd::OwnedFd {
        // SAFETY: `attr` has the layout of `cmd`'s part of `union bpf_attr`.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                (attr as *mut T).cast::<libc::c_void>(),
                std::mem::size_of::<T>() as libc::c_uint,
            )
        };
        assert!(fd >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
        // SAFETY: a new fd the kernel just gave us.
        unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
    }
    // Before 5.11 a program's memory counts against RLIMIT_MEMLOCK (64 KiB
    // by default; EPERM beyond), since then against the memory cgroup. A
    // refusal to raise it (no CAP_SYS_RESOURCE: a container) matters only
    // on those kernels, where the load below then says EPERM.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a plain system call on a local struct.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    // r0 = 0 (drop); exit
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    let program = bpf(
        BPF_PROG_LOAD,
        &mut ProgLoad {
            prog_type: BPF_PROG_TYPE_CGROUP_SKB,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            expected_attach_type: BPF_CGROUP_INET_INGRESS,
            ..Default::default()
        },
    );
    let dir = std::fs::File::open(cgroup).unwrap();
    bpf(
        BPF_LINK_CREATE,
        &mut LinkCreate {
            prog_fd: program.as_raw_fd() as u32,
            target_fd: dir.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_INET_INGRESS,
            flags: 0,
        },
    )
}

/// Issue 17, item 1: connections still closing when their cgroup went away
/// (every `systemctl restart`, every new container) kept their tuples for
/// good: `run` detached the instance from the removed cgroup at once, so
/// their close never reached a program, and later connects to that
/// destination failed with EADDRNOTAVAIL. Here ten connections over a
/// ten-port range are closed while the peer's ACKs are dropped (our side
/// stays in FIN_WAIT1), the cgroup is removed and `run` detaches it, then
/// the drop is lifted and the peer closes too (our side: TIME_WAIT). When
/// the cgroup is back, ten connects get the ten ports again: each finds its
/// tuple held by no live connection and takes it back.
#[test]
fn tuples_of_connections_closing_when_their_cgroup_goes_come_back() {
    use std::{io::Write as _, process::Stdio, time::Duration};
    let cg = TestCgroup::new("closing");
    let peer = HoldingPeer::on(std::net::TcpListener::bind("127.0.0.8:0").unwrap());
    let port = peer.addr.port();
    let file = cg.rules_file("closing.ini", &format!("127.0.0.8 {port} : 19300-19309\n"));
    let service = RunningService::start(&cg, &file, &[]);
    let dest = peer.addr.to_string();
    let mut client = std::process::Command::new(RULEBPF)
        .args(["probe", "--json", "--cgroup", cg.arg(), "--count", "10"])
        .args(["--hold", "--hold-until-eof", "--close-first", &dest])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    peer.wait_for(10);
    let dropping = drop_ingress(&cg.path);
    drop(client.stdin.take());
    let out = client.wait_with_output().unwrap();
    let probed = parse_probe(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(sorted_ports(&probed), (19300..=19309).collect::<Vec<_>>());
    wait_for_states(
        "our FINs to go unanswered",
        19300..=19309,
        port,
        TCP_FIN_WAIT1,
    );

    std::fs::remove_dir(&cg.path).unwrap();
    wait_until(
        "run to drop the gone cgroup",
        Duration::from_secs(10),
        || {
            cg.status()["attachments"]
                .as_array()
                .is_none_or(|a| a.iter().all(|a| a["standing"] != "in_force"))
        },
    );
    drop(dropping);
    wait_for_states(
        "the peer to acknowledge our FINs",
        19300..=19309,
        port,
        TCP_FIN_WAIT2,
    );
    peer.held.lock().unwrap().clear();
    wait_for_states("the peer's FINs", 19300..=19309, port, TCP_TIME_WAIT);

    std::fs::create_dir(&cg.path).unwrap();
    wait_until(
        "run to attach the new cgroup",
        Duration::from_secs(10),
        || cg.status()["attachments"][0]["standing"] == "in_force",
    );
    let again = cg.probe(peer.addr, 10, &["--hold", "--close-first"]);
    if !kernel_shares_ports() {
        // Without sharing the ports stay with their TIME_WAIT sockets
        // until these end (see above): nothing to take back.
        assert_eq!(again, [Probed::Errno(exhausted_errno()); 10]);
        assert_eq!(reclaimed(&cg), 0);
        return;
    }
    assert_eq!(
        sorted_ports(&again),
        (19300..=19309).collect::<Vec<_>>(),
        "{}",
        service.log_text()
    );
    assert_eq!(reclaimed(&cg), 10);
    let _ = std::io::stdout().flush();
}

const TCP_FIN_WAIT1: u8 = 4;

/// Issue 17, item 4: with the tuple table's pin removed, `attach` loaded
/// the new rule set with a fresh table, which the release programs never
/// saw: after one pass over the range every connect failed, and status
/// said nothing. Here the table's pin, a jump map's and a bookkeeping
/// program's are removed, then the table's pin is replaced by another map:
/// status names each, the next attach pins the objects in use again (and
/// says so), and three passes over a ten-port range all succeed.
#[test]
fn a_removed_pin_is_reported_and_repaired_never_replaced() {
    let named = Named::new("pins");
    let cg = TestCgroup::new("pins");
    let server = Listener::on([127, 0, 0, 2]);
    let file = cg.rules_file(
        "pins.ini",
        &format!("127.0.0.2 {} : 19400-19409\n", server.port()),
    );
    let attach = || {
        rulebpf(&[
            "attach",
            "--name",
            &named.name,
            "--cgroup",
            cg.arg(),
            file.to_str().unwrap(),
        ])
    };
    assert!(attach().status.success());
    let dir = Path::new("/sys/fs/bpf/rulebpf").join(&named.name);
    for pin in ["RULEBPF_TUPLES", "jump-connect4", "sock_release"] {
        std::fs::remove_file(dir.join(pin)).unwrap();
    }
    let damage = named.status()["damage"].clone();
    for pin in ["RULEBPF_TUPLES", "jump-connect4", "sock_release"] {
        assert!(
            damage
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["pin"] == pin && d["problem"] == "missing"),
            "{pin}: {damage}"
        );
    }

    let out = attach();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("RULEBPF_TUPLES: pin missing"), "{stderr}");
    let undamaged = || {
        assert_eq!(
            named.status()["damage"],
            serde_json::json!([]),
            "{}",
            named.status()
        )
    };
    undamaged();

    // A pin replaced by another map: reported, and put back.
    std::fs::remove_file(dir.join("RULEBPF_TUPLES")).unwrap();
    MapData::from_pin(dir.join("RULEBPF_PORT_USE"))
        .unwrap()
        .pin(dir.join("RULEBPF_TUPLES"))
        .unwrap();
    let damage = named.status()["damage"].clone();
    assert_eq!(
        damage,
        serde_json::json!([{"problem": "foreign", "pin": "RULEBPF_TUPLES"}]),
        "{damage}"
    );
    let out = attach();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("RULEBPF_TUPLES: pins another map"),
        "{stderr}"
    );
    undamaged();
    for pass in 0..3 {
        let got = cg.probe(server.addr, 10, &["--hold"]);
        assert!(
            got.iter()
                .all(|p| matches!(p, Probed::Port(port) if (19400..=19409).contains(port))),
            "pass {pass}: {got:?}"
        );
    }
    server.take(30);
}

/// The `run` warning for a rule whose ports are nearly all in use.
fn full_warning(text: &str) -> String {
    format!("(`{text}`): 10 of its 10 origin ports in use")
}

/// This cgroup's rule of line 1: (in_use, high_water) from `stats --json`.
fn line1_occupancy(cg: &TestCgroup) -> (u64, u64) {
    let v: serde_json::Value =
        serde_json::from_str(&rulebpf_ok(&["stats", "--json", "--cgroup", cg.arg()])).unwrap();
    let rule = &v[0]["rules"][0];
    (
        rule["in_use"].as_u64().unwrap(),
        rule["high_water"].as_u64().unwrap(),
    )
}

/// Issue 17, item 5, first case: after a rule's text changed, its live
/// sockets stayed counted under the old rule (`IN USE 0`), and the 90 %
/// warning never fired for the rule in force. Here ten connections hold a
/// ten-port range while the rule is rewritten (same range): the new rule
/// shows 10 of 10 in use and `run` warns about it.
#[test]
fn occupancy_follows_a_rule_whose_text_changed() {
    use std::process::Stdio;
    let cg = TestCgroup::new("occ-text");
    let server = Listener::on([127, 0, 0, 2]);
    let p = server.port();
    let file = cg.rules_file("occ.ini", &format!("127.0.0.2 {p} : 19500-19509\n"));
    let service = RunningService::start(&cg, &file, &[]);
    let mut client = std::process::Command::new(RULEBPF)
        .args([
            "probe",
            "--cgroup",
            cg.arg(),
            "--count",
            "10",
            "--hold",
            "--hold-until-eof",
        ])
        .arg(server.addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    server.take(10);
    let text = format!("127.0.0.0/24 {p} : 19500-19509");
    std::fs::write(&file, format!("{text}\n")).unwrap();
    wait_until(
        "the new text in force",
        std::time::Duration::from_secs(20),
        || cg.status()["rule_set"]["generation"].as_u64() == Some(2),
    );
    assert_eq!(line1_occupancy(&cg).0, 10);
    wait_until("run to warn", std::time::Duration::from_secs(20), || {
        service.log_text().contains(&full_warning(&text))
    });
    drop(client.stdin.take());
    client.wait().unwrap();
}

/// Issue 17, item 5, second case: `IN USE` counted sockets, so tuples still
/// busy after their sockets' release (connections closing, or kept for a
/// peer in CLOSE_WAIT) did not count: connects were refused as exhausted
/// with a peak of 1, and no warning came. Here ten connections this side
/// closed are held by the peer: the rule shows 10 of 10 in use and `run`
/// warns.
#[test]
fn occupancy_counts_busy_tuples_after_their_sockets_are_gone() {
    let cg = TestCgroup::new("occ-tuples");
    let peer = HoldingPeer::on(std::net::TcpListener::bind("127.0.0.9:0").unwrap());
    let text = format!("127.0.0.9 {} : 19510-19519", peer.addr.port());
    let file = cg.rules_file("occ.ini", &format!("{text}\n"));
    let service = RunningService::start(&cg, &file, &[]);
    let got = cg.probe(peer.addr, 10, &["--close-first"]);
    assert!(got.iter().all(|p| matches!(p, Probed::Port(_))), "{got:?}");
    peer.wait_for(10);
    wait_for_states(
        "the peer to acknowledge our FINs",
        19510..=19519,
        peer.addr.port(),
        TCP_FIN_WAIT2,
    );
    if !kernel_shares_ports() {
        // Without sharing no tuple outlives its socket: the occupancy
        // counts sockets only (none in use; one at a time, each released
        // before the next connect), and the range is full of timewait
        // sockets it does not see (said in the README).
        assert_eq!(line1_occupancy(&cg), (0, 1));
        let more = cg.probe(peer.addr, 1, &["--close-first"]);
        assert_eq!(more, [Probed::Errno(exhausted_errno())]);
        return;
    }
    assert_eq!(line1_occupancy(&cg), (10, 10));
    wait_until("run to warn", std::time::Duration::from_secs(20), || {
        service.log_text().contains(&full_warning(&text))
    });
}
