//! The peer rulebpf is measured against: nftables SNAT scoped to the bench
//! cgroup, which is how a cgroup's connections get an origin port range
//! without rulebpf. Verified with nftables 1.0.6 (Debian 12) on Linux 6.18;
//! the bench loads exactly this ruleset ([`ruleset`]):
//!
//! ```text
//! table ip rulebpf_bench {
//!   chain out {
//!     type filter hook output priority mangle; policy accept;
//!     socket cgroupv2 level 1 "rulebpf-bench" meta mark set 0x4242
//!   }
//!   chain post {
//!     type nat hook postrouting priority srcnat; policy accept;
//!     meta mark 0x4242 ip daddr 127.0.0.2 tcp dport 7400-7599 snat to 127.0.0.1:24000-31999
//!   }
//! }
//! ```
//!
//! Why it looks like this:
//!
//! * **Mark in `output`, translate in `postrouting`.** Source NAT happens in
//!   a nat chain at `postrouting`, but the `socket` expression, the one that
//!   knows which cgroup the sending socket belongs to, is refused there
//!   ("Operation not supported"). So the `output` chain, where the socket is
//!   known, marks the cgroup's packets (0x4242, a mark nothing else uses),
//!   and `postrouting` translates the marked ones to the bench's origin
//!   range. `level 1` is the depth of the matched cgroup below the cgroup2
//!   root: the bench cgroup sits right under it.
//! * **Loaded in a private mount namespace.** nft resolves the path of
//!   `socket cgroupv2 level N "path"` against /sys/fs/cgroup, once, to the
//!   cgroup's id, which is what the kernel compares. On a hybrid host
//!   /sys/fs/cgroup holds the v1 hierarchies and cgroup2 is mounted at
//!   /sys/fs/cgroup/unified, so the path would not resolve. The ruleset is
//!   therefore loaded with [`LOAD`] under `unshare -m`: in a mount namespace
//!   of its own, with cgroup2 mounted at /sys/fs/cgroup. A cgroup has the
//!   same id in every mount of the hierarchy, and the namespace and its
//!   mount vanish when nft exits; the ruleset stays (it belongs to the
//!   network namespace). On a cgroup2-only host this changes nothing.
//! * **Each side sees something else.** NAT rewrites packets, not the
//!   socket: the server sees the translated port, while the client's
//!   `getsockname()` still shows the ephemeral port the OS gave it. So the
//!   bench proves every configuration at the server, never at the client.
//! * **TIME_WAIT in conntrack.** With the server closing first, conntrack
//!   keeps each translated connection in TIME_WAIT, holding its translated
//!   (source port, destination) pair. With more connections to one
//!   destination than ports in the range, these entries block the range and
//!   the rate collapses (to about a hundred connects per second where this
//!   was first measured). The bench measures the per-connect cost, not the
//!   range's capacity, so every timed round connects to a fresh destination
//!   port, whose pairs are all free.
//! * **Removed** with `nft delete table ip rulebpf_bench` after every SNAT
//!   round and, whatever happened, at the end of the bench.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, ensure};

use rulebpf_testkit::PortSlot;

use super::{BULK_PORT, CGROUP, FIRST_PORT, ORIGIN, SERVER_IP};

/// The nft table the bench adds and deletes.
pub const TABLE: &str = "rulebpf_bench";

/// What `unshare -m` runs to load the ruleset (given on stdin): cgroup2
/// mounted where nft looks for cgroup paths, then nft.
pub const LOAD: &str = "mount -t cgroup2 none /sys/fs/cgroup && nft -f -";

/// The ruleset: mark the bench cgroup's packets in `output`, translate the
/// marked ones to the bench's origin range in `postrouting`.
pub fn ruleset() -> String {
    ruleset_for(
        &SERVER_IP.to_string(),
        &format!("{FIRST_PORT}-{BULK_PORT}"),
        ORIGIN,
    )
}

/// [`ruleset`] for other destinations (`daddr`, `dports` in nft's syntax)
/// and another origin range (the capacity scenario's).
pub fn ruleset_for(daddr: &str, dports: &str, origin: PortSlot) -> String {
    format!(
        "table ip {TABLE} {{
  chain out {{
    type filter hook output priority mangle; policy accept;
    socket cgroupv2 level 1 \"{CGROUP}\" meta mark set 0x4242
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    meta mark 0x4242 ip daddr {daddr} tcp dport {dports} snat to 127.0.0.1:{origin}
  }}
}}
"
    )
}

/// Loads [`ruleset`] (see the module doc for the mount namespace).
pub fn add() -> anyhow::Result<()> {
    load(Command::new("unshare"), &ruleset())
}

/// Loads `ruleset` in network namespace `netns` (`nsenter --net`, which
/// leaves the mount namespace alone; then as [`add`]).
pub fn add_in(netns: &str, ruleset: &str) -> anyhow::Result<()> {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{netns}"))
        .arg("unshare");
    load(command, ruleset)
}

/// Runs `unshare` (as `command` starts it) `-m sh -c LOAD` with `ruleset`
/// on stdin.
fn load(mut command: Command, ruleset: &str) -> anyhow::Result<()> {
    let mut child = command
        .args(["-m", "sh", "-c", LOAD])
        .stdin(Stdio::piped())
        .spawn()
        .context("unshare + nft")?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(ruleset.as_bytes())?;
    ensure!(
        child.wait()?.success(),
        "loading the nft SNAT ruleset failed"
    );
    Ok(())
}

/// Deletes the table; quiet when it is not there (cleanup after any run).
pub fn delete() {
    let _ = Command::new("nft")
        .args(["delete", "table", "ip", TABLE])
        .stderr(Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::ruleset;

    /// The module doc shows the ruleset the bench loads, line for line.
    #[test]
    fn the_doc_shows_the_ruleset() {
        let source = include_str!("nft.rs");
        for line in ruleset().lines() {
            assert!(
                source.contains(&format!("//! {line}\n")),
                "the module doc lacks `{line}`"
            );
        }
    }
}
