//! For the netfilter module's own tests: each runs on a thread moved into a private, unnamed
//! network namespace, which disappears with the thread.

use slurm_egress::config::Config;
use slurm_egress::netfilter::*;
use slurm_egress::selection::Selection;
use std::io;
use std::net::Ipv4Addr;

/// Runs `f` on a thread that has been moved into a fresh, unnamed network namespace; the
/// namespace disappears with the thread, also when `f` panics. Never runs `f` in the
/// namespace the test started in.
pub fn in_netns<T: Send>(f: impl FnOnce() -> T + Send) -> Option<T> {
    super::require_root();
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                panic!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
            }
            f()
        })
        .join()
    });
    match result {
        Ok(v) => Some(v),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// An fd for the calling thread's network namespace, so other threads can join it.
pub fn netns_fd() -> std::fs::File {
    std::fs::File::open(format!("/proc/self/task/{}/ns/net", unsafe {
        libc::gettid()
    }))
    .expect("open own netns")
}

pub fn join_netns(fd: &std::fs::File) {
    use std::os::fd::AsRawFd;
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        panic!("setns: {}", io::Error::last_os_error());
    }
}

/// Runs `nft` (observing or tampering only) in the calling thread's namespace.
pub fn nft(args: &[&str]) -> String {
    let mut all = vec!["nft"];
    all.extend_from_slice(args);
    super::ok(&all)
}

pub const MARK: u32 = 0x1;

/// The worker-node table slurm-egress builds, for users 1001 and 1002 and group 2000.
pub fn node_table() -> Table {
    let config = Config::parse(
        "[routing]\ntable = 201\ntable_name = \"alinat\"\nmark = 0x1\nmask = 0x1\n\
         priority = 1000\ninterface = \"ib0\"\ngateway = \"10.20.3.227\"\nprotocols = [\"tcp\"]\n",
        std::path::Path::new("test.toml"),
    )
    .unwrap();
    let selection = Selection {
        uids: [1001, 1002].into(),
        gids: [2000].into(),
    };
    slurm_egress::node::table(&config, &selection, &Default::default())
}

/// The router table: forward filter plus source NAT (`snat`: `None` for masquerade).
pub fn router_table(snat: Option<Ipv4Addr>) -> Table {
    let iif = |n: &str| Match::IifName(n.into());
    let oif = |n: &str| Match::OifName(n.into());
    Table {
        family: Family::Inet,
        name: "slurm_egress_router".into(),
        sets: vec![],
        chains: vec![
            Chain {
                name: "forward".into(),
                base: Some(BaseChain {
                    kind: ChainKind::Filter,
                    hook: Hook::Forward,
                    priority: BaseChain::PRIORITY_FILTER,
                    policy: Policy::Drop,
                }),
                rules: vec![
                    Rule {
                        matches: vec![iif("ib0"), oif("eth9")],
                        statements: vec![Statement::Accept],
                    },
                    Rule {
                        matches: vec![
                            iif("eth9"),
                            oif("ib0"),
                            Match::CtState(CtState::ESTABLISHED | CtState::RELATED),
                        ],
                        statements: vec![Statement::Accept],
                    },
                ],
            },
            Chain {
                name: "postrouting".into(),
                base: Some(BaseChain {
                    kind: ChainKind::Nat,
                    hook: Hook::Postrouting,
                    priority: BaseChain::PRIORITY_SRCNAT,
                    policy: Policy::Accept,
                }),
                rules: vec![Rule {
                    matches: vec![oif("eth9")],
                    statements: vec![snat.map_or(Statement::Masquerade, Statement::Snat)],
                }],
            },
        ],
    }
}
