//! What runs in the guest, and what the host reads back from its console.
//!
//! The guest boots to multi-user.target; `rulebpf-systemd-test.service` runs
//! [`script`] with its output on ttyS0 and powers the guest off when it ends,
//! whatever the outcome (`SuccessAction=`/`FailureAction=`), or when it takes
//! longer than [`Scenario::guest_timeout`]. The script:
//!
//! 1. starts a listener on 127.0.0.2:7000 (socat, its own unit) that appends
//!    the origin port of each connection to a file;
//! 2. connects once from outside any rules (the script's own cgroup): an
//!    OS-chosen port, so the listener and the range check are sound;
//! 3. starts the rules instance `rulebpf@gw` from the installed package, with
//!    `/etc/rulebpf/gw.ini` = [`RULE`] (`rulebpf run --name gw` pins
//!    `/sys/fs/bpf/rulebpf/gw/connect{4,6}`, ready at READY=1), and gives
//!    `gateway.service` the drop-in `rulebpf systemd-dropin --name gw
//!    gateway.service` writes: the test runs exactly what the CLI writes;
//! 4. starts `gateway.service`, whose very first action is a connect to the
//!    listener, then restarts it [`Scenario::restarts`] times in a row: every
//!    start runs in a new cgroup, which the drop-in must give the programs
//!    before the gateway runs, so every first connect must come from the
//!    rule's range;
//! 5. prints one line per start and a summary.
//!
//! Before the starts, `systemd-analyze verify` reads the packaged unit and
//! the drop-in as systemd does: it finds what systemd would only log (an
//! unknown setting, a missing binary).
//!
//! The drop-in (rulebpf-loader/src/integrations/systemd.rs says why) has `BPFProgram=`
//! lines and an `ExecStartPre=+/usr/bin/rulebpf systemd-attach --name gw`
//! that attaches the programs in the new cgroup: systemd 252 attaches
//! `BPFProgram=` programs at a unit's first start only (this test showed it:
//! with `BPFProgram=` alone, the first start got the rule's port, each
//! restart an OS port).
//!
//! On a failure the script shows the end of the units' journal and, with
//! bpftool, the programs on each cgroup under system.slice.
//!
//! Every line the host needs starts with `systemd-test: ` ([`MARK`]).

use std::time::Duration;

use super::image::Entry;
use crate::vm::initramfs::{BOOT_ONLY, EXIT_MARK, KERNEL_MARK};

/// The prefix of the script's lines.
pub const MARK: &str = "systemd-test: ";

/// The rules of instance `gw`: the listener's address gets 20000-20099.
pub const RULE: &str = "127.0.0.2 7000 : 20000-20099";
const RANGE: (u16, u16) = (20000, 20099);
const INSTANCE: &str = "gw";

/// The scenario's parameters.
pub struct Scenario {
    pub restarts: u32,
    pub guest_timeout: Duration,
}

impl Scenario {
    /// Everything the scenario adds to the guest.
    pub fn entries(&self) -> Vec<Entry> {
        let file = |path, mode, text: &str| Entry::File {
            path,
            mode,
            text: text.to_string(),
        };
        let mut entries = vec![
            file("/etc/rulebpf/gw.ini", 0o644, &format!("{RULE}\n")),
            file(SCRIPT, 0o755, &self.script()),
            file(
                "/etc/systemd/system/rulebpf-systemd-test.service",
                0o644,
                &self.test_unit(),
            ),
            file(RECORD, 0o755, RECORD_SCRIPT),
            file(
                "/etc/systemd/system/rulebpf-test-listener.service",
                0o644,
                LISTENER_UNIT,
            ),
            file("/etc/systemd/system/gateway.service", 0o644, GATEWAY_UNIT),
            Entry::Symlink {
                path: "/etc/systemd/system/multi-user.target.wants/rulebpf-systemd-test.service"
                    .into(),
                target: "/etc/systemd/system/rulebpf-systemd-test.service",
            },
        ];
        entries.extend(MASKED.iter().map(|unit| Entry::Symlink {
            path: format!("/etc/systemd/system/{unit}"),
            target: "/dev/null",
        }));
        entries
    }

    fn test_unit(&self) -> String {
        format!(
            "\
[Unit]
Description=rulebpf systemd test (cargo xtask systemd-test)
After=multi-user.target
# Power off when the test ends, whatever the outcome: the host is waiting.
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart={SCRIPT}
# A oneshot's whole run is its start: this is the guest's deadline.
TimeoutStartSec={timeout}
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/ttyS0
",
            timeout = self.guest_timeout.as_secs()
        )
    }

    /// The guest side of the test (bash: the gateway's /dev/tcp needs it
    /// anyway). The variables at its top are the parameters.
    pub fn script(&self) -> String {
        format!(
            r#"#!/bin/bash
# rulebpf under systemd, guest side. Written by `cargo xtask systemd-test`
# (xtask/src/vm/systemd/scenario.rs); its output goes to ttyS0, which the host
# reads, and the guest powers off when it ends.
set -u
RESTARTS={restarts}
NAME={INSTANCE}
LOW={low} HIGH={high}
PORTS=/run/rulebpf-systemd-test/ports

say() {{ echo "{MARK}$*"; }}
finish() {{ echo "{EXIT_MARK} $1"; exit "$1"; }}
fail() {{ say "FAILED: $*"; finish 1; }}
# wait_for COMMAND: polls COMMAND for 30 s; false when it never succeeds.
wait_for() {{
    for _ in $(seq 300); do "$@" && return 0; sleep 0.1; done
    return 1
}}
# connects: how many connections the listener saw.
connects() {{ wc -l < "$PORTS"; }}
# port_of N: the origin port of the listener's Nth connection.
port_of() {{ sed -n "$1p" "$PORTS"; }}
in_range() {{ [ -n "$1" ] && [ "$1" -ge "$LOW" ] && [ "$1" -le "$HIGH" ]; }}
listening() {{ [ -n "$(ss -Hltn 'sport = :7000')" ]; }}
seen() {{ [ "$(connects)" -ge "$1" ]; }}

echo "{KERNEL_MARK} $(uname -r)"
if grep -qw {BOOT_ONLY} /proc/cmdline; then finish 0; fi
say "up after $(cut -d' ' -f1 /proc/uptime) s: $(systemctl --version | head -1), $(dpkg-query -W rulebpf)"

# 1. The listener, in a unit of its own.
mkdir -p "${{PORTS%/*}}"; : > "$PORTS"
systemctl start rulebpf-test-listener.service || fail "the listener did not start"
wait_for listening || fail "no listener on 127.0.0.2:7000 after 30 s"

# 2. A connect from outside any rules: the OS chooses the port.
(exec 3<>/dev/tcp/127.0.0.2/7000) || fail "control connection refused"
wait_for seen 1 || fail "the listener did not see the control connection"
control=$(port_of 1)
in_range "$control" && fail "control connection: origin port $control is in the rule's range"
say "control connect outside the rules: origin port $control (OS)"

# 3. The rules instance, and the gateway's drop-in as rulebpf writes it.
instance_failed() {{
    journalctl -b -u "rulebpf@$NAME.service" --no-pager | tail -n 20
    fail "rulebpf@$NAME did not start"
}}
systemctl start "rulebpf@$NAME.service" || instance_failed
rulebpf systemd-dropin --name "$NAME" gateway.service || fail "rulebpf systemd-dropin failed"
systemctl daemon-reload
systemctl is-active --quiet "rulebpf@$NAME.service" || instance_failed
say "rulebpf@$NAME active, programs /sys/fs/bpf/rulebpf/$NAME/connect4 /sys/fs/bpf/rulebpf/$NAME/connect6"
# The packaged unit and the drop-in as systemd reads them: unknown settings,
# missing binaries.
issues=$(systemd-analyze verify "rulebpf@$NAME.service" gateway.service 2>&1)
if [ -z "$issues" ]; then say "units verified: ok"; else say "units verified: FAILED"; echo "$issues"; fi

# 4. The gateway: started once, then restarted; each start's first connect.
rule=0 os=0 missing=0
begin=$(date +%s%N)
for i in $(seq 0 "$RESTARTS"); do
    if [ "$i" -eq 0 ]; then what=start; else what=restart; fi
    expected=$((i + 2))
    systemctl "$what" gateway.service || say "systemctl $what gateway.service failed"
    for _ in $(seq 200); do seen "$expected" && break; sleep 0.1; done
    port=$(port_of "$expected")
    if [ -z "$port" ]; then
        missing=$((missing + 1)); verdict="no connection within 20 s"
    elif in_range "$port"; then
        rule=$((rule + 1)); verdict="origin port $port, rule"
    else
        os=$((os + 1)); verdict="origin port $port, OS"
    fi
    say "$what $((i + 1))/$((RESTARTS + 1)): $verdict"
done
took=$(( ($(date +%s%N) - begin) / 1000000 ))
say "$RESTARTS restarts, $os OS ports, $rule rule ports, $missing missing; $((took / 1000)).$(printf %03d $((took % 1000))) s"

if [ $((os + missing)) -ne 0 ] || [ -n "$issues" ]; then
    journalctl -b -u gateway.service -u "rulebpf@$NAME.service" --no-pager | tail -n 30
    # Diagnostic only: which programs each cgroup has.
    bpftool cgroup tree /sys/fs/cgroup/system.slice
    finish 1
fi
finish 0
"#,
            restarts = self.restarts,
            low = RANGE.0,
            high = RANGE.1,
        )
    }
}

/// Where the script lives in the guest.
const SCRIPT: &str = "/usr/local/lib/rulebpf-systemd-test/run";
/// What socat runs for each connection (`SOCAT_PEERPORT`: the origin port).
const RECORD: &str = "/usr/local/lib/rulebpf-systemd-test/record";
const RECORD_SCRIPT: &str =
    "#!/bin/sh\necho \"$SOCAT_PEERPORT\" >> /run/rulebpf-systemd-test/ports\n";

const LISTENER_UNIT: &str = "\
[Unit]
Description=rulebpf systemd test: listener on 127.0.0.2:7000 recording origin ports

[Service]
ExecStart=/usr/bin/socat TCP-LISTEN:7000,bind=127.0.0.2,reuseaddr,fork EXEC:/usr/local/lib/rulebpf-systemd-test/record
";

/// A gateway whose very first action is a connect to the listener: the
/// connect happens microseconds after exec, in the unit's new cgroup.
const GATEWAY_UNIT: &str = "\
[Unit]
Description=rulebpf systemd test: a gateway that connects first thing
# Started 21 times in a row: by default systemd refuses a sixth start within
# 10 s (StartLimitBurst=5).
StartLimitIntervalSec=0

[Service]
ExecStart=/bin/bash -c 'exec 3<>/dev/tcp/127.0.0.2/7000 && exec sleep infinity'
";

/// Units a test guest does not need: each costs seconds under TCG, and the
/// timers could start apt in the middle of the test.
const MASKED: &[&str] = &[
    "serial-getty@ttyS0.service",
    "getty@tty1.service",
    "getty-static.service",
    "systemd-logind.service",
    "proc-sys-fs-binfmt_misc.automount",
    "e2scrub_reap.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "systemd-tmpfiles-clean.timer",
];

/// What the host read from the guest's console.
#[derive(Debug, Default, PartialEq)]
pub struct Results {
    /// One per gateway start, in order: did its first connect get a port of
    /// the rule's range?
    pub starts: Vec<bool>,
    /// Did `systemd-analyze verify` find nothing to say about the units?
    pub verified: Option<bool>,
    /// Seconds from kernel start to the test (the guest's uptime).
    pub up_after: Option<f64>,
    /// The summary line, and the seconds the starts and restarts took.
    pub summary: Option<String>,
    pub restarts_took: Option<f64>,
}

impl Results {
    pub fn read<'a>(console: impl IntoIterator<Item = &'a str>) -> Self {
        let mut results = Self::default();
        for line in console {
            let Some(rest) = line.strip_prefix(MARK) else {
                continue;
            };
            if rest.starts_with("start ") || rest.starts_with("restart ") {
                results.starts.push(rest.ends_with(", rule"));
            } else if let Some(uptime) = rest.strip_prefix("up after ") {
                results.up_after = uptime
                    .split_whitespace()
                    .next()
                    .and_then(|s| s.parse().ok());
            } else if let Some(verdict) = rest.strip_prefix("units verified: ") {
                results.verified = Some(verdict == "ok");
            } else if rest.contains(" restarts, ") {
                results.summary = Some(rest.to_string());
                results.restarts_took = rest
                    .rsplit("; ")
                    .next()
                    .and_then(|t| t.strip_suffix(" s"))
                    .and_then(|t| t.parse().ok());
            }
        }
        results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_reading_matches_what_the_script_prints() {
        let console = [
            "[  OK  ] Started something.",
            "systemd-test: up after 21.50 s: systemd 252 (252.39-1~deb12u2), rulebpf\t0.1.0-1",
            "systemd-test: control connect outside the rules: origin port 41234 (OS)",
            "systemd-test: rulebpf@gw active, programs /a /b",
            "systemd-test: units verified: ok",
            "systemd-test: start 1/3: origin port 20000, rule",
            "systemd-test: restart 2/3: origin port 45000, OS",
            "systemd-test: restart 3/3: no connection within 20 s",
            "systemd-test: 2 restarts, 1 OS ports, 1 rule ports, 1 missing; 3.042 s",
        ];
        let results = Results::read(console);
        assert_eq!(results.starts, [true, false, false]);
        assert_eq!(results.verified, Some(true));
        assert_eq!(results.up_after, Some(21.5));
        assert_eq!(results.restarts_took, Some(3.042));
        assert!(results.summary.unwrap().starts_with("2 restarts"));
    }

    #[test]
    fn the_script_carries_its_parameters() {
        let scenario = Scenario {
            restarts: 7,
            guest_timeout: Duration::from_secs(99),
        };
        let script = scenario.script();
        assert!(script.contains("\nRESTARTS=7\n"));
        assert!(script.contains("\nLOW=20000 HIGH=20099\n"));
        assert!(scenario.test_unit().contains("TimeoutStartSec=99\n"));
    }

    #[test]
    fn the_gateway_gets_only_what_rulebpf_writes() {
        let scenario = Scenario {
            restarts: 1,
            guest_timeout: Duration::from_secs(99),
        };
        let script = scenario.script();
        assert!(script.contains("\nrulebpf systemd-dropin --name \"$NAME\" gateway.service "));
        // No drop-in, override or attach of the test's own.
        assert!(!script.contains(".service.d"));
        assert!(!script.contains("BPFProgram="));
        assert!(!script.contains("bpftool cgroup attach"));
        for entry in scenario.entries() {
            let path = match &entry {
                Entry::File { path, .. } => path.to_string(),
                Entry::Symlink { path, .. } => path.clone(),
            };
            assert!(!path.contains(".service.d/"), "{path}");
        }
    }
}
