//! `rulebpf probe`: connect from inside a cgroup and print the origin port
//! each connection got.

use std::{net::SocketAddr, path::PathBuf};

use rulebpf_loader::{ops::probe, report, sys::cgroup::Cgroup};

use super::{
    CliError,
    args::{CGROUP_HELP, ProtocolArg},
};

#[derive(clap::Args)]
pub struct ProbeArgs {
    #[arg(long, help = CGROUP_HELP)]
    cgroup: PathBuf,
    /// Destination as IPv4:PORT or [IPv6]:PORT.
    destination: SocketAddr,
    /// TCP connections, or connected UDP sockets sending one datagram.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp)]
    protocol: ProtocolArg,
    /// Connect to an IPv4 destination from a dual-stack IPv6 socket
    /// (at ::ffff:a.b.c.d), as Java does.
    #[arg(long)]
    dual_stack: bool,
    /// Number of connections, made one after the other.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Keep all connections open until the last is made (each then needs
    /// its own origin port).
    #[arg(long)]
    hold: bool,
    /// With --hold: keep the connections open until standard input
    /// ends, so that a script decides when they close.
    #[arg(long, requires = "hold")]
    hold_until_eof: bool,
    /// Close each TCP connection at once, this side first (it keeps the
    /// TIME_WAIT), instead of waiting up to 2 s for the peer to close.
    #[arg(long)]
    close_first: bool,
    /// Bind this origin port before connect(), as an application that
    /// chooses its own port does (rulebpf must leave it alone).
    #[arg(long)]
    bind_port: Option<u16>,
    #[arg(long)]
    json: bool,
}

pub fn probe(args: ProbeArgs) -> Result<(), CliError> {
    let cgroup = Cgroup::resolve(&args.cgroup)?;
    probe::enter(&cgroup)?;
    let outcomes = probe::run(&probe::Probe {
        dest: args.destination,
        protocol: args.protocol.into(),
        dual_stack: args.dual_stack,
        count: args.count,
        hold: args.hold,
        hold_until_eof: args.hold_until_eof,
        close_first: args.close_first,
        bind_port: args.bind_port,
    });
    let report = report::ProbeReport {
        destination: args.destination,
        outcomes,
    };
    report::print(&report, args.json)?;
    match report.failures() {
        0 => Ok(()),
        failed => Err(CliError::ProbeFailed {
            failed,
            count: report.outcomes.len(),
        }),
    }
}
