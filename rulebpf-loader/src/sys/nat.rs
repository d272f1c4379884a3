//! This network namespace's source NAT, as nftables holds it: read with
//! `nft -j list ruleset` (iptables-nft's rules included; rules of the
//! legacy iptables backend are not there, and are not seen).

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::Command,
};

use rulebpf_rules::ruleset::RuleSet;

use crate::model::nat::{self, NatRule};

/// Where Debian and others install nft; never looked up in `PATH` (root
/// runs this).
const NFT: [&str; 3] = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"];

/// The NAT rules that could rewrite a connection's source here; `Err`
/// says why the ruleset could not be read. Without nft (the nftables
/// package) nothing is checked, and nothing said: a host without it
/// rarely has nftables NAT (README: "NAT").
pub fn nat_rules() -> Result<Vec<NatRule>, String> {
    nat_rules_in(None)
}

/// [`nat_rules`] of the network namespace `netns` (an open
/// `/proc/PID/ns/net`; `None`: ours): nft runs in it.
pub fn nat_rules_in(netns: Option<&File>) -> Result<Vec<NatRule>, String> {
    let Some(nft) = NFT.iter().find(|p| std::path::Path::new(p).exists()) else {
        return Ok(vec![]);
    };
    let mut command = Command::new(nft);
    command.args(["-j", "list", "ruleset"]);
    if let Some(netns) = netns {
        let fd = netns.as_raw_fd();
        // SAFETY: setns(2) between fork and exec touches no memory of the
        // parent; `fd` stays open until `output()` returns.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
    }
    let output = command
        .output()
        .map_err(|e| format!("running {nft}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{nft} -j list ruleset: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    // An empty ruleset prints nothing at all with some versions.
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(vec![]);
    }
    let json = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("{nft} -j list ruleset printed what this version cannot read: {e}"))?;
    Ok(nat::nat_rules(&json))
}

/// What an operator should know about `set` and this namespace's NAT, one
/// line each.
pub fn warnings(set: &RuleSet) -> Vec<String> {
    match nat_rules() {
        Ok(rules) => nat::warnings(&set.path.display().to_string(), &set.rules, &rules),
        Err(why) => vec![why],
    }
}
