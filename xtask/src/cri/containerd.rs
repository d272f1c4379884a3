//! A containerd of its own for the test: Debian trixie's package (1.7,
//! the first with NRI; bookworm's 1.6 has only the old exec-hook NRI; sid
//! has 2.x),
//! fetched with a private apt state and unpacked under the target
//! directory, run with a configuration that keeps every path of its own
//! (`/var/lib/containerd` and the host's sockets are never touched), NRI
//! enabled, the cgroupfs driver, and the test's image as the sandbox image.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use crate::apt::{self, Apt};

/// The Debian suite whose containerd the test runs unless told otherwise
/// (`sid` has 2.x).
pub const DEFAULT_SUITE: &str = "trixie";

/// The containerd binaries of Debian `suite` (`usr/bin` of the unpacked
/// package): from the cache when there, else fetched.
pub fn fetch(cache: &Path, suite: &str) -> anyhow::Result<PathBuf> {
    let root = cache.join(format!("containerd-{suite}"));
    let bin = root.join("usr/bin");
    if bin.join("containerd").exists() {
        return Ok(bin);
    }
    let apt = Apt::private(&cache.join(format!("apt-{suite}")), suite)?;
    let deb = apt.download("containerd", &cache.join("download"))?;
    apt::unpack(&deb, &root)?;
    fs::remove_file(&deb)?;
    ensure!(
        bin.join("containerd").exists(),
        "no usr/bin/containerd in {}",
        deb.display()
    );
    Ok(bin)
}

/// A running containerd; stopped (and its state removed) on drop.
pub struct Containerd {
    child: Child,
    /// Whether `/run/containerd` (where 1.7 puts its shims' sockets
    /// whatever the configuration says) was made by this run.
    made_run_containerd: bool,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub nri_socket: PathBuf,
    bin: PathBuf,
}

impl Containerd {
    /// Starts containerd from `bin` with everything under `dir`; the pod
    /// sandbox image is `sandbox_image` (imported before any pod).
    pub fn start(bin: &Path, dir: &Path, sandbox_image: &str) -> anyhow::Result<Self> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir.join("cni"))?;
        let made_run_containerd = !Path::new(RUN_CONTAINERD).exists();
        let socket = dir.join("containerd.sock");
        let nri_socket = dir.join("nri.sock");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            config_text(dir, &socket, &nri_socket, sandbox_image),
        )?;
        let log = fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new(bin.join("containerd"))
            .arg("--config")
            .arg(&config)
            // Its shim (containerd-shim-runc-v2) is found on PATH, runc too.
            .env(
                "PATH",
                format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let containerd = Self {
            child,
            made_run_containerd,
            dir: dir.to_path_buf(),
            socket,
            nri_socket,
            bin: bin.to_path_buf(),
        };
        let start = Instant::now();
        while !(containerd.socket.exists() && containerd.nri_socket.exists()) {
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "containerd made no sockets in 30 s; its log:\n{}",
                    containerd.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(containerd)
    }

    /// `ctr -n k8s.io images import TAR` (the CRI's namespace).
    pub fn import(&self, tar: &Path) -> anyhow::Result<()> {
        let out = Command::new(self.bin.join("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(tar)
            .output()
            .context("running ctr")?;
        ensure!(
            out.status.success(),
            "ctr images import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The last lines of containerd's log (for failures).
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SIGTERM, then the shims it left (one per pod: they outlive a
        // containerd that stops, by design) are stopped by the test's own
        // cleanup of pods before this.
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
        if self.made_run_containerd {
            let _ = fs::remove_dir_all(RUN_CONTAINERD);
        }
    }
}

/// Where containerd 1.7 keeps its shims' sockets (`/run/containerd/s`).
const RUN_CONTAINERD: &str = "/run/containerd";

/// containerd's configuration (version 2: read by 1.7, converted by 2.x).
/// https://github.com/containerd/containerd/blob/v1.7.24/docs/NRI.md
fn config_text(dir: &Path, socket: &Path, nri_socket: &Path, sandbox_image: &str) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{socket}"

[plugins."io.containerd.nri.v1.nri"]
  disable = false
  disable_connections = false
  socket_path = "{nri}"
  plugin_path = "{d}/nri-plugins"
  plugin_config_path = "{d}/nri-conf.d"
  plugin_registration_timeout = "5s"
  plugin_request_timeout = "2s"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  disable_apparmor = true
  # The sandbox's oom_score_adj is -998; lowering it needs CAP_SYS_RESOURCE,
  # which a container host (as this test's) may not grant: runc init then
  # dies before the pod starts. Restricted, it is never set below ours.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"#,
        socket = socket.display(),
        nri = nri_socket.display(),
    )
}
