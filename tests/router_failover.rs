//! The router role with real keepalived and conntrackd, judged by packets: where they went,
//! which source address the internet host saw, how long new connections failed after a crash,
//! and whether a long-lived connection lived on. The lab is in `common::ha`.
//!
//! The tests run one at a time: they measure time, and two labs would share two cores.
//! `SE_FAILOVER_RUNS=<n>` repeats each crash measurement n times (for the README's figures).

mod common;

use std::sync::{Mutex, MutexGuard};
use std::thread::sleep;
use std::time::Duration;

use common::ha::{self, Ha, Options, PUBLIC, SELECTED, UNSELECTED, VIP, now};

/// One lab at a time; a failed test must not stop the others (poisoning is ignored).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn runs(default: usize) -> usize {
    std::env::var("SE_FAILOVER_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// The worker's established connections in router i's kernel table, with their NAT mapping.
fn kernel_entries(lab: &Ha, i: usize) -> String {
    let out = lab
        .net
        .ok(&lab.router(i).ns, &["conntrack", "-L", "-p", "tcp"]);
    out.lines()
        .filter(|l| l.contains("ESTABLISHED src=10.20.1.1 dst=203.0.113.10"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The connection the worker's selected user holds, as router i's conntrackd cache lists it
/// (`-e`: received from the other routers; `-i`: its own).
fn cached(lab: &Ha, i: usize, which: &str) -> String {
    let r = lab.router(i);
    let conf = r.dir.join("conntrackd.conf");
    let out = lab
        .net
        .ok(&r.ns, &["conntrackd", "-C", conf.to_str().unwrap(), which]);
    out.lines()
        .filter(|l| l.contains("src=10.20.1.1 dst=203.0.113.10"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn selected_traffic_leaves_through_the_master_natted() {
    let _serial = serial();
    let lab = Ha::new("rsel", Options::default());
    assert_eq!(lab.masters(), [1]);
    for _ in 0..5 {
        let a = lab.connect(SELECTED);
        assert!(a.ok, "{a:?}");
        assert_eq!(a.detail, PUBLIC, "the internet host saw another source");
    }
    let (counts, gateway) = (lab.counts(), lab.gateway_count());
    println!(
        "5 connections of {SELECTED}: packets at r1, r2: {counts:?}; at the gateway: {gateway}"
    );
    assert!(
        counts[0] >= 20,
        "master r1 forwarded only {} packets",
        counts[0]
    );
    assert_eq!(counts[1], 0, "packets reached the backup");
    assert_eq!(gateway, 0, "selected packets reached the closed gateway");
    // The backup already has the connections, from the master's conntrackd.
    let synced = cached(&lab, 2, "-e");
    assert!(
        synced.contains("dport=8080"),
        "r2's external cache: {synced}"
    );

    lab.reset_counts();
    let a = lab.connect(UNSELECTED);
    assert!(!a.ok, "{UNSELECTED} got out: {a:?}");
    assert_eq!(
        lab.counts(),
        [0, 0],
        "an unselected packet reached a router"
    );
    assert!(lab.gateway_count() >= 1, "the closed gateway saw nothing");
}

#[test]
fn masquerade_without_a_public_address() {
    let _serial = serial();
    let mut lab = Ha::new(
        "rmasq",
        Options {
            public_ip: false,
            sync: false,
            ..Options::default()
        },
    );
    let a = lab.connect(SELECTED);
    assert!(a.ok && a.detail == lab.router(1).outside, "{a:?}");
    lab.crash(1);
    lab.wait_holder(2, secs(3.0));
    // The source address changes with the router: connections cannot survive this.
    common::wait_until("a connection through r2", secs(3.0), || {
        lab.connect(SELECTED).ok
    });
    let a = lab.connect(SELECTED);
    assert_eq!(a.detail, lab.router(2).outside, "{a:?}");
}

/// One crash of router `master` while new connections are opened every 20 ms; returns the
/// time from the crash to the first connection that worked again.
fn crash_run(lab: &mut Ha, master: usize, backup: usize, bound: f64) -> f64 {
    assert_eq!(lab.masters(), [master]);
    lab.reset_counts();
    let interval = 0.02;
    let probe = lab.connect_loop(interval, 0.5, 1.0 + bound + 0.5);
    sleep(secs(1.0));
    let crash = lab.crash(master);
    let attempts = ha::attempts(&probe.finish());
    let before: Vec<_> = attempts.iter().filter(|a| a.end < crash.frozen).collect();
    assert!(
        before.len() > 20 && before.iter().all(|a| a.ok),
        "before the crash: {before:?}"
    );
    // Counted from the moment keepalived froze; the first connection that counts started
    // after the links were down too (until then the dying router's kernel still forwarded).
    let Some(back) = attempts.iter().find(|a| a.ok && a.start >= crash.down) else {
        panic!("no connection worked within {bound} s of the crash of r{master}");
    };
    let failover = back.start - crash.frozen;
    let after: Vec<_> = attempts.iter().filter(|a| a.start > back.start).collect();
    assert!(
        !after.is_empty() && after.iter().all(|a| a.ok),
        "flapping after the failover: {after:?}"
    );
    assert!(
        attempts.iter().filter(|a| a.ok).all(|a| a.detail == PUBLIC),
        "a connection was NATed to another address"
    );
    let counts = lab.counts();
    let (gap, _) = ha::longest_gap(&attempts);
    println!(
        "crash of r{master}: new connections through r{backup} after {:.3} s \
         (longest gap between successful connections {:.3} s); packets per router {counts:?}",
        failover, gap
    );
    assert!(
        counts[master - 1] > 0 && counts[backup - 1] > 0,
        "both routers forward in turn: {counts:?}"
    );
    assert!(
        failover < bound,
        "failover took {failover:.3} s, more than {bound} s"
    );
    lab.wait_holder(backup, secs(1.0));
    // The crashed router comes back, as a backup: its stale virtual IP had to go first.
    let released = lab.revive(master);
    assert!(
        released.contains(&format!("deleted {VIP}/32 from ib0")),
        "the killed keepalived left no virtual IP? {released}"
    );
    lab.wait_state(master, "BACKUP", secs(5.0));
    assert_eq!(lab.masters(), [backup], "the old master took over again");
    failover
}

fn measure(tag: &str, advert: &'static str, bound: f64, default_runs: usize) {
    let _serial = serial();
    let mut lab = Ha::new(
        tag,
        Options {
            advert,
            ..Options::default()
        },
    );
    let mut figures = Vec::new();
    let (mut master, mut backup) = (1, 2);
    for _ in 0..runs(default_runs) {
        figures.push(crash_run(&mut lab, master, backup, bound));
        (master, backup) = (backup, master);
    }
    let (min, median, max) = ha::summary(&figures);
    let each: Vec<String> = figures.iter().map(|f| format!("{f:.3}")).collect();
    println!(
        "FAILOVER advert_interval={advert} s: {} runs: min {min:.3} s, median {median:.3} s, \
         max {max:.3} s (bound {bound} s) [{}]",
        figures.len(),
        each.join(", ")
    );
}

#[test]
fn crash_failover_within_1s_with_100ms_adverts() {
    measure("rf100", "0.1", 1.0, 3);
}

#[test]
fn crash_failover_within_4s_with_1s_adverts() {
    measure("rf1000", "1", 4.0, 2);
}

/// keepalived stopped with SIGTERM gives its addresses up at once and the backup takes over;
/// the old master's kernel keeps forwarding meanwhile, so no new connection fails.
#[test]
fn graceful_stop_has_no_outage() {
    let _serial = serial();
    let mut lab = Ha::new(
        "rterm",
        Options {
            advert: "1",
            ..Options::default()
        },
    );
    let interval = 0.05;
    let probe = lab.connect_loop(interval, 0.5, 3.5);
    sleep(secs(1.0));
    let stopped = lab.stop_keepalived(1);
    let attempts = ha::attempts(&probe.finish());
    let failed: Vec<_> = attempts.iter().filter(|a| !a.ok).collect();
    let (gap, at) = ha::longest_gap(&attempts);
    println!(
        "graceful stop of r1: {} connections, {} failed; longest gap between successful \
         connections {gap:.3} s (at {:+.3} s); packets per router {:?}",
        attempts.len(),
        failed.len(),
        at - stopped,
        lab.counts()
    );
    assert!(failed.is_empty(), "connections failed: {failed:?}");
    assert!(
        gap < 2.0 * interval,
        "a gap of {gap:.3} s, more than one probe interval"
    );
    lab.wait_master(2, secs(2.0));
    assert!(lab.counts()[1] > 0, "r2 never forwarded");
}

/// A connection that receives a number every 50 ms lives through a crash of the master
/// (conntrackd had its state, NAT included, on the backup), through the old master's return
/// (which does not take the virtual IP back) and through a crash of the second master (the
/// returned router got the state again from it).
#[test]
fn long_lived_stream_survives_crashes_and_the_old_master_returning() {
    let _serial = serial();
    let mut lab = Ha::new("rstream", Options::default());
    let interval = 0.05;
    let duration = 9.0;
    let probe = lab.stream(interval, duration);
    let begin = now();
    sleep(secs(1.5));
    let crash1 = lab.crash(1).frozen;
    lab.wait_holder(2, secs(2.0));
    sleep(secs(1.0));
    // r2's kernel has the connection with the NAT mapping r1 made: the same public port.
    let entry = kernel_entries(&lab, 2);
    assert!(
        entry.contains(&format!("src={} dst={PUBLIC} sport=8080", ha::INTERNET)),
        "r2 has not got the connection with its mapping: {entry}"
    );
    lab.revive(1);
    lab.wait_state(1, "BACKUP", secs(5.0));
    let returned = now();
    sleep(secs(1.0));
    assert_eq!(
        lab.masters(),
        [2],
        "the returning router took the virtual IP"
    );
    let resynced = cached(&lab, 1, "-e");
    assert!(
        resynced.contains("dport=8080"),
        "r1 did not get the connection back from r2: {resynced}"
    );
    let crash2 = lab.crash(2).frozen;
    lab.wait_holder(1, secs(2.0));
    let s = ha::stream(&probe.finish());
    let dropped = (input_drops(&lab, 1), input_drops(&lab, 2));
    let rel = |t: f64| t - begin;
    let stalls: Vec<String> = s
        .stalls
        .iter()
        .map(|(a, d)| format!("{d:.3} s at {:.3} s", rel(*a)))
        .collect();
    println!(
        "stream: {} numbers, consecutive {}, seen as {}; crashes at {:.3} s and {:.3} s, \
         r1 back at {:.3} s; stalls: {}; error {}; packets the input rules dropped on \
         r1, r2: {dropped:?}",
        s.received,
        s.consecutive,
        s.peer,
        rel(crash1),
        rel(crash2),
        rel(returned),
        stalls.join(", "),
        s.error
    );
    assert_eq!(s.error, "none", "the connection broke");
    assert!(s.consecutive, "numbers were lost");
    assert_eq!(s.peer, PUBLIC);
    assert!(
        s.received as f64 >= 0.8 * duration / interval,
        "only {} numbers in {duration} s",
        s.received
    );
    assert!(
        s.last > crash2 + 0.5,
        "nothing arrived after the second crash"
    );
    for (start, length) in &s.stalls {
        let near_crash = [crash1, crash2]
            .iter()
            .any(|c| *start > c - 0.2 && *start < c + 0.2);
        assert!(
            near_crash,
            "a stall of {length:.3} s at {:.3} s, not at a crash (the return at {:.3} s?)",
            rel(*start),
            rel(returned)
        );
        assert!(*length < 3.0, "a stall of {length:.3} s");
    }
}

/// The control: without conntrackd the same stream does not survive. The new master knows
/// nothing of the connection, so the server's packets for it are dropped.
#[test]
fn without_sync_the_stream_does_not_survive() {
    let _serial = serial();
    let mut lab = Ha::new(
        "rnosync",
        Options {
            sync: false,
            ..Options::default()
        },
    );
    let duration = 5.0;
    let probe = lab.stream(0.05, duration);
    sleep(secs(1.5));
    let crashed = lab.crash(1).down;
    lab.wait_holder(2, secs(2.0));
    // The failover itself worked: new connections go through r2.
    common::wait_until("a new connection through r2", secs(2.0), || {
        lab.connect(SELECTED).ok
    });
    let s = ha::stream(&probe.finish());
    let dropped = input_drops(&lab, 2);
    println!(
        "without sync: the stream's last number came {:.3} s after the crash; {:.3} s of \
         silence until the end; error {}; r2 dropped {dropped} packet(s) for {PUBLIC} it \
         knew no connection of",
        s.last - crashed,
        s.end - s.last,
        s.error
    );
    assert!(
        s.last < crashed + 0.2,
        "numbers arrived {:.3} s after the crash without state sync",
        s.last - crashed
    );
    // The server's packets reached r2 and were dropped there, not answered with a reset.
    assert!(dropped > 0, "r2's input rule saw nothing");
    assert_eq!(s.error, "none", "the new master reset the connection");
}

/// Packets for `public_ip` that router i's input rule dropped (no known connection).
fn input_drops(lab: &Ha, i: usize) -> u64 {
    let listing = lab.net.ok(
        &lab.router(i).ns,
        &[
            "nft",
            "list",
            "chain",
            "inet",
            "slurm_egress_router",
            "input",
        ],
    );
    let after = listing.split("packets ").nth(1).expect("a counter");
    after.split_whitespace().next().unwrap().parse().unwrap()
}

/// Three routers: the backup with the next priority takes over (r2, not r3), and multicast
/// sync gave both backups the connection, so the stream survives two crashes in a row.
#[test]
fn three_routers_fail_over_in_priority_order() {
    let _serial = serial();
    let mut lab = Ha::new(
        "rthree",
        Options {
            routers: 3,
            ..Options::default()
        },
    );
    assert_eq!(lab.masters(), [1]);
    let probe = lab.stream(0.05, 6.0);
    sleep(secs(1.0));
    for i in [2, 3] {
        let synced = cached(&lab, i, "-e");
        assert!(synced.contains("dport=8080"), "r{i} has no copy: {synced}");
    }
    let crash1 = lab.crash(1).frozen;
    lab.wait_holder(2, secs(2.0));
    sleep(secs(1.5));
    assert_eq!(
        lab.masters(),
        [1, 2],
        "r1's killed keepalived left the address; r3 has none"
    );
    let crash2 = lab.crash(2).frozen;
    lab.wait_holder(3, secs(2.0));
    let s = ha::stream(&probe.finish());
    let stalls: Vec<String> = s
        .stalls
        .iter()
        .map(|(a, d)| format!("{d:.3} s at {:.3} s", a - s.begin))
        .collect();
    println!(
        "three routers: {} numbers, consecutive {}, crashes at {:.3} s and {:.3} s, \
         stalls {}; error {}",
        s.received,
        s.consecutive,
        crash1 - s.begin,
        crash2 - s.begin,
        stalls.join(", "),
        s.error
    );
    assert_eq!(s.error, "none");
    assert!(s.consecutive);
    assert!(
        s.last > crash2 + 0.5,
        "nothing arrived after the second crash"
    );
}
