//! The `slurm-egress` command line.
//!
//! Exit status: 0 done (or in sync), 1 drift found by `check`, 2 error. What changed goes to
//! stdout, one line each; diagnostics go to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, OnError};
use crate::jobs::{self, Ended, Started};
use crate::ledger::{self, Ledger};
use crate::node::{self, Handles, Node};
use crate::watch;

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
    /// Job start and end, for sites that run `Prolog=`/`Epilog=` scripts instead of the SPANK
    /// plugin. Values default to the variables slurmd sets for those scripts.
    #[command(subcommand)]
    Job(JobCommand),
    /// Keep the node policy true: repair it whenever links, addresses, routes, rules, the
    /// nftables table or its set members change (a link flap drops every route), and every
    /// --interval. Logs one line per repair; backs off while the kernel refuses. Also serves
    /// the plugin's set changes. Reloads the config on SIGHUP; stops on SIGTERM.
    Watch {
        /// Seconds between full checks besides the kernel's change notifications. Each also
        /// reads the selected groups' members from NSS again, which sends no notification.
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        interval: u64,
    },
    /// List the selected jobs recorded for a node.
    Jobs {
        /// The Slurm node name [default: this host's short name].
        #[arg(long, env = "SLURMD_NODENAME")]
        node: Option<String>,
        /// Every node recorded on this host.
        #[arg(long, conflicts_with = "node")]
        all: bool,
    },
    /// The NAT router role (needs a [router] section): forwarding and NAT, and the configs
    /// and hooks for keepalived and conntrackd.
    #[command(subcommand)]
    Router(crate::router::cli::RouterCommand),
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// A job starts: if it is selected, record it and give its owner the egress path.
    Start {
        #[arg(long, env = "SLURM_JOB_ID")]
        job_id: u32,
        #[arg(long, env = "SLURM_JOB_UID")]
        uid: u32,
        /// Trusted only from slurmd's own environment, never from the job's.
        #[arg(long, env = "SLURM_JOB_ACCOUNT")]
        account: Option<String>,
        /// The Slurm node name [default: this host's short name].
        #[arg(long, env = "SLURMD_NODENAME")]
        node: Option<String>,
    },
    /// A job ended: forget it; its owner loses the egress path with their last selected job.
    End {
        #[arg(long, env = "SLURM_JOB_ID")]
        job_id: u32,
        /// The Slurm node name [default: this host's short name].
        #[arg(long, env = "SLURMD_NODENAME")]
        node: Option<String>,
    },
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
            node::require_root()?;
            let mut handles = Handles::open()?;
            let node = Node::load(&config, &mut handles).await?;
            if node.plan.is_empty() {
                println!("in sync: nothing to do");
                return Ok(ExitCode::SUCCESS);
            }
            print!("{}", node.plan);
            if dry_run {
                println!("dry run: {} change(s) not applied", node.plan.len());
                return Ok(ExitCode::SUCCESS);
            }
            node.apply(&mut handles).await?;
            println!("applied {} change(s)", node.plan.len());
            tracing::info!(changes = node.plan.len(), "node policy applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let config = Config::load(&cli.config)?;
            node::require_root()?;
            let node = Node::load(&config, &mut Handles::open()?).await?;
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
            node::require_root()?;
            let done = node::remove(&config, &mut Handles::open()?).await?;
            if done.is_empty() {
                println!("nothing to remove");
            }
            for line in done {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { interval } => {
            watch::run(&cli.config, std::time::Duration::from_secs(interval)).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Job(command) => {
            let config = Config::load(&cli.config)?;
            node::require_root()?;
            job(&config, command)
        }
        Command::Jobs { node, all } => {
            let config = Config::load(&cli.config)?;
            node::require_root()?;
            let ledger = Ledger::lock(&config.jobs.state_dir)?;
            let nodes = if all {
                ledger.all()?
            } else {
                vec![ledger.read(&node.unwrap_or_else(ledger::default_node))?]
            };
            println!(
                "{:<12} {:>10} {:>8} {:<16} {:<24} {:<11} CGROUP",
                "NODE", "JOB", "UID", "USER", "REASON", "RUNNING"
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            for n in &nodes {
                for j in &n.jobs {
                    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(j.uid))
                        .ok()
                        .flatten()
                        .map(|u| u.name)
                        .unwrap_or_else(|| "-".into());
                    let secs = now.saturating_sub(j.started);
                    let running =
                        format!("{}h{:02}m{:02}s", secs / 3600, secs / 60 % 60, secs % 60);
                    let cgroup = j.cgroup.as_ref().map_or("-", |c| c.path.as_str());
                    println!(
                        "{:<12} {:>10} {:>8} {:<16} {:<24} {running:<11} {cgroup}",
                        n.node, j.id, j.uid, user, j.reason,
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Router(command) => crate::router::cli::run(&cli.config, command).await,
    }
}

fn job(config: &Config, command: JobCommand) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let (what, result) = match command {
        JobCommand::Start {
            job_id,
            uid,
            account,
            node,
        } => {
            let job = jobs::Job {
                id: job_id,
                uid,
                account,
                node: node.unwrap_or_else(ledger::default_node),
            };
            let outcome = jobs::start(config, &job).map(|started| match started {
                Started::Selected(reason) => {
                    format!("job {job_id}: uid {uid} selected ({reason}): egress path on")
                }
                Started::AlreadyTracked => format!("job {job_id}: already recorded"),
                Started::NotSelected => format!("job {job_id}: uid {uid} not selected"),
            });
            ("start", outcome)
        }
        JobCommand::End { job_id, node } => {
            let node = node.unwrap_or_else(ledger::default_node);
            let outcome = jobs::end(config, job_id, &node).map(|ended| match ended {
                Ended::Removed { .. } => format!("job {job_id}: ended; {}", ended.summary()),
                Ended::NotTracked => format!("job {job_id}: not recorded on {node}"),
            });
            ("end", outcome)
        }
    };
    match result {
        Ok(line) => {
            println!("{line}");
            Ok(ExitCode::SUCCESS)
        }
        // Like the plugin: an error fails the prolog/epilog script (Slurm drains the node)
        // unless the site chose to carry on.
        Err(e) if config.jobs.on_error == OnError::Continue => {
            eprintln!(
                "slurm-egress: job {what}: {} (on_error = \"continue\")",
                chain(&e)
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every slurm-egress command line in the worker units, without the program name.
    fn commands(unit: &str) -> Vec<Vec<&str>> {
        unit.lines()
            .filter_map(|l| l.split_once('=').map(|(_, v)| v))
            .filter_map(|v| v.strip_prefix("/usr/sbin/slurm-egress "))
            .map(|v| v.split_whitespace().collect())
            .collect()
    }

    /// The units are only text: parse their command lines with the real parser, so that a
    /// renamed flag or subcommand fails here and not at a node's boot.
    #[test]
    fn the_shipped_worker_units_run_valid_commands() {
        let apply = include_str!("../slurm/slurm-egress-apply.service");
        let watch = include_str!("../slurm/slurm-egress.service");
        let mut seen = Vec::new();
        for line in commands(apply).into_iter().chain(commands(watch)) {
            let cli = Cli::try_parse_from(std::iter::once("slurm-egress").chain(line.clone()))
                .unwrap_or_else(|e| panic!("{line:?}: {e}"));
            assert_eq!(cli.config, std::path::Path::new(config::DEFAULT_PATH));
            seen.push(cli.command);
        }
        assert!(matches!(
            seen[..],
            [
                Command::Apply { dry_run: false },
                Command::Apply { dry_run: false },
                Command::Watch { interval: 60 }
            ]
        ));
        assert!(watch.contains("After=slurm-egress-apply.service "));
        assert!(apply.contains("Before=slurmd.service slurm-egress.service\n"));
    }
}
