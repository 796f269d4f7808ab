//! `slurm-egress router ...`: the router role's commands. Output and exit status as for the
//! worker commands: changes on stdout, one line each; 0 done (or in sync), 1 drift, 2 error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use super::Transition;
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum RouterCommand {
    /// Make this node a NAT router: forwarding on the inside and outside interfaces only,
    /// and the filter and NAT table, in one transaction. Idempotent.
    Apply {
        /// Print what would change and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Compare the live state with the config; print each difference. Exit 0 in sync, 1 drift.
    Check,
    /// Take out what `apply` made; forwarding goes back to what `apply` found.
    Remove,
    /// Print keepalived.conf for this router (VRRP for the virtual IP and public_ip).
    KeepalivedConfig {
        /// Write it to this file (atomically) instead.
        #[arg(long, value_name = "PATH")]
        output: Option<PathBuf>,
    },
    /// Print conntrackd.conf for this router (connection state sync). The notify hook expects
    /// conntrackd to run with it as <state_dir>/conntrackd.conf.
    ConntrackdConfig {
        /// Write it to this file (atomically) instead.
        #[arg(long, value_name = "PATH")]
        output: Option<PathBuf>,
    },
    /// keepalived's notify hook: hand connection state over through conntrackd.
    Notify {
        /// The state keepalived entered.
        #[arg(value_enum)]
        state: Transition,
    },
    /// Remove virtual_ip and public_ip from this node's interfaces, where a killed keepalived
    /// left them. For keepalived's unit, before it starts and after it stops.
    Release,
}

fn emit(text: &str, output: Option<&Path>) -> Result<(), super::Error> {
    match output {
        Some(path) => super::write_file(path, text),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn lines(done: Vec<String>, nothing: &str) {
    if done.is_empty() {
        println!("{nothing}");
    }
    for line in done {
        println!("{line}");
    }
}

pub async fn run(
    config: &Path,
    command: RouterCommand,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let config = Config::load(config)?;
    match command {
        RouterCommand::Apply { dry_run } => {
            let mut router = super::Router::load(&config).await?;
            if router.plan.is_empty() {
                println!("in sync: nothing to do");
                return Ok(ExitCode::SUCCESS);
            }
            print!("{}", router.plan);
            if dry_run {
                println!("dry run: {} change(s) not applied", router.plan.len());
                return Ok(ExitCode::SUCCESS);
            }
            router.apply().await?;
            println!("applied {} change(s)", router.plan.len());
            tracing::info!(changes = router.plan.len(), "router applied");
            Ok(ExitCode::SUCCESS)
        }
        RouterCommand::Check => {
            let router = super::Router::load(&config).await?;
            if router.plan.is_empty() {
                println!("in sync");
                Ok(ExitCode::SUCCESS)
            } else {
                print!("{}", router.plan);
                println!("drift: {} difference(s)", router.plan.len());
                Ok(ExitCode::from(1))
            }
        }
        RouterCommand::Remove => {
            lines(super::remove(&config).await?, "nothing to remove");
            Ok(ExitCode::SUCCESS)
        }
        RouterCommand::KeepalivedConfig { output } => {
            emit(&super::keepalived_config(&config).await?, output.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        RouterCommand::ConntrackdConfig { output } => {
            emit(&super::conntrackd_config(&config).await?, output.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        RouterCommand::Notify { state } => {
            let report = super::notify(&config, state)?;
            for line in &report.lines {
                println!("{line}");
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        RouterCommand::Release => {
            lines(super::release(&config).await?, "nothing to release");
            Ok(ExitCode::SUCCESS)
        }
    }
}
