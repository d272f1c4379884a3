//! `rulebpf firewall`: the perimeter firewall's rules, from the rule file.

use std::net::IpAddr;

use clap::ValueEnum;
use rulebpf_loader::{
    report::{
        self,
        firewall::{FirewallExport, Format},
    },
    sys::{addresses, ephemeral, time::unix_now},
};
use rulebpf_rules::{paths, rule::PortRange};

use super::{CliError, args::RulesArgs};

/// The output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// A complete nft table for a forwarding firewall (`nft -f`).
    Nft,
    /// `iptables-restore` input (IPv4 paths).
    Iptables,
    /// The table the firewall team reads, as CSV.
    Csv,
    /// The same table in Markdown.
    Markdown,
}

#[derive(clap::Args)]
pub struct FirewallArgs {
    #[command(flatten)]
    rules: RulesArgs,
    /// The gateway's address(es) as the firewall sees them (comma-separated,
    /// repeatable). Default: this host's global addresses (the output says
    /// so).
    #[arg(long, value_delimiter = ',')]
    source: Vec<IpAddr>,
    #[arg(long, value_enum, default_value_t = FormatArg::Nft)]
    format: FormatArg,
    /// Also open each allowed path's replies (for packet filters without
    /// connection tracking; UDP responses).
    #[arg(long)]
    stateless: bool,
}

pub fn firewall(args: FirewallArgs) -> Result<(), CliError> {
    let set = args.rules.load()?;
    let (sources, sources_note) = if args.source.is_empty() {
        let found = addresses::global().map_err(CliError::Addresses)?;
        if found.is_empty() {
            return Err(CliError::Usage(
                "this host has no global address: give the gateway's with --source",
            ));
        }
        (
            found,
            Some("Sources: this host's global addresses (no --source given).".to_string()),
        )
    } else {
        (args.source, None)
    };
    let (lo, hi) = ephemeral::ephemeral_range().map_err(CliError::Addresses)?;
    let export = FirewallExport {
        rules_file: set.path.clone(),
        sources,
        sources_note,
        entries: paths::entries(&set, PortRange { lo, hi }),
        resolved_at: report::time(unix_now()),
        stateless: args.stateless,
        format: match args.format {
            FormatArg::Nft => Format::Nft,
            FormatArg::Iptables => Format::Iptables,
            FormatArg::Csv => Format::Csv,
            FormatArg::Markdown => Format::Markdown,
        },
    };
    print!("{export}");
    Ok(())
}
