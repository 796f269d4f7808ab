//! Logging through Slurm's own log functions, so messages land in slurmd's log (and, from
//! sbatch/srun, on the user's terminal at the matching verbosity).
//!
//! The C functions are printf-like and variadic: the format is always the constant `"%s"` and
//! the message one C string argument, so a `%` in a message is printed, never interpreted.
//! Every message is prefixed with `slurm-egress: `. Outside Slurm (the crate's tests and
//! binaries) the functions are missing and messages go to stderr instead.

use std::ffi::CString;

use crate::spank::sys::{self, LogFn};

const PREFIX: &str = "slurm-egress: ";

/// The message as a C string: prefixed, interior NULs (which C would cut at) replaced.
fn c_message(msg: &str) -> CString {
    let mut s = String::with_capacity(PREFIX.len() + msg.len());
    s.push_str(PREFIX);
    s.push_str(msg);
    CString::new(s.replace('\0', "\u{fffd}")).expect("interior NULs were replaced")
}

fn emit(f: Option<LogFn>, level: &str, msg: &str) {
    let msg = c_message(msg);
    match f {
        // SAFETY: the format is a constant "%s" whose one conversion takes the C string after
        // it; both pointers outlive the call.
        Some(f) => unsafe { f(c"%s".as_ptr(), msg.as_ptr()) },
        None => eprintln!("{level}: {}", msg.to_string_lossy()),
    }
}

/// `info` level: in slurmd's log at its default verbosity.
pub fn info(msg: &str) {
    emit(sys::api().slurm_info, "info", msg)
}

/// `error` level: logged with an `error: ` prefix.
pub fn error(msg: &str) {
    emit(sys::api().slurm_error, "error", msg)
}

/// `verbose` level: shown from `SlurmdDebug=verbose` on.
pub fn verbose(msg: &str) {
    emit(sys::api().slurm_verbose, "verbose", msg)
}

/// `debug` level: shown from `SlurmdDebug=debug` on.
pub fn debug(msg: &str) {
    emit(sys::api().slurm_debug, "debug", msg)
}

#[cfg(test)]
mod tests {
    use super::c_message;

    #[test]
    fn messages_are_prefixed_and_nul_free() {
        assert_eq!(
            c_message("100% up").to_str().unwrap(),
            "slurm-egress: 100% up"
        );
        assert_eq!(
            c_message("a\0b").to_str().unwrap(),
            "slurm-egress: a\u{fffd}b"
        );
    }
}
