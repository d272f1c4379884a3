//! The five-minute demo: a cgroup, the example rules, a listener on
//! 127.0.0.2:7000, and the origin ports it sees from inside and outside.

use std::{
    fs,
    io::Read as _,
    net::{TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{cgroup2_root, workspace};

const DEST: &str = "127.0.0.2:7000";
const RULES: &str = "examples/tcpoport.ini";

pub fn run() -> anyhow::Result<()> {
    let workspace = workspace();
    let rulebpf = workspace.join("target/release/rulebpf");
    if !rulebpf.exists() {
        bail!(
            "{} not built: run `cargo build --release` first",
            rulebpf.display()
        );
    }
    let rules = workspace.join(RULES);
    let cgroup = cgroup2_root()?.join("rulebpf-demo");
    fs::create_dir_all(&cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    let result = demo(&rulebpf, &rules, &cgroup);
    // Clean up whatever happened above.
    let _ = Command::new(&rulebpf)
        .args(["detach", "--cgroup"])
        .arg(&cgroup)
        .output();
    let _ = fs::remove_dir(&cgroup);
    println!("\ncleaned up: detached and removed {}", cgroup.display());
    result
}

fn demo(rulebpf: &Path, rules: &Path, cgroup: &Path) -> anyhow::Result<()> {
    let listener = TcpListener::bind(DEST).with_context(|| format!("listening on {DEST}"))?;
    let (seen_tx, seen) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if let Ok(peer) = stream.peer_addr() {
                let _ = seen_tx.send(peer.port());
            }
        }
    });

    step(&format!("the rules ({})", rules.display()));
    for line in fs::read_to_string(rules)?
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        println!("    {line}");
    }
    step("rulebpf attach");
    cli(rulebpf, &["attach", "--cgroup", path(cgroup), path(rules)])?;
    step(&format!("rulebpf explain {DEST}"));
    cli(rulebpf, &["explain", path(rules), DEST])?;

    step(&format!(
        "3 connections to {DEST} from a process inside {}",
        cgroup.display()
    ));
    cli(
        rulebpf,
        &["probe", "--cgroup", path(cgroup), "--count", "3", DEST],
    )?;
    let inside: Vec<u16> = (0..3)
        .map(|_| seen.recv_timeout(Duration::from_secs(5)))
        .collect::<Result<_, _>>()?;
    println!("==> the listener on {DEST} saw origin ports {inside:?}");

    step("1 connection from this process, outside the cgroup");
    let mut outside = TcpStream::connect(DEST)?;
    let _ = outside.read(&mut [0u8; 1]);
    let port = seen.recv_timeout(Duration::from_secs(5))?;
    println!(
        "==> the listener saw origin port {port} (the OS's choice: rulebpf only acts in its cgroup)"
    );

    step("rulebpf stats");
    cli(rulebpf, &["stats", "--cgroup", path(cgroup)])?;
    if !inside.iter().all(|p| (20000..=20099).contains(p)) {
        bail!("expected origin ports in 20000-20099, the listener saw {inside:?}");
    }
    Ok(())
}

fn step(what: &str) {
    println!("\n\x1b[1m--- {what}\x1b[0m");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn cli(rulebpf: &Path, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(rulebpf).args(args).status()?;
    if !status.success() {
        bail!("rulebpf {} failed ({status})", args.join(" "));
    }
    Ok(())
}
