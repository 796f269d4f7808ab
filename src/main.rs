use std::process::ExitCode;

use clap::Parser;
use slurm_egress::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon says what it does by default; one-shot commands print their results and
    // only log problems.
    let daemon = matches!(cli.command, cli::Command::Watch { .. });
    let level = match (cli.verbose, daemon) {
        (0, false) => "warn",
        (0, true) | (1, _) => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .init();
    cli::main(cli)
}
