//! The five-minute demo: a cgroup, the example rules, a listener on
//! 127.0.0.2:7000, and the origin ports it sees from inside and outside.
//!
//! The listener is the kernel tests' ([`rulebpf_testkit::Listener`]): what
//! the demo prints is what a peer saw, not what the client thinks it bound.
//! The rule for 127.0.0.2:7000 in examples/tcpoport.ini hands out the
//! demo's slot of the port table ([`ports::DEMO`], 20000-20099).

use std::{
    fs,
    io::Read as _,
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use rulebpf_testkit::{Listener, Mode, ports};

use crate::{
    rulebpf::{Profile, Rulebpf, arg},
    workspace,
};

const DEST: &str = "127.0.0.2:7000";
const RULES: &str = "examples/tcpoport.ini";
/// How long the listener may take to see the connections made.
const WAIT: Duration = Duration::from_secs(5);

/// Runs the demo with the binary `cargo build` built in `profile`.
pub fn run(profile: Profile) -> anyhow::Result<()> {
    let rulebpf = Rulebpf::built_in(profile)?;
    let rules = workspace().join(RULES);
    let cgroup = rulebpf.cgroup2_mount()?.join("rulebpf-demo");
    fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let result = demo(&rulebpf, &rules, &cgroup);
    // Clean up whatever happened above.
    rulebpf.detach(&cgroup);
    let _ = fs::remove_dir(&cgroup);
    println!("\ncleaned up: detached and removed {}", cgroup.display());
    result
}

fn demo(rulebpf: &Rulebpf, rules: &Path, cgroup: &Path) -> anyhow::Result<()> {
    let dest: SocketAddr = DEST.parse()?;
    let listener =
        Listener::bind(dest, Mode::Tcp).with_context(|| format!("listening on {DEST}"))?;
    let (cg, rules_arg) = (arg(cgroup)?, arg(rules)?);

    step(&format!("the rules ({})", rules.display()));
    for line in fs::read_to_string(rules)?
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        println!("    {line}");
    }
    step("rulebpf attach");
    rulebpf.show(&["attach", "--cgroup", cg, rules_arg])?;
    step(&format!("rulebpf explain {DEST}"));
    rulebpf.show(&["explain", rules_arg, DEST])?;

    step(&format!(
        "3 connections to {DEST} from a process inside {}",
        cgroup.display()
    ));
    rulebpf.show(&["probe", "--cgroup", cg, "--count", "3", DEST])?;
    let inside = listener.take_within(3, WAIT);
    ensure!(
        inside.len() == 3,
        "the listener on {DEST} saw {inside:?}, expected 3 connections"
    );
    println!("==> the listener on {DEST} saw origin ports {inside:?}");

    step("1 connection from this process, outside the cgroup");
    let mut outside = TcpStream::connect(DEST)?;
    // The listener closes first: end-of-file says it has seen the connection.
    let _ = outside.read(&mut [0u8; 1]);
    let [port] = listener.take_within(1, WAIT)[..] else {
        bail!("the listener on {DEST} did not see exactly the 1 connection made");
    };
    println!(
        "==> the listener saw origin port {port} (the OS's choice: rulebpf only acts in its cgroup)"
    );

    step("rulebpf stats");
    rulebpf.show(&["stats", "--cgroup", cg])?;
    let demo = ports::DEMO;
    ensure!(
        inside.iter().all(|&p| demo.contains(p)),
        "expected origin ports in {demo}, the listener saw {inside:?}"
    );
    Ok(())
}

/// The demo's own headers (stdout, between the CLI's output).
fn step(what: &str) {
    println!("\n\x1b[1m--- {what}\x1b[0m");
}
