//! `cargo xtask vm-test`: the kernel integration suite (the same test binary
//! the host runs) on Debian's 5.10, 6.1 and 6.12 LTS kernels, in qemu.
//!
//! Steps: build the suite → fetch each kernel (cached under target/vm) →
//! one initramfs for all kernels → choose KVM or TCG → boot each kernel, run
//! the suite in the guest, read the results from the serial console →
//! a table per kernel, also written to target/vm/results.md, and the totals
//! (`cargo xtask ci` adds them to the host's). `cargo xtask vm-test` exits
//! non-zero when any kernel fails.

mod initramfs;
mod kernel;
mod qemu;
pub mod systemd;

use std::{
    fmt::Write as _,
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
pub use kernel::Series;

use crate::{cargo, libtest::Counts, target_dir};

/// The guest ends the suite after this long; qemu is killed a bit later.
const GUEST_TIMEOUT: Duration = Duration::from_secs(25 * 60);
const QEMU_DEADLINE: Duration = Duration::from_secs(27 * 60);

/// One kernel's outcome.
struct Outcome {
    series: Series,
    package: String,
    kernel: Option<String>,
    tests: Counts,
    failures: Vec<String>,
    exit: Option<i32>,
    took: Duration,
    timed_out: bool,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.exit == Some(0) && self.tests.failed == 0 && self.tests.passed > 0
    }
}

/// Which guest console lines reach stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Console {
    All,
    /// Every line but libtest's `test NAME ... ok` (CI's log shows failures,
    /// summaries and the boot, not hundreds of passes).
    HidePasses,
}

/// The guests' tests, summed over kernels.
pub struct Totals(pub Counts);

impl Totals {
    /// Ok when every kernel ran the suite and passed it.
    pub fn verdict(&self) -> anyhow::Result<()> {
        ensure!(
            self.0.failed == 0,
            "the suite failed on at least one kernel (see above)"
        );
        Ok(())
    }
}

/// Runs the suite on `kernels`. An error means vm-test itself could not run
/// (build, fetch, qemu); failed tests are in the [`Totals`].
pub fn run(kernels: &[Series], filter: Option<&str>, console: Console) -> anyhow::Result<Totals> {
    let start = Instant::now();
    let dir = target_dir().join("vm");
    let cache = dir.join("kernels");
    fs::create_dir_all(&cache)?;

    let (rulebpf, tests) = build_suite()?;
    let mut test_command = vec![tests.display().to_string(), "--test-threads=2".to_string()];
    test_command.extend(filter.map(str::to_string));
    // The guest is a busybox initramfs: no podman, no container runtime,
    // no nft or iptables for the firewall namespace and the NAT.
    for host_only in ["containers::", "firewall::", "nat::"] {
        test_command.extend(["--skip".to_string(), host_only.to_string()]);
    }
    let initrd = dir.join("initramfs.cpio.gz");
    initramfs::build(
        &initramfs::Contents {
            before: vec![rulebpf.display().to_string(), "kernel".to_string()],
            binaries: &[rulebpf, tests],
            test_command,
            guest_timeout: GUEST_TIMEOUT,
        },
        &dir,
        &initrd,
    )?;

    let mut fetched = Vec::new();
    for &series in kernels {
        let (package, image) = kernel::fetch(series, &cache)?;
        fetched.push((series, package, image));
    }
    let Some((_, _, first)) = fetched.first() else {
        bail!("no kernel to test");
    };
    let (accel, why) = qemu::choose_accel(first, &initrd);
    eprintln!("vm-test: accelerator {} ({why})", accel.name());

    let mut outcomes = Vec::new();
    for (series, package, image) in fetched {
        eprintln!("vm-test: booting {package} ({})", accel.name());
        let tag = format!("[{}] ", series.name());
        let boot = qemu::boot(&image, &initrd, accel, "", QEMU_DEADLINE, |line| {
            if console == Console::All || !line.ends_with(" ... ok") {
                println!("{tag}{line}");
            }
        })?;
        outcomes.push(summarise(series, package, boot));
    }

    let report = table(&outcomes, accel, start.elapsed());
    println!("\n{report}");
    fs::write(dir.join("results.md"), &report)?;
    for o in &outcomes {
        println!(
            "vm {} ({}): {} passed, {} failed",
            o.series.name(),
            o.kernel.as_deref().unwrap_or("did not boot"),
            o.tests.passed,
            o.tests.failed
        );
    }
    let mut totals = Counts::default();
    for o in &outcomes {
        totals += Counts {
            passed: o.tests.passed,
            // A kernel that did not finish counts as one failure at least.
            failed: o.tests.failed.max(u32::from(!o.ok())),
        };
    }
    Ok(Totals(totals))
}

/// Reads libtest's lines from the console.
fn summarise(series: Series, package: String, boot: qemu::Boot) -> Outcome {
    let mut outcome = Outcome {
        series,
        package,
        kernel: boot.kernel,
        tests: Counts::sum(boot.console.iter().map(String::as_str)),
        failures: Vec::new(),
        exit: boot.exit,
        took: boot.took,
        timed_out: boot.timed_out,
    };
    for line in &boot.console {
        if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            outcome.failures.push(name.to_string());
        }
    }
    outcome
}

fn table(outcomes: &[Outcome], accel: qemu::Accel, took: Duration) -> String {
    let mut out = String::from(
        "| kernel | package | result | passed | failed | wall time |\n|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let result = if o.ok() {
            "ok".to_string()
        } else if o.timed_out {
            "TIMED OUT".to_string()
        } else if o.kernel.is_none() {
            "DID NOT BOOT".to_string()
        } else {
            format!("FAILED (exit {:?})", o.exit)
        };
        let _ = writeln!(
            out,
            "| {} ({}) | {} | {result} | {} | {} | {:.0} s |",
            o.series.name(),
            o.kernel.as_deref().unwrap_or("?"),
            o.package,
            o.tests.passed,
            o.tests.failed,
            o.took.as_secs_f64()
        );
        for name in &o.failures {
            let _ = writeln!(out, "|  | failed: `{name}` | | | | |");
        }
    }
    let _ = writeln!(
        out,
        "\nqemu accelerator: {}; whole vm-test: {:.0} s",
        accel.name(),
        took.as_secs_f64()
    );
    out
}

/// Builds `rulebpf` and the kernel test binary; returns their paths. The
/// test binary runs `rulebpf` from the path cargo baked into it, which is
/// where the initramfs puts it too.
fn build_suite() -> anyhow::Result<(PathBuf, PathBuf)> {
    let status = cargo()
        .args([
            "build",
            "--release",
            "-p",
            "rulebpf-loader",
            "--bin",
            "rulebpf",
        ])
        .status()?;
    if !status.success() {
        bail!("building rulebpf failed");
    }
    let out = cargo()
        .args([
            "test",
            "--release",
            "-p",
            "rulebpf-loader",
            "--test",
            "kernel",
            "--no-run",
            "--message-format=json",
        ])
        .output()?;
    if !out.status.success() {
        bail!(
            "building the kernel tests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tests = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == "kernel")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo did not report the kernel test executable")?;
    let rulebpf = crate::rulebpf::Rulebpf::built()?;
    Ok((rulebpf.path().to_path_buf(), tests))
}
