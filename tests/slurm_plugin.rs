//! The SPANK plugin under a real slurmctld and two slurmd, each slurmd in its own network
//! namespace on the lab's fabric, judged by where the jobs' packets went.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use common::cluster::Cluster;
use common::lab::{INTERNET, Lab};
use common::{PYTHON, probe_py, set_elements, uid, wait_until};

const NATTED: &str = "peer=203.0.113.1";

/// A lab with a controller, the node policy applied on both workers, and the cluster up with
/// the plugin loaded (`required`). The config is readable by root only: sbatch, which loads
/// the plugin as the user, must not care.
fn cluster(tag: &str, extra: &str) -> (Lab, Cluster, PathBuf) {
    let mut lab = Lab::new(tag, 2);
    lab.add_controller();
    let config = lab.config(
        r#"["tcp", "udp"]"#,
        &format!("users = [\"aliprod\", \"alise\", \"rgrosso\"]\ngroups = [\"alice\"]\naccounts = [\"alice\"]\n{extra}"),
    );
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    for w in &lab.workers {
        lab.egress_ok(w, &config, &["apply"]);
    }
    let cluster = Cluster::up(&lab, &config, "required");
    (lab, cluster, config)
}

/// The probe, run inside a job.
fn probe_cmd() -> Vec<String> {
    vec![
        PYTHON.into(),
        probe_py().to_str().unwrap().into(),
        "tcp".into(),
        INTERNET.into(),
        "8080".into(),
        "--timeout".into(),
        "1.5".into(),
    ]
}

fn run_probe_job(c: &Cluster, user: &str, node: &str, account: &str) -> String {
    let cmd = probe_cmd();
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let done = c.job(user, node, account, &cmd);
    assert_eq!(
        done.state, "COMPLETED 0:0",
        "job {}: {}",
        done.id, done.output
    );
    done.output.trim().to_owned()
}

/// Waits until the `jobs` set of worker `w` is `want`.
fn wait_jobs_set(lab: &Lab, w: &str, want: &BTreeSet<u32>) {
    wait_until(
        &format!("jobs set of {w} = {want:?}"),
        Duration::from_secs(30),
        || set_elements(&lab.net, w, "jobs") == *want,
    );
}

fn ledger(lab: &Lab, config: &std::path::Path, w: &str, node: &str) -> String {
    lab.egress_ok(w, config, &["jobs", "--node", node])
}

/// Accounts, users and groups, with the probe running inside the jobs themselves.
#[test]
fn jobs_of_selected_accounts_users_and_groups_get_out() {
    let (lab, c, config) = cluster("spank", "");
    let (w1, w2) = (&lab.workers[0], &lab.workers[1]);

    // A selected account, for a user who is not selected otherwise.
    assert_eq!(run_probe_job(&c, "se-other", "w1", "alice"), NATTED);
    // The same user under another account stays closed.
    let blocked = run_probe_job(&c, "se-other", "w1", "physics");
    assert!(blocked.starts_with("error="), "{blocked}");
    // A statically selected user, whatever the account, on either node.
    assert_eq!(run_probe_job(&c, "aliprod", "w2", "physics"), NATTED);
    // A member of the selected group through a supplementary group only.
    assert_eq!(run_probe_job(&c, "se-supp", "w1", "physics"), NATTED);

    // The plugin decided each job and said why.
    let log = c.slurmd_log("w1");
    let uid_other = uid("se-other");
    assert!(
        log.contains(&format!(
            "uid {uid_other} selected (account alice) on w1: egress path on"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("uid {} selected (group alice)", uid("se-supp"))),
        "{log}"
    );
    assert!(
        c.slurmd_log("w2")
            .contains(&format!("uid {} selected (user)", uid("aliprod")))
    );
    // Every job ended: nothing is left behind.
    for w in [w1, w2] {
        wait_jobs_set(&lab, w, &BTreeSet::new());
    }
    for node in ["w1", "w2"] {
        assert_eq!(
            ledger(&lab, &config, w1, node).lines().count(),
            1,
            "header only"
        );
    }
    assert_eq!(c.node_state("w1"), "idle");
}

/// One user, two selected jobs on a node: the first ends and the second still gets through;
/// after both, the user is closed again. A job on the other node is that node's business.
#[test]
fn a_user_keeps_the_path_until_the_last_selected_job_ends() {
    let (lab, c, config) = cluster("two", "");
    let (w1, w2) = (&lab.workers[0], &lab.workers[1]);
    let other = uid("se-other");
    let first = c.submit("se-other", "w1", "alice", &["sleep", "300"]);
    let second = c.submit("se-other", "w1", "alice", &["sleep", "300"]);
    let elsewhere = c.submit("se-other", "w2", "alice", &["sleep", "300"]);
    for id in [first, second, elsewhere] {
        c.wait_running(id);
    }
    wait_jobs_set(&lab, w1, &BTreeSet::from([other]));
    assert_eq!(lab.tcp(w1, "se-other", INTERNET, "hello"), NATTED);
    let listing = ledger(&lab, &config, w1, "w1");
    assert!(listing.contains(&first.to_string()) && listing.contains(&second.to_string()));

    c.cancel(first);
    wait_until("the first job's epilog", Duration::from_secs(30), || {
        !ledger(&lab, &config, w1, "w1").contains(&format!(" {first} "))
    });
    assert_eq!(set_elements(&lab.net, w1, "jobs"), BTreeSet::from([other]));
    assert_eq!(lab.tcp(w1, "se-other", INTERNET, "hello"), NATTED);

    c.cancel(second);
    wait_jobs_set(&lab, w1, &BTreeSet::new());
    lab.reset_counts();
    assert!(
        lab.tcp(w1, "se-other", INTERNET, "hello")
            .starts_with("error=")
    );
    assert_eq!(
        lab.internet_counts().1,
        0,
        "a packet reached the NAT router"
    );
    // w2's job still runs: its node kept the user.
    assert_eq!(set_elements(&lab.net, w2, "jobs"), BTreeSet::from([other]));
    assert_eq!(lab.tcp(w2, "se-other", INTERNET, "hello"), NATTED);
    c.cancel(elsewhere);
    wait_jobs_set(&lab, w2, &BTreeSet::new());
}

/// slurmd restarts while a selected job runs: the job keeps its path, and its end (run by the
/// new slurmd) still cleans up.
#[test]
fn slurmd_restart_during_a_job() {
    let (lab, c, _config) = cluster("restart", "");
    let w1 = &lab.workers[0];
    let id = c.submit("se-other", "w1", "alice", &["sleep", "300"]);
    c.wait_running(id);
    wait_jobs_set(&lab, w1, &BTreeSet::from([uid("se-other")]));
    c.slurmd("restart", "w1");
    assert_eq!(lab.tcp(w1, "se-other", INTERNET, "hello"), NATTED);
    c.cancel(id);
    wait_jobs_set(&lab, w1, &BTreeSet::new());
    assert!(
        lab.tcp(w1, "se-other", INTERNET, "hello")
            .starts_with("error=")
    );
}

/// 50 jobs of mixed users and accounts start and end at once on one node: at every moment
/// the set holds exactly the owners of running selected jobs, and at the end nothing.
#[test]
fn fifty_concurrent_jobs_leave_set_and_ledger_exact() {
    let (lab, c, config) = cluster("fifty", "");
    let w1 = &lab.workers[0];
    // (user, account, selected?)
    let kinds = [
        ("se-other", "alice", true),
        ("se-other", "physics", false),
        ("alise", "physics", true),
        ("se-prim", "physics", true),
        ("se-supp", "alice", true),
    ];
    let mut ids = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let (user, account, selected) = kinds[i % kinds.len()];
                let c = &c;
                s.spawn(move || {
                    (
                        c.submit(user, "w1", account, &["sleep", "8"]),
                        user,
                        selected,
                    )
                })
            })
            .collect();
        ids = handles.into_iter().map(|h| h.join().unwrap()).collect();
    });
    for (id, _, _) in &ids {
        c.wait_running(*id);
    }
    let want: BTreeSet<u32> = kinds.iter().filter(|k| k.2).map(|k| uid(k.0)).collect();
    assert_eq!(set_elements(&lab.net, w1, "jobs"), want);
    let listing = ledger(&lab, &config, w1, "w1");
    let recorded: BTreeSet<u32> = listing
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    let selected: BTreeSet<u32> = ids.iter().filter(|j| j.2).map(|j| j.0).collect();
    assert_eq!(recorded, selected, "{listing}");
    assert_eq!(selected.len(), 40);

    for (id, _, _) in &ids {
        let done = c.wait(*id);
        assert_eq!(done.state, "COMPLETED 0:0", "job {id}");
    }
    wait_jobs_set(&lab, w1, &BTreeSet::new());
    assert_eq!(ledger(&lab, &config, w1, "w1").lines().count(), 1);
    assert_eq!(c.node_state("w1"), "idle");
}

/// A broken config: slurmd's log names the file, line and problem; with `required` the node
/// drains and the job is held, as for any failed prolog.
#[test]
fn bad_config_is_named_in_slurmds_log() {
    let (_lab, c, config) = cluster("badcfg", "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("priority = 1000", "priorty = 1000")).unwrap();
    let id = c.submit("se-other", "w1", "alice", &["true"]);
    wait_until(
        "the prolog error in slurmd's log",
        Duration::from_secs(30),
        || c.slurmd_log("w1").contains("unknown field `priorty`"),
    );
    let log = c.slurmd_log("w1");
    assert!(log.contains(&config.display().to_string()), "{log}");
    assert!(log.contains("line 6"), "{log}");
    wait_until("w1 drained", Duration::from_secs(30), || {
        c.node_state("w1").starts_with("drain")
    });
    let state = c.client(&["squeue", "-h", "-j", &id.to_string(), "-o", "%T %r"]);
    assert!(state.contains("PENDING"), "{state}");
}

/// `on_error = "continue"`: a node without the policy runs selected jobs without egress and is
/// not drained; the log says so.
#[test]
fn on_error_continue_lets_the_job_run() {
    let (lab, c, config) = cluster("cont", "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[jobs]", "[jobs]\non_error = \"continue\""),
    )
    .unwrap();
    lab.egress_ok(&lab.workers[1], &config, &["remove"]);
    let out = run_probe_job(&c, "se-other", "w2", "alice");
    assert!(out.starts_with("error="), "{out}");
    let log = c.slurmd_log("w2");
    assert!(
        log.contains("on_error = \"continue\": the job runs without egress"),
        "{log}"
    );
    assert_eq!(c.node_state("w2"), "idle");
    // The other node is unaffected.
    assert_eq!(run_probe_job(&c, "se-other", "w1", "alice"), NATTED);
}

/// The account comes from slurmd, not from the job's environment: a job charged to another
/// account whose environment says SLURM_JOB_ACCOUNT=alice gets nothing.
#[test]
fn the_jobs_environment_cannot_claim_an_account() {
    let (_lab, c, _config) = cluster("forge", "");
    let wrap = probe_cmd().join(" ");
    let out = c.client_as(
        "se-other",
        &[
            "sbatch",
            "--parsable",
            "-w",
            "w1",
            "-A",
            "physics",
            "--export=ALL,SLURM_JOB_ACCOUNT=alice",
            &format!("--output={}/jobs/%j.out", c.dir.display()),
            "--wrap",
            &wrap,
        ],
    );
    let id: u32 = out.trim().parse().unwrap_or_else(|_| panic!("{out}"));
    let done = c.wait(id);
    assert_eq!(done.state, "COMPLETED 0:0");
    assert!(done.output.trim().starts_with("error="), "{}", done.output);
}
