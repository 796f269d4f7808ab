//! `slurm-egress watch`: keeps the node policy true, for as long as it runs.
//!
//! The seed's open problem: when the fabric link goes down and up, the interface loses its
//! address and every route through it, the egress table with them, and nothing puts them
//! back. `watch` listens to the kernel's own change notifications (links, addresses, routes
//! and rules over rtnetlink; nftables ruleset changes, set members included, over
//! nfnetlink) and re-applies the policy as soon as it differs, plus every `--interval` as a
//! safety net, which also picks up group membership changes in NSS. Each repair is one log
//! line: what was wrong, and what was done.
//!
//! Two states are told apart. While the interface is missing, down or has no address, there
//! is nothing to apply: it waits (and says so once), and looks again at the next
//! notification, which the interface's return is. When the kernel refuses a change, or
//! something undoes every repair, looking again at once could spin, fed by the
//! notifications of its own partial changes: retries back off instead (see [`Retry`]).
//! Notifications caused by our own nftables sockets are ignored; lost ones (`ENOBUFS`) count
//! as drift.
//!
//! It also serves the plugin's set changes on a unix socket (see [`crate::jobs`]), from a
//! thread of its own with an nftables socket that is never closed, so a job end never waits
//! for the kernel to free what it removed (closing an nftables socket does, for an RCU grace
//! period, under the nftables mutex). The client holds the ledger lock while it asks, so that
//! thread never takes the lock; the checks, which do, run on the main thread.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use netlink_sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};
use nix::sys::socket::sockopt;
use rtnetlink::MulticastGroup;
use rtnetlink::packet_core::NetlinkMessage;
use rtnetlink::packet_route::RouteNetlinkMessage;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::Config;
use crate::netfilter::{self, Family, KeyType, Netfilter};
use crate::node::{self, Handles, JOBS, Node, Plan, TABLE};
use crate::{ledger, routing};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot subscribe to kernel notifications: {0}")]
    Subscribe(#[source] std::io::Error),
    #[error("the kernel's route notifications stopped")]
    Closed,
    #[error("{path}: cannot serve the set socket: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Node(#[from] node::Error),
    #[error(transparent)]
    Ledger(#[from] ledger::Error),
}

/// nfnetlink's multicast group for nftables ruleset changes (`NFNLGRP_NFTABLES`).
const NFNLGRP_NFTABLES: u32 = 7;
/// The message that ends every nftables transaction's notifications.
const NFT_MSG_NEWGEN: u8 = 15;
/// Receive buffer for nftables notifications (the kernel doubles it for bookkeeping).
const NFT_RCVBUF: usize = 4 << 20;
/// Changes arrive in bursts (a link flap removes every route one message at a time): wait
/// this long after the first one before looking.
const SETTLE: Duration = Duration::from_millis(100);
/// The first retry after a look that did not end in sync, and the longest wait between
/// retries (see [`Retry`]).
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The set socket of the current network namespace under `state_dir`: one per namespace,
/// because the set it changes lives in the namespace.
pub fn socket_path(state_dir: &Path) -> Result<PathBuf, ledger::Error> {
    let netns = ledger::current_netns()?;
    let id: String = netns.chars().filter(char::is_ascii_digit).collect();
    Ok(state_dir.join(format!("watch-{id}.sock")))
}

/// A member of the `jobs` set: a job owner (`by = "uid"`) or a job's cgroup id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    Uid(u32),
    Cgroup(u64),
}

/// A set change asked for by a job start or end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetChange {
    Add(Member),
    Remove(Member),
}

/// The request as sent on the socket, without its newline: `add uid 1001`,
/// `remove cgroup 4242`.
impl std::fmt::Display for SetChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (verb, member) = match self {
            SetChange::Add(m) => ("add", m),
            SetChange::Remove(m) => ("remove", m),
        };
        match member {
            Member::Uid(uid) => write!(f, "{verb} uid {uid}"),
            Member::Cgroup(id) => write!(f, "{verb} cgroup {id}"),
        }
    }
}

impl SetChange {
    fn parse(line: &str) -> Option<SetChange> {
        let mut words = line.split_whitespace();
        let (verb, kind, value) = (words.next()?, words.next()?, words.next()?);
        let member = match kind {
            "uid" => Member::Uid(value.parse().ok()?),
            "cgroup" => Member::Cgroup(value.parse().ok()?),
            _ => return None,
        };
        match (verb, words.next()) {
            ("add", None) => Some(SetChange::Add(member)),
            ("remove", None) => Some(SetChange::Remove(member)),
            _ => None,
        }
    }

    /// Makes the change through `nft`; adding what is there or removing what is not is fine.
    pub fn apply(self, nft: &mut Netfilter) -> Result<(), crate::netfilter::Error> {
        let (SetChange::Add(member) | SetChange::Remove(member)) = self;
        let (key, value) = match member {
            Member::Uid(uid) => (KeyType::Uid, u64::from(uid)),
            Member::Cgroup(id) => (KeyType::CgroupV2, id),
        };
        match self {
            SetChange::Add(_) => nft.add_elements(Family::Inet, TABLE, JOBS, key, &[value]),
            SetChange::Remove(_) => nft.remove_elements(Family::Inet, TABLE, JOBS, key, &[value]),
        }
    }
}

/// Runs until SIGTERM or SIGINT. The config is read at start and again on SIGHUP; a config
/// that fails to load keeps the previous one (and says why).
pub async fn run(config_path: &Path, interval: Duration) -> Result<(), Error> {
    node::require_root()?;
    let mut config = Config::load(config_path).map_err(node::Error::from)?;
    let mut handles = Handles::open()?;
    let mut notifications = Notifications::subscribe()?;
    notifications
        .ours
        .push(handles.nft.portid().map_err(node::Error::from)?);
    let mut listening = serve(&config, &mut notifications)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(Error::Subscribe)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(Error::Subscribe)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(Error::Subscribe)?;
    // The first tick is at once: the policy is applied at start.
    let mut timer = tokio::time::interval(interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = Retry::default();
    tracing::info!(config = %config_path.display(), socket = %listening.display(), "watching");

    loop {
        if retry.due() {
            notifications.settle().await?;
            let outcome = reconcile(&config, &mut handles).await;
            retry.after(outcome);
            continue;
        }
        tokio::select! {
            _ = timer.tick() => retry.drift(),
            drift = notifications.next() => {
                if drift? {
                    retry.drift();
                }
            }
            _ = tokio::time::sleep_until(retry.not_before), if retry.pending => {}
            _ = hangup.recv() => {
                match Config::load(config_path) {
                    Ok(new) => {
                        if new.jobs.state_dir != config.jobs.state_dir {
                            listening = serve(&new, &mut notifications)?;
                        }
                        config = new;
                        tracing::info!("config reloaded");
                        // A new config may cure what the old one could not apply.
                        retry = Retry::default();
                        retry.drift();
                    }
                    Err(e) => tracing::error!("config not reloaded: {e}"),
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    let _ = std::fs::remove_file(&listening);
    tracing::info!("stopped");
    Ok(())
}

/// The kernel's change notifications, boiled down to "the policy may have drifted".
struct Notifications {
    /// Links, IPv4 addresses, routes and rules.
    routes: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
    /// nftables ruleset changes.
    nft: TokioSocket,
    /// Port ids of our own nftables sockets: what they change is no drift (the set changes
    /// of running jobs, and each repair), and looking again after each would be waste.
    ours: Vec<u32>,
}

impl Notifications {
    fn subscribe() -> Result<Notifications, Error> {
        let (connection, _, routes) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv4Rule,
        ])
        .map_err(Error::Subscribe)?;
        tokio::spawn(connection);
        let mut nft =
            TokioSocket::new(libc::NETLINK_NETFILTER as isize).map_err(Error::Subscribe)?;
        let socket = nft.socket_mut();
        socket
            .bind_auto()
            .and_then(|_| socket.add_membership(NFNLGRP_NFTABLES))
            .map_err(Error::Subscribe)?;
        // A rebuild of a table with thousands of set members is a burst of notifications;
        // room for it avoids a needless ENOBUFS (which would still be handled: see `next`).
        let _ = nix::sys::socket::setsockopt(&*socket, sockopt::RcvBufForce, &NFT_RCVBUF);
        Ok(Notifications {
            routes,
            nft,
            ours: Vec::new(),
        })
    }

    /// Waits for the next notification; true if it may mean drift. Lost notifications count
    /// as drift: whatever they said is unknown. Cancel safe (one receive per poll).
    async fn next(&mut self) -> Result<bool, Error> {
        tokio::select! {
            // Every route message counts, including the overrun marker that netlink-proto
            // hands on when the kernel reports ENOBUFS.
            event = self.routes.next() => match event {
                Some(_) => Ok(true),
                None => Err(Error::Closed),
            },
            received = self.nft.recv_from_full() => match received {
                Ok((datagram, _)) => Ok(foreign_change(&datagram, &self.ours)),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(true),
                Err(e) => Err(Error::Subscribe(e)),
            },
        }
    }

    /// Lets a burst settle (a link flap removes every route, one message at a time),
    /// swallowing what else arrives meanwhile: the look that follows sees all of it.
    async fn settle(&mut self) -> Result<(), Error> {
        let settle = tokio::time::sleep(SETTLE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => return Ok(()),
                drift = self.next() => {
                    drift?;
                }
            }
        }
    }
}

/// Whether an nftables notification datagram holds a change that none of our own sockets
/// made. The kernel stamps each notification with the port id of the socket whose
/// transaction caused it; every transaction also ends with a new-generation message, which
/// says nothing by itself.
fn foreign_change(datagram: &[u8], ours: &[u32]) -> bool {
    let mut rest = datagram;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let portid = u32::from_ne_bytes([rest[12], rest[13], rest[14], rest[15]]);
        if (kind & 0xff) as u8 != NFT_MSG_NEWGEN && !ours.contains(&portid) {
            return true;
        }
        if len < 16 {
            return true;
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    false
}

/// When to look at the node next. Looks that end in sync (or waiting for the interface)
/// clear it; a look that had to repair something is checked again at once, and any further
/// look that does not end in sync (the kernel refused, or something undoes each repair)
/// waits twice as long as the one before, from [`BACKOFF_MIN`] to [`BACKOFF_MAX`]. So no
/// loop of repairs and the notifications they cause can spin.
#[derive(Debug)]
struct Retry {
    /// The node may have drifted since the last look.
    pending: bool,
    not_before: tokio::time::Instant,
    backoff: Duration,
    /// The last look ended in sync or waiting: a repair now starts a new episode.
    settled: bool,
    /// What the interface was last found waiting for, so that it is said once.
    waiting: Option<String>,
}

impl Default for Retry {
    fn default() -> Retry {
        Retry {
            pending: false,
            not_before: tokio::time::Instant::now(),
            backoff: Duration::ZERO,
            settled: true,
            waiting: None,
        }
    }
}

impl Retry {
    fn drift(&mut self) {
        self.pending = true;
    }

    fn due(&self) -> bool {
        self.pending && tokio::time::Instant::now() >= self.not_before
    }

    fn grow(&mut self) {
        self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
    }

    /// Takes the outcome of a look, logs it, and decides when to look again.
    fn after(&mut self, outcome: Outcome) {
        self.pending = false;
        match outcome {
            Outcome::InSync => {
                self.waiting = None;
                self.backoff = Duration::ZERO;
                self.settled = true;
                tracing::debug!("node policy in sync");
            }
            Outcome::Waiting(problem) => {
                // Nothing was changed, and the interface's return is itself a notification:
                // the next one is looked at without delay. Said once per problem.
                if self.waiting.as_ref() != Some(&problem) {
                    tracing::warn!("node policy not applied, waiting for the interface: {problem}");
                }
                self.waiting = Some(problem);
                self.backoff = Duration::ZERO;
                self.settled = true;
            }
            Outcome::Repaired(lines) => {
                self.waiting = None;
                for line in lines {
                    tracing::warn!("repaired: {line}");
                }
                if !self.settled {
                    self.grow();
                }
                self.settled = false;
                self.pending = true;
            }
            Outcome::Failed(problem) => {
                self.waiting = None;
                self.grow();
                self.settled = false;
                self.pending = true;
                tracing::warn!(
                    "node policy not applied, retrying in {:.1} s: {problem}",
                    self.backoff.as_secs_f64()
                );
            }
        }
        self.not_before = tokio::time::Instant::now() + self.backoff;
    }
}

/// What one look at the node found and did.
#[derive(Debug)]
enum Outcome {
    InSync,
    /// One line per repair: what was wrong, and what was done.
    Repaired(Vec<String>),
    /// The interface is missing, down, or without an address on the gateway's subnet:
    /// nothing can be applied until that changes.
    Waiting(String),
    /// Reading, resolving or applying failed otherwise (for example the kernel refused).
    Failed(String),
}

/// Starts the thread that serves set changes on this namespace's socket; returns its path.
/// The thread lives as long as the process (a reload that moves the state directory starts
/// another one; the old socket file is removed, so nobody reaches the old thread). Its
/// nftables socket joins our own in `notifications`.
fn serve(config: &Config, notifications: &mut Notifications) -> Result<PathBuf, Error> {
    let path = socket_path(&config.jobs.state_dir)?;
    let listen_error = |source| Error::Listen {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(&config.jobs.state_dir).map_err(listen_error)?;
    // A socket file left by a watch that was killed.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(listen_error)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(listen_error)?;
    let mut nft = Netfilter::open().map_err(node::Error::from)?;
    notifications
        .ours
        .push(nft.portid().map_err(node::Error::from)?);
    std::thread::Builder::new()
        .name("set changes".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                answer(stream, &mut nft);
            }
        })
        .map_err(listen_error)?;
    Ok(path)
}

/// Looks at the node once and applies the policy if it drifted.
async fn reconcile(config: &Config, handles: &mut Handles) -> Outcome {
    let node = match Node::load(config, handles).await {
        Ok(node) => node,
        Err(e) if waits_for_interface(&e) => return Outcome::Waiting(e.to_string()),
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    if node.plan.is_empty() {
        return Outcome::InSync;
    }
    match node.apply(handles).await {
        Ok(()) => Outcome::Repaired(repairs(&node.plan)),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// Whether the policy cannot be applied because of the interface's present state (missing,
/// down, no address on the gateway's subnet): the routing module refuses to derive routes
/// from it. Only a link or address change, or a new config, can end that, and both wake us.
fn waits_for_interface(e: &node::Error) -> bool {
    matches!(e, node::Error::Routing(routing::Error::Config { .. }))
}

/// One line per difference of an applied plan: what was wrong, then what was done.
fn repairs(plan: &Plan) -> Vec<String> {
    use netfilter::Difference as Nft;
    use routing::Difference as Route;
    // Any structural difference replaces the whole table, in one transaction.
    let rebuilt = plan.netfilter.iter().any(Nft::is_structural);
    let nft = plan.netfilter.iter().map(|d| {
        let done = match d {
            Nft::TableMissing { .. } => "created",
            _ if rebuilt => "table rebuilt",
            Nft::ElementMissing { .. } => "added",
            _ => "removed",
        };
        format!("nftables: {d} -> {done}")
    });
    let routes = plan.routing.iter().map(|d| {
        let done = match d {
            Route::MissingRule(..) | Route::MissingRoute(..) => "added",
            Route::WrongRoute { .. } => "replaced",
            Route::StaleRule(..) | Route::ExtraRoute(..) => "deleted",
            Route::TableName { .. } => "written",
        };
        format!("routing: {d} -> {done}")
    });
    nft.chain(routes).collect()
}

/// Answers one set change request from a root client: `ok`, or `error <errno> <message>`.
/// The client holds the ledger lock meanwhile; a silent client is dropped after a second.
fn answer(stream: UnixStream, nft: &mut Netfilter) {
    if !nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .is_ok_and(|c| c.uid() == 0)
    {
        return;
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    let reply = match (reader.read_line(&mut line), SetChange::parse(&line)) {
        (Ok(_), Some(change)) => match change.apply(nft) {
            Ok(()) => {
                tracing::info!("jobs set: {change}");
                "ok\n".to_owned()
            }
            Err(e) => format!("error {} {e}\n", e.errno().unwrap_or(libc::EIO)),
        },
        _ => format!("error {} bad request {:?}\n", libc::EINVAL, line.trim()),
    };
    let _ = (&stream).write_all(reply.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> Outcome {
        Outcome::Failed("refused".into())
    }

    #[test]
    fn refusals_back_off_from_the_minimum_to_the_cap_and_a_clean_look_resets() {
        let mut retry = Retry::default();
        let mut waits = Vec::new();
        for _ in 0..10 {
            retry.after(failed());
            assert!(retry.pending, "a refusal is retried without a notification");
            waits.push(retry.backoff.as_millis());
        }
        assert_eq!(
            waits,
            [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]
        );
        retry.after(Outcome::InSync);
        assert!(!retry.pending);
        assert_eq!(retry.backoff, Duration::ZERO);
    }

    #[test]
    fn a_repair_is_checked_again_at_once_but_repeated_repairs_back_off() {
        let mut retry = Retry::default();
        retry.after(Outcome::Repaired(vec!["x".into()]));
        assert!(retry.pending && retry.backoff == Duration::ZERO);
        // Something undoes each repair.
        retry.after(Outcome::Repaired(vec!["x".into()]));
        assert_eq!(retry.backoff, BACKOFF_MIN);
        retry.after(Outcome::Repaired(vec!["x".into()]));
        assert_eq!(retry.backoff, BACKOFF_MIN * 2);
        retry.after(Outcome::InSync);
        retry.after(Outcome::Repaired(vec!["x".into()]));
        assert_eq!(retry.backoff, Duration::ZERO, "a new episode starts fresh");
    }

    #[test]
    fn waiting_for_the_interface_delays_nothing() {
        let mut retry = Retry::default();
        for _ in 0..4 {
            retry.after(failed());
        }
        retry.after(Outcome::Waiting("ib0 is down".into()));
        assert!(!retry.pending, "the interface's return is a notification");
        retry.drift();
        assert!(retry.due(), "and it is looked at without delay");
    }

    /// A netlink message header of nf_tables message `kind` from port `portid`.
    fn message(kind: u8, portid: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&20u32.to_ne_bytes());
        m.extend_from_slice(&((10u16 << 8) | u16::from(kind)).to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&portid.to_ne_bytes());
        m.extend_from_slice(&[0; 4]);
        m
    }

    #[test]
    fn only_changes_by_others_count() {
        const NEWTABLE: u8 = 0;
        const DELSETELEM: u8 = 14;
        let ours = [4242, 4243];
        let own = [message(DELSETELEM, 4243), message(NFT_MSG_NEWGEN, 4243)].concat();
        assert!(!foreign_change(&own, &ours));
        assert!(!foreign_change(&message(NFT_MSG_NEWGEN, 77), &ours));
        // `nft flush set`, by someone else.
        let flush = [message(DELSETELEM, 77), message(NFT_MSG_NEWGEN, 77)].concat();
        assert!(foreign_change(&flush, &ours));
        assert!(foreign_change(&message(NEWTABLE, 0), &ours));
    }

    #[test]
    fn each_repair_says_what_was_wrong_and_what_was_done() {
        let plan = Plan {
            netfilter: vec![netfilter::Difference::ElementMissing {
                set: "jobs".into(),
                key: KeyType::Uid,
                value: 1001,
            }],
            routing: vec![],
        };
        assert_eq!(
            repairs(&plan),
            ["nftables: set jobs: element 1001 missing -> added"]
        );
        let plan = Plan {
            netfilter: vec![
                netfilter::Difference::ChainMissing {
                    chain: "select".into(),
                },
                netfilter::Difference::ElementUnexpected {
                    set: "users".into(),
                    key: KeyType::Uid,
                    value: 0,
                },
            ],
            routing: vec![],
        };
        assert_eq!(
            repairs(&plan),
            [
                "nftables: chain select is missing -> table rebuilt",
                "nftables: set users: unexpected element 0 -> table rebuilt",
            ]
        );
    }
}
