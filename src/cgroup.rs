//! Per-job cgroups for `[select] by = "cgroup"`: which cgroup v2 holds a job's processes, its
//! id and depth (what `socket cgroupv2 level N @jobs` matches), and the cgroup slurm-egress
//! makes for a job when Slurm makes none.
//!
//! Two kinds of node:
//! * Slurm's cgroup/v2 plugin manages jobs: a task already runs below the job's own cgroup
//!   (`.../job_<id>/step_<s>/...`), whose depth Slurm decides; we use that cgroup and never
//!   move anything.
//! * cgroup v1 or hybrid hosts (cgroup2 only at `/sys/fs/cgroup/unified`, which Slurm's
//!   cgroup/v2 refuses): Slurm's cgroups live in the v1 hierarchies, so each task of a selected
//!   job moves itself, before it execs, into `<parent>/job_<id>` of the v2 hierarchy, which
//!   Slurm does not use. Children, daemons included, inherit it.
//!
//! A cgroup's id is the inode number of its directory (what the kernel's `cgroup_id()` and
//! `socket cgroupv2` use); levels count from the hierarchy's root, level 0. Paths here are as
//! `/proc/self/cgroup` writes them, from the root: this assumes slurmd runs in the initial
//! cgroup namespace, as it does.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cgroup2 file system is mounted (by = \"cgroup\" needs the cgroup v2 hierarchy)")]
    NoHierarchy,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("/proc/self/cgroup has no cgroup v2 line (\"0::/...\")")]
    NotInHierarchy,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// A job's cgroup, as the ledger records it: the cgroup itself is gone by the epilog when
/// Slurm made it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobCgroup {
    /// From the hierarchy's root: `/slurm-egress/job_42`.
    pub path: String,
    pub id: u64,
    pub level: u32,
    /// Made by slurm-egress (and removed by it at job end), not by Slurm.
    pub own: bool,
}

/// The cgroup v2 hierarchy, where it is mounted.
pub struct Hierarchy {
    mount: PathBuf,
}

impl Hierarchy {
    /// Finds the cgroup2 mount of this mount namespace (`/sys/fs/cgroup` on unified hosts,
    /// `/sys/fs/cgroup/unified` on hybrid ones).
    pub fn find() -> Result<Hierarchy, Error> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(at(path))?;
        mount_point(&text)
            .map(|mount| Hierarchy { mount })
            .ok_or(Error::NoHierarchy)
    }

    fn dir(&self, cgroup: &str) -> PathBuf {
        self.mount.join(cgroup.trim_start_matches('/'))
    }

    fn id(&self, cgroup: &str) -> Result<u64, Error> {
        let dir = self.dir(cgroup);
        Ok(fs::metadata(&dir).map_err(at(&dir))?.ino())
    }

    /// Puts the calling process into its job's cgroup, if it is not in one: Slurm's, when the
    /// process runs below `job_<job>`; else `<parent>/job_<job>`, made if needed.
    pub fn join(&self, job: u32, parent: &str) -> Result<JobCgroup, Error> {
        let current = current()?;
        let path = own_cgroup(parent, job);
        // (A process that is already in ours, forked by the job, is not in Slurm's.)
        if let Some(path) = slurm_job_cgroup(&current, job).filter(|p| *p != path) {
            return Ok(JobCgroup {
                id: self.id(&path)?,
                level: level(&path),
                path,
                own: false,
            });
        }
        let dir = self.dir(&path);
        fs::create_dir_all(&dir).map_err(at(&dir))?;
        // "0" moves the writer itself.
        let procs = dir.join("cgroup.procs");
        fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .and_then(|mut f| f.write_all(b"0"))
            .map_err(at(&procs))?;
        Ok(JobCgroup {
            id: self.id(&path)?,
            level: level(&path),
            path,
            own: true,
        })
    }

    /// Removes a cgroup slurm-egress made, after the job ended. Processes the job left behind
    /// (daemons that escaped Slurm's process tracking) are frozen and moved to the parent,
    /// which has no egress; returns how many. A cgroup already gone is fine.
    pub fn release(&self, cgroup: &str) -> Result<usize, Error> {
        let dir = self.dir(cgroup);
        if !dir.exists() {
            return Ok(0);
        }
        let parent_procs = dir
            .parent()
            .map(|p| p.join("cgroup.procs"))
            .unwrap_or_default();
        let procs = dir.join("cgroup.procs");
        // Frozen, they cannot fork while they are moved; the move thaws them.
        let freeze = dir.join("cgroup.freeze");
        let _ = fs::write(&freeze, b"1");
        let mut moved = 0;
        // Bounded: a process that exits meanwhile just disappears from the list.
        for _ in 0..10 {
            let pids = fs::read_to_string(&procs).map_err(at(&procs))?;
            if pids.trim().is_empty() {
                break;
            }
            for pid in pids.lines() {
                match fs::write(&parent_procs, pid.as_bytes()) {
                    Ok(()) => moved += 1,
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(e) => return Err(at(&parent_procs)(e)),
                }
            }
        }
        match fs::remove_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(at(&dir)(e)),
            _ => Ok(moved),
        }
    }
}

/// The cgroup slurm-egress makes for a job: `/<parent>/job_<job>`.
pub fn own_cgroup(parent: &str, job: u32) -> String {
    format!("/{parent}/job_{job}")
}

/// The depth of a cgroup below the root (the root is 0).
pub fn level(cgroup: &str) -> u32 {
    cgroup.split('/').filter(|c| !c.is_empty()).count() as u32
}

/// The cgroup v2 path of the calling process.
fn current() -> Result<String, Error> {
    let path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(path).map_err(at(path))?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .ok_or(Error::NotInHierarchy)
}

/// Slurm's cgroup of job `job` in a cgroup path: the path up to its `job_<job>` component.
fn slurm_job_cgroup(path: &str, job: u32) -> Option<String> {
    let name = format!("job_{job}");
    let parts: Vec<&str> = path.split('/').collect();
    let at = parts.iter().position(|c| *c == name)?;
    Some(parts[..=at].join("/"))
}

/// The mount point of the first cgroup2 file system in a mountinfo text.
fn mount_point(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (fields, rest) = line.split_once(" - ")?;
        (rest.split(' ').next()? == "cgroup2")
            .then(|| fields.split(' ').nth(4).map(unescape))
            .flatten()
    })
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> PathBuf {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    PathBuf::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_unified_hosts() {
        let hybrid = "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                      27 25 0:24 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        assert_eq!(
            mount_point(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 1 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(mount_point(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(mount_point("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
        assert_eq!(unescape("/a\\040b\\\\"), PathBuf::from("/a b\\\\"));
    }

    #[test]
    fn slurm_job_cgroups_and_levels() {
        // Slurm 22.05-23.x with cgroup/v2, a task of job 42.
        let task = "/system.slice/slurmstepd.scope/job_42/step_0/user/task_0";
        let job = slurm_job_cgroup(task, 42).unwrap();
        assert_eq!(job, "/system.slice/slurmstepd.scope/job_42");
        assert_eq!(level(&job), 3);
        // Another job's cgroup, or none at all, is not this job's.
        assert_eq!(slurm_job_cgroup(task, 4), None);
        assert_eq!(slurm_job_cgroup("/system.slice/slurmd.service", 42), None);
        assert_eq!(slurm_job_cgroup("/x/job_420/step_0", 42), None);
        // Ours.
        assert_eq!(own_cgroup("slurm-egress", 7), "/slurm-egress/job_7");
        assert_eq!(level(&own_cgroup("a/b", 7)), 3);
        assert_eq!(level("/"), 0);
    }
}
