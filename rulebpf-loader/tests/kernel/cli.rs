//! The command line as a new user meets it: help that teaches, precise
//! messages, honest exit statuses, output that lines up.

use std::process::Command;

use crate::harness::*;

fn stdout_of(args: &[&str]) -> String {
    String::from_utf8(rulebpf(args).stdout).unwrap()
}

#[test]
fn help_shows_the_rule_syntax_and_says_what_is_covered() {
    let help = stdout_of(&["--help"]);
    assert!(help.contains("TCP connections and connected UDP"), "{help}");
    assert!(
        help.contains("[!] DEST_IP DEST_PORTS : ORG_PORTS [PROTOCOL]"),
        "{help}"
    );
    assert!(help.contains("Exit status: 0 success"), "{help}");
    let check = stdout_of(&["check", "--help"]);
    assert!(
        check.contains("[!] DEST_IP DEST_PORTS : ORG_PORTS [PROTOCOL]"),
        "{check}"
    );
    assert!(check.contains("10.*.*.*"), "examples: {check}");
    for command in ["check", "explain", "attach", "run"] {
        let help = stdout_of(&[command, "--help"]);
        assert!(
            help.contains("The rule file (tcpoport.ini)"),
            "{command}: {help}"
        );
    }
    for command in ["attach", "detach", "probe", "run", "stats"] {
        let help = stdout_of(&[command, "--help"]);
        assert!(help.contains("cgroup v2 directory"), "{command}: {help}");
    }
}

#[test]
fn version_names_the_program() {
    let version = stdout_of(&["--version"]);
    assert_eq!(version, format!("rulebpf {}\n", env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_counts_names_and_plurals_right() {
    let dir = std::env::temp_dir().join(format!("rulebpf-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("one-name.ini");
    std::fs::write(&file, "no-such-host.invalid * : 5\n127.0.0.1 53 : 6 udp\n").unwrap();
    let out = stdout_of(&["check", file.to_str().unwrap()]);
    assert!(
        out.contains("2 rules OK (1 DNS name, 1 unresolved)"),
        "{out}"
    );
    assert!(out.contains("note: 1 rule applies to UDP"), "{out}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn syntax_errors_and_unresolvable_names_are_reported_together() {
    let dir = std::env::temp_dir().join(format!("rulebpf-cli-both-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("both.ini");
    std::fs::write(
        &file,
        "127.0.0.2 80, 81 : 5\n[::1] 80 : 5\nno-such-host.invalid * : 5\n",
    )
    .unwrap();
    let out = rulebpf(&["check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let f = file.display();
    assert!(
        stderr.contains(&format!(
            "{f}:1:14: a port list has no blanks: write `80,81`"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{f}:2:1: write an IPv6 address without brackets: `::1`"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "warning: {f}:3: `no-such-host.invalid` did not resolve"
        )),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn stats_after_detach_says_nothing_is_attached_like_detach() {
    let (cg, _server) = with_rules("cli-stats", Listener::on([127, 0, 0, 2]), &[], |port| {
        format!("127.0.0.2 {port} : 21551\n")
    });
    rulebpf_ok(&["detach", "--cgroup", cg.arg()]);
    let out = rulebpf(&["stats", "--cgroup", cg.arg()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("nothing attached to {}", cg.arg())),
        "{stderr}"
    );
    let detach = rulebpf_ok(&["detach", "--cgroup", cg.arg()]);
    assert_eq!(detach, format!("nothing attached to {}\n", cg.arg()));
}

#[test]
fn probe_exits_non_zero_when_a_connect_fails() {
    let cg = TestCgroup::new("cli-probe");
    // A port nothing listens on: refused.
    let closed = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let out = rulebpf(&["probe", "--cgroup", cg.arg(), &addr]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("connect failed"),
        "{out:?}"
    );
}

#[test]
fn status_columns_stay_put_when_a_cgroup_is_gone() {
    let gone = TestCgroup::new("cli-gone");
    let kept = TestCgroup::new("cli-kept");
    let rules = "127.0.0.2 9 : 21561\n";
    gone.attach(rules, &[]);
    kept.attach(rules, &[]);
    std::fs::remove_dir(&gone.path).unwrap();
    let status = stdout_of(&["status"]);
    let mut columns = Vec::new();
    for (path, state) in [(gone.arg(), "cgroup gone"), (kept.arg(), "in force")] {
        let row = status
            .lines()
            .find(|l| l.ends_with(path))
            .unwrap_or_else(|| panic!("no row for {path}:\n{status}"));
        assert!(row.trim_start().starts_with(state), "{row}");
        columns.push(row.find(path));
    }
    assert_eq!(columns[0], columns[1], "{status}");
}

#[test]
fn output_into_a_closed_pipe_is_not_a_crash() {
    require_kernel();
    // `rulebpf kernel | true`: the reader is gone before the writer writes.
    let out = Command::new("sh")
        .args(["-c", &format!("{RULEBPF} kernel | true; echo $?")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
