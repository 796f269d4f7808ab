//! The symbols slurmd, slurmstepd, sbatch, salloc and srun look up in `libslurm_egress.so`.
//!
//! Every callback first asks `spank_context()` and returns 0 at once where it has nothing to do:
//! on the user's side (sbatch/salloc/srun) the plugin must never fail, whatever its
//! configuration. Bodies run under `catch_unwind`, so no panic crosses into C; a caught panic
//! is logged and counts as a failure. Nothing here starts a thread: slurmd and slurmstepd fork.

use std::ffi::{CStr, c_char, c_int, c_uint};
use std::panic::{self, AssertUnwindSafe};

use crate::spank::args::{ArgsError, PluginArgs};
use crate::spank::ffi;
use crate::spank::handle::{Context, SPANK_FAIL, SPANK_OK, Spank};
use crate::spank::hook;
use crate::spank::job::JobInfo;
use crate::spank::log;

// A panic must unwind to `catch_unwind`; with panic=abort it would take slurmd down with it.
#[cfg(panic = "abort")]
compile_error!("the SPANK plugin needs panic = \"unwind\"");

/// `plugin_name`: a C `char[]`, as `SPANK_PLUGIN()` defines it.
#[unsafe(export_name = "plugin_name")]
pub static PLUGIN_NAME: [u8; 13] = *b"slurm-egress\0";

/// `plugin_type`: must be "spank".
#[unsafe(export_name = "plugin_type")]
pub static PLUGIN_TYPE: [u8; 6] = *b"spank\0";

/// `plugin_version`: the `SLURM_VERSION_NUMBER` of the headers built against. Slurm refuses a
/// plugin whose major.minor differs from its own ("Incompatible Slurm plugin version").
#[unsafe(export_name = "plugin_version")]
pub static PLUGIN_VERSION: c_uint = ffi::SLURM_VERSION_NUMBER;

/// `spank_plugin_version`: the plugin's own version, as `SPANK_PLUGIN(name, 1)` sets it.
#[unsafe(export_name = "spank_plugin_version")]
pub static SPANK_PLUGIN_VERSION: c_uint = 1;

/// The Slurm version this plugin was built against, as "major.minor.micro".
pub fn built_against() -> String {
    let v = ffi::SLURM_VERSION_NUMBER;
    format!("{}.{:02}.{}", (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff)
}

/// Runs a callback body, turning a panic into a logged failure.
fn guarded(callback: &str, body: impl FnOnce() -> c_int) -> c_int {
    match panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(rc) => rc,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_owned());
            log::error(&format!("{callback}: panic: {what}"));
            SPANK_FAIL
        }
    }
}

/// The plugstack arguments as Rust strings.
///
/// # Safety
/// `av` must be NULL or point to `ac` pointers, each NULL or a NUL-terminated string.
unsafe fn c_args(ac: c_int, av: *const *const c_char) -> Vec<String> {
    if av.is_null() || ac <= 0 {
        return Vec::new();
    }
    (0..ac as usize)
        // SAFETY: the caller guarantees `ac` readable pointers.
        .map(|i| unsafe { *av.add(i) })
        .filter(|p| !p.is_null())
        // SAFETY: non-NULL entries are C strings.
        .map(|p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .collect()
}

/// The plugstack arguments, parsed afresh by each callback that needs them: the prolog and
/// epilog processes (`slurmstepd spank prolog|epilog`) never call `init`, and re-read
/// plugstack.conf for every job.
///
/// # Safety
/// As [`c_args`].
unsafe fn plugin_args(ac: c_int, av: *mut *mut c_char) -> Result<PluginArgs, ArgsError> {
    // SAFETY: forwarded from the caller.
    PluginArgs::parse(unsafe { c_args(ac, av as *const *const c_char) })
}

/// Called when slurmd, slurmstepd (job steps), sbatch, salloc and srun load the plugin; not in
/// the prolog/epilog process. In slurmd it checks the plugstack arguments, so a bad line stops
/// slurmd at start (`required`) instead of failing every job; elsewhere it does nothing.
///
/// # Safety
/// Called by Slurm with its handle and the plugstack.conf arguments.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn slurm_spank_init(
    _sp: ffi::spank_t,
    ac: c_int,
    av: *mut *mut c_char,
) -> c_int {
    let ctx = Context::current();
    if ctx != Context::Slurmd {
        return SPANK_OK;
    }
    guarded("init", || {
        // SAFETY: Slurm passes `ac` argument strings.
        match unsafe { plugin_args(ac, av) } {
            Ok(args) => {
                log::info(&format!(
                    "loaded in slurmd (built against Slurm {}), config {}",
                    built_against(),
                    args.config
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "-".to_owned())
                ));
                SPANK_OK
            }
            Err(e) => {
                log::error(&e.to_string());
                SPANK_FAIL
            }
        }
    })
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Start,
    End,
}

/// The body of `job_prolog` / `job_epilog`.
///
/// # Safety
/// `sp`, `ac` and `av` are what Slurm passed to the callback.
unsafe fn job_callback(
    name: &str,
    phase: Phase,
    sp: ffi::spank_t,
    ac: c_int,
    av: *mut *mut c_char,
) -> c_int {
    if Context::current() != Context::JobScript {
        return SPANK_OK;
    }
    guarded(name, || {
        // SAFETY: forwarded from the caller.
        let args = match unsafe { plugin_args(ac, av) } {
            Ok(a) => a,
            Err(e) => {
                log::error(&format!("{name}: {e}"));
                return SPANK_FAIL;
            }
        };
        // SAFETY: `sp` is the handle of the running callback and does not escape it.
        let spank = unsafe { Spank::from_raw(sp) };
        let job = match JobInfo::gather(&spank) {
            Ok(j) => j,
            Err(e) => {
                log::error(&format!("{name}: {e}"));
                return SPANK_FAIL;
            }
        };
        let result = match phase {
            Phase::Start => hook::on_job_start(&args, &job),
            Phase::End => hook::on_job_end(&args, &job),
        };
        match result {
            Ok(()) => SPANK_OK,
            Err(e) => {
                log::error(&format!("{name}: job {}: {e}", job.job_id));
                SPANK_FAIL
            }
        }
    })
}

/// Runs before the job starts on this node, as root, in slurmd's network namespace. A
/// failure (-1) drains the node and requeues the job.
///
/// # Safety
/// Called by Slurm with its handle and the plugstack.conf arguments.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn slurm_spank_job_prolog(
    sp: ffi::spank_t,
    ac: c_int,
    av: *mut *mut c_char,
) -> c_int {
    // SAFETY: Slurm's own arguments.
    unsafe { job_callback("job_prolog", Phase::Start, sp, ac, av) }
}

/// Runs after the job has ended on this node. A failure (-1) drains the node.
///
/// # Safety
/// Called by Slurm with its handle and the plugstack.conf arguments.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn slurm_spank_job_epilog(
    sp: ffi::spank_t,
    ac: c_int,
    av: *mut *mut c_char,
) -> c_int {
    // SAFETY: Slurm's own arguments.
    unsafe { job_callback("job_epilog", Phase::End, sp, ac, av) }
}

/// Runs in each task of a job step (the batch script included), as root, after fork and
/// before exec, in slurmd's network namespace (context remote). With `by = "cgroup"` it puts
/// the task in its job's cgroup if the job was selected; otherwise it returns at once. A
/// failure fails the task (and so the job) under `on_error = "drain"`: a selected job never
/// runs without the path it was promised.
///
/// # Safety
/// Called by Slurm with its handle and the plugstack.conf arguments.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn slurm_spank_task_init_privileged(
    sp: ffi::spank_t,
    ac: c_int,
    av: *mut *mut c_char,
) -> c_int {
    if Context::current() != Context::Remote {
        return SPANK_OK;
    }
    guarded("task_init_privileged", || {
        // SAFETY: forwarded from the caller.
        let args = match unsafe { plugin_args(ac, av) } {
            Ok(a) => a,
            Err(e) => {
                log::error(&format!("task_init_privileged: {e}"));
                return SPANK_FAIL;
            }
        };
        // SAFETY: `sp` is the handle of the running callback and does not escape it.
        let spank = unsafe { Spank::from_raw(sp) };
        let job_id = match spank.job_id() {
            Ok(id) => id,
            Err(e) => {
                log::error(&format!("task_init_privileged: {e}"));
                return SPANK_FAIL;
            }
        };
        match hook::on_task_start(&args, job_id) {
            Ok(()) => SPANK_OK,
            Err(e) => {
                log::error(&format!("task_init_privileged: job {job_id}: {e}"));
                SPANK_FAIL
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_constants() {
        assert_eq!(&PLUGIN_TYPE, b"spank\0");
        assert_eq!(PLUGIN_NAME.iter().filter(|b| **b == 0).count(), 1);
        assert_eq!(PLUGIN_NAME.last(), Some(&0));
        assert!(built_against().starts_with(&format!("{}.", PLUGIN_VERSION >> 16)));
    }

    #[test]
    fn c_args_reads_argv() {
        let a = c"config=/x";
        let b = c"other";
        let argv = [a.as_ptr(), std::ptr::null(), b.as_ptr()];
        // SAFETY: three valid entries, one NULL.
        let v = unsafe { c_args(3, argv.as_ptr()) };
        assert_eq!(v, vec!["config=/x".to_owned(), "other".to_owned()]);
        // SAFETY: NULL argv is accepted.
        assert!(unsafe { c_args(2, std::ptr::null()) }.is_empty());
    }

    #[test]
    fn guarded_catches_panics() {
        assert_eq!(guarded("t", || 7), 7);
        // Outside Slurm the error is logged to stderr.
        assert_eq!(guarded("t", || panic!("boom")), SPANK_FAIL);
        assert_eq!(guarded("t", || panic!("{}", 42)), SPANK_FAIL);
    }

    #[test]
    fn callbacks_do_nothing_outside_a_job_script() {
        // Outside Slurm the context is Error: every callback returns 0 without touching its
        // arguments.
        let (sp, av) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: the arguments are never read in this context.
        unsafe {
            assert_eq!(slurm_spank_init(sp, 5, av), SPANK_OK);
            assert_eq!(slurm_spank_job_prolog(sp, 5, av), SPANK_OK);
            assert_eq!(slurm_spank_job_epilog(sp, 5, av), SPANK_OK);
            assert_eq!(slurm_spank_task_init_privileged(sp, 5, av), SPANK_OK);
        }
    }
}
