//! Job start and end, shared by the SPANK plugin and `slurm-egress job start|end`: decide
//! whether the job is selected, then change the node's ledger and the `jobs` set together,
//! under the ledger lock.
//!
//! With `by = "cgroup"` the decision is still made at job start, from slurmd's environment
//! (the only trustworthy place), and recorded; the job's cgroup only exists once its tasks
//! start, so [`attach`], run in each task before it execs, puts the task in the job's cgroup
//! and adds that cgroup to the set, learning from the ledger whether the job was selected.
//!
//! Synchronous on purpose: this runs inside slurmd's prolog and epilog processes, where
//! threads and async runtimes have no place.
//!
//! Those processes are short-lived, and closing an nftables socket after a recent removal in
//! the network namespace waits for the kernel (an RCU grace period, 5-30 ms, under the
//! nftables mutex). So the set change goes through `slurm-egress watch` when it serves this
//! namespace (its socket never closes); without it, the change is made here and the socket
//! let go with [`Netfilter::close_detached`].

use std::time::{SystemTime, UNIX_EPOCH};

use crate::cgroup::{self, Hierarchy, JobCgroup};
use crate::config::{By, Config};
use crate::ledger::{self, Ledger};
use crate::netfilter::{self, Netfilter};
use crate::node;
use crate::selection::{self, Reason, Selection};
use crate::watch::{self, Member, SetChange};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Selection(#[from] selection::Error),
    #[error(transparent)]
    Ledger(#[from] ledger::Error),
    #[error("{0} (is the node policy applied? run `slurm-egress apply`)")]
    Netfilter(#[from] netfilter::Error),
    #[error("slurm-egress watch could not change the set: {0} (is the node policy applied?)")]
    Watch(String),
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    #[error(
        "no nftables table inet {} here: run `slurm-egress apply`",
        node::TABLE
    )]
    NotApplied,
}

/// A job starting on a node, as slurmd describes it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: u32,
    pub uid: u32,
    /// From slurmd's own environment (`SLURM_JOB_ACCOUNT`), never the job's.
    pub account: Option<String>,
    /// The Slurm node name (`SLURMD_NODENAME`).
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// The job is selected: its owner is in the set (`by = "uid"`), or its tasks will put
    /// its cgroup there (`by = "cgroup"`).
    Selected(Reason),
    /// The ledger already had this job (a prolog run twice): nothing changed.
    AlreadyTracked,
    NotSelected,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The job was selected; `released` says whether its set member left the set (with
    /// `by = "uid"`, not while another selected job of the owner runs here); `moved` counts
    /// the processes it left in its own cgroup, which were moved out.
    Removed {
        uid: u32,
        released: bool,
        moved: usize,
    },
    /// The job was not in the ledger: not selected, or already ended.
    NotTracked,
}

impl Ended {
    /// What happened, for logs: "uid 1001 egress path off".
    pub fn summary(&self) -> String {
        let Ended::Removed {
            uid,
            released,
            moved,
        } = self
        else {
            return "not recorded here".to_owned();
        };
        let mut line = if *released {
            format!("uid {uid} egress path off")
        } else {
            format!("uid {uid} keeps the egress path for its other selected jobs")
        };
        if *moved > 0 {
            line += &format!("; {moved} processes it left behind moved out of its cgroup");
        }
        line
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attached {
    /// The task is in the job's cgroup; `first` says whether this task recorded it and put
    /// it in the set.
    Joined { cgroup: JobCgroup, first: bool },
    /// The job is not in this node's ledger: not selected (or `by = "uid"`).
    NotSelected,
}

/// Records a starting job and gives its owner the egress path if it is selected. On any
/// failure nothing is left changed.
pub fn start(config: &Config, job: &Job) -> Result<Started, Error> {
    let Some(reason) = selection::job_reason(config, job.uid, job.account.as_deref())? else {
        return Ok(Started::NotSelected);
    };
    let ledger = Ledger::lock(&config.jobs.state_dir)?;
    if ledger.job(&job.node, job.id)?.is_some() {
        return Ok(Started::AlreadyTracked);
    }
    let record = ledger::Job {
        id: job.id,
        uid: job.uid,
        reason: reason.to_string(),
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        cgroup: None,
    };
    // By cgroup, the set changes when the first task joins the job's cgroup; a node without
    // the policy fails here all the same, where a failure drains the node.
    if config.select.by != By::Uid {
        let mut nft = Netfilter::open()?;
        if nft.read(netfilter::Family::Inet, node::TABLE)?.is_none() {
            return Err(Error::NotApplied);
        }
        ledger.record(&job.node, &record)?;
        return Ok(Started::Selected(reason));
    }
    ledger.record(&job.node, &record)?;
    if let Err(e) = change_set(config, SetChange::Add(Member::Uid(job.uid))) {
        // Undo the record, so that the ledger never promises what the set does not hold.
        ledger.forget(&job.node, job.id)?;
        return Err(e);
    }
    Ok(Started::Selected(reason))
}

/// Forgets an ending job. By uid, its owner leaves the set when no other selected job of
/// theirs runs on any node in this network namespace; by cgroup, its cgroup leaves the set,
/// and the cgroup is removed if slurm-egress made it.
pub fn end(config: &Config, id: u32, node_name: &str) -> Result<Ended, Error> {
    let ledger = Ledger::lock(&config.jobs.state_dir)?;
    let Some(job) = ledger.forget(node_name, id)? else {
        return Ok(Ended::NotTracked);
    };
    let mut moved = 0;
    let released = match (&config.select.by, &job.cgroup) {
        (By::Uid, _) => {
            let released = !ledger.runs_here(job.uid)?;
            if released {
                change_set(config, SetChange::Remove(Member::Uid(job.uid)))?;
            }
            released
        }
        // No task ever started here: nothing to take back.
        (By::Cgroup { .. }, None) => true,
        (By::Cgroup { .. }, Some(c)) => {
            // The nodes where the same job still runs in this cgroup: a second slurmd in
            // this namespace keeps its set member, one anywhere keeps the cgroup itself.
            let here = ledger::current_netns()?;
            let holders: Vec<String> = ledger
                .find(id)?
                .into_iter()
                .filter(|r| r.job.cgroup.as_ref().is_some_and(|o| o.id == c.id))
                .map(|r| r.netns)
                .collect();
            if !holders.contains(&here) {
                change_set(config, SetChange::Remove(Member::Cgroup(c.id)))?;
            }
            if c.own && holders.is_empty() {
                moved = Hierarchy::find()?.release(&c.path)?;
            }
            true
        }
    };
    Ok(Ended::Removed {
        uid: job.uid,
        released,
        moved,
    })
}

/// Called in each task of a job as it starts (root, before exec): if the job was selected on
/// this node, puts the task in the job's cgroup, and the first task puts that cgroup in the
/// set. With `by = "uid"` it does nothing.
pub fn attach(config: &Config, job_id: u32) -> Result<Attached, Error> {
    let By::Cgroup { parent } = &config.select.by else {
        return Ok(Attached::NotSelected);
    };
    let ledger = Ledger::lock(&config.jobs.state_dir)?;
    let here = ledger::current_netns()?;
    let mut records = ledger.find(job_id)?;
    records.retain(|r| r.netns == here);
    if records.is_empty() {
        return Ok(Attached::NotSelected);
    }
    let cgroup = Hierarchy::find()?.join(job_id, parent)?;
    if records
        .iter()
        .all(|r| r.job.cgroup.as_ref() == Some(&cgroup))
    {
        return Ok(Attached::Joined {
            cgroup,
            first: false,
        });
    }
    for r in &records {
        let mut job = r.job.clone();
        job.cgroup = Some(cgroup.clone());
        ledger.record(&r.node, &job)?;
    }
    let added = if ledger.add_level(cgroup.level)? {
        // A level the table has no rule for yet (Slurm's layout, first seen): the table
        // changes shape, in one transaction with the new member.
        // (By cgroup, the table does not depend on the static selection.)
        let table = node::table(config, &Selection::default(), &ledger.running_here()?);
        reshape(&table)
    } else {
        change_set(config, SetChange::Add(Member::Cgroup(cgroup.id)))
    };
    if let Err(e) = added {
        // As at job start: the ledger never promises what the set does not hold.
        for r in &records {
            ledger.record(&r.node, &r.job)?;
        }
        return Err(e);
    }
    Ok(Attached::Joined {
        cgroup,
        first: true,
    })
}

/// Replaces the node's table with `table`, if the node policy is applied.
fn reshape(table: &netfilter::Table) -> Result<(), Error> {
    let mut nft = Netfilter::open()?;
    if nft.read(table.family, &table.name)?.is_none() {
        return Err(Error::NotApplied);
    }
    nft.apply(table)?;
    nft.close_detached();
    Ok(())
}

/// Makes a change to the `jobs` set: through `slurm-egress watch` if it serves this network
/// namespace, else in-process. Called with the ledger lock held.
fn change_set(config: &Config, change: SetChange) -> Result<(), Error> {
    if let Ok(path) = watch::socket_path(&config.jobs.state_dir)
        && let Some(reply) = ask_watch(&path, change)
    {
        return match reply.strip_prefix("ok") {
            Some(_) => Ok(()),
            None => Err(Error::Watch(reply)),
        };
    }
    let mut nft = Netfilter::open()?;
    change.apply(&mut nft)?;
    nft.close_detached();
    Ok(())
}

/// The watch's one-line answer, or `None` if no watch answers (not running, another
/// namespace's, stuck): the caller then does the work itself, which is safe to repeat.
fn ask_watch(path: &std::path::Path, change: SetChange) -> Option<String> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path).ok()?;
    stream
        .set_write_timeout(Some(std::time::Duration::from_secs(1)))
        .ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .ok()?;
    stream.write_all(format!("{change}\n").as_bytes()).ok()?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).ok()?;
    let reply = reply.trim().to_owned();
    (!reply.is_empty()).then_some(reply)
}
