//! The job ledger: which selected jobs run on each Slurm node, so that a uid leaves the
//! `jobs` set only when its last selected job on the node ends, and so that `apply` can put
//! back set members that someone flushed.
//!
//! One small JSON file per Slurm node (`<state_dir>/nodes/<node>.json`), never per host:
//! several slurmd may share a host. Each file records the network namespace its node runs in,
//! because the nftables set lives there: the set of a namespace is the union of the ledgers
//! of the nodes in it. The state directory is on tmpfs (`/run`), so the ledger survives slurmd
//! restarts and is empty after a reboot, exactly like the kernel state it mirrors. JSON, not
//! TOML like the config: every job start and end reads a whole ledger while holding the lock,
//! and a 1000-job ledger took 4 ms to parse as TOML, about 0.2 ms as JSON.
//!
//! Every change to a ledger *and* to the set happens under one exclusive `flock` on
//! `<state_dir>/lock`, so concurrent job starts and ends on a node never lose an update. The
//! lock is released by the kernel if its holder dies, and waiting for it is bounded.
//!
//! A ledger also records the boot it was written in, and one from an earlier boot reads as
//! empty: should the state directory not be on tmpfs, a reboot still forgets the jobs, as it
//! forgets the set. For the same reason writes are not fsynced: the file only has to outlive
//! slurmd, not the machine.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// The ledger of one Slurm node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub node: String,
    /// `/proc/self/ns/net` of the process that last wrote it (`net:[4026531840]`).
    pub netns: String,
    /// The kernel's boot id when it was written.
    #[serde(default)]
    pub boot: String,
    #[serde(default, rename = "job")]
    pub jobs: Vec<Job>,
}

/// Exclusive access to every ledger under a state directory, for as long as it lives.
pub struct Ledger {
    dir: PathBuf,
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
        Ok(Ledger {
            dir: state_dir.to_owned(),
            _lock: file,
        })
    }

    fn path(&self, node: &str) -> Result<PathBuf, Error> {
        if node.is_empty()
            || node.starts_with('.')
            || node.len() > 255
            || node.contains(|c: char| c == '/' || c.is_control() || c.is_whitespace())
        {
            return Err(Error::BadNode(node.to_owned()));
        }
        Ok(self.dir.join("nodes").join(format!("{node}.json")))
    }

    /// The ledger of `node`; empty if it has none yet.
    pub fn read(&self, node: &str) -> Result<Node, Error> {
        let path = self.path(node)?;
        match fs::read_to_string(&path) {
            Ok(text) => parse(&text, &path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Node {
                node: node.to_owned(),
                netns: current_netns()?,
                boot: boot_id()?,
                jobs: Vec::new(),
            }),
            Err(e) => Err(e).at(&path),
        }
    }

    /// Replaces the ledger of `node.node` atomically (write, rename), recording the current
    /// network namespace and boot. An empty ledger is deleted.
    pub fn write(&self, node: &mut Node) -> Result<(), Error> {
        let path = self.path(&node.node)?;
        if node.jobs.is_empty() {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).at(&path),
                _ => Ok(()),
            };
        }
        node.netns = current_netns()?;
        node.boot = boot_id()?;
        let text = serde_json::to_string(node).map_err(|e| Error::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let mut file = File::create(&tmp).at(&tmp)?;
        file.write_all(text.as_bytes()).at(&tmp)?;
        fs::rename(&tmp, &path).at(&path)
    }

    /// Every node ledger, in node name order.
    pub fn all(&self) -> Result<Vec<Node>, Error> {
        let mut nodes = self.read_all_but(None)?;
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(nodes)
    }

    fn read_all_but(&self, skip: Option<&Path>) -> Result<Vec<Node>, Error> {
        let dir = self.dir.join("nodes");
        let mut nodes = Vec::new();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let path = entry.at(&dir)?.path();
            if path.extension().is_some_and(|x| x == "json") && Some(path.as_path()) != skip {
                let text = fs::read_to_string(&path).at(&path)?;
                nodes.push(parse(&text, &path)?);
            }
        }
        Ok(nodes)
    }

    /// Whether `uid` still has a job on a node in the current network namespace, `node` being
    /// one as just written: it is not read back, since every read of a 1000-job ledger is a
    /// parse under the lock.
    pub fn runs_here(&self, uid: u32, node: &Node) -> Result<bool, Error> {
        if node.jobs.iter().any(|j| j.uid == uid) {
            return Ok(true);
        }
        let here = current_netns()?;
        Ok(self
            .read_all_but(Some(&self.path(&node.node)?))?
            .iter()
            .any(|n| n.netns == here && n.jobs.iter().any(|j| j.uid == uid)))
    }

    /// What the `jobs` set of the current network namespace must hold: the owners or
    /// cgroups of every job of every node running in it.
    pub fn running_here(&self) -> Result<Running, Error> {
        let here = current_netns()?;
        let mut running = Running {
            levels: self.levels()?,
            ..Running::default()
        };
        for job in self
            .all()?
            .into_iter()
            .filter(|n| n.netns == here)
            .flat_map(|n| n.jobs)
        {
            running.uids.insert(job.uid);
            if let Some(c) = job.cgroup {
                running.cgroups.insert(c.id);
                running.levels.insert(c.level);
            }
        }
        Ok(running)
    }

    /// The cgroup levels of jobs seen since boot. The node's table keeps a rule per level
    /// once one was needed, so that the last job at a level ending and the next one starting
    /// do not rebuild the table each time.
    pub fn levels(&self) -> Result<BTreeSet<u32>, Error> {
        let path = self.dir.join("cgroup-levels");
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text
                .split_whitespace()
                .filter_map(|l| l.parse().ok())
                .collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
            Err(e) => Err(e).at(&path),
        }
    }

    /// Remembers a cgroup level (see [`Ledger::levels`]); returns whether it is new.
    pub fn add_level(&self, level: u32) -> Result<bool, Error> {
        let mut levels = self.levels()?;
        if !levels.insert(level) {
            return Ok(false);
        }
        let path = self.dir.join("cgroup-levels");
        let text: Vec<String> = levels.iter().map(u32::to_string).collect();
        fs::write(&path, text.join("\n") + "\n").at(&path)?;
        Ok(true)
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

/// Parses a ledger; one written before the last boot has no jobs.
fn parse(text: &str, path: &Path) -> Result<Node, Error> {
    let mut node: Node = serde_json::from_str(text).map_err(|e| Error::Corrupt {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if node.boot != boot_id()? {
        node.jobs.clear();
    }
    Ok(node)
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
        let mut w1 = ledger.read("w1").unwrap();
        assert!(w1.jobs.is_empty());
        w1.jobs = vec![job(1, 1001), job(2, 1002)];
        ledger.write(&mut w1).unwrap();
        let mut w2 = ledger.read("w2").unwrap();
        w2.jobs = vec![job(3, 1003)];
        ledger.write(&mut w2).unwrap();
        // A node in another namespace does not count here.
        let mut elsewhere = Node {
            node: "w3".into(),
            netns: "net:[1]".into(),
            boot: boot_id().unwrap(),
            jobs: vec![job(4, 1004)],
        };
        fs::write(
            dir.join("nodes/w3.json"),
            serde_json::to_string(&elsewhere).unwrap(),
        )
        .unwrap();
        assert_eq!(ledger.read("w1").unwrap(), w1);
        assert_eq!(
            ledger.running_here().unwrap().uids,
            BTreeSet::from([1001, 1002, 1003])
        );
        // A job's cgroup counts once its task recorded it, with its level.
        w2.jobs[0].cgroup = Some(JobCgroup {
            path: "/se/job_3".into(),
            id: 77,
            level: 2,
            own: true,
        });
        ledger.write(&mut w2).unwrap();
        assert!(ledger.add_level(4).unwrap());
        assert!(!ledger.add_level(4).unwrap());
        let running = ledger.running_here().unwrap();
        assert_eq!(running.cgroups, BTreeSet::from([77]));
        assert_eq!(running.levels, BTreeSet::from([2, 4]));
        assert_eq!(ledger.read("w2").unwrap(), w2);
        assert_eq!(ledger.all().unwrap().len(), 3);
        elsewhere.jobs.clear();
        ledger.write(&mut elsewhere).unwrap();
        assert!(!dir.join("nodes/w3.json").exists());
        drop(ledger);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_node_names_and_corrupt_files() {
        let dir = tempdir();
        let ledger = Ledger::lock(&dir).unwrap();
        for bad in ["", "../x", ".hidden", "a b"] {
            assert!(matches!(ledger.read(bad), Err(Error::BadNode(_))), "{bad}");
        }
        // A ledger from an earlier boot is empty.
        fs::write(
            dir.join("nodes/w8.json"),
            r#"{"node": "w8", "netns": "x", "boot": "old",
                "job": [{"id": 1, "uid": 2, "reason": "r", "started": 0}]}"#,
        )
        .unwrap();
        assert!(ledger.read("w8").unwrap().jobs.is_empty());
        fs::write(dir.join("nodes/w9.json"), r#"{"node": 3}"#).unwrap();
        let e = ledger.read("w9").unwrap_err().to_string();
        assert!(e.contains("w9.json: corrupt ledger"), "{e}");
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
