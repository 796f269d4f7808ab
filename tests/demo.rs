//! The demo (`tests/demo.sh`): a Slurm cluster in network namespaces, one selected and one
//! unselected job, and where each one's packets went. Also part of the test suite, so the
//! demo keeps working.

mod common;

use common::cluster::Cluster;
use common::lab::{GATEWAY, INTERNET, Lab, NAT_OUTSIDE, VIP};
use common::{PYTHON, probe_py, uid};

#[test]
fn demo() {
    let started = std::time::Instant::now();
    let mut lab = Lab::new("demo", 2);
    lab.add_controller();
    let config = lab.seed_config();
    for w in &lab.workers {
        lab.egress_ok(w, &config, &["apply"]);
    }
    let cluster = Cluster::up(&lab, &config, "required");
    println!();
    println!("slurm-egress demo: a real Slurm cluster in network namespaces");
    println!("  slurmctld on 10.20.0.10, slurmd w1 (10.20.1.1) and w2 (10.20.1.2), plugin loaded");
    println!("  normal gateway {GATEWAY}: drops everything (the cluster's \"nothing out\")");
    println!("  NAT router {VIP}: masquerades to {NAT_OUTSIDE}; internet host {INTERNET}");
    println!("  selected: account alice; users aliprod, alise, rgrosso; members of group alice");
    println!();

    let probe = probe_py();
    let cmd = [
        PYTHON,
        probe.to_str().unwrap(),
        "tcp",
        INTERNET,
        "8080",
        "--timeout",
        "1.5",
    ];
    let mut outcomes = Vec::new();
    for (user, account, selected) in [("se-other", "alice", true), ("se-other", "physics", false)] {
        lab.reset_counts();
        let job = cluster.job(user, "w1", account, &cmd);
        let (gw, nat) = lab.internet_counts();
        let answer = job.output.trim().to_owned();
        println!(
            "job {} of {user} (uid {}), account {account}, on w1: {}",
            job.id,
            uid(user),
            if selected { "selected" } else { "not selected" }
        );
        match answer.strip_prefix("peer=") {
            Some(source) => println!(
                "  reached the internet host, which saw it come from {source} (NATed by the NAT router)"
            ),
            None => println!("  did not reach the internet host ({answer})"),
        }
        println!("  its packets: {nat} through the NAT router, {gw} dropped by the normal gateway");
        outcomes.push((selected, answer, gw, nat));
    }
    println!();
    println!("what the plugin wrote to w1's slurmd log:");
    for line in cluster
        .slurmd_log("w1")
        .lines()
        .filter(|l| l.contains("slurm-egress: job"))
    {
        println!("  {}", line.split("slurm-egress: ").nth(1).unwrap_or(line));
    }
    println!();
    println!(
        "demo finished in {:.1} s; tearing down",
        started.elapsed().as_secs_f64()
    );

    let (_, selected_answer, selected_gw, selected_nat) = &outcomes[0];
    assert_eq!(selected_answer, &format!("peer={NAT_OUTSIDE}"));
    assert_eq!(*selected_gw, 0);
    assert!(*selected_nat > 0);
    let (_, other_answer, other_gw, other_nat) = &outcomes[1];
    assert!(other_answer.starts_with("error="), "{other_answer}");
    assert!(*other_gw > 0);
    assert_eq!(*other_nat, 0);
}
