//! The configurations a round measures, and switching each on and off.
//!
//! * no hook: nothing attached, the limit;
//! * rulebpf with 1, 1,000, 10,000 and 100,000 rules: n-1 filler rules that
//!   never match loopback, then the measured destination's rule **last**,
//!   the worst case for anything that scans rules in order;
//! * rulebpf with an allow-list of 1,000 paths: 999 filler paths, the
//!   measured one, then `* * : deny tcp+udp` (what a gateway whose file
//!   lists every path it may open runs);
//! * rulebpf with 1 rule and its decision events (`super::events`):
//!   compiled out (the verifier removes their code), with `rulebpf events`
//!   reading them, with `rulebpf run --events-log` writing them to a file
//!   (with nobody listening, the plain 1-rule configuration);
//! * nft SNAT: the peer ([`super::nft`]).
//!
//! Only one configuration is on at a time; whatever happens, the [`Rig`]
//! switches everything off at the end.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::Mutex,
};

use anyhow::{Context as _, bail};

use serde_json::Value;

use super::{ALLOW_LIST_PATHS, BULK_PORT, FIRST_PORT, ORIGIN, RULE_COUNTS, SERVER_IP, nft};
use crate::rulebpf::{Rulebpf, arg};

/// One configuration under test.
#[derive(Clone, Debug, PartialEq)]
pub enum Config {
    NoHook,
    Rulebpf(u32),
    /// An allow-list of this many paths.
    AllowList(u32),
    /// 1 rule, what decision events cost.
    Events(Events),
    NftSnat,
}

/// The decision events of a 1-rule instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Events {
    /// Loaded without their code (`RULEBPF_NO_EVENTS`).
    CompiledOut,
    /// `rulebpf events --json` reads them (to /dev/null).
    Read,
    /// `rulebpf run --events-log FILE` writes them.
    Logged,
}

impl Config {
    /// In the order each main round runs them (and the report lists them);
    /// the events configurations have rounds of their own (`events.rs`).
    pub fn all() -> Vec<Self> {
        let mut configs = vec![Self::NoHook];
        configs.extend(RULE_COUNTS.iter().map(|&n| Self::Rulebpf(n)));
        configs.push(Self::AllowList(ALLOW_LIST_PATHS));
        configs.push(Self::NftSnat);
        configs
    }

    pub fn name(&self) -> String {
        match self {
            Self::NoHook => "no hook".into(),
            Self::Rulebpf(n) => format!("rulebpf {n} rules"),
            Self::AllowList(n) => format!("rulebpf allow-list {n} paths"),
            Self::Events(Events::CompiledOut) => "rulebpf 1 rule, events compiled out".into(),
            Self::Events(Events::Read) => "rulebpf 1 rule, rulebpf events reading".into(),
            Self::Events(Events::Logged) => "rulebpf 1 rule, run --events-log".into(),
            Self::NftSnat => "nft SNAT".into(),
        }
    }
}

/// What switching configurations takes: the `rulebpf` binary, the bench
/// cgroup, and a directory for the generated rule files.
pub struct Rig {
    rulebpf: Rulebpf,
    cgroup: PathBuf,
    rules_dir: PathBuf,
    /// The `rulebpf events` or `rulebpf run` of an events configuration.
    reader: Mutex<Option<Child>>,
}

impl Rig {
    pub fn new(rulebpf: Rulebpf, cgroup: PathBuf, rules_dir: PathBuf) -> Self {
        Self {
            rulebpf,
            cgroup,
            rules_dir,
            reader: Mutex::new(None),
        }
    }

    fn rules_path(&self, n: u32) -> PathBuf {
        self.rules_dir.join(format!("rules-{n}.ini"))
    }

    /// Writes the rule file of `n` rules; returns its path.
    pub fn write_rules(&self, n: u32) -> anyhow::Result<PathBuf> {
        fs::create_dir_all(&self.rules_dir)?;
        let path = self.rules_path(n);
        fs::write(&path, rules_text(n)?)?;
        Ok(path)
    }

    fn allow_list_path(&self, n: u32) -> PathBuf {
        self.rules_dir.join(format!("allow-list-{n}.ini"))
    }

    /// Writes the allow-list of `n` paths; returns its path.
    pub fn write_allow_list(&self, n: u32) -> anyhow::Result<PathBuf> {
        fs::create_dir_all(&self.rules_dir)?;
        let path = self.allow_list_path(n);
        let mut text = rules_text(n)?;
        text.push_str("* * : deny tcp+udp\n");
        fs::write(&path, text)?;
        Ok(path)
    }

    /// `rulebpf attach --json`: what it reports (compile time, map memory,
    /// verifier instructions).
    pub fn attach(&self, file: &Path) -> anyhow::Result<Value> {
        self.attach_with(file, &[])
    }

    /// [`Self::attach`] with more `attach` arguments.
    pub fn attach_with(&self, file: &Path, extra: &[&str]) -> anyhow::Result<Value> {
        self.attach_env(file, extra, &[])
    }

    /// [`Self::attach_with`] with environment variables set for `rulebpf`
    /// (what it assumes of the kernel, what it compiles out).
    pub fn attach_env(
        &self,
        file: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Value> {
        let mut args = vec!["attach", "--json", "--cgroup", arg(&self.cgroup)?];
        args.extend_from_slice(extra);
        args.push(arg(file)?);
        self.rulebpf.json_env(&args, env)
    }

    /// Writes a rule file `name` with `text` among the generated ones.
    pub fn write_file(&self, name: &str, text: &str) -> anyhow::Result<PathBuf> {
        fs::create_dir_all(&self.rules_dir)?;
        let path = self.rules_dir.join(name);
        fs::write(&path, text)?;
        Ok(path)
    }

    /// The bench cgroup.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The `rulebpf` binary the rig runs.
    pub fn rulebpf_path(&self) -> &Path {
        self.rulebpf.path()
    }

    /// `rulebpf stats --json` for the bench cgroup.
    pub fn stats(&self) -> anyhow::Result<Value> {
        self.rulebpf
            .json(&["stats", "--json", "--cgroup", arg(&self.cgroup)?])
    }

    pub fn detach(&self) {
        self.rulebpf.detach(&self.cgroup);
    }

    pub fn on(&self, config: &Config) -> anyhow::Result<()> {
        match config {
            Config::NoHook => Ok(()),
            Config::Rulebpf(n) => self.attach(&self.rules_path(*n)).map(drop),
            Config::AllowList(n) => self.attach(&self.allow_list_path(*n)).map(drop),
            Config::Events(events) => self.events_on(*events),
            Config::NftSnat => nft::add(),
        }
    }

    fn events_on(&self, events: Events) -> anyhow::Result<()> {
        let rules = self.rules_path(1);
        let cgroup = arg(&self.cgroup)?;
        let (command, ready) = match events {
            Events::CompiledOut => {
                return self
                    .attach_env(&rules, &[], &[("RULEBPF_NO_EVENTS", "1")])
                    .map(drop);
            }
            Events::Read => {
                self.attach(&rules)?;
                return self.events_reader();
            }
            Events::Logged => {
                let log = self.rules_dir.join("events.log");
                let _ = fs::remove_file(&log);
                let mut command = self.rulebpf.command(&["run", "--cgroup", cgroup]);
                command.arg("--events-log").arg(&log).arg(&rules);
                (command, "ready: instance")
            }
        };
        self.spawn_reader(command, ready)
    }

    /// Starts `command` (a `rulebpf events` or `rulebpf run`) as the
    /// reader of an events configuration and waits until its stderr says
    /// `ready`, then lets it settle.
    fn spawn_reader(&self, mut command: std::process::Command, ready: &str) -> anyhow::Result<()> {
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the events reader")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let started = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains(ready));
        // Drain the rest, so the reader never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        *self.reader.lock().unwrap() = Some(child);
        if !started {
            bail!("the events reader ended before it was ready");
        }
        // A reader runs for months: measure it settled, not its start
        // (`run`'s first checks, nft read once for the NAT watch).
        std::thread::sleep(std::time::Duration::from_millis(500));
        Ok(())
    }

    /// The pin `name` of the bench instance (named after the cgroup, as
    /// `systemd-escape --path` does: `rulebpf-bench` is
    /// `rulebpf\x2dbench`): `connect4` is the entry program.
    pub fn pin(&self, name: &str) -> PathBuf {
        let leaf = self
            .cgroup
            .file_name()
            .map(|n| n.to_string_lossy().replace('-', r"\x2d"))
            .unwrap_or_default();
        Path::new("/sys/fs/bpf/rulebpf").join(leaf).join(name)
    }

    /// `rulebpf events --json` for the bench cgroup, as a reader.
    pub fn events_reader(&self) -> anyhow::Result<()> {
        let command = self
            .rulebpf
            .command(&["events", "--json", "--cgroup", arg(&self.cgroup)?]);
        self.spawn_reader(command, "listening to instance")
    }

    /// CPU time the reader of an events configuration has used so far
    /// (nanoseconds, all its threads: `/proc/PID/task/*/schedstat`).
    pub fn reader_cpu_ns(&self) -> Option<u64> {
        let pid = self.reader.lock().unwrap().as_ref()?.id();
        let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
        Some(
            tasks
                .flatten()
                .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split(' ').next()?.parse::<u64>().ok())
                .sum(),
        )
    }

    /// Stops the reader of an events configuration (SIGTERM: `run` leaves
    /// the rules in force; they are detached next).
    pub fn reader_off(&self) {
        if let Some(mut child) = self.reader.lock().unwrap().take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    pub fn off(&self, config: &Config) {
        match config {
            Config::NoHook => {}
            Config::Rulebpf(_) | Config::AllowList(_) => self.detach(),
            Config::Events(_) => {
                self.reader_off();
                self.detach();
            }
            Config::NftSnat => nft::delete(),
        }
    }

    pub fn all_off(&self) {
        self.reader_off();
        self.detach();
        nft::delete();
    }
}

/// n-1 filler rules that never match loopback, then the measured
/// destination's rule last.
fn rules_text(n: u32) -> anyhow::Result<String> {
    let mut text = String::with_capacity(n as usize * 32);
    for i in 0..n - 1 {
        let [_, b, c, d] = i.to_be_bytes();
        writeln!(text, "10.{b}.{c}.{d} {} : {}", 1000 + i % 7, 40000 + i % 13)?;
    }
    writeln!(text, "{SERVER_IP} {FIRST_PORT}-{BULK_PORT} : {ORIGIN}")?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::rules_text;

    #[test]
    fn the_measured_rule_comes_last() {
        let text = rules_text(3).unwrap();
        assert_eq!(
            text,
            "10.0.0.0 1000 : 40000\n10.0.0.1 1001 : 40001\n127.0.0.2 7400-7599 : 24000-31999\n"
        );
        assert_eq!(rules_text(1).unwrap().lines().count(), 1);
    }
}
