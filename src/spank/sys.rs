//! The Slurm functions the plugin calls, looked up at run time in the process that loaded it.
//!
//! slurmd, slurmstepd, sbatch, salloc and srun all link `libslurmfull.so`, which defines the
//! SPANK API and the log functions; `dlsym(RTLD_DEFAULT, ..)` finds them there. Not linking
//! against them keeps the rlib usable outside Slurm: the crate's own tests and binaries, which
//! would fail to link on an undefined `slurm_info` the moment a test reached a log call.
//! Outside Slurm every lookup answers `None` and the callers degrade (no context, stderr logs).
//!
//! The pointer types are checked against bindgen's prototypes at compile time (the `const _`
//! items below), so a header that changes a signature fails the build.

use std::ffi::{CStr, c_char, c_void};
use std::sync::OnceLock;

use crate::spank::ffi;

pub type SpankContextFn = unsafe extern "C" fn() -> ffi::spank_context_t;
pub type SpankGetItemFn =
    unsafe extern "C" fn(ffi::spank_t, ffi::spank_item_t, ...) -> ffi::spank_err_t;
pub type SpankStrerrorFn = unsafe extern "C" fn(ffi::spank_err_t) -> *const c_char;
pub type LogFn = unsafe extern "C" fn(*const c_char, ...);

const _: SpankContextFn = ffi::spank_context;
const _: SpankGetItemFn = ffi::spank_get_item;
const _: SpankStrerrorFn = ffi::spank_strerror;
const _: LogFn = ffi::slurm_info;
const _: LogFn = ffi::slurm_error;
const _: LogFn = ffi::slurm_verbose;
const _: LogFn = ffi::slurm_debug;

/// The resolved functions; each `None` where the process does not define it.
#[derive(Debug, Clone, Copy)]
pub struct Api {
    pub spank_context: Option<SpankContextFn>,
    pub spank_get_item: Option<SpankGetItemFn>,
    pub spank_strerror: Option<SpankStrerrorFn>,
    pub slurm_info: Option<LogFn>,
    pub slurm_error: Option<LogFn>,
    pub slurm_verbose: Option<LogFn>,
    pub slurm_debug: Option<LogFn>,
}

fn lookup(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: dlsym with RTLD_DEFAULT and a C string only searches the loaded objects.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

macro_rules! resolve {
    ($name:literal, $ty:ty) => {
        // SAFETY: the symbol named is a function with the prototype `$ty` (checked against
        // the header above).
        lookup($name).map(|p| unsafe { std::mem::transmute::<*mut c_void, $ty>(p) })
    };
}

/// The functions, resolved once per process (after a fork the child keeps the answer, which
/// stays right: the same libraries are mapped at the same addresses).
pub fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| Api {
        spank_context: resolve!(c"spank_context", SpankContextFn),
        spank_get_item: resolve!(c"spank_get_item", SpankGetItemFn),
        spank_strerror: resolve!(c"spank_strerror", SpankStrerrorFn),
        slurm_info: resolve!(c"slurm_info", LogFn),
        slurm_error: resolve!(c"slurm_error", LogFn),
        slurm_verbose: resolve!(c"slurm_verbose", LogFn),
        slurm_debug: resolve!(c"slurm_debug", LogFn),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn outside_slurm_nothing_resolves() {
        let api = super::api();
        assert!(api.spank_context.is_none());
        assert!(api.spank_get_item.is_none());
        assert!(api.slurm_info.is_none());
    }
}
