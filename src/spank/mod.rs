//! The SPANK plugin: a thin, safe layer over Slurm's plugin API.
//!
//! * [`ffi`]: bindgen's raw bindings to `<slurm/spank.h>` (build.rs).
//! * [`handle`]: [`Spank`] (the handle), [`Context`], [`SpankError`].
//! * [`log`]: Slurm's log functions.
//! * [`args`]: the plugstack.conf arguments.
//! * [`job`]: [`JobInfo`], what a prolog/epilog knows about its job.
//! * [`hook`]: the business logic the callbacks call.
//! * [`plugin`]: the exported symbols (`plugin_*`, `slurm_spank_*`).
//! * [`sys`]: the Slurm functions, looked up at run time (the crate does not link against
//!   libslurm, so its tests and binaries link and run without Slurm).
//!
//! Everything here is verified against a real cluster by `tests/cluster/verify.sh`.

pub mod args;
pub mod ffi;
pub mod handle;
pub mod hook;
pub mod job;
pub mod log;
pub mod plugin;
pub mod sys;

pub use args::PluginArgs;
pub use handle::{Context, Spank, SpankError};
pub use hook::{on_job_end, on_job_start};
pub use job::JobInfo;
