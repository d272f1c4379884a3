//! `cargo xtask`: everything that is not plain cargo.
//!
//! * `demo` — attach examples/tcpoport.ini to a demo cgroup, connect from
//!   inside it to a loopback listener, print the origin ports it saw, clean up.

mod demo;

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show rulebpf at work on this machine (needs root), then clean up.
    Demo,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo => demo::run(),
    }
}
