//! `slurm-egress watch` repairs the node policy after link flaps, lost addresses and
//! tampering, and serves the plugin's set changes.

mod common;

use std::time::{Duration, Instant};

use common::lab::{INTERNET, Lab};
use common::{BIN, set_elements, uid, wait_until};

const NATTED: &str = "peer=203.0.113.1";

/// Waits until `check` says in sync; returns how long that took.
fn repaired(lab: &Lab, w: &str, config: &std::path::Path, what: &str) -> Duration {
    let start = Instant::now();
    wait_until(what, Duration::from_secs(10), || {
        lab.egress(w, config, &["check"]).status.code() == Some(0)
    });
    start.elapsed()
}

#[test]
fn watch_repairs_link_flaps_lost_addresses_and_tampering() {
    let mut lab = Lab::new("watch", 1);
    let w = lab.workers[0].clone();
    let config = lab.seed_config();
    let log = lab.scratch.path("watch.log");
    let cfg = config.to_str().unwrap().to_owned();
    lab.net.spawn_logged(
        &w,
        &[BIN, "--config", &cfg, "-v", "watch", "--interval", "300"],
        Some(&log),
    );
    // It applies at start.
    let took = repaired(&lab, &w, &config, "the first apply");
    println!("first apply by watch: {took:?}");
    assert_eq!(lab.tcp(&w, "aliprod", INTERNET, "hello"), NATTED);

    // The seed's open problem: the fabric link goes down and up; its routes are gone. (The
    // main table's default route too, which the node's network setup puts back: selected
    // sockets need it for their first route lookup, before the mark exists.)
    lab.net.ok(&w, &["ip", "link", "set", "ib0", "down"]);
    lab.net.ok(&w, &["ip", "link", "set", "ib0", "up"]);
    lab.net.ok(
        &w,
        &["ip", "route", "replace", "default", "via", "10.20.0.1"],
    );
    let took = repaired(&lab, &w, &config, "repair after a link flap");
    println!("link flap repaired in {took:?}");
    assert_eq!(lab.tcp(&w, "aliprod", INTERNET, "hello"), NATTED);

    // The address disappears and comes back (the main default route with it).
    lab.net.ok(&w, &["ip", "addr", "flush", "dev", "ib0"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        lab.egress(&w, &config, &["check"]).status.code(),
        Some(2),
        "no address: an error"
    );
    lab.net
        .ok(&w, &["ip", "addr", "add", "10.20.1.1/16", "dev", "ib0"]);
    lab.net
        .ok(&w, &["ip", "route", "add", "default", "via", "10.20.0.1"]);
    let took = repaired(&lab, &w, &config, "repair after the address came back");
    println!("lost address repaired in {took:?}");
    assert_eq!(lab.tcp(&w, "aliprod", INTERNET, "hello"), NATTED);

    // Someone deletes the nftables table, or the rule.
    for tamper in [
        &["nft", "delete", "table", "inet", "slurm_egress"][..],
        &["ip", "rule", "del", "priority", "1000"],
        &["ip", "route", "flush", "table", "alinat"],
    ] {
        lab.net.ok(&w, tamper);
        let took = repaired(&lab, &w, &config, &format!("repair after {tamper:?}"));
        println!("{tamper:?} repaired in {took:?}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("waiting for the next change"), "{text}");
    assert!(
        text.contains("repaired: routing: ip route missing in table alinat"),
        "{text}"
    );

    // Set changes go through the watch's socket; the set and the ledger agree.
    let other = uid("se-other").to_string();
    let start = |id: &str| {
        lab.egress_ok(
            &w,
            &config,
            &[
                "job",
                "start",
                "--job-id",
                id,
                "--uid",
                &other,
                "--account",
                "alice",
                "--node",
                "w1",
            ],
        )
    };
    assert!(start("7").contains("egress path on"));
    assert!(start("8").contains("egress path on"));
    assert_eq!(set_elements(&lab.net, &w, "jobs"), [uid("se-other")].into());
    lab.egress_ok(
        &w,
        &config,
        &["job", "end", "--job-id", "7", "--node", "w1"],
    );
    assert_eq!(set_elements(&lab.net, &w, "jobs"), [uid("se-other")].into());
    lab.egress_ok(
        &w,
        &config,
        &["job", "end", "--job-id", "8", "--node", "w1"],
    );
    assert!(set_elements::<u32>(&lab.net, &w, "jobs").is_empty());
    let sock = std::fs::read_dir(lab.scratch.path("state"))
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("watch-"));
    assert!(sock, "the watch serves its socket");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("jobs set: add uid {other}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("jobs set: remove uid {other}")),
        "{text}"
    );
}
