//! What the plugin does at job start and end: the shared job logic of [`crate::jobs`], with
//! the outcome logged to slurmd's log and errors turned into a prolog/epilog failure or not,
//! as `[jobs] on_error` says.
//!
//! What this can rely on and must cope with (observed on Slurm 22.05.8):
//! * it runs in a short-lived root process (`slurmstepd spank prolog|epilog`, a child of
//!   slurmd) in slurmd's network namespace, once per job and node, with no `PATH`;
//! * a failed prolog with `required` in plugstack.conf drains the node ("Prolog error") and
//!   requeues the job held; with `optional` the failure is only logged;
//! * the epilog also runs when the prolog failed, and on every node of a multi-node job even
//!   where no prolog ran: ending a job the ledger does not know is not an error.

use std::error::Error;
use std::path::Path;

use crate::config::{self, Config, OnError};
use crate::jobs::{self, Attached, Ended, Started};
use crate::ledger;
use crate::spank::args::PluginArgs;
use crate::spank::job::JobInfo;
use crate::spank::log;

pub type HookResult = Result<(), Box<dyn Error + Send + Sync>>;

fn load(args: &PluginArgs) -> Result<Config, config::Error> {
    let path = args
        .config
        .as_deref()
        .unwrap_or(Path::new(config::DEFAULT_PATH));
    Config::load(path)
}

fn node(job: &JobInfo) -> String {
    job.node.clone().unwrap_or_else(ledger::default_node)
}

/// The job is about to start on this node.
pub fn on_job_start(args: &PluginArgs, job: &JobInfo) -> HookResult {
    // Without a config the policy (including on_error) is unknown: fail, which drains.
    let config = load(args)?;
    let request = jobs::Job {
        id: job.job_id,
        uid: job.uid,
        account: job.account.clone(),
        node: node(job),
    };
    match jobs::start(&config, &request) {
        Ok(Started::Selected(reason)) => {
            log::info(&format!(
                "job {}: uid {} selected ({reason}) on {}: egress path on",
                job.job_id, job.uid, request.node
            ));
            Ok(())
        }
        Ok(Started::AlreadyTracked) => {
            log::verbose(&format!("job {}: already recorded", job.job_id));
            Ok(())
        }
        Ok(Started::NotSelected) => {
            log::debug(&format!("job {}: uid {} not selected", job.job_id, job.uid));
            Ok(())
        }
        Err(e) => failed(&config, job, "start", e, "the job runs without egress"),
    }
}

/// A task of the job is starting on this node (`by = "cgroup"` only does anything).
pub fn on_task_start(args: &PluginArgs, job_id: u32) -> HookResult {
    let config = load(args)?;
    match jobs::attach(&config, job_id) {
        Ok(Attached::Joined { cgroup, first }) => {
            if first {
                log::info(&format!(
                    "job {job_id}: cgroup {} (id {}, level {}) egress path on",
                    cgroup.path, cgroup.id, cgroup.level
                ));
            }
            Ok(())
        }
        Ok(Attached::NotSelected) => Ok(()),
        Err(e) => match config.jobs.on_error {
            OnError::Drain => Err(format!("task start: {e}").into()),
            OnError::Continue => {
                log::error(&format!(
                    "job {job_id}: task start: {e} (on_error = \"continue\": the task runs \
                     without egress)"
                ));
                Ok(())
            }
        },
    }
}

/// The job has ended on this node.
pub fn on_job_end(args: &PluginArgs, job: &JobInfo) -> HookResult {
    let config = load(args)?;
    match jobs::end(&config, job.job_id, &node(job)) {
        Ok(ended @ Ended::Removed { .. }) => {
            log::info(&format!("job {}: ended; {}", job.job_id, ended.summary()));
            Ok(())
        }
        Ok(Ended::NotTracked) => Ok(()),
        Err(e) => failed(
            &config,
            job,
            "end",
            e,
            "the next `slurm-egress apply` corrects the set",
        ),
    }
}

/// Fails the callback (drain) or logs and carries on, as `[jobs] on_error` says.
fn failed(config: &Config, job: &JobInfo, what: &str, e: jobs::Error, then: &str) -> HookResult {
    match config.jobs.on_error {
        OnError::Drain => Err(format!("{what}: {e}").into()),
        OnError::Continue => {
            log::error(&format!(
                "job {}: {what}: {e} (on_error = \"continue\": {then})",
                job.job_id
            ));
            Ok(())
        }
    }
}
