//! The perimeter rules `rulebpf firewall` exports, proven through a real
//! firewall: gateway -> firewall -> server, three network namespaces joined
//! by two veth pairs (198.51.100.0/24 and 203.0.113.0/24, documentation
//! addresses). The firewall namespace forwards only what the export lets
//! through (nft in one case, iptables-restore in the other). A client in
//! the gateway namespace and in the attached cgroup crosses it on every
//! allowed path, from the rule's origin range, and UDP replies come back; a
//! denied and an unlisted path fail with EPERM before a packet leaves; the
//! same client outside the cgroup (OS ports) is dropped by the firewall.
//! Host only: the VM guests have no nft or iptables. Origin ranges
//! 18100-18199 (rulebpf_testkit::ports::PATH_TESTS).

use std::{
    fs,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use crate::{agent::Agent, harness::*};

const EPERM: i32 = 1;
pub(crate) const GATEWAY: &str = "198.51.100.2";
pub(crate) const SERVER: &str = "203.0.113.2";

/// The three namespaces and their links; removed on drop.
pub(crate) struct Net {
    names: [String; 3],
}

impl Net {
    pub(crate) fn gateway(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.names[0])
    }

    pub(crate) fn names(&self) -> &[String; 3] {
        &self.names
    }

    fn firewall(&self) -> &str {
        &self.names[1]
    }

    pub(crate) fn server(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.names[2])
    }

    pub(crate) fn new(tag: &str) -> Self {
        let id = std::process::id() % 1_000_000;
        let names = ["g", "f", "s"].map(|n| format!("rb{tag}{id}{n}"));
        let net = Self { names };
        let [gw, fw, sv] = &net.names;
        for ns in &net.names {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let link = |a: &str, a_ns: &str, b: &str, b_ns: &str| {
            ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
            ip(&["link", "set", a, "netns", a_ns]);
            ip(&["link", "set", b, "netns", b_ns]);
        };
        let (g0, f0, f1, s0) = (
            format!("{gw}0"),
            format!("{fw}0"),
            format!("{fw}1"),
            format!("{sv}0"),
        );
        link(&g0, gw, &f0, fw);
        link(&f1, fw, &s0, sv);
        for (ns, dev, addr) in [
            (gw, &g0, "198.51.100.2/24"),
            (fw, &f0, "198.51.100.1/24"),
            (fw, &f1, "203.0.113.1/24"),
            (sv, &s0, "203.0.113.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip(&["-n", gw, "route", "add", "default", "via", "198.51.100.1"]);
        ip(&[
            "-n",
            sv,
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            "203.0.113.1",
        ]);
        // Forwarding in the firewall's namespace only (/proc/sys/net is
        // the reader's namespace).
        in_netns(fw, &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    run("ip", args);
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `command` in network namespace `ns` (nsenter: no remount of /sys).
pub(crate) fn in_netns(ns: &str, command: &[&str]) {
    let net = format!("--net=/run/netns/{ns}");
    let mut args = vec![net.as_str(), "--"];
    args.extend_from_slice(command);
    run("nsenter", &args);
}

/// The server: TCP listeners and a UDP echo in the server namespace, each
/// writing down the source ports it saw.
pub(crate) type Seen = Arc<Mutex<Vec<u16>>>;

pub(crate) struct Server {
    pub(crate) tcp: Vec<(u16, Seen)>,
    udp: Vec<(u16, Seen)>,
}

impl Server {
    /// Listeners on `tcp` and `udp` ports of the server address (0: any
    /// free port).
    pub(crate) fn start(netns: PathBuf, tcp: &[u16], udp: &[u16]) -> Self {
        let (tcp, udp) = (tcp.to_vec(), udp.to_vec());
        thread::spawn(move || {
            // This thread only: the namespace is per thread.
            let ns = fs::File::open(&netns).unwrap();
            // SAFETY: setns on a namespace file we opened, for this thread.
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let tcp: Vec<_> = tcp
                .into_iter()
                .map(|port| {
                    let listener = TcpListener::bind((SERVER, port)).unwrap();
                    let port = listener.local_addr().unwrap().port();
                    let seen = Arc::new(Mutex::new(Vec::new()));
                    let record = Arc::clone(&seen);
                    thread::spawn(move || {
                        for stream in listener.incoming().flatten() {
                            let peer = stream.peer_addr().unwrap().port();
                            record.lock().unwrap().push(peer);
                        }
                    });
                    (port, seen)
                })
                .collect();
            let udp: Vec<_> = udp
                .into_iter()
                .map(|port| {
                    let socket = UdpSocket::bind((SERVER, port)).unwrap();
                    let port = socket.local_addr().unwrap().port();
                    let seen = Arc::new(Mutex::new(Vec::new()));
                    let record = Arc::clone(&seen);
                    // An echo: the reply must come back through the firewall.
                    thread::spawn(move || {
                        let mut buf = [0u8; 512];
                        while let Ok((n, from)) = socket.recv_from(&mut buf) {
                            record.lock().unwrap().push(from.port());
                            let _ = socket.send_to(&buf[..n], from);
                        }
                    });
                    (port, seen)
                })
                .collect();
            Self { tcp, udp }
        })
        .join()
        .unwrap()
    }

    pub(crate) fn addr(port: u16) -> SocketAddr {
        format!("{SERVER}:{port}").parse().unwrap()
    }

    pub(crate) fn seen(list: &Seen) -> Vec<u16> {
        list.lock().unwrap().clone()
    }
}

/// The whole proof, with the export loaded by `load` in the firewall.
fn crossing(tag: &str, format: &str) {
    let net = Net::new(tag);
    let server = Server::start(net.server(), &[0, 0, 0], &[0]);
    let [
        (tcp_port, tcp_seen),
        (deny_port, deny_seen),
        (unlisted_port, unlisted_seen),
    ] = <[_; 3]>::try_from(server.tcp.clone()).unwrap();
    let (udp_port, udp_seen) = server.udp[0].clone();
    let cg = TestCgroup::new(&format!("fw-{tag}"));
    let rules = format!(
        "{SERVER} {tcp_port} : 18100-18109   # the TCP path\n\
         {SERVER} {udp_port} : 18110-18119 udp   # the UDP path\n\
         {SERVER} {deny_port} : deny\n\
         * * : deny tcp+udp\n"
    );
    let file = cg.rules_file("paths.ini", &rules);
    cg.attach(&rules, &[]);
    let exported = rulebpf_ok(&[
        "firewall",
        file.to_str().unwrap(),
        "--source",
        GATEWAY,
        "--format",
        format,
    ]);
    let export = cg.rules_file(&format!("export.{format}"), &exported);
    let export = export.to_str().unwrap();
    match format {
        "nft" => in_netns(net.firewall(), &["nft", "-f", export]),
        _ => in_netns(net.firewall(), &["iptables-restore", export]),
    }

    // In the cgroup: every allowed path crosses from its range.
    let mut inside = Agent::start_in(&cg.path, Some(&net.gateway()));
    let (_, port) = inside.tcp(Server::addr(tcp_port)).unwrap();
    assert!((18100..=18109).contains(&port), "{port}");
    wait_until(
        "the server to see the TCP path",
        Duration::from_secs(5),
        || Server::seen(&tcp_seen) == [port],
    );
    let (id, port) = inside.udp(Server::addr(udp_port)).unwrap();
    assert!((18110..=18119).contains(&port), "{port}");
    assert_eq!(inside.recv(id), Ok("hello".to_string()), "the UDP reply");
    assert_eq!(Server::seen(&udp_seen), [port]);
    // Denied and unlisted: refused on the host, before any packet.
    assert_eq!(inside.tcp(Server::addr(deny_port)), Err(EPERM));
    assert_eq!(inside.tcp(Server::addr(unlisted_port)), Err(EPERM));
    assert_eq!(inside.udp(Server::addr(unlisted_port)), Err(EPERM));

    // Outside the cgroup, from OS ports: the firewall drops the same paths.
    let plain = TestCgroup::new(&format!("fw-{tag}-plain"));
    let mut outside = Agent::start_in(&plain.path, Some(&net.gateway()));
    let refused = outside.tcp(Server::addr(tcp_port));
    assert!(matches!(refused, Err(0 | 110)), "{refused:?}");
    let (id, _) = outside.udp(Server::addr(udp_port)).unwrap();
    assert!(outside.recv(id).is_err(), "a reply to an OS port");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        Server::seen(&tcp_seen).len(),
        1,
        "the firewall let an OS port through"
    );
    assert_eq!(
        Server::seen(&udp_seen).len(),
        1,
        "the firewall let an OS port through"
    );
    assert!(Server::seen(&deny_seen).is_empty() && Server::seen(&unlisted_seen).is_empty());
    eprintln!(
        "{format}: 2 allowed paths crossed from their ranges (UDP reply back), 3 connects \
         refused on the host, 2 from OS ports dropped by the firewall"
    );
}

#[test]
fn the_nft_export_lets_exactly_the_rules_through() {
    crossing("n", "nft");
}

#[test]
fn the_iptables_export_lets_exactly_the_rules_through() {
    crossing("i", "iptables");
}

/// The gateway's documented connection-path table
/// (`examples/connection-paths.ini`, an allow-list), its names resolving
/// to the server: the DNS (TCP and UDP) and LDAP paths cross from their
/// ranges, an unlisted one is refused on the host.
#[test]
fn the_connection_path_table_crosses_as_documented() {
    let net = Net::new("t");
    let _hosts = ["dns.corp.example", "ntp.corp.example", "dc1.corp.example"]
        .map(|name| HostsEntry::add(SERVER.parse::<std::net::IpAddr>().unwrap(), name));
    let server = Server::start(net.server(), &[53, 389, 8080], &[53]);
    let cg = TestCgroup::new("fw-table");
    let table = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/connection-paths.ini"
    );
    rulebpf_ok(&["attach", "--cgroup", cg.arg(), table]);
    let exported = rulebpf_ok(&["firewall", table, "--source", GATEWAY, "--format", "nft"]);
    let export = cg.rules_file("table.nft", &exported);
    in_netns(net.firewall(), &["nft", "-f", export.to_str().unwrap()]);

    let mut agent = Agent::start_in(&cg.path, Some(&net.gateway()));
    let (_, dns_tcp) = agent.tcp(Server::addr(53)).unwrap();
    let (id, dns_udp) = agent.udp(Server::addr(53)).unwrap();
    assert_eq!(agent.recv(id), Ok("hello".to_string()), "the DNS reply");
    let (_, ldap) = agent.tcp(Server::addr(389)).unwrap();
    assert!((41000..=41099).contains(&dns_tcp), "{dns_tcp}");
    assert!((41000..=41099).contains(&dns_udp), "{dns_udp}");
    assert!((41300..=41399).contains(&ldap), "{ldap}");
    wait_until(
        "the server to see both TCP paths",
        Duration::from_secs(5),
        || Server::seen(&server.tcp[0].1) == [dns_tcp] && Server::seen(&server.tcp[1].1) == [ldap],
    );
    assert_eq!(Server::seen(&server.udp[0].1), [dns_udp]);
    // Not in the table: refused before any packet.
    assert_eq!(agent.tcp(Server::addr(8080)), Err(EPERM));
    assert!(Server::seen(&server.tcp[2].1).is_empty());
}
