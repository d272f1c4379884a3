//! Connection paths: `deny`, `*` as every destination (an allow-list), and
//! remarks. Origin ranges 18000-18999 belong to this file
//! (rulebpf_testkit::ports::PATH_TESTS).

use std::net::{Ipv6Addr, SocketAddr};

use serde_json::Value;

use crate::harness::*;

const EPERM: i32 = 1;
const LOCAL6: Ipv6Addr = Ipv6Addr::LOCALHOST;

/// Per rule `(line, matched, denied, remark)` from `stats --json`.
fn denied(cg: &TestCgroup) -> Vec<(u64, u64, u64, Option<String>)> {
    let out = rulebpf_ok(&["stats", "--json", "--cgroup", cg.arg()]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let n = |k: &str| r[k].as_u64().unwrap();
            let remark = r["remark"].as_str().map(str::to_string);
            (n("line"), n("matched"), n("denied"), remark)
        })
        .collect()
}

#[test]
fn a_denied_path_fails_with_eperm_before_any_packet() {
    let tcp4 = Listener::on([127, 0, 0, 3]);
    let udp4 = Listener::udp([127, 0, 0, 3]);
    let tcp6 = Listener::on(LOCAL6);
    let cg = TestCgroup::new("p-deny");
    cg.attach(
        "127.0.0.3 * : deny tcp+udp   # no partner there\n::1 * : deny tcp+udp\n",
        &[],
    );
    for (dest, extra) in [
        (tcp4.addr, &[][..]),
        (udp4.addr, &["--protocol", "udp"][..]),
        (tcp6.addr, &[][..]),
        // An application that binds its own port is refused too.
        (tcp4.addr, &["--bind-port", "18001"][..]),
    ] {
        assert_eq!(
            cg.probe(dest, 1, extra),
            [Probed::Errno(EPERM)],
            "{dest} {extra:?}"
        );
    }
    // Refused at connect(): the listeners never saw anything.
    assert!(
        tcp4.take_within(1, std::time::Duration::from_millis(200))
            .is_empty()
    );
    assert!(
        udp4.take_within(1, std::time::Duration::from_millis(200))
            .is_empty()
    );
    assert_eq!(
        denied(&cg),
        [
            (1, 3, 3, Some("no partner there".to_string())),
            (2, 1, 1, None)
        ]
    );
    let status = cg.status();
    assert_eq!(status["denied"][0]["line"], 1, "{status}");
    assert_eq!(status["denied"][0]["denied"], 3, "{status}");
    assert_eq!(
        status["denied"][0]["remark"], "no partner there",
        "{status}"
    );
}

#[test]
fn star_deny_makes_the_file_an_allow_list() {
    let allowed = Listener::on([127, 0, 0, 2]);
    let other = Listener::on([127, 0, 0, 4]);
    let v6 = Listener::on(LOCAL6);
    let rules = format!(
        "127.0.0.2 {} : 18010-18019   # the one path\n! 127.0.0.2 * : deny\n* * : deny tcp+udp\n",
        allowed.port()
    );
    let cg = TestCgroup::new("p-allow");
    let file = cg.rules_file("allow.ini", &rules);
    let out = rulebpf_ok(&["check", file.to_str().unwrap()]);
    assert!(
        out.contains("allow-list: 1 path allowed; line 3 denies every other connect()"),
        "{out}"
    );
    cg.attach(&rules, &[]);
    let port = only_port(&cg.probe(allowed.addr, 1, &[]));
    assert!((18010..=18019).contains(&port), "{port}");
    // Another port of the allowed address: the `!` rule does not match
    // (the address is inside it), the last line does.
    let wrong_port = SocketAddr::new(allowed.addr.ip(), other.port());
    for dest in [other.addr, v6.addr, wrong_port] {
        assert_eq!(cg.probe(dest, 1, &[]), [Probed::Errno(EPERM)], "{dest}");
    }
    assert_eq!(
        cg.probe(other.addr, 1, &["--protocol", "udp"]),
        [Probed::Errno(EPERM)]
    );
    let counts: Vec<(u64, u64)> = denied(&cg).iter().map(|r| (r.1, r.2)).collect();
    assert_eq!(counts, [(1, 0), (1, 1), (3, 3)]);
}

#[test]
fn explain_shows_the_deny_and_the_remark() {
    let cg = TestCgroup::new("p-explain");
    let file = cg.rules_file(
        "r.ini",
        "10.1.1.1 22 : 18020-18029  # SFTP to the partner\n* * : deny tcp+udp\n",
    );
    let out = rulebpf_ok(&["explain", file.to_str().unwrap(), "10.1.1.1:22"]);
    assert!(out.contains("remark: SFTP to the partner"), "{out}");
    assert!(out.contains("origin port: 18020-18029"), "{out}");
    let out = rulebpf_ok(&["explain", file.to_str().unwrap(), "[2001:db8::1]:443"]);
    assert!(out.contains("line 2 decides"), "{out}");
    assert!(out.contains("denied: connect() fails with EPERM"), "{out}");
    let json = rulebpf_ok(&["explain", "--json", file.to_str().unwrap(), "10.9.9.9:1"]);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["matched"]["origin"]["deny"], true, "{v}");
}
