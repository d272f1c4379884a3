//! `cargo xtask ci`: the whole CI sequence, which `scripts/test.sh` runs once
//! `scripts/setup.sh` has installed what is missing.
//!
//! 1. `cargo fmt --all --check`;
//! 2. clippy with `-D warnings`: the host crates (`--release --all-targets`)
//!    and the eBPF crate for its own target (`bpfel-unknown-none`, build-std);
//! 3. `cargo test --release`: unit, property and kernel integration tests on
//!    this host's kernel, the output shown as it comes and kept for the totals;
//!    then the rules' fuzz target for 60 s (`cargo fuzz`, from the seeds
//!    committed in `rulebpf-loader/rules/fuzz/corpus`): runs and exec/s;
//! 4. `bench --smoke` into `target/bench-smoke`: the bench still works (the
//!    figures are BENCHMARKS.md's, from a full run); only where it wrote is
//!    shown; then `cri-test`: the NRI plugin under a real containerd, its
//!    summary line;
//! 5. `vm-test --kernel all`: the kernel suite on Linux 5.10, 6.1 and 6.12 in qemu,
//!    passing tests not shown, then its wall time;
//! 6. `systemd-test`: the Debian package on Debian 12 under systemd in qemu,
//!    one test per gateway start, then its wall time;
//! 7. the closing lines: `host <kernel>: N passed, N failed` (every libtest
//!    summary of step 3: unit, property, kernel tests, doctests) and
//!    `tests: N passed, N failed` (the same plus the guests' tests: the
//!    kernel suite's and systemd-test's).
//!
//! The first failing step ends the run with a non-zero exit status, as
//! `set -e` did in the script this replaces; once step 3 has run, the
//! closing lines are printed whatever happens after it. Steps 4 to 6 run
//! in this process (no second `cargo xtask`); every cargo command is the
//! cargo that runs xtask (`CARGO`), so the pinned toolchain throughout.

use std::{
    io::{Read as _, Write},
    process::{Command, ExitStatus},
    time::Instant,
};

use anyhow::{Context as _, ensure};

use crate::{bench, cargo, libtest::Counts, step, target_dir, vm};

#[derive(clap::Args)]
pub struct Options {
    /// Leave out the bench smoke run (step 4).
    #[arg(long)]
    skip_bench: bool,
    /// Leave out the rules fuzzer's run (after step 3).
    #[arg(long)]
    skip_fuzz: bool,
    /// Leave out the qemu steps: vm-test and systemd-test (steps 5 and 6).
    #[arg(long)]
    skip_vm: bool,
    /// Leave out systemd-test only (step 6).
    #[arg(long)]
    skip_systemd: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    step("cargo fmt --check");
    cargo_ok("fmt --all --check")?;
    step("cargo clippy -D warnings");
    cargo_ok("clippy --release --all-targets -- -D warnings")?;
    cargo_ok(
        "clippy --release -p rulebpf-ebpf --target bpfel-unknown-none -Zbuild-std=core -- -D warnings",
    )?;

    step("cargo test (unit, property, kernel integration)");
    let (host, tested) = host_tests()?;
    let mut guests = Counts::default();
    let rest = tested
        .and_then(|()| fuzz(options))
        .and_then(|()| bench_and_vm(options, &mut guests));
    // Closing lines: per kernel, then the whole suite.
    let release = crate::kernel_release();
    println!(
        "host {release}: {} passed, {} failed",
        host.passed, host.failed
    );
    println!(
        "tests: {} passed, {} failed",
        host.passed + guests.passed,
        host.failed + guests.failed
    );
    rest
}

/// Steps 4 to 6; `guests` gets the guests' totals as vm-test and
/// systemd-test run.
fn bench_and_vm(options: &Options, guests: &mut Counts) -> anyhow::Result<()> {
    if options.skip_bench {
        step("bench smoke skipped (--skip-bench)");
    } else {
        step("cargo xtask bench --smoke (the bench still works; figures: BENCHMARKS.md)");
        bench::run(
            bench::Size::SMOKE,
            &target_dir().join("bench-smoke"),
            bench::Echo::Paths,
        )?;
    }
    step("cargo xtask cri-test (the NRI plugin under containerd, pods through the CRI)");
    let start = Instant::now();
    let result = crate::cri::run(crate::cri::DEFAULT_SUITE);
    println!("cri-test wall time: {} s", start.elapsed().as_secs());
    result?;
    if options.skip_vm {
        step("vm-test skipped (--skip-vm)");
        return Ok(());
    }
    step(
        "cargo xtask vm-test --kernel all (the kernel suite on Linux 5.10, 6.1 and 6.12, in qemu)",
    );
    let start = Instant::now();
    let result = vm::run(&vm::Series::ALL, None, vm::Console::HidePasses);
    println!("vm-test wall time: {} s", start.elapsed().as_secs());
    let totals = result?;
    *guests = totals.0;
    totals.verdict()?;

    if options.skip_systemd {
        step("systemd-test skipped (--skip-systemd)");
        return Ok(());
    }
    step("cargo xtask systemd-test (the package on Debian 12, systemd's BPFProgram=, in qemu)");
    let start = Instant::now();
    let result = vm::systemd::run(&vm::systemd::Options::default());
    println!("systemd-test wall time: {} s", start.elapsed().as_secs());
    let counts = result?;
    *guests += counts;
    vm::systemd::verdict(counts)
}

/// The rules' fuzz target (`rulebpf-loader/rules/fuzz`) and how long CI
/// runs it.
const FUZZ_TARGET: &str = "parse_compile";
const FUZZ_SECONDS: u32 = 60;

/// After step 3: the rules' libFuzzer target for [`FUZZ_SECONDS`], from the
/// committed seeds (`corpus/parse_compile`). What it finds on the way goes
/// to a scratch corpus in the target directory, so the checkout stays
/// clean; a crash fails the run, its input in the fuzz directory's
/// `artifacts/`. No sanitizer: the crate has no `unsafe`, and without one
/// it runs 3-4 times as many inputs. Prints runs and executions per second.
fn fuzz(options: &Options) -> anyhow::Result<()> {
    if options.skip_fuzz {
        step("fuzzing skipped (--skip-fuzz)");
        return Ok(());
    }
    step(&format!(
        "cargo fuzz run {FUZZ_TARGET} for {FUZZ_SECONDS} s (parse + compile == first match)"
    ));
    let dir = crate::workspace().join("rulebpf-loader/rules/fuzz");
    let scratch = target_dir().join("fuzz-corpus");
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let mut command = cargo();
    command
        .args(["fuzz", "run", "--sanitizer", "none", "--fuzz-dir"])
        .arg(&dir)
        .arg("--target-dir")
        .arg(target_dir().join("fuzz"))
        .arg(FUZZ_TARGET)
        .arg(&scratch)
        .arg(dir.join("corpus").join(FUZZ_TARGET))
        .arg("--")
        .arg(format!("-max_total_time={FUZZ_SECONDS}"))
        .arg(format!("-dict={}", dir.join("rules.dict").display()))
        .args([
            "-max_len=4096",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
        ]);
    let output = command
        .output()
        .context("running cargo fuzz (scripts/setup.sh installs it)")?;
    let log = String::from_utf8_lossy(&output.stderr);
    let stat = |name: &str| {
        log.lines()
            .find_map(|line| line.strip_prefix(&format!("stat::{name}:")))
            .map_or("?", str::trim)
    };
    if !output.status.success() {
        // The crash report and the reproduction command are at the end.
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("{}", lines[lines.len().saturating_sub(80)..].join("\n"));
        anyhow::bail!("cargo fuzz run {FUZZ_TARGET} failed ({})", output.status);
    }
    println!(
        "fuzz: {} runs, {} exec/s, {} new inputs, no failure",
        stat("number_of_executed_units"),
        stat("average_exec_per_sec"),
        stat("new_units_added"),
    );
    Ok(())
}

/// Runs `cargo ARGS` (words separated by blanks), output on the terminal;
/// fails unless it exits 0.
fn cargo_ok(args: &str) -> anyhow::Result<()> {
    let status = cargo()
        .args(args.split_whitespace())
        .status()
        .with_context(|| format!("running cargo {args}"))?;
    ensure!(status.success(), "cargo {args} failed ({status})");
    Ok(())
}

/// `cargo test --release 2>&1 | tee`: the libtest summaries summed. The
/// outer error is "could not run cargo"; the inner one "tests failed".
fn host_tests() -> anyhow::Result<(Counts, anyhow::Result<()>)> {
    let mut command = cargo();
    command.args(["test", "--release"]);
    let (log, status) = tee(command, &mut std::io::stdout()).context("running cargo test")?;
    let counts = Counts::sum(String::from_utf8_lossy(&log).lines());
    let tested = if status.success() {
        Ok(())
    } else {
        Err(anyhow::anyhow!("cargo test --release failed ({status})"))
    };
    Ok((counts, tested))
}

/// Runs `command` with stdout and stderr through one pipe (`2>&1`), so the
/// terminal shows them in the order they came, and copies everything to
/// `out` as it arrives (`| tee`); returns what it printed and how it ended.
fn tee(mut command: Command, out: &mut impl Write) -> std::io::Result<(Vec<u8>, ExitStatus)> {
    let (mut reader, writer) = std::io::pipe()?;
    command.stdout(writer.try_clone()?).stderr(writer);
    let mut child = command.spawn()?;
    // The command holds the pipe's write ends: without dropping it, reading
    // would never see end-of-file.
    drop(command);
    let mut log = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
        log.extend_from_slice(&buf[..n]);
    }
    Ok((log, child.wait()?))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::tee;
    use crate::libtest::Counts;

    #[test]
    fn tee_keeps_both_streams_in_order_and_the_status() {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "echo 'test result: ok. 2 passed; 0 failed;'; \
             echo 'test result: FAILED. 1 passed; 1 failed;' >&2; exit 3",
        ]);
        // Not to stdout: these lines would count in CI's own totals.
        let mut shown = Vec::new();
        let (log, status) = tee(command, &mut shown).unwrap();
        assert_eq!(shown, log);
        let log = String::from_utf8(log).unwrap();
        assert_eq!(
            log,
            "test result: ok. 2 passed; 0 failed;\ntest result: FAILED. 1 passed; 1 failed;\n"
        );
        assert_eq!(status.code(), Some(3));
        assert_eq!(
            Counts::sum(log.lines()),
            Counts {
                passed: 3,
                failed: 1
            }
        );
    }
}
