//! `rulebpf check` and `rulebpf explain`: a rule file read, compiled and
//! questioned; nothing in the kernel changes.

use std::net::{IpAddr, SocketAddr};

use rulebpf_common::Protocol;
use rulebpf_loader::{model::options::Sharing, report};
use rulebpf_rules::{resolve, ruleset::RuleSet};

use super::{
    CliError,
    args::{ProtocolArg, RulesArgs},
    warn_ports,
};

#[derive(clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    rules: RulesArgs,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn check(args: CheckArgs) -> Result<(), CliError> {
    let set = args.rules.load()?;
    warn_ports(&set, Sharing::On, false);
    report::print(&report::Summary::of(&set), args.json)?;
    Ok(())
}

#[derive(clap::Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    rules: RulesArgs,
    /// Destination as IPv4:PORT, [IPv6]:PORT or NAME:PORT, e.g.
    /// 10.1.2.3:21, [2001:db8::10]:443, [::ffff:10.1.2.3]:21,
    /// sftp.partner.example:22 (each address of the name is explained: the
    /// file's own answer for a name it uses, else the system resolver's).
    destination: String,
    /// The connecting socket's protocol.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp)]
    protocol: ProtocolArg,
    #[arg(long)]
    json: bool,
}

pub fn explain(args: ExplainArgs) -> Result<(), CliError> {
    let set = args.rules.load()?;
    let protocol = args.protocol.into();
    if let Ok(destination) = args.destination.parse::<SocketAddr>() {
        report::print(&decide(&set, destination, protocol)?, args.json)?;
        return Ok(());
    }
    let (name, addresses, port) = resolve_destination(&set, &args.destination)?;
    let explanations = addresses
        .into_iter()
        .map(|addr| {
            let mut explanation = decide(&set, SocketAddr::new(addr, port), protocol)?;
            explanation.name = Some(name.clone());
            Ok(explanation)
        })
        .collect::<Result<Vec<_>, CliError>>()?;
    report::print(&report::Explanations(explanations), args.json)?;
    Ok(())
}

/// `NAME:PORT` as the name, its addresses and the port: the file's own
/// answer for a name its rules use (what the hook matches), else the
/// system resolver's.
fn resolve_destination(set: &RuleSet, text: &str) -> Result<(String, Vec<IpAddr>, u16), CliError> {
    let bad = |why: String| CliError::Destination(format!("`{text}`: {why}"));
    let (name, port) = text
        .rsplit_once(':')
        .ok_or_else(|| bad("give IPv4:PORT, [IPv6]:PORT or NAME:PORT".into()))?;
    let port: u16 = port
        .parse()
        .map_err(|_| bad(format!("`{port}` is not a port (0-65535)")))?;
    let addresses = match resolve::addresses(&set.names, name) {
        Some(known) => known.to_vec(),
        None => {
            resolve::resolve(name).map_err(|why| bad(format!("{name} does not resolve: {why}")))?
        }
    };
    if addresses.is_empty() {
        return Err(bad(format!("{name} has no address")));
    }
    Ok((name.to_string(), addresses, port))
}

/// The deciding rule for `destination`, computed twice: as the hook does and
/// by the reference first match; they must agree.
fn decide(
    set: &RuleSet,
    destination: SocketAddr,
    protocol: Protocol,
) -> Result<report::Explanation, CliError> {
    let (addr, port) = (destination.ip(), destination.port());
    let compiled = set.compiled.lookup(protocol, addr, port).map(|v| v.rule);
    let reference = rulebpf_rules::first_match(&set.rules, &set.names, protocol, addr, port);
    if compiled.map(|r| r as usize) != reference {
        return Err(CliError::LookupMismatch {
            compiled,
            reference,
        });
    }
    let matched_as = rulebpf_rules::rule::canonical(addr);
    Ok(report::Explanation::of(
        set,
        destination,
        protocol,
        matched_as,
        reference,
    ))
}
