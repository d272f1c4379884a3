//! IPv6, connected UDP, IPv4 through dual-stack sockets, port lists, CIDR
//! and the protocol selector, each checked at the listener: the peer port it
//! saw is what the rule says. Origin ranges 23000-23499 belong to this file.

use std::net::Ipv6Addr;

use crate::harness::*;

const LOCAL6: Ipv6Addr = Ipv6Addr::LOCALHOST;

#[test]
fn ipv6_tcp_address_and_prefix() {
    let cg = TestCgroup::new("v6tcp");
    let exact = Listener::on(LOCAL6);
    let prefix = Listener::on(LOCAL6);
    cg.attach(
        &format!(
            "2001:db8::/32 * : 23001\n::1 {} : 23002\n::/64 {} : 23003-23004\n",
            exact.port(),
            prefix.port()
        ),
        &[],
    );
    assert_eq!(only_port(&cg.probe(exact.addr, 1, &[])), 23002);
    assert_eq!(exact.take(1), [23002]);
    let got = only_port(&cg.probe(prefix.addr, 1, &[]));
    assert!((23003..=23004).contains(&got), "{got}");
    assert_eq!(prefix.take(1), [got]);
    let stats = cg.stats();
    assert_eq!(stats[1], (2, 1, 1, 0));
    assert_eq!(stats[2], (3, 1, 1, 0));
}

#[test]
fn ipv6_udp_connected_socket() {
    let (cg, server) = with_rules("v6udp", Listener::udp(LOCAL6), &[], |port| {
        format!("::1 {port} : 23011 udp\n")
    });
    let got = cg.probe(server.addr, 1, &["--protocol", "udp"]);
    assert_eq!(got, [Probed::Port(23011)]);
    assert_eq!(server.take(1), [23011]);
}

#[test]
fn ipv4_udp_connected_sockets_share_a_range() {
    let (cg, server) = with_rules("v4udp", Listener::udp([127, 0, 0, 2]), &[], |port| {
        format!("127.0.0.0/8 {port} : 23021-23022 UDP\n")
    });
    // Two sockets held at once: two distinct ports of the range.
    let got = cg.probe(server.addr, 2, &["--protocol", "udp", "--hold"]);
    let mut seen = server.take(2);
    seen.sort();
    assert_eq!(seen, [23021, 23022], "{got:?}");
}

#[test]
fn dual_stack_socket_to_ipv4_follows_the_ipv4_rules() {
    let cg = TestCgroup::new("mapped");
    let tcp = Listener::on([127, 0, 0, 2]);
    let udp = Listener::udp([127, 0, 0, 2]);
    cg.attach(
        &format!(
            "127.0.0.2 {} : 23031\n127.0.0.2 {} : 23032 udp\n::/0 * : 23039\n",
            tcp.port(),
            udp.port()
        ),
        &[],
    );
    // connect() to ::ffff:127.0.0.2 from an AF_INET6 socket.
    let got = cg.probe(tcp.addr, 1, &["--dual-stack"]);
    assert_eq!(got, [Probed::Port(23031)]);
    assert_eq!(tcp.take(1), [23031]);
    let got = cg.probe(udp.addr, 1, &["--dual-stack", "--protocol", "udp"]);
    assert_eq!(got, [Probed::Port(23032)]);
    assert_eq!(udp.take(1), [23032]);
    // The IPv6 catch-all never saw them: v4-mapped is IPv4.
    assert_eq!(cg.stats()[2], (3, 0, 0, 0));
}

#[test]
fn port_lists_and_cidr() {
    let cg = TestCgroup::new("lists");
    let first = Listener::on([127, 0, 0, 2]);
    let second = Listener::on([127, 0, 0, 3]);
    let unlisted = Listener::on([127, 0, 0, 2]);
    cg.attach(
        &format!(
            "127.0.0.0/30 {},{},1-2 : 23041\n",
            first.port(),
            second.port()
        ),
        &[],
    );
    cg.probe(first.addr, 1, &[]);
    cg.probe(second.addr, 1, &[]);
    cg.probe(unlisted.addr, 1, &[]);
    assert_eq!(first.take(1), [23041]);
    assert_eq!(second.take(1), [23041]);
    let os = unlisted.take(1)[0];
    assert!(is_os_port(os), "an unlisted port is left to the OS: {os}");
}

#[test]
fn protocol_selector_keeps_tcp_and_udp_apart() {
    let cg = TestCgroup::new("proto");
    let tcp = Listener::on([127, 0, 0, 2]);
    let udp = Listener::udp([127, 0, 0, 2]);
    cg.attach("127.0.0.2 * : 23051 udp\n127.0.0.2 * : 23052 tcp\n", &[]);
    cg.probe(tcp.addr, 1, &[]);
    cg.probe(udp.addr, 1, &["--protocol", "udp"]);
    assert_eq!(tcp.take(1), [23052]);
    assert_eq!(udp.take(1), [23051]);
}

#[test]
fn a_name_covers_its_ipv4_and_ipv6_addresses() {
    let cg = TestCgroup::new("dualname");
    let v4 = Listener::on([127, 0, 0, 6]);
    let v6 = Listener::on(LOCAL6);
    let name = format!("dual-{}.rulebpf.test", std::process::id());
    let _a = HostsEntry::add([127, 0, 0, 6], &name);
    let _aaaa = HostsEntry::add(LOCAL6, &name);
    cg.attach(&format!("{name} * : 23061-23062\n"), &[]);
    cg.probe(v4.addr, 1, &[]);
    cg.probe(v6.addr, 1, &[]);
    for port in [v4.take(1)[0], v6.take(1)[0]] {
        assert!((23061..=23062).contains(&port), "{port}");
    }
}

/// A file in the original tcpoport.ini forms keeps its meaning: TCP over
/// IPv4 as before, and UDP and IPv6 connections are not touched.
#[test]
fn an_unchanged_tcpoport_ini_behaves_as_before() {
    let cg = TestCgroup::new("classic");
    let exact = Listener::on([127, 0, 0, 2]);
    let pattern = Listener::on([127, 0, 0, 3]);
    let os_choice = Listener::on([127, 0, 0, 4]);
    let elsewhere = Listener::on([127, 0, 0, 5]);
    let v6 = Listener::on(LOCAL6);
    let udp = Listener::udp([127, 0, 0, 2]);
    cg.attach(
        &format!(
            "; the classic forms\n\
             127.0.0.2 {exact}: 23071\n\
             127.0.0.4 * : 0\n\
             127.*.*.3 {lo}-{hi} : 23074\n\
             ! 10.*.*.*  *:  23072-23073\n",
            exact = exact.port(),
            lo = pattern.port() - 1,
            hi = pattern.port() + 1,
        ),
        &[],
    );
    for server in [&exact, &pattern, &os_choice, &elsewhere] {
        cg.probe(server.addr, 1, &[]);
    }
    assert_eq!(exact.take(1), [23071]);
    assert_eq!(pattern.take(1), [23074]);
    assert!(is_os_port(os_choice.take(1)[0]));
    assert!((23072..=23073).contains(&elsewhere.take(1)[0]));
    // Not IPv4 TCP: the negated IPv4 rule says nothing about these.
    cg.probe(v6.addr, 1, &[]);
    cg.probe(udp.addr, 1, &["--protocol", "udp"]);
    assert!(is_os_port(v6.take(1)[0]));
    assert!(is_os_port(udp.take(1)[0]));
}

#[test]
fn explain_covers_ipv6_mapped_and_udp() {
    let cg = TestCgroup::new("explain6");
    let file = cg.rules_file(
        "e.ini",
        "2001:db8::/32 443 : 23081\n10.0.0.0/8 53 : 23082 tcp+udp\n",
    );
    let file = file.to_str().unwrap();
    let out = rulebpf_ok(&["explain", file, "[2001:db8::10]:443"]);
    assert!(out.contains("line 1 decides"), "{out}");
    let out = rulebpf_ok(&["explain", file, "[::ffff:10.1.2.3]:53"]);
    assert!(
        out.contains("matched against the IPv4 rules as 10.1.2.3"),
        "{out}"
    );
    assert!(out.contains("line 2 decides"), "{out}");
    let out = rulebpf_ok(&["explain", "--protocol", "udp", file, "10.1.2.3:53"]);
    assert!(out.contains("line 2 decides"), "{out}");
    assert!(
        out.contains("unconnected socket cannot be given one"),
        "{out}"
    );
    let json = rulebpf_ok(&[
        "explain",
        "--json",
        "--protocol",
        "udp",
        file,
        "10.1.2.3:53",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["matched"]["line"], 2);
    assert_eq!(v["protocol"], "udp");
}
