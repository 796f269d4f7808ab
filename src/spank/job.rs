//! What the plugin knows about a job in `job_prolog` / `job_epilog`.

use crate::spank::handle::{Spank, SpankError};

/// The job as seen from its prolog/epilog process on one node.
///
/// Job id, uid and gid come from `spank_get_item`; the rest from the process environment
/// slurmd builds for the prolog/epilog (SPANK has no items for them there). The environment
/// values are `None` when unset or empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobInfo {
    pub job_id: u32,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// `SLURM_JOB_USER`: the user name slurmctld resolved for the uid.
    pub user: Option<String>,
    /// `SLURM_JOB_ACCOUNT`: the account the job runs under, as slurmctld accepted it. Without
    /// slurmdbd enforcing associations this is whatever `--account` the user typed.
    pub account: Option<String>,
    /// `SLURM_JOB_PARTITION`.
    pub partition: Option<String>,
    /// `SLURMD_NODENAME`: this node's Slurm name (slurmd `-N`), not necessarily the hostname.
    pub node: Option<String>,
}

impl JobInfo {
    /// Reads the job from the handle and this process's environment.
    pub fn gather(sp: &Spank) -> Result<JobInfo, SpankError> {
        Ok(JobInfo::from_parts(
            sp.job_id()?,
            sp.job_uid()?,
            sp.job_gid()?,
            |k| std::env::var(k).ok(),
        ))
    }

    /// Builds a `JobInfo` from the SPANK items and an environment lookup.
    pub fn from_parts(
        job_id: u32,
        uid: libc::uid_t,
        gid: libc::gid_t,
        env: impl Fn(&str) -> Option<String>,
    ) -> JobInfo {
        let var = |k: &str| env(k).filter(|v| !v.is_empty());
        JobInfo {
            job_id,
            uid,
            gid,
            user: var("SLURM_JOB_USER"),
            account: var("SLURM_JOB_ACCOUNT"),
            partition: var("SLURM_JOB_PARTITION"),
            node: var("SLURMD_NODENAME"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_environment() {
        let env = |k: &str| match k {
            "SLURM_JOB_USER" => Some("alice".to_owned()),
            "SLURM_JOB_ACCOUNT" => Some("physics".to_owned()),
            "SLURM_JOB_PARTITION" => Some(String::new()),
            "SLURMD_NODENAME" => Some("w1".to_owned()),
            _ => None,
        };
        let j = JobInfo::from_parts(7, 1001, 1002, env);
        assert_eq!(j.job_id, 7);
        assert_eq!((j.uid, j.gid), (1001, 1002));
        assert_eq!(j.user.as_deref(), Some("alice"));
        assert_eq!(j.account.as_deref(), Some("physics"));
        assert_eq!(j.partition, None);
        assert_eq!(j.node.as_deref(), Some("w1"));
    }
}
