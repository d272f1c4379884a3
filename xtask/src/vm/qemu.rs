//! Booting a kernel + initramfs in qemu and reading its serial console.
//!
//! KVM is used when it can boot the kernel; otherwise TCG (`-accel tcg -cpu
//! max`). On this kind of machine /dev/kvm belongs to a nested PVM that stops
//! a stock kernel with "KVM internal error", so a short boot-only run decides,
//! once per `vm-test`. Every boot has a deadline: qemu is killed when the
//! guest does not power off in time, so a hung guest never hangs CI.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::initramfs::{BOOT_ONLY, EXIT_MARK, KERNEL_MARK};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Self::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Self::Tcg => &["-accel", "tcg", "-cpu", "max"],
        }
    }
}

/// What a boot showed.
#[derive(Debug)]
pub struct Boot {
    /// `uname -r` of the guest, when it got that far.
    pub kernel: Option<String>,
    /// The exit status of the guest's command, when it finished.
    pub exit: Option<i32>,
    pub console: Vec<String>,
    pub took: Duration,
    pub timed_out: bool,
}

/// KVM when it boots `kernel` here, TCG otherwise; and why.
pub fn choose_accel(kernel: &Path, initrd: &Path) -> (Accel, String) {
    if let Err(e) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return (Accel::Tcg, format!("/dev/kvm: {e}"));
    }
    let probe = boot(
        kernel,
        initrd,
        Accel::Kvm,
        BOOT_ONLY,
        Duration::from_secs(60),
        |_| {},
    );
    match probe {
        Ok(b) if b.exit == Some(0) => (Accel::Kvm, "KVM booted the kernel".into()),
        Ok(b) => {
            let said = b
                .console
                .iter()
                .find(|l| l.contains("error") || l.contains("qemu:"))
                .cloned()
                .unwrap_or_else(|| "no output".into());
            (Accel::Tcg, format!("KVM could not boot the kernel: {said}"))
        }
        Err(e) => (Accel::Tcg, format!("KVM: {e:#}")),
    }
}

/// Boots and waits for the guest to power off (or `deadline`), passing each
/// console line to `line` as it arrives.
pub fn boot(
    kernel: &Path,
    initrd: &Path,
    accel: Accel,
    extra_cmdline: &str,
    deadline: Duration,
    mut line: impl FnMut(&str),
) -> anyhow::Result<Boot> {
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(accel.args())
        .args(["-m", "2048", "-smp", "2", "-nodefaults", "-no-reboot"])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 oops=panic quiet loglevel=3 {extra_cmdline}"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (apt-get install qemu-system-x86)")?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let err_tx = tx.clone();
    thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = err_tx.send(format!("qemu: {l}"));
        }
    });
    let mut result = Boot {
        kernel: None,
        exit: None,
        console: Vec::new(),
        took: Duration::ZERO,
        timed_out: false,
    };
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(text) => {
                // The serial console ends lines with \r\n.
                let text = text.trim_end_matches('\r').to_string();
                if let Some(v) = text.strip_prefix(KERNEL_MARK) {
                    result.kernel = Some(v.trim().to_string());
                }
                if let Some(v) = text.strip_prefix(EXIT_MARK) {
                    result.exit = v.trim().parse().ok();
                }
                line(&text);
                result.console.push(text);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if start.elapsed() >= deadline {
            result.timed_out = true;
            let _ = child.kill();
            break;
        }
    }
    let _ = child.wait();
    result.took = start.elapsed();
    Ok(result)
}
