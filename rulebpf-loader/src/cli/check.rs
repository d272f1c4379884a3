//! `rulebpf check` and `rulebpf explain`: a rule file read, compiled and
//! questioned; nothing in the kernel changes.

use std::{net::SocketAddr, path::PathBuf};

use rulebpf_common::Protocol;
use rulebpf_loader::{model::options::Sharing, report};
use rulebpf_rules::ruleset::RuleSet;

use super::{
    CliError,
    args::{LimitArgs, ProtocolArg, RULES_HELP},
    load, warn_ports,
};

#[derive(clap::Args)]
pub struct CheckArgs {
    #[arg(help = RULES_HELP)]
    rules: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn check(args: CheckArgs) -> Result<(), CliError> {
    let set = load(&args.rules, &args.limits)?;
    warn_ports(&set, Sharing::On, false);
    report::print(&report::Summary::of(&set), args.json)?;
    Ok(())
}

#[derive(clap::Args)]
pub struct ExplainArgs {
    #[arg(help = RULES_HELP)]
    rules: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
    /// Destination as IPv4:PORT or [IPv6]:PORT, e.g. 10.1.2.3:21,
    /// [2001:db8::10]:443, [::ffff:10.1.2.3]:21.
    destination: SocketAddr,
    /// The connecting socket's protocol.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp)]
    protocol: ProtocolArg,
    #[arg(long)]
    json: bool,
}

pub fn explain(args: ExplainArgs) -> Result<(), CliError> {
    let set = load(&args.rules, &args.limits)?;
    let explanation = decide(&set, args.destination, args.protocol.into())?;
    report::print(&explanation, args.json)?;
    Ok(())
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
