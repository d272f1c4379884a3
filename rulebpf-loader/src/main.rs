//! `rulebpf`: parse the command line, run the command, turn its error into
//! the exit status. The commands are in `cli/`, the work in the library.

mod cli;

use std::{
    io::{self, Write as _},
    process::ExitCode,
};

use clap::Parser as _;
use cli::{Cli, CliError, Command};
use rulebpf_loader::with_causes;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_) | Command::Nri(_)) {
        // One-shot commands: warnings (a kernel feature missing, ...) as
        // `warning: ...` lines on stderr; `run` and `nri` set up their own
        // logger.
        env_logger::Builder::new()
            .filter_level(log::LevelFilter::Warn)
            .format(|out, record| {
                let level = record.level().as_str().to_ascii_lowercase();
                writeln!(out, "{level}: {}", record.args())
            })
            .init();
    }
    match cli::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`rulebpf stats | head -1`) is the reader's choice.
        Err(CliError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            let code = cli::exit_code(&e);
            // Bad input speaks for itself (`file:line:col: ...`); a runtime
            // failure says who failed. Writing to a closed stderr must not
            // panic either.
            let prefix = if code == 2 { "" } else { "rulebpf: " };
            let _ = writeln!(io::stderr(), "{prefix}{}", with_causes(&e));
            if cli::lacks_privilege(&e) {
                let _ = writeln!(
                    io::stderr(),
                    "rulebpf: this needs root (CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN): \
                     the pins in /sys/fs/bpf/rulebpf and the records in /run/rulebpf are root's"
                );
            }
            ExitCode::from(code)
        }
    }
}
