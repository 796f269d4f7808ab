use std::io;

/// Errors of the netfilter module.
///
/// Every variant names the object it was about (`table inet slurm_egress`,
/// `set inet slurm_egress jobs`, ...) and keeps an `io::Error` as its `source()`: for kernel
/// refusals that is the errno of the netlink error ack, so callers match on
/// [`Error::errno`], never on text.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening, writing or reading the netlink socket failed.
    #[error("{object}: netlink {action} failed")]
    Netlink {
        object: String,
        action: &'static str,
        source: io::Error,
    },
    /// The kernel refused a message; the whole transaction was rolled back.
    #[error(
        "{object}: the kernel refused to {action}{}",
        eperm_hint(source, has_net_admin())
    )]
    Refused {
        object: String,
        action: &'static str,
        source: io::Error,
    },
    /// The kernel answered something this module does not understand.
    #[error("{object}: unexpected reply from the kernel")]
    Reply { object: String, source: io::Error },
    /// The desired table cannot be applied as written.
    #[error("{object} is invalid")]
    Invalid { object: String, source: io::Error },
}

/// Why the kernel says EPERM: without CAP_NET_ADMIN, that; with it, another process owns the
/// table (nftables' `owner` flag: nobody else may change it while that process lives).
pub(crate) fn eperm_hint(source: &io::Error, net_admin: bool) -> &'static str {
    match source.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) if net_admin => {
            " (another process owns the table: nftables `flags owner`)"
        }
        Some(libc::EPERM | libc::EACCES) => {
            " (this needs root: CAP_NET_ADMIN in the current network namespace)"
        }
        _ => "",
    }
}

/// Whether the calling thread has CAP_NET_ADMIN (bit 12 of `CapEff`).
fn has_net_admin() -> bool {
    std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

impl Error {
    /// The errno behind this error, if it came from the kernel or a system call.
    pub fn errno(&self) -> Option<i32> {
        let (Error::Netlink { source, .. }
        | Error::Refused { source, .. }
        | Error::Reply { source, .. }
        | Error::Invalid { source, .. }) = self;
        source.raw_os_error()
    }

    pub(crate) fn reply(object: impl Into<String>, why: impl Into<String>) -> Error {
        Error::Reply {
            object: object.into(),
            source: io::Error::new(io::ErrorKind::InvalidData, why.into()),
        }
    }

    pub(crate) fn invalid(object: impl Into<String>, why: impl Into<String>) -> Error {
        Error::Invalid {
            object: object.into(),
            source: io::Error::new(io::ErrorKind::InvalidInput, why.into()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
