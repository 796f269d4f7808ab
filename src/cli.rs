//! The `slurm-egress` command line.
//!
//! Exit status: 0 done (or in sync), 1 drift found by `check`, 2 error. What changed goes to
//! stdout, one line each; diagnostics go to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};
use crate::node::{self, Node};

#[derive(Debug, Parser)]
#[command(
    name = "slurm-egress",
    version,
    about = "Gives the jobs of selected Slurm accounts, users and groups a NATed path out; \
             every other process keeps the closed default path.",
    after_help = "Exit status: 0 success (for check: in sync), 1 drift (check only), 2 error."
)]
pub struct Cli {
    /// The site configuration.
    #[arg(long, short, global = true, value_name = "PATH", default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Log more (repeat for debug output). RUST_LOG overrides.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make this worker node's marking and policy routing match the config. Idempotent: only
    /// what differs is changed, the nftables part in one transaction.
    Apply {
        /// Print what would change and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Compare the live state with the config; print each difference. Exit 0 in sync, 1 drift.
    Check,
    /// Take out exactly what `apply` made.
    Remove,
}

/// Runs the parsed command line on a single-threaded runtime.
pub fn main(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("slurm-egress: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("slurm-egress: {}", chain(e.as_ref()));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

async fn run(cli: Cli) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match cli.command {
        Command::Apply { dry_run } => {
            let config = Config::load(&cli.config)?;
            let mut node = Node::load(&config).await?;
            if node.plan.is_empty() {
                println!("in sync: nothing to do");
                return Ok(ExitCode::SUCCESS);
            }
            print!("{}", node.plan);
            if dry_run {
                println!("dry run: {} change(s) not applied", node.plan.len());
                return Ok(ExitCode::SUCCESS);
            }
            node.apply().await?;
            println!("applied {} change(s)", node.plan.len());
            tracing::info!(changes = node.plan.len(), "node policy applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let config = Config::load(&cli.config)?;
            let node = Node::load(&config).await?;
            if node.plan.is_empty() {
                println!("in sync");
                Ok(ExitCode::SUCCESS)
            } else {
                print!("{}", node.plan);
                println!("drift: {} difference(s)", node.plan.len());
                Ok(ExitCode::from(1))
            }
        }
        Command::Remove => {
            let config = Config::load(&cli.config)?;
            let done = node::remove(&config).await?;
            if done.is_empty() {
                println!("nothing to remove");
            }
            for line in done {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
