//! slurm-egress: a NATed path out for the jobs of selected Slurm accounts, users and groups,
//! and the closed default path for every other process.

pub mod cgroup;
pub mod cli;
pub mod config;
pub mod jobs;
pub mod ledger;
pub mod netfilter;
pub mod node;
pub mod router;
pub mod routing;
pub mod selection;
pub mod spank;
pub mod watch;
