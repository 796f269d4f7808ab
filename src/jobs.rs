//! Job start and end, shared by the SPANK plugin and `slurm-egress job start|end`: decide
//! whether the job is selected, then change the node's ledger and the `jobs` set together,
//! under the ledger lock.
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

use crate::config::Config;
use crate::ledger::{self, Ledger};
use crate::netfilter::{self, Netfilter};
use crate::selection::{self, Reason};
use crate::watch::{self, SetChange};

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
    /// The job is selected; its owner is in the set.
    Selected(Reason),
    /// The ledger already had this job (a prolog run twice): nothing changed.
    AlreadyTracked,
    NotSelected,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The job was selected; `released` says whether its owner left the set (no other
    /// selected job of theirs runs here).
    Removed { uid: u32, released: bool },
    /// The job was not in the ledger: not selected, or already ended.
    NotTracked,
}

/// Records a starting job and gives its owner the egress path if it is selected. On any
/// failure nothing is left changed.
pub fn start(config: &Config, job: &Job) -> Result<Started, Error> {
    let Some(reason) = selection::job_reason(config, job.uid, job.account.as_deref())? else {
        return Ok(Started::NotSelected);
    };
    let ledger = Ledger::lock(&config.jobs.state_dir)?;
    let mut node = ledger.read(&job.node)?;
    if node.jobs.iter().any(|j| j.id == job.id) {
        return Ok(Started::AlreadyTracked);
    }
    let before = node.clone();
    node.jobs.push(ledger::Job {
        id: job.id,
        uid: job.uid,
        reason: reason.to_string(),
        started: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
    });
    ledger.write(&mut node)?;
    if let Err(e) = change_set(config, SetChange::Add(job.uid)) {
        // Undo the record, so that the ledger never promises what the set does not hold.
        let mut before = before;
        ledger.write(&mut before)?;
        return Err(e);
    }
    Ok(Started::Selected(reason))
}

/// Forgets an ending job; its owner leaves the set when no other selected job of theirs runs
/// on any node in this network namespace.
pub fn end(config: &Config, id: u32, node_name: &str) -> Result<Ended, Error> {
    let ledger = Ledger::lock(&config.jobs.state_dir)?;
    let mut node = ledger.read(node_name)?;
    let Some(at) = node.jobs.iter().position(|j| j.id == id) else {
        return Ok(Ended::NotTracked);
    };
    let job = node.jobs.remove(at);
    ledger.write(&mut node)?;
    let released = !ledger.runs_here(job.uid, &node)?;
    if released {
        change_set(config, SetChange::Remove(job.uid))?;
    }
    Ok(Ended::Removed {
        uid: job.uid,
        released,
    })
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
