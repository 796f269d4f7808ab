//! The job ledger: which selected jobs run on each Slurm node, so that a uid leaves the
//! `jobs` set only when its last selected job on the node ends, and so that `apply` can put
//! back set members that someone flushed.
//!
//! One directory per Slurm node, never per host (several slurmd may share a host), and one
//! small file per job in it:
//!
//! ```text
//! <state_dir>/nodes/<node>/node.json        the node's network namespace and boot
//! <state_dir>/nodes/<node>/jobs/<id>.json   one selected job
//! <state_dir>/nodes/<node>/uids/<uid>/<id>  empty: the index of the uid's jobs there
//! ```
//!
//! A file per job, not one per node, so that a job start or end costs the same with one or
//! a thousand jobs running: with a single file, each rewrote the whole ledger, and a burst of
//! 1000 jobs (500 ending while 500 start) was quadratic, 1.4-1.9 s on 2 cores; it is 0.5 s
//! now. The uid index answers "does the owner still run a job here?" with one lookup; empty
//! directories are removed as they empty, in O(1) (`rmdir` fails on a non-empty one).
//!
//! Each node records the network namespace of the process that wrote it, because the
//! nftables set lives there: the set of a namespace is the union of the ledgers of the nodes
//! in it. The state directory is on tmpfs (`/run`), so the ledger survives slurmd restarts and
//! is empty after a reboot, exactly like the kernel state it mirrors.
//!
//! Every change to a ledger *and* to the set happens under one exclusive `flock` on
//! `<state_dir>/lock`, so concurrent job starts and ends on a node never lose an update. The
//! lock is released by the kernel if its holder dies, and waiting for it is bounded.
//!
//! A node also records the boot it was written in, and one from an earlier boot reads as
//! empty (and is removed): should the state directory not be on tmpfs, a reboot still forgets
//! the jobs, as it forgets the set. For the same reason writes are not fsynced: the files only
//! have to outlive slurmd, not the machine. A job file is written to a temporary name and
//! renamed, so a reader never sees half of one.
//!
//! The ledger of earlier versions, one `<state_dir>/nodes/<node>.json` per node, is taken
//! over when the lock is first taken, so an upgrade during running jobs loses none of them.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cgroup::JobCgroup;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: timed out after {waited:?} waiting for the ledger lock")]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error("{path}: corrupt ledger: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{0:?} is not a usable Slurm node name")]
    BadNode(String),
}

trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T, Error>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, Error> {
        self.map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })
    }
}

/// How long a job start or end waits for another one to finish with the ledger. Each holds
/// it for well under a millisecond; `apply` holds it for one nftables transaction.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// One selected job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: u32,
    pub uid: u32,
    /// Why it was selected, for `slurm-egress jobs`.
    pub reason: String,
    /// Seconds since the epoch.
    pub started: u64,
    /// With `by = "cgroup"`: the job's cgroup, once its first task has started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<JobCgroup>,
}

/// What the `jobs` set of the current network namespace must hold, by what it is keyed on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Running {
    /// Owners of the jobs (`by = "uid"`).
    pub uids: BTreeSet<u32>,
    /// Ids of the jobs' cgroups (`by = "cgroup"`), as far as their tasks have started.
    pub cgroups: BTreeSet<u64>,
    /// The cgroup levels seen since boot (see [`Ledger::levels`]).
    pub levels: BTreeSet<u32>,
}

/// The ledger of one Slurm node, as a whole: for listings and for `apply`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub node: String,
    /// `/proc/self/ns/net` of the process that recorded its jobs (`net:[4026531840]`).
    pub netns: String,
    /// In job id order.
    pub jobs: Vec<Job>,
}

/// One job as recorded on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub node: String,
    /// The node's network namespace, as in [`Node::netns`].
    pub netns: String,
    pub job: Job,
}

/// `node.json`: where and when a node's jobs were recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    node: String,
    netns: String,
    boot: String,
}

/// The single file per node of earlier versions, taken over by [`Ledger::lock`].
#[derive(Deserialize)]
struct Legacy {
    node: String,
    netns: String,
    #[serde(default)]
    boot: String,
    #[serde(default, rename = "job")]
    jobs: Vec<Job>,
}

/// Exclusive access to every ledger under a state directory, for as long as it lives.
pub struct Ledger {
    nodes: PathBuf,
    levels: PathBuf,
    /// This process's network namespace and the kernel's boot id, read once.
    here: String,
    boot: String,
    _lock: File,
}

impl Ledger {
    /// Takes the lock, creating the state directory if needed; waits at most [`LOCK_WAIT`].
    pub fn lock(state_dir: &Path) -> Result<Ledger, Error> {
        let nodes = state_dir.join("nodes");
        fs::create_dir_all(&nodes).at(&nodes)?;
        let path = state_dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .at(&path)?;
        if !flock(&file, libc::LOCK_NB).at(&path)? && !wait_for_lock(&file).at(&path)? {
            return Err(Error::LockTimeout {
                path,
                waited: LOCK_WAIT,
            });
        }
        let ledger = Ledger {
            nodes,
            levels: state_dir.join("cgroup-levels"),
            here: current_netns()?,
            boot: boot_id()?,
            _lock: file,
        };
        ledger.take_over_legacy()?;
        Ok(ledger)
    }

    fn node_dir(&self, node: &str) -> Result<PathBuf, Error> {
        if node.is_empty()
            || node.starts_with('.')
            || node.len() > 255
            || node.contains(|c: char| c == '/' || c.is_control() || c.is_whitespace())
        {
            return Err(Error::BadNode(node.to_owned()));
        }
        Ok(self.nodes.join(node))
    }

    /// The node's `node.json`, or `None` if it has no jobs this boot (a ledger from an
    /// earlier boot is removed).
    fn meta(&self, node: &str) -> Result<Option<Meta>, Error> {
        let dir = self.node_dir(node)?;
        let Some(meta) = read_json::<Meta>(&dir.join("node.json"))? else {
            return Ok(None);
        };
        if meta.boot != self.boot {
            fs::remove_dir_all(&dir).at(&dir)?;
            return Ok(None);
        }
        Ok(Some(meta))
    }

    /// The job `id` on `node`, if it is recorded.
    pub fn job(&self, node: &str, id: u32) -> Result<Option<Job>, Error> {
        match self.meta(node)? {
            Some(_) => self.job_file(node, id),
            None => Ok(None),
        }
    }

    /// The job's file, for a node whose `node.json` was just read.
    fn job_file(&self, node: &str, id: u32) -> Result<Option<Job>, Error> {
        read_json(&self.node_dir(node)?.join(format!("jobs/{id}.json")))
    }

    /// Records `job` on `node`, or replaces its record (its owner never changes), noting
    /// this network namespace and boot as the node's.
    pub fn record(&self, node: &str, job: &Job) -> Result<(), Error> {
        self.record_in(node, job, &self.here)
    }

    fn record_in(&self, node: &str, job: &Job, netns: &str) -> Result<(), Error> {
        let dir = self.node_dir(node)?;
        let meta = Meta {
            node: node.to_owned(),
            netns: netns.to_owned(),
            boot: self.boot.clone(),
        };
        if self.meta(node)?.as_ref() != Some(&meta) {
            fs::create_dir_all(dir.join("jobs")).at(&dir)?;
            write_atomically(&dir.join("node.json"), &meta)?;
        }
        write_atomically(&dir.join(format!("jobs/{}.json", job.id)), job)?;
        let uid = dir.join(format!("uids/{}", job.uid));
        fs::create_dir_all(&uid).at(&uid)?;
        let marker = uid.join(job.id.to_string());
        File::create(&marker).at(&marker)?;
        Ok(())
    }

    /// Forgets the job `id` on `node`; what was recorded, if anything. A node left without
    /// jobs has no directory.
    pub fn forget(&self, node: &str, id: u32) -> Result<Option<Job>, Error> {
        let Some(job) = self.job(node, id)? else {
            return Ok(None);
        };
        let dir = self.node_dir(node)?;
        let uid = dir.join(format!("uids/{}", job.uid));
        remove_file(&uid.join(id.to_string()))?;
        remove_dir_if_empty(&uid)?;
        remove_file(&dir.join(format!("jobs/{id}.json")))?;
        if remove_dir_if_empty(&dir.join("jobs"))? {
            fs::remove_dir_all(&dir).at(&dir)?;
        }
        Ok(Some(job))
    }

    /// The ledger of `node`; empty if it has none this boot.
    pub fn read(&self, node: &str) -> Result<Node, Error> {
        match self.meta(node)? {
            Some(meta) => self.jobs_of(meta),
            None => Ok(Node {
                node: node.to_owned(),
                netns: self.here.clone(),
                jobs: Vec::new(),
            }),
        }
    }

    /// The jobs of a node whose `node.json` was just read.
    fn jobs_of(&self, meta: Meta) -> Result<Node, Error> {
        let dir = self.node_dir(&meta.node)?.join("jobs");
        let mut jobs = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Only node.json: a job end stopped halfway through removing the node.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Node {
                    node: meta.node,
                    netns: meta.netns,
                    jobs,
                });
            }
            Err(e) => return Err(e).at(&dir),
        };
        for entry in entries {
            let path = entry.at(&dir)?.path();
            if path.extension().is_some_and(|x| x == "json") {
                jobs.extend(read_json::<Job>(&path)?);
            }
        }
        jobs.sort_by_key(|j| j.id);
        Ok(Node {
            node: meta.node,
            netns: meta.netns,
            jobs,
        })
    }

    /// The nodes with jobs recorded this boot, in name order.
    fn metas(&self) -> Result<Vec<Meta>, Error> {
        let mut metas = Vec::new();
        for entry in fs::read_dir(&self.nodes).at(&self.nodes)? {
            let entry = entry.at(&self.nodes)?;
            if entry.file_type().at(&entry.path())?.is_dir()
                && let Ok(name) = entry.file_name().into_string()
                && let Some(meta) = self.meta(&name)?
            {
                metas.push(meta);
            }
        }
        metas.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(metas)
    }

    /// The job `id` on every node that records it (normally one; several slurmd on a host
    /// may each run a part of it).
    pub fn find(&self, id: u32) -> Result<Vec<Recorded>, Error> {
        let mut found = Vec::new();
        for meta in self.metas()? {
            if let Some(job) = self.job_file(&meta.node, id)? {
                found.push(Recorded {
                    node: meta.node,
                    netns: meta.netns,
                    job,
                });
            }
        }
        Ok(found)
    }

    /// The nodes whose jobs were recorded in this network namespace.
    fn metas_here(&self) -> Result<Vec<Meta>, Error> {
        let mut metas = self.metas()?;
        metas.retain(|m| m.netns == self.here);
        Ok(metas)
    }

    /// Every node's ledger, in node name order.
    pub fn all(&self) -> Result<Vec<Node>, Error> {
        self.metas()?.into_iter().map(|m| self.jobs_of(m)).collect()
    }

    /// Whether `uid` has a job on any node in the current network namespace.
    pub fn runs_here(&self, uid: u32) -> Result<bool, Error> {
        for meta in self.metas_here()? {
            let dir = self.node_dir(&meta.node)?.join(format!("uids/{uid}"));
            match fs::read_dir(&dir) {
                Ok(mut jobs) => {
                    if jobs.next().is_some() {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).at(&dir),
            }
        }
        Ok(false)
    }

    /// What the `jobs` set of the current network namespace must hold: the owners or
    /// cgroups of every job of every node running in it.
    pub fn running_here(&self) -> Result<Running, Error> {
        let mut running = Running {
            levels: self.levels()?,
            ..Running::default()
        };
        for meta in self.metas_here()? {
            for job in self.jobs_of(meta)?.jobs {
                running.uids.insert(job.uid);
                if let Some(c) = job.cgroup {
                    running.cgroups.insert(c.id);
                    running.levels.insert(c.level);
                }
            }
        }
        Ok(running)
    }

    /// The cgroup levels of jobs seen since boot. The node's table keeps a rule per level
    /// once one was needed, so that the last job at a level ending and the next one starting
    /// do not rebuild the table each time.
    pub fn levels(&self) -> Result<BTreeSet<u32>, Error> {
        match fs::read_to_string(&self.levels) {
            Ok(text) => Ok(text
                .split_whitespace()
                .filter_map(|l| l.parse().ok())
                .collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
            Err(e) => Err(e).at(&self.levels),
        }
    }

    /// Remembers a cgroup level (see [`Ledger::levels`]); returns whether it is new.
    pub fn add_level(&self, level: u32) -> Result<bool, Error> {
        let mut levels = self.levels()?;
        if !levels.insert(level) {
            return Ok(false);
        }
        let text: Vec<String> = levels.iter().map(u32::to_string).collect();
        fs::write(&self.levels, text.join("\n") + "\n").at(&self.levels)?;
        Ok(true)
    }

    /// Moves each `<node>.json` of earlier versions into the per-job layout, keeping its
    /// network namespace; one from an earlier boot is just removed.
    fn take_over_legacy(&self) -> Result<(), Error> {
        for entry in fs::read_dir(&self.nodes).at(&self.nodes)? {
            let path = entry.at(&self.nodes)?.path();
            if !path.is_file() || path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Some(legacy) = read_json::<Legacy>(&path)? else {
                continue;
            };
            if legacy.boot == self.boot {
                for job in &legacy.jobs {
                    self.record_in(&legacy.node, job, &legacy.netns)?;
                }
            }
            remove_file(&path)?;
        }
        Ok(())
    }
}

fn corrupt(path: &Path, e: serde_json::Error) -> Error {
    Error::Corrupt {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Reads and parses a JSON file; `None` if there is none.
fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, Error> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| corrupt(path, e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).at(path),
    }
}

/// Writes `value` as JSON to a temporary name next to `path`, then renames it there.
fn write_atomically(path: &Path, value: &impl Serialize) -> Result<(), Error> {
    let text = serde_json::to_vec(value).map_err(|e| corrupt(path, e))?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = File::create(&tmp).at(&tmp)?;
    file.write_all(&text).at(&tmp)?;
    fs::rename(&tmp, path).at(path)
}

/// Removes a file; one already gone is fine.
fn remove_file(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).at(path),
        _ => Ok(()),
    }
}

/// Removes a directory if it is empty (or gone); whether it is now gone.
fn remove_dir_if_empty(path: &Path) -> Result<bool, Error> {
    match fs::remove_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => Ok(false),
        Err(e) => Err(e).at(path),
    }
}

/// `flock(LOCK_EX | extra)`: whether it was taken (`false`: held elsewhere, with `LOCK_NB`).
fn flock(file: &File, extra: i32) -> io::Result<bool> {
    loop {
        // SAFETY: flock on a descriptor that `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | extra) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Waits for the lock in the kernel's queue, at most [`LOCK_WAIT`]; whether it was taken.
///
/// Not by polling: a burst of a thousand prologs polling with backoff left the lock idle
/// between polls and starved its holder of CPU (3-6 s for 1000 job starts). A helper thread
/// blocks in `flock` on a duplicate of the descriptor, which shares the lock; after a timeout
/// nobody waits for it, and the lock, should it still come, goes with the last descriptor.
fn wait_for_lock(file: &File) -> io::Result<bool> {
    let waiter = file.try_clone()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("ledger lock".into())
        .spawn(move || {
            let _ = tx.send(flock(&waiter, 0));
        })?;
    match rx.recv_timeout(LOCK_WAIT) {
        Ok(taken) => {
            // Until the thread has closed its duplicate, a fork (the detached socket closer)
            // would inherit the lock and hold it for as long as it lives.
            let _ = thread.join();
            taken
        }
        Err(_) => Ok(false),
    }
}

/// This boot's id, as the kernel gives it.
fn boot_id() -> Result<String, Error> {
    let path = Path::new("/proc/sys/kernel/random/boot_id");
    Ok(fs::read_to_string(path).at(path)?.trim().to_owned())
}

/// Identifies the network namespace this process is in, as the kernel names it.
pub fn current_netns() -> Result<String, Error> {
    let path = Path::new("/proc/self/ns/net");
    let link = fs::read_link(path).at(path)?;
    Ok(link.to_string_lossy().into_owned())
}

/// The node name to use when none is given: Slurm's default for a node is its short host
/// name.
pub fn default_node() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .map(|h| h.split('.').next().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "slurm-egress-ledger-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn job(id: u32, uid: u32) -> Job {
        Job {
            id,
            uid,
            reason: "account alice".into(),
            started: 1,
            cgroup: None,
        }
    }

    #[test]
    fn round_trip_and_union_per_namespace() {
        let dir = tempdir();
        let ledger = Ledger::lock(&dir).unwrap();
        assert!(ledger.read("w1").unwrap().jobs.is_empty());
        assert_eq!(ledger.job("w1", 1).unwrap(), None);
        ledger.record("w1", &job(2, 1002)).unwrap();
        ledger.record("w1", &job(1, 1001)).unwrap();
        ledger.record("w2", &job(3, 1003)).unwrap();
        // A node in another namespace does not count here.
        ledger.record_in("w3", &job(4, 1004), "net:[1]").unwrap();
        let w1 = ledger.read("w1").unwrap();
        assert_eq!(w1.jobs, vec![job(1, 1001), job(2, 1002)]);
        assert_eq!(w1.netns, current_netns().unwrap());
        assert_eq!(ledger.job("w2", 3).unwrap(), Some(job(3, 1003)));
        let here: Vec<String> = ledger
            .metas_here()
            .unwrap()
            .into_iter()
            .map(|m| m.node)
            .collect();
        assert_eq!(here, ["w1", "w2"]);
        assert_eq!(
            ledger.running_here().unwrap().uids,
            BTreeSet::from([1001, 1002, 1003])
        );
        assert!(!ledger.runs_here(1004).unwrap());
        // A job's cgroup counts once its task recorded it, with its level.
        let mut with_cgroup = job(3, 1003);
        with_cgroup.cgroup = Some(JobCgroup {
            path: "/se/job_3".into(),
            id: 77,
            level: 2,
            own: true,
        });
        ledger.record("w2", &with_cgroup).unwrap();
        assert!(ledger.add_level(4).unwrap());
        assert!(!ledger.add_level(4).unwrap());
        let running = ledger.running_here().unwrap();
        assert_eq!(running.cgroups, BTreeSet::from([77]));
        assert_eq!(running.levels, BTreeSet::from([2, 4]));
        assert_eq!(ledger.read("w2").unwrap().jobs, vec![with_cgroup.clone()]);
        assert_eq!(ledger.all().unwrap().len(), 3);
        // The last job of a node takes its directory with it.
        assert_eq!(ledger.forget("w2", 3).unwrap(), Some(with_cgroup));
        assert_eq!(ledger.forget("w2", 3).unwrap(), None);
        assert!(!dir.join("nodes/w2").exists());
        assert_eq!(ledger.all().unwrap().len(), 2);
        drop(ledger);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_owner_runs_here_until_its_last_job_ends() {
        let dir = tempdir();
        let ledger = Ledger::lock(&dir).unwrap();
        ledger.record("w1", &job(1, 1001)).unwrap();
        ledger.record("w1", &job(2, 1001)).unwrap();
        ledger.record("w2", &job(3, 1001)).unwrap();
        ledger.record("w1", &job(4, 1002)).unwrap();
        for (id, node, still) in [(1, "w1", true), (3, "w2", true), (2, "w1", false)] {
            assert!(ledger.forget(node, id).unwrap().is_some());
            assert_eq!(ledger.runs_here(1001).unwrap(), still, "after job {id}");
        }
        assert!(!dir.join("nodes/w1/uids/1001").exists());
        assert_eq!(ledger.read("w1").unwrap().jobs, vec![job(4, 1002)]);
        assert!(ledger.runs_here(1002).unwrap());
        drop(ledger);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_node_names_stale_boots_and_corrupt_files() {
        let dir = tempdir();
        let ledger = Ledger::lock(&dir).unwrap();
        for bad in ["", "../x", ".hidden", "a b"] {
            assert!(matches!(ledger.read(bad), Err(Error::BadNode(_))), "{bad}");
            assert!(matches!(
                ledger.record(bad, &job(1, 2)),
                Err(Error::BadNode(_))
            ));
        }
        // A ledger from an earlier boot is empty, and goes.
        ledger.record("w8", &job(1, 2)).unwrap();
        let stale = Meta {
            node: "w8".into(),
            netns: ledger.here.clone(),
            boot: "old".into(),
        };
        write_atomically(&dir.join("nodes/w8/node.json"), &stale).unwrap();
        assert_eq!(ledger.job("w8", 1).unwrap(), None);
        assert!(!ledger.runs_here(2).unwrap());
        assert!(!dir.join("nodes/w8").exists());
        ledger.record("w9", &job(5, 2)).unwrap();
        fs::write(dir.join("nodes/w9/jobs/5.json"), r#"{"id": "x"}"#).unwrap();
        let e = ledger.job("w9", 5).unwrap_err().to_string();
        assert!(e.contains("w9/jobs/5.json: corrupt ledger"), "{e}");
        drop(ledger);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_earlier_versions_ledger_is_taken_over() {
        let dir = tempdir();
        fs::create_dir_all(dir.join("nodes")).unwrap();
        let boot = boot_id().unwrap();
        fs::write(
            dir.join("nodes/w5.json"),
            format!(
                r#"{{"node": "w5", "netns": "net:[5]", "boot": "{boot}",
                    "job": [{{"id": 7, "uid": 2, "reason": "r", "started": 0}}]}}"#
            ),
        )
        .unwrap();
        fs::write(
            dir.join("nodes/w6.json"),
            r#"{"node": "w6", "netns": "x", "boot": "old",
                "job": [{"id": 1, "uid": 2, "reason": "r", "started": 0}]}"#,
        )
        .unwrap();
        let ledger = Ledger::lock(&dir).unwrap();
        let w5 = ledger.read("w5").unwrap();
        assert_eq!(w5.netns, "net:[5]");
        assert_eq!(w5.jobs.iter().map(|j| j.id).collect::<Vec<_>>(), [7]);
        assert_eq!(ledger.all().unwrap().len(), 1);
        assert!(!dir.join("nodes/w5.json").exists() && !dir.join("nodes/w6.json").exists());
        drop(ledger);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lock_is_exclusive_across_processes() {
        let dir = tempdir();
        let held = Ledger::lock(&dir).unwrap();
        // A second open file description conflicts, like another process would.
        let other = File::open(dir.join("lock")).unwrap();
        let r = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(r, -1);
        drop(held);
        let r = unsafe { libc::flock(other.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(r, 0);
        drop(other);
        fs::remove_dir_all(&dir).unwrap();
    }
}
