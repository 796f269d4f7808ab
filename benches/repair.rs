//! How long `slurm-egress watch` takes to repair each fault, against the goal of 1 s.
//!
//! Run with `benches/repair.sh` (root). It builds the tests' worker lab (a worker, the normal
//! gateway, a NAT router, an internet host) in network namespaces named `se-repair-*`, starts
//! the watch in the worker with a 300 s interval (so every repair comes from a kernel
//! notification), and for each fault, [`RUNS`] times: makes the fault, then runs
//! `slurm-egress check` until it exits 0. A run's time is from just before the first command
//! of the fault to the end of the first check that finds the policy in sync: an upper bound,
//! which includes the fault's own commands and one check (the "check" row says how long a
//! check takes).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::lab::Lab;
use common::{BIN, uid, wait_until};

const RUNS: usize = 10;
const GOAL: Duration = Duration::from_secs(1);
/// Longer than the watch's settle time plus its look to verify a repair, so that each run
/// starts from a watch that is idle again.
const PAUSE: Duration = Duration::from_millis(400);

fn main() {
    let mut lab = Lab::new("repair", 1);
    let w = lab.workers[0].clone();
    let config = lab.seed_config();
    let cfg = config.to_str().unwrap().to_owned();
    let log = lab.scratch.path("watch.log");
    lab.net.spawn_logged(
        &w,
        &[BIN, "--config", &cfg, "watch", "--interval", "300"],
        Some(&log),
    );
    let in_sync = |lab: &Lab| lab.egress(&w, &config, &["check"]).status.code() == Some(0);
    wait_until("the first apply", Duration::from_secs(10), || in_sync(&lab));
    // A running selected job, so that the jobs set has a member to lose.
    let owner = uid("se-other").to_string();
    lab.egress_ok(
        &w,
        &config,
        &[
            "job",
            "start",
            "--job-id",
            "1",
            "--uid",
            &owner,
            "--account",
            "alice",
            "--node",
            "w1",
        ],
    );
    let aliprod = uid("aliprod");
    let faults: [(&str, Vec<String>); 12] = [
        (
            "link flap (ib0 down, up)",
            vec![
                "ip link set ib0 down".into(),
                "ip link set ib0 up".into(),
                "ip route replace default via 10.20.0.1".into(),
            ],
        ),
        (
            "address lost and restored",
            vec![
                "ip addr flush dev ib0".into(),
                "ip addr add 10.20.1.1/16 dev ib0".into(),
                "ip route add default via 10.20.0.1".into(),
            ],
        ),
        ("ip rule deleted", vec!["ip rule del priority 1000".into()]),
        (
            "default route deleted",
            vec!["ip route del default table 201".into()],
        ),
        (
            "routing table flushed",
            vec!["ip route flush table 201".into()],
        ),
        (
            "nftables table deleted",
            vec!["nft delete table inet slurm_egress".into()],
        ),
        (
            "nftables table flushed",
            vec!["nft flush table inet slurm_egress".into()],
        ),
        (
            "chain flushed",
            vec!["nft flush chain inet slurm_egress select".into()],
        ),
        ("nft flush ruleset", vec!["nft flush ruleset".into()]),
        (
            "jobs set members lost",
            vec!["nft flush set inet slurm_egress jobs".into()],
        ),
        (
            "users set member lost",
            vec![format!(
                "nft delete element inet slurm_egress users {{ {aliprod} }}"
            )],
        ),
        (
            "foreign users set member",
            vec!["nft add element inet slurm_egress users { 0 }".into()],
        ),
    ];

    println!(
        "repair time: fault made -> `slurm-egress check` in sync; {RUNS} runs each, goal {GOAL:?}"
    );
    println!("{:<28} {:>9} {:>9} {:>9}", "fault", "min", "median", "max");
    let mut over = 0;
    for (name, commands) in &faults {
        let mut times = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            std::thread::sleep(PAUSE);
            assert!(in_sync(&lab), "{name}: not in sync before the fault");
            let start = Instant::now();
            for command in commands {
                lab.net
                    .ok(&w, &command.split_whitespace().collect::<Vec<_>>());
            }
            wait_until(name, Duration::from_secs(10), || in_sync(&lab));
            times.push(start.elapsed());
        }
        let (min, median, max) = summary(&mut times);
        let verdict = if max <= GOAL { "ok" } else { "OVER THE GOAL" };
        over += usize::from(max > GOAL);
        println!(
            "{name:<28} {:>7.3} s {:>7.3} s {:>7.3} s  {verdict}",
            min.as_secs_f64(),
            median.as_secs_f64(),
            max.as_secs_f64()
        );
    }
    let mut checks: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            assert!(in_sync(&lab));
            start.elapsed()
        })
        .collect();
    let (min, median, max) = summary(&mut checks);
    println!(
        "{:<28} {:>7.3} s {:>7.3} s {:>7.3} s  (one `slurm-egress check`, in sync)",
        "check",
        min.as_secs_f64(),
        median.as_secs_f64(),
        max.as_secs_f64()
    );
    drop(lab);
    if over > 0 {
        eprintln!("{over} fault(s) took longer than {GOAL:?} at least once");
        std::process::exit(1);
    }
}

fn summary(times: &mut [Duration]) -> (Duration, Duration, Duration) {
    times.sort();
    (times[0], times[times.len() / 2], times[times.len() - 1])
}
