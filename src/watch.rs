//! `slurm-egress watch`: keeps the node policy true, for as long as it runs.
//!
//! The seed's open problem: when the fabric link goes down and up, the interface loses its
//! address and every route through it, the egress table with them, and nothing puts them
//! back. `watch` listens to the kernel's own change notifications (links, addresses, routes
//! and rules over rtnetlink; nftables ruleset changes over nfnetlink) and re-applies the
//! policy as soon as it differs, plus every `--interval` as a safety net, which also picks up
//! group membership changes in NSS. While the interface is down or has no address it waits
//! (and says so once) instead of failing.
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
use netlink_sys::{AsyncSocket, AsyncSocketExt, TokioSocket};
use rtnetlink::MulticastGroup;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::Config;
use crate::ledger;
use crate::netfilter::{Family, KeyType, Netfilter};
use crate::node::{self, Handles, JOBS, Node, TABLE};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot subscribe to kernel notifications: {0}")]
    Subscribe(#[source] std::io::Error),
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
/// nftables notifications that are no sign of drift: set elements come and go with jobs, and
/// every transaction ends with a new generation.
const NFT_MSG_NEWSETELEM: u8 = 12;
const NFT_MSG_DELSETELEM: u8 = 14;
const NFT_MSG_NEWGEN: u8 = 15;
/// Changes arrive in bursts (a link flap removes every route one message at a time): wait
/// this long after the last one before looking.
const SETTLE: Duration = Duration::from_millis(100);

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

    let (connection, _, mut route_events) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv4Rule,
    ])
    .map_err(Error::Subscribe)?;
    tokio::spawn(connection);
    let mut nft_events =
        TokioSocket::new(libc::NETLINK_NETFILTER as isize).map_err(Error::Subscribe)?;
    nft_events
        .socket_mut()
        .bind_auto()
        .and_then(|_| nft_events.socket_mut().add_membership(NFNLGRP_NFTABLES))
        .map_err(Error::Subscribe)?;

    let mut listening = serve(&config)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(Error::Subscribe)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(Error::Subscribe)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(Error::Subscribe)?;
    let mut timer = tokio::time::interval(interval);
    let mut last_problem: Option<String> = None;
    tracing::info!(config = %config_path.display(), socket = %listening.display(), "watching");

    loop {
        let mut dirty = false;
        tokio::select! {
            _ = timer.tick() => dirty = true,
            Some(_) = route_events.next() => dirty = true,
            Ok((datagram, _)) = nft_events.recv_from_full() => dirty = structural(&datagram),
            _ = hangup.recv() => {
                match Config::load(config_path) {
                    Ok(new) => {
                        if new.jobs.state_dir != config.jobs.state_dir {
                            listening = serve(&new)?;
                        }
                        config = new;
                        tracing::info!("config reloaded");
                        dirty = true;
                    }
                    Err(e) => tracing::error!("config not reloaded: {e}"),
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
        if !dirty {
            continue;
        }
        // Let the burst settle, swallowing what else arrives meanwhile.
        let settle = tokio::time::sleep(SETTLE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => break,
                Some(_) = route_events.next() => {}
                Ok(_) = nft_events.recv_from_full() => {}
            }
        }
        match reconcile(&config, &mut handles).await {
            Ok(()) => last_problem = None,
            Err(e) => {
                let problem = e.to_string();
                if last_problem.as_deref() != Some(problem.as_str()) {
                    tracing::warn!(
                        "node policy not applied, waiting for the next change: {problem}"
                    );
                }
                last_problem = Some(problem);
            }
        }
    }
    let _ = std::fs::remove_file(&listening);
    tracing::info!("stopped");
    Ok(())
}

/// Whether an nftables notification datagram holds anything but set element changes.
fn structural(datagram: &[u8]) -> bool {
    let mut rest = datagram;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if !matches!(
            (kind & 0xff) as u8,
            NFT_MSG_NEWSETELEM | NFT_MSG_DELSETELEM | NFT_MSG_NEWGEN
        ) {
            return true;
        }
        if len < 16 {
            return true;
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    false
}

/// Starts the thread that serves set changes on this namespace's socket; returns its path.
/// The thread lives as long as the process (a reload that moves the state directory starts
/// another one; the old socket file is removed, so nobody reaches the old thread).
fn serve(config: &Config) -> Result<PathBuf, Error> {
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

/// Applies the policy if it drifted, logging each change.
async fn reconcile(config: &Config, handles: &mut Handles) -> Result<(), node::Error> {
    let node = Node::load(config, handles).await?;
    if node.plan.is_empty() {
        return Ok(());
    }
    node.apply(handles).await?;
    for line in node.plan.to_string().lines() {
        tracing::warn!("repaired: {line}");
    }
    Ok(())
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
