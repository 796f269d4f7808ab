//! conntrackd.conf for a router (FTFW over the inside network), and keepalived's notify hook,
//! which drives conntrackd through a VRRP state change the way conntrack-tools'
//! `primary-backup.sh` does.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use super::{Error, Setup};
use crate::config;

/// conntrackd's port for sync messages (its default).
pub const PORT: u16 = 3780;
/// The multicast group used with more than one peer (conntrackd's example value).
pub const MULTICAST_GROUP: &str = "225.0.0.50";
/// How long one conntrackd client command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// The notify log is started afresh above this size (the previous one is kept as `.old`).
const LOG_LIMIT: u64 = 256 * 1024;

/// The config file conntrackd runs with: the shipped unit writes it there, and the notify
/// hook's client commands read it to find conntrackd's socket.
pub fn config_path(state_dir: &Path) -> PathBuf {
    state_dir.join("conntrackd.conf")
}

/// The config text; an error when the router does not synchronise.
pub fn config(setup: &Setup, host: &str) -> Result<String, Error> {
    let r = &setup.router;
    if !r.sync {
        return Err(Error::NoSync {
            path: setup.path.clone(),
        });
    }
    let mut out = String::new();
    let state = r.state_dir.display();
    let (inside, me) = (r.inside.as_str(), setup.inside_addr);
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "# conntrackd.conf of the slurm-egress NAT router {host}, made by\n\
         # `slurm-egress router conntrackd-config` from {}.\n\
         # Change that file and make this one again; do not edit it.",
        setup.path.display()
    );
    out += "Sync {\n";
    out += "    Mode FTFW {\n";
    out += "        # The other routers' connections wait in user space until this router\n";
    out += "        # becomes master; the notify hook then commits them to the kernel.\n";
    out += "        DisableExternalCache off\n";
    out += "        # A router that turns backup empties its kernel table this long after.\n";
    out += "        PurgeTimeout 15\n";
    out += "    }\n";
    if let [peer] = &r.peers[..] {
        out += "    # One peer: unicast over the inside network.\n";
        out += "    UDP {\n";
        let _ = writeln!(out, "        IPv4_address {me}");
        let _ = writeln!(out, "        IPv4_Destination_Address {}", peer.value);
        let _ = writeln!(out, "        Port {PORT}");
    } else {
        out += "    # Several peers: multicast over the inside network (UDP reaches only one).\n";
        out += "    Multicast {\n";
        let _ = writeln!(out, "        IPv4_address {MULTICAST_GROUP}");
        let _ = writeln!(out, "        Group {PORT}");
        let _ = writeln!(out, "        IPv4_interface {me}");
    }
    let _ = writeln!(out, "        Interface {inside}");
    out += "        SndSocketBuffer 1249280\n";
    out += "        RcvSocketBuffer 1249280\n";
    out += "        Checksum on\n";
    out += "    }\n";
    out += "}\n\n";
    out += "General {\n";
    out += "    # Readiness for systemd (Type=notify); logs go to stdout, the journal.\n";
    out += "    Systemd on\n";
    out += "    LogFile off\n";
    out += "    Syslog off\n";
    out += "    HashSize 32768\n";
    out += "    HashLimit 131072\n";
    let _ = writeln!(out, "    LockFile {state}/conntrackd.lock");
    out += "    UNIX {\n";
    let _ = writeln!(out, "        Path {state}/conntrackd.ctl");
    out += "    }\n";
    out += "    NetlinkBufferSize 2097152\n";
    out += "    NetlinkBufferSizeMaxGrowth 8388608\n";
    out += "    Filter From Userspace {\n";
    out += "        Protocol Accept {\n";
    out += "            TCP\n";
    out += "            UDP\n";
    out += "            ICMP\n";
    out += "        }\n";
    out += "        # Forwarded connections only, not the routers' own traffic.\n";
    out += "        Address Ignore {\n";
    out += "            IPv4_address 127.0.0.1\n";
    let mut ignore = vec![*r.virtual_ip];
    ignore.extend(r.public_ip.as_ref().map(|p| p.value));
    ignore.push(me);
    ignore.extend(r.peers.iter().map(|p| p.value));
    ignore.extend(setup.outside_addrs.iter().copied());
    for ip in ignore {
        let _ = writeln!(out, "            IPv4_address {ip}");
    }
    out += "        }\n";
    out += "    }\n";
    out += "}\n";
    Ok(out)
}

/// A VRRP state keepalived reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transition {
    Master,
    Backup,
    Fault,
}

impl Transition {
    fn name(self) -> &'static str {
        match self {
            Transition::Master => "master",
            Transition::Backup => "backup",
            Transition::Fault => "fault",
        }
    }
}

/// The conntrackd client commands for a transition, in order, with what each is for.
pub fn steps(transition: Transition) -> &'static [(&'static str, &'static str)] {
    match transition {
        Transition::Master => &[
            (
                "-c",
                "commit the connections received from the other routers to the kernel",
            ),
            ("-f", "flush the internal and external caches"),
            ("-R", "refill the internal cache from the kernel"),
            ("-B", "send every connection to the backups"),
        ],
        Transition::Backup => &[
            ("-s", "check that conntrackd runs"),
            ("-t", "empty this router's kernel table after PurgeTimeout"),
            ("-n", "ask the master for all its connections"),
        ],
        Transition::Fault => &[("-t", "empty this router's kernel table after PurgeTimeout")],
    }
}

/// What the hook did.
#[derive(Debug)]
pub struct Report {
    pub lines: Vec<String>,
    /// Every command succeeded.
    pub ok: bool,
}

fn conntrackd_binary() -> &'static str {
    if Path::new("/usr/sbin/conntrackd").exists() {
        "/usr/sbin/conntrackd"
    } else {
        "conntrackd"
    }
}

/// Runs one client command; `Err` says why it failed.
fn client(config: &Path, flag: &str) -> Result<(), String> {
    let mut child = Command::new(conntrackd_binary())
        .arg("-C")
        .arg(config)
        .arg(flag)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run conntrackd: {e}"))?;
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer in {COMMAND_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("cannot wait for conntrackd: {e}")),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    let said = stderr.lines().rev().find(|l| !l.trim().is_empty());
    Err(match said {
        Some(said) => format!("{status}: {}", said.trim()),
        None => status.to_string(),
    })
}

/// Drives conntrackd through `transition`; every command runs even when an earlier one
/// failed, except on a backup whose conntrackd does not answer (its unit restarts it).
pub fn notify(router: &config::Router, transition: Transition) -> Report {
    let config = config_path(&router.state_dir);
    let mut report = Report {
        lines: Vec::new(),
        ok: true,
    };
    for (flag, what) in steps(transition) {
        let started = Instant::now();
        let result = client(&config, flag);
        let took = started.elapsed().as_millis();
        match result {
            Ok(()) => report
                .lines
                .push(format!("conntrackd {flag} ({what}): ok, {took} ms")),
            Err(why) => {
                report.ok = false;
                report
                    .lines
                    .push(format!("conntrackd {flag} ({what}): failed: {why}"));
                if *flag == "-s" {
                    report.lines.push(
                        "conntrackd does not answer: skipping the rest (its unit restarts it)"
                            .into(),
                    );
                    break;
                }
            }
        }
    }
    log(&router.state_dir, transition, &report.lines);
    report
}

/// Appends the report to `<state_dir>/notify.log`, the only trace of a hook keepalived runs
/// in the background. Best effort: a full disk must not stop a handover.
fn log(state_dir: &Path, transition: Transition, lines: &[String]) {
    let path = state_dir.join("notify.log");
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > LOG_LIMIT) {
        let _ = std::fs::rename(&path, state_dir.join("notify.log.old"));
    }
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let stamp = format!("{}.{:03}", now.as_secs(), now.subsec_millis());
    let mut text = String::new();
    for line in lines {
        let _ = writeln!(text, "{stamp} {}: {line}", transition.name());
    }
    let _ = std::fs::create_dir_all(state_dir);
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        let _ = file.write_all(text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{TOML, body, setup};
    use super::*;

    /// The seed router with one peer, its state under /run/se.
    fn one_peer() -> String {
        TOML.replace(r#"["10.20.3.2", "10.20.3.3"]"#, r#"["10.20.3.2"]"#)
            .replace(
                "virtual_router_id = 51",
                "virtual_router_id = 51\nstate_dir = \"/run/se\"",
            )
    }

    #[test]
    fn one_peer_is_reached_by_unicast() {
        let text = config(&setup(&one_peer()), "alinat1").unwrap();
        let lines = body(&text);
        let at = lines.iter().position(|l| l == "UDP {").unwrap();
        assert_eq!(
            lines[at..at + 9],
            [
                "UDP {",
                "IPv4_address 10.20.3.1",
                "IPv4_Destination_Address 10.20.3.2",
                "Port 3780",
                "Interface ib0",
                "SndSocketBuffer 1249280",
                "RcvSocketBuffer 1249280",
                "Checksum on",
                "}"
            ]
        );
        for want in [
            "Mode FTFW {",
            "DisableExternalCache off",
            "LockFile /run/se/conntrackd.lock",
            "Path /run/se/conntrackd.ctl",
            "Systemd on",
        ] {
            assert!(lines.contains(&want.to_owned()), "{want}: {text}");
        }
        let ignored: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("IPv4_address "))
            .skip(1)
            .collect();
        assert_eq!(
            ignored,
            [
                "127.0.0.1",
                "10.20.3.227",
                "140.181.2.227",
                "10.20.3.1",
                "10.20.3.2",
                "140.181.2.1"
            ]
        );
    }

    #[test]
    fn several_peers_are_reached_by_multicast() {
        let text = one_peer().replace("[\"10.20.3.2\"]", "[\"10.20.3.2\", \"10.20.3.3\"]");
        let lines = body(&config(&setup(&text), "r").unwrap());
        let at = lines.iter().position(|l| l == "Multicast {").unwrap();
        assert_eq!(
            lines[at..at + 5],
            [
                "Multicast {",
                "IPv4_address 225.0.0.50",
                "Group 3780",
                "IPv4_interface 10.20.3.1",
                "Interface ib0"
            ]
        );
        assert!(!lines.iter().any(|l| l == "UDP {"));
    }

    #[test]
    fn no_sync_no_conntrackd() {
        let text = one_peer().replace("state_dir", "sync = false\nstate_dir");
        let e = config(&setup(&text), "r").unwrap_err().to_string();
        assert!(
            e.ends_with(": router.sync is off: this router runs no conntrackd"),
            "{e}"
        );
    }

    #[test]
    fn transitions_follow_primary_backup() {
        let flags = |t| steps(t).iter().map(|s| s.0).collect::<Vec<_>>();
        assert_eq!(flags(Transition::Master), ["-c", "-f", "-R", "-B"]);
        assert_eq!(flags(Transition::Backup), ["-s", "-t", "-n"]);
        assert_eq!(flags(Transition::Fault), ["-t"]);
    }
}
