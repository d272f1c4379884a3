//! `cargo xtask systemd-test`: rulebpf as Debian 12 runs it, under systemd,
//! in qemu.
//!
//! What it shows, on Debian's own systemd 252 and 6.1 cloud kernel:
//!
//! * the package from `cargo xtask deb` installs on a fresh Debian 12 with
//!   `apt install ./rulebpf_*.deb` and runs there with no Rust toolchain;
//! * the packaged `rulebpf@.service`, hardening included, can load, pin and
//!   keep rules;
//! * the drop-in `rulebpf systemd-dropin` writes (`BPFProgram=` and its
//!   `ExecStartPre=+rulebpf systemd-attach`) puts the named instance's entry
//!   programs on a service's new cgroup at every start, before the service
//!   runs: the first connect of each of N restarts in a row gets an origin
//!   port of the rule.
//!
//! Steps: the package → the Debian base system (mmdebstrap, cached:
//! [`rootfs`]) → the initramfs with the package installed by apt and the
//! scenario's units (cached by content: [`image`]) → the 6.1 kernel (vm-test's
//! cache) → boot, the scenario runs and powers off ([`scenario`]) → one test
//! per gateway start and one for `systemd-analyze verify`, and the timings.
//!
//! Timings on the 2-core build VM (qemu TCG, no KVM): the base 65-85 s, once;
//! the image 15-25 s, when the package or the scenario changed; the guest is
//! up after about 20 s; the 21 starts take 45-60 s; the whole test 90 s with
//! both cached.

mod image;
mod rootfs;
mod scenario;

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use super::{Series, kernel, qemu};
use crate::{deb, libtest::Counts, target_dir};

/// The guest ends the scenario after this long; qemu is killed a bit later.
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);
const QEMU_DEADLINE: Duration = Duration::from_secs(300);

/// The kernel of Debian 12, whose systemd this is.
const KERNEL: Series = Series::V6_1;

#[derive(clap::Args)]
pub struct Options {
    /// Restart the gateway this many times after its first start.
    #[arg(long, default_value_t = 20)]
    pub restarts: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self { restarts: 20 }
    }
}

/// Runs the scenario: one test per gateway start, one for the units as
/// systemd reads them. An error means the test itself could not run (build,
/// mmdebstrap, qemu).
pub fn run(options: &Options) -> anyhow::Result<Counts> {
    let start = Instant::now();
    let dir = target_dir().join("vm/systemd");
    std::fs::create_dir_all(&dir)?;

    crate::step("cargo xtask deb");
    let deb = deb::build()?;
    let base = rootfs::base(&dir)?;
    let scenario = scenario::Scenario {
        restarts: options.restarts,
        guest_timeout: GUEST_TIMEOUT,
    };
    let image = image::build(&base, &deb, &scenario.entries(), &dir)?;
    let (package, kernel) = kernel::fetch(KERNEL, &target_dir().join("vm/kernels"))?;
    let (accel, why) = qemu::choose_accel(&kernel, &image.path);
    eprintln!(
        "systemd-test: booting {package} with {} ({}, {}), accelerator {} ({why})",
        image.path.display(),
        deb::megabytes(image.size),
        built(image.built_in),
        accel.name()
    );
    let boot = qemu::boot(&kernel, &image.path, accel, "", QEMU_DEADLINE, |line| {
        println!("[systemd] {line}");
    })?;
    let results = scenario::Results::read(boot.console.iter().map(String::as_str));

    // One test per gateway start, and one for `systemd-analyze verify`.
    let expected = options.restarts + 2;
    let passed = results.starts.iter().filter(|&&ok| ok).count() as u32
        + u32::from(results.verified == Some(true));
    let finished = boot.exit == Some(0);
    let counts = Counts {
        passed,
        // Starts never seen count as failed; so does a guest that did not
        // finish, at least once.
        failed: (expected - passed.min(expected)).max(u32::from(!finished)),
    };
    println!();
    println!(
        "systemd-test: deb {} ({}); base {} ({}); image {} ({})",
        deb.file_name(),
        deb::megabytes(deb.size),
        base.path.display(),
        built(base.built_in),
        deb::megabytes(image.size),
        built(image.built_in),
    );
    println!(
        "systemd-test: guest up after {}; starts+restarts {}; qemu {:.0} s{}; whole test {:.0} s",
        seconds(results.up_after),
        seconds(results.restarts_took),
        boot.took.as_secs_f64(),
        if boot.timed_out { " (TIMED OUT)" } else { "" },
        start.elapsed().as_secs_f64()
    );
    if let Some(summary) = &results.summary {
        println!("systemd-test: {summary}");
    }
    println!(
        "systemd {} ({}): {} passed, {} failed",
        KERNEL.name(),
        boot.kernel.as_deref().unwrap_or("did not boot"),
        counts.passed,
        counts.failed
    );
    Ok(counts)
}

/// `cargo xtask systemd-test`: fails unless every start got the rule's port.
pub fn verdict(counts: Counts) -> anyhow::Result<()> {
    ensure!(
        counts.failed == 0 && counts.passed > 0,
        "systemd-test failed (see above)"
    );
    Ok(())
}

fn built(took: Option<Duration>) -> String {
    match took {
        Some(t) => format!("built in {:.0} s", t.as_secs_f64()),
        None => "cached".into(),
    }
}

fn seconds(value: Option<f64>) -> String {
    value.map_or_else(|| "?".into(), |s| format!("{s:.1} s"))
}

/// The first 16 hex digits of the SHA-256 of `bytes` (sha256sum from
/// coreutils): the cache keys of the base and the image.
fn digest(bytes: &[u8]) -> anyhow::Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running sha256sum")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(bytes)
        .context("writing to sha256sum")?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "sha256sum failed");
    Ok(String::from_utf8_lossy(&out.stdout)
        .chars()
        .take(16)
        .collect())
}
