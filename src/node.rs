//! The worker node's policy as one unit: the nftables table that marks the connections of
//! selected sockets, and the policy routing that sends marked packets to the NAT routers.
//!
//! `apply` = validate everything (config, NSS, interface, gateway, table name), then diff the
//! live state against the desired one and change only what differs: the nftables part in one
//! transaction, routes before the rule that points at them. `check` is the same diff, printed.
//! `remove` is the symmetric teardown.
//!
//! How a packet is chosen: the first packet of a connection (`ct state new`) from a socket
//! whose owner is selected puts our bits into the connection's mark; every packet of a
//! connection that carries them gets the fwmark. Deciding once per connection, and carrying
//! the decision in conntrack, is what keeps packets the kernel sends for a socket that is
//! gone (TIME_WAIT ACKs, RSTs after close, which the kernel sends from its own root-owned
//! socket) on the same path as the rest of their connection.

use std::fmt;

use crate::cgroup;
use crate::config::{By, Config, Protocols};
use crate::ledger::{self, Ledger, Running};
use crate::netfilter::{
    self, BaseChain, Chain, ChainKind, CtState, Family, Hook, KeyType, Match, Netfilter, Policy,
    Rule, Set, Statement, Table,
};
use crate::routing::{self, Routing};
use crate::selection::{self, Selection};

/// The nftables table this project owns on a worker node.
pub const TABLE: &str = "slurm_egress";
/// Statically selected users, and the known members of selected groups.
pub const USERS: &str = "users";
/// Statically selected groups (matched on the socket's primary gid).
pub const GROUPS: &str = "groups";
/// Owners (`by = "uid"`) or cgroups (`by = "cgroup"`) of running selected jobs; the plugin
/// adds and removes them.
pub const JOBS: &str = "jobs";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("slurm-egress must run as root (it changes nftables and routing)")]
    NotRoot,
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Selection(#[from] selection::Error),
    #[error(transparent)]
    Routing(#[from] routing::Error),
    #[error(transparent)]
    Netfilter(#[from] netfilter::Error),
    #[error(transparent)]
    Ledger(#[from] ledger::Error),
}

/// Refuses to go on without root: every later step would fail with a less clear EPERM.
pub fn require_root() -> Result<(), Error> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::NotRoot)
    }
}

/// The node's nftables table for this config, selection and running jobs.
///
/// With `by = "uid"`: sets of selected users, groups and running jobs' owners, matched on the
/// socket's owner. With `by = "cgroup"`: one set of running jobs' cgroups, matched on the
/// socket's cgroup ancestor, one rule per level where job cgroups are (the per-job cgroups
/// slurm-egress makes, and each level Slurm's were seen at since boot); nothing is selected
/// by user.
pub fn table(config: &Config, selection: &Selection, running: &Running) -> Table {
    let r = &config.routing;
    let select = |m: Match| Rule {
        matches: vec![Match::CtState(CtState::NEW), m],
        statements: vec![Statement::CtMark {
            mask: r.mask,
            value: r.mark,
        }],
    };
    let jump = Rule {
        matches: match &r.protocols {
            Protocols::All => vec![],
            Protocols::Only(list) => {
                vec![Match::L4Proto(list.iter().map(|p| p.number()).collect())]
            }
        },
        statements: vec![Statement::Jump("select".into())],
    };
    let (sets, mut rules) = match &config.select.by {
        By::Uid => (
            vec![
                Set::new(
                    USERS,
                    KeyType::Uid,
                    selection.uids.iter().map(|&u| u.into()),
                ),
                Set::new(
                    GROUPS,
                    KeyType::Gid,
                    selection.gids.iter().map(|&g| g.into()),
                ),
                Set::new(JOBS, KeyType::Uid, running.uids.iter().map(|&u| u.into())),
            ],
            vec![
                select(Match::SkUidIn(USERS.into())),
                select(Match::SkGidIn(GROUPS.into())),
                select(Match::SkUidIn(JOBS.into())),
            ],
        ),
        By::Cgroup { parent } => {
            let mut levels = running.levels.clone();
            levels.insert(cgroup::level(&cgroup::own_cgroup(parent, 0)));
            (
                vec![Set::new(
                    JOBS,
                    KeyType::CgroupV2,
                    running.cgroups.iter().copied(),
                )],
                levels
                    .into_iter()
                    .map(|level| {
                        select(Match::SocketCgroupIn {
                            level,
                            set: JOBS.into(),
                        })
                    })
                    .collect(),
            )
        }
    };
    rules.push(Rule {
        matches: vec![Match::CtMark {
            mask: r.mask,
            value: r.mark,
        }],
        statements: vec![Statement::MetaMark {
            mask: r.mask,
            value: r.mark,
        }],
    });
    Table {
        family: Family::Inet,
        name: TABLE.into(),
        sets,
        chains: vec![
            Chain {
                name: "output".into(),
                // A route chain: changing the mark here makes the kernel route the packet
                // again, so the fwmark rule applies to the very first packet.
                base: Some(BaseChain {
                    kind: ChainKind::Route,
                    hook: Hook::Output,
                    priority: BaseChain::PRIORITY_MANGLE,
                    policy: Policy::Accept,
                }),
                rules: vec![jump],
            },
            Chain {
                name: "select".into(),
                base: None,
                rules,
            },
        ],
    }
}

/// What `apply` would change, or what `check` found.
#[derive(Debug, Default)]
pub struct Plan {
    pub netfilter: Vec<netfilter::Difference>,
    pub routing: Vec<routing::Difference>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.netfilter.is_empty() && self.routing.is_empty()
    }

    pub fn len(&self) -> usize {
        self.netfilter.len() + self.routing.len()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.netfilter {
            writeln!(f, "nftables: {d}")?;
        }
        for d in &self.routing {
            writeln!(f, "routing: {d}")?;
        }
        Ok(())
    }
}

/// The node's kernel connections, opened once and reused: by `watch` for its whole life,
/// because closing an nftables socket can wait for the kernel.
pub struct Handles {
    pub nft: Netfilter,
    pub routing: Routing,
}

impl Handles {
    /// Opens both sockets in the current network namespace (on the current tokio runtime).
    pub fn open() -> Result<Handles, Error> {
        Ok(Handles {
            nft: Netfilter::open()?,
            routing: Routing::connect()?,
        })
    }
}

/// A validated node policy with its live state read, holding the ledger lock so that no job
/// starts or ends between reading and applying.
pub struct Node {
    table: Table,
    policy: routing::Policy,
    _ledger: Ledger,
    pub plan: Plan,
}

impl Node {
    /// Everything that can fail on bad input fails here, before any change.
    pub async fn load(config: &Config, handles: &mut Handles) -> Result<Node, Error> {
        require_root()?;
        let selection = selection::resolve(&config.select, &config.path)?;
        routing::check_table_name(config)?;
        let link = handles.routing.link(&config.routing.interface).await?;
        let policy = routing::Policy::new(config, link.as_ref())?;
        let ledger = Ledger::lock(&config.jobs.state_dir)?;
        let table = table(config, &selection, &ledger.running_here()?);
        let live_table = handles.nft.read(Family::Inet, TABLE)?;
        let live_routes = handles.routing.read(policy.rule.table).await?;
        let plan = Plan {
            netfilter: netfilter::diff(&table, live_table.as_ref()),
            routing: policy.diff(&live_routes),
        };
        Ok(Node {
            table,
            policy,
            _ledger: ledger,
            plan,
        })
    }

    /// Makes the plan true: nftables in one transaction, then routing.
    pub async fn apply(&self, handles: &mut Handles) -> Result<(), Error> {
        if !self.plan.netfilter.is_empty() {
            handles.nft.apply(&self.table)?;
        }
        if !self.plan.routing.is_empty() {
            handles
                .routing
                .apply(self.policy.rule.table, &self.plan.routing)
                .await?;
        }
        Ok(())
    }
}

/// Takes out what `apply` made; returns a line per thing removed. Running jobs stay in the
/// ledger, so a later `apply` gives them their path back.
pub async fn remove(config: &Config, handles: &mut Handles) -> Result<Vec<String>, Error> {
    require_root()?;
    let _ledger = Ledger::lock(&config.jobs.state_dir)?;
    let mut done = handles.routing.remove(config.routing.table).await?;
    if handles.nft.delete(Family::Inet, TABLE)? {
        done.insert(0, format!("deleted nftables table inet {TABLE}"));
    }
    Ok(done)
}
