//! A safe view of the SPANK handle and context.
//!
//! What each process sees (observed on Slurm 22.05.8, details in notes/spank.md):
//!
//! * `job_prolog` / `job_epilog` run in a short-lived `slurmstepd spank prolog|epilog` process
//!   that slurmd forks and execs for each job and node: root, a child of slurmd, in slurmd's
//!   network namespace, context [`Context::JobScript`]. `slurm_spank_init` is NOT called in
//!   that process. `spank_get_item` answers only [`Spank::job_id`], [`Spank::job_uid`],
//!   [`Spank::job_gid`] and the `S_SLURM_VERSION*` strings; every other item fails with
//!   `ESPANK_NOT_AVAIL` ("Item not available from this callback"), and `spank_getenv` with
//!   `ESPANK_NOT_REMOTE`. The account, user name and partition are in the *process*
//!   environment (`SLURM_JOB_ACCOUNT`, `SLURM_JOB_USER`, `SLURM_JOB_PARTITION`), and so is the
//!   node name (`SLURMD_NODENAME`). That environment is built by slurmd from scratch: it has
//!   no `PATH` (run programs by absolute path) and `SLURM_SCRIPT_CONTEXT=prolog_slurmd` /
//!   `epilog_slurmd`.
//! * slurmd itself ([`Context::Slurmd`]) calls `init` once at start, not again on
//!   `scontrol reconfigure` (each prolog/epilog process re-reads plugstack.conf anyway).
//! * slurmstepd of a job step or batch script ([`Context::Remote`]) calls `init` and answers
//!   most items; the plugin has nothing to do there.
//! * sbatch/salloc ([`Context::Allocator`]) and srun ([`Context::Local`]) load the plugin as
//!   the submitting user and call `init`: callbacks must do nothing there.

use std::ffi::{CStr, c_int};

use crate::spank::ffi;
use crate::spank::sys;

/// Where the plugin is running, from `spank_context()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// Slurm could not tell (`S_CTX_ERROR`).
    Error,
    /// srun (`S_CTX_LOCAL`).
    Local,
    /// slurmstepd of a job step (`S_CTX_REMOTE`).
    Remote,
    /// sbatch or salloc (`S_CTX_ALLOCATOR`).
    Allocator,
    /// slurmd itself (`S_CTX_SLURMD`).
    Slurmd,
    /// The job prolog/epilog process (`S_CTX_JOB_SCRIPT`).
    JobScript,
    /// A value this build does not know (a newer Slurm).
    Unknown(u32),
}

impl Context {
    /// The context of the calling process. Needs no handle and cannot fail; unknown
    /// contexts are reported as such, never trusted.
    pub fn current() -> Context {
        match sys::api().spank_context {
            // SAFETY: spank_context() takes no arguments and only reads plugin-stack state.
            Some(f) => Context::from_raw(unsafe { f() }),
            // Not inside a Slurm process.
            None => Context::Error,
        }
    }

    pub fn from_raw(raw: ffi::spank_context_t) -> Context {
        match raw {
            ffi::S_CTX_ERROR => Context::Error,
            ffi::S_CTX_LOCAL => Context::Local,
            ffi::S_CTX_REMOTE => Context::Remote,
            ffi::S_CTX_ALLOCATOR => Context::Allocator,
            ffi::S_CTX_SLURMD => Context::Slurmd,
            ffi::S_CTX_JOB_SCRIPT => Context::JobScript,
            other => Context::Unknown(other),
        }
    }
}

/// A failed SPANK call: which one, Slurm's error code and its text from `spank_strerror`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{call}: {message} (spank error {code})")]
pub struct SpankError {
    pub call: &'static str,
    pub code: u32,
    pub message: String,
}

impl SpankError {
    fn new(call: &'static str, code: ffi::spank_err_t) -> SpankError {
        let text = match sys::api().spank_strerror {
            // SAFETY: spank_strerror returns a pointer to a static string (or, defensively,
            // NULL).
            Some(f) => unsafe { f(code) },
            None => std::ptr::null(),
        };
        let message = if text.is_null() {
            "unknown error".to_owned()
        } else {
            // SAFETY: non-NULL, NUL-terminated, static.
            unsafe { CStr::from_ptr(text) }
                .to_string_lossy()
                .into_owned()
        };
        SpankError {
            call,
            code,
            message,
        }
    }
}

/// The `spank_t` handle Slurm passes to a callback. Valid only during that callback, which
/// the borrow of the (never stored) handle enforces by construction.
#[derive(Debug)]
pub struct Spank {
    raw: ffi::spank_t,
}

impl Spank {
    /// # Safety
    /// `raw` must be the handle Slurm passed to the running callback, and the `Spank` must not
    /// outlive that callback.
    pub unsafe fn from_raw(raw: ffi::spank_t) -> Spank {
        Spank { raw }
    }

    /// `S_JOB_ID`. Available in job_prolog/job_epilog and in slurmstepd.
    pub fn job_id(&self) -> Result<u32, SpankError> {
        let mut v: u32 = 0;
        let get = self.get_item("spank_get_item(S_JOB_ID)")?;
        // SAFETY: S_JOB_ID takes one `uint32_t *`.
        self.check("spank_get_item(S_JOB_ID)", unsafe {
            get(self.raw, ffi::S_JOB_ID, &mut v as *mut u32)
        })?;
        Ok(v)
    }

    /// `S_JOB_UID`: the job owner's uid. Available in job_prolog/job_epilog and slurmstepd.
    pub fn job_uid(&self) -> Result<libc::uid_t, SpankError> {
        let mut v: libc::uid_t = 0;
        let get = self.get_item("spank_get_item(S_JOB_UID)")?;
        // SAFETY: S_JOB_UID takes one `uid_t *`.
        self.check("spank_get_item(S_JOB_UID)", unsafe {
            get(self.raw, ffi::S_JOB_UID, &mut v as *mut libc::uid_t)
        })?;
        Ok(v)
    }

    /// `S_JOB_GID`: the job's primary gid. Available in job_prolog/job_epilog and slurmstepd.
    pub fn job_gid(&self) -> Result<libc::gid_t, SpankError> {
        let mut v: libc::gid_t = 0;
        let get = self.get_item("spank_get_item(S_JOB_GID)")?;
        // SAFETY: S_JOB_GID takes one `gid_t *`.
        self.check("spank_get_item(S_JOB_GID)", unsafe {
            get(self.raw, ffi::S_JOB_GID, &mut v as *mut libc::gid_t)
        })?;
        Ok(v)
    }

    fn get_item(&self, call: &'static str) -> Result<sys::SpankGetItemFn, SpankError> {
        sys::api().spank_get_item.ok_or(SpankError {
            call,
            code: ffi::ESPANK_ERROR,
            message: "not running inside Slurm".to_owned(),
        })
    }

    fn check(&self, call: &'static str, rc: ffi::spank_err_t) -> Result<(), SpankError> {
        if rc == ffi::ESPANK_SUCCESS {
            Ok(())
        } else {
            Err(SpankError::new(call, rc))
        }
    }
}

/// The C `int` a callback returns: 0 for success, -1 for failure.
pub(crate) const SPANK_OK: c_int = 0;
pub(crate) const SPANK_FAIL: c_int = -1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_slurm() {
        assert_eq!(Context::current(), Context::Error);
        // SAFETY: never dereferenced: spank_get_item is not resolved outside Slurm.
        let sp = unsafe { Spank::from_raw(std::ptr::null_mut()) };
        let e = sp.job_id().unwrap_err();
        assert_eq!(e.call, "spank_get_item(S_JOB_ID)");
        assert_eq!(e.code, ffi::ESPANK_ERROR);
        assert!(sp.job_uid().is_err() && sp.job_gid().is_err());
    }

    #[test]
    fn contexts() {
        assert_eq!(Context::from_raw(ffi::S_CTX_JOB_SCRIPT), Context::JobScript);
        assert_eq!(Context::from_raw(99), Context::Unknown(99));
    }
}
