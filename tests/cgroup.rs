//! `[select] by = "cgroup"`: exactly the processes of selected jobs get the egress path, not
//! every process of their owner. Real slurmctld and slurmd with the plugin on this hybrid host
//! (Slurm's cgroups in v1, ours in the unified hierarchy), judged by where packets went; and
//! Slurm's cgroup/v2 layout (which Slurm refuses to run on this host) built by hand.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::cluster::Cluster;
use common::lab::{INTERNET, Lab};
use common::{PYTHON, probe_py, set_elements, uid, wait_until};

const NATTED: &str = "peer=203.0.113.1";
/// Where this host mounts the cgroup v2 hierarchy (see ENVIRONMENT.md).
const UNIFIED: &str = "/sys/fs/cgroup/unified";

/// A cgroup subtree of the test's own below the unified root, emptied and removed on drop
/// (also when the test fails): processes still in it go back to the root cgroup.
struct Subtree(PathBuf);

impl Subtree {
    fn new(tag: &str) -> Subtree {
        let name = format!("se-{tag}-{}", std::process::id());
        let dir = Path::new(UNIFIED).join(&name);
        let tree = Subtree(dir);
        tree.clear();
        tree
    }

    /// Its name as `cgroup_parent` takes it.
    fn name(&self) -> String {
        self.0.file_name().unwrap().to_string_lossy().into_owned()
    }

    /// The job cgroups left in it.
    fn jobs(&self) -> BTreeSet<String> {
        std::fs::read_dir(&self.0)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn clear(&self) {
        fn walk(dir: &Path) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for e in entries.flatten().filter(|e| e.path().is_dir()) {
                walk(&e.path());
            }
            if let Ok(pids) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in pids.lines() {
                    let _ = std::fs::write(Path::new(UNIFIED).join("cgroup.procs"), pid);
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        walk(&self.0);
    }
}

impl Drop for Subtree {
    fn drop(&mut self) {
        self.clear();
    }
}

/// A lab with the cluster's two workers, the policy by cgroup applied on w1, and the cluster
/// up with the plugin.
fn cluster(tag: &str) -> (Lab, Cluster, PathBuf, Subtree) {
    let mut lab = Lab::new(tag, 2);
    lab.add_controller();
    let tree = Subtree::new(tag);
    let config = lab.config(
        r#"["tcp"]"#,
        &format!(
            "users = [\"aliprod\"]\naccounts = [\"alice\"]\nby = \"cgroup\"\n\
             cgroup_parent = \"{}\"",
            tree.name()
        ),
    );
    lab.egress_ok(&lab.workers[0], &config, &["apply"]);
    let cluster = Cluster::up(&lab, &config, "required");
    (lab, cluster, config, tree)
}

/// The probe as a shell command line.
fn probe() -> String {
    format!(
        "{PYTHON} {} tcp {INTERNET} 8080 --timeout 1.5",
        probe_py().display()
    )
}

/// One user, two jobs at once on one node, one charged to a selected account and one not:
/// only the first gets out, from its start to its end, in subprocesses and in a daemon it
/// leaves running; once it ended, its cgroup and set member are gone.
#[test]
fn only_the_selected_job_of_a_user_gets_out() {
    let (lab, c, config, tree) = cluster("cg");
    let w1 = &lab.workers[0];
    let p = probe();
    // A line per moment of the job's life; the daemon (its own session, reparented to init)
    // probes while the job still sleeps.
    let script = format!(
        "echo start $({p}); sh -c 'echo child $({p})'; \
         setsid sh -c 'sleep 2; echo daemon $({p})' & \
         sleep 4; echo end $({p})"
    );
    // The selected job also leaves a daemon behind, which Slurm's process tracking
    // (proctrack/linuxproc) does not find at the job's end: its job cgroup does.
    let lingering = format!("setsid sleep 30 & {script}");
    let selected = c.submit("se-other", "w1", "alice", &["/bin/sh", "-c", &lingering]);
    let other = c.submit("se-other", "w1", "physics", &["/bin/sh", "-c", &script]);
    c.wait_running(selected);
    c.wait_running(other);
    // While both run: the selected job's cgroup is in the set, and nothing of the user's
    // outside it gets out.
    wait_until(
        "the job's cgroup in the set",
        Duration::from_secs(20),
        || set_elements::<u64>(&lab.net, w1, "jobs").len() == 1,
    );
    let job_dir = tree.0.join(format!("job_{selected}"));
    let id = std::fs::metadata(&job_dir).unwrap().ino();
    assert_eq!(set_elements::<u64>(&lab.net, w1, "jobs"), [id].into());
    assert_eq!(tree.jobs(), [format!("job_{selected}")].into());
    let outside = lab.tcp(w1, "se-other", INTERNET, "hello");
    assert!(outside.starts_with("error="), "{outside}");

    let done = c.wait(selected);
    assert_eq!(done.state, "COMPLETED 0:0", "{}", done.output);
    let lines: Vec<&str> = done.output.lines().collect();
    for moment in ["start", "child", "daemon", "end"] {
        assert!(
            lines.contains(&format!("{moment} {NATTED}").as_str()),
            "{moment}: {}",
            done.output
        );
    }
    let done = c.wait(other);
    assert_eq!(done.state, "COMPLETED 0:0", "{}", done.output);
    assert_eq!(done.output.lines().count(), 4, "{}", done.output);
    for line in done.output.lines() {
        assert!(line.contains("error="), "{}", done.output);
    }

    wait_until("the job's set member gone", Duration::from_secs(20), || {
        set_elements::<u64>(&lab.net, w1, "jobs").is_empty()
    });
    wait_until("the job's cgroup gone", Duration::from_secs(10), || {
        tree.jobs().is_empty()
    });
    let log = c.slurmd_log("w1");
    assert!(
        log.contains(&format!(
            "job {selected}: cgroup /{}/job_{selected}",
            tree.name()
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "job {selected}: ended; uid {} egress path off; 1 processes it left behind moved \
             out of its cgroup",
            uid("se-other")
        )),
        "{log}"
    );
    // The daemon is in the parent now, without egress; stop it.
    let left = std::fs::read_to_string(tree.0.join("cgroup.procs")).unwrap();
    assert_eq!(left.lines().count(), 1, "{left}");
    for pid in left.lines() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid.parse().unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert_eq!(
        lab.egress_ok(w1, &config, &["jobs"]).lines().count(),
        1,
        "header only"
    );
    // The node's policy is intact: `check` finds nothing to do.
    lab.egress_ok(w1, &config, &["check"]);
}

/// 50 jobs of mixed users and accounts at once: each selected one gets out, no other does,
/// and nothing is left behind: no cgroup, no set member, no ledger entry.
#[test]
fn fifty_concurrent_jobs_leave_no_cgroup_or_set_member() {
    let (lab, c, config, tree) = cluster("cg50");
    let w1 = &lab.workers[0];
    // (user, account, selected?)
    let kinds = [
        ("se-other", "alice", true),
        ("se-other", "physics", false),
        ("aliprod", "physics", true),
        ("se-supp", "physics", false),
        ("se-prim", "alice", true),
    ];
    let script = format!("sleep 3; {}", probe());
    let mut ids = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let (user, account, selected) = kinds[i % kinds.len()];
                let (c, script) = (&c, &script);
                s.spawn(move || {
                    let id = c.submit(user, "w1", account, &["/bin/sh", "-c", script]);
                    (id, selected)
                })
            })
            .collect();
        ids = handles.into_iter().map(|h| h.join().unwrap()).collect();
    });
    let mut natted = 0;
    for (id, selected) in &ids {
        let done = c.wait(*id);
        assert_eq!(done.state, "COMPLETED 0:0", "job {id}: {}", done.output);
        let out = done.output.trim();
        if *selected {
            assert_eq!(out, NATTED, "job {id}");
            natted += 1;
        } else {
            assert!(out.starts_with("error="), "job {id}: {out}");
        }
    }
    assert_eq!(natted, 30);
    wait_until("an empty jobs set", Duration::from_secs(30), || {
        set_elements::<u64>(&lab.net, w1, "jobs").is_empty()
    });
    wait_until("no job cgroup left", Duration::from_secs(10), || {
        tree.jobs().is_empty()
    });
    assert_eq!(lab.egress_ok(w1, &config, &["jobs"]).lines().count(), 1);
    assert_eq!(c.node_state("w1"), "idle");
}

/// Where Slurm's cgroup/v2 plugin runs jobs, a task already sits below `job_<id>`, at a depth
/// Slurm decides: that cgroup is the job's, its level gets a rule, and nothing is moved or
/// removed. Slurm refuses cgroup/v2 on this hybrid host, so the layout is built by hand and
/// the plugin's task hook (`jobs::attach`) runs in a process placed in it.
#[test]
fn slurms_own_job_cgroup_is_used_where_it_exists() {
    let lab = Lab::new("cgv2", 1);
    let w1 = lab.workers[0].clone();
    let tree = Subtree::new("cgv2");
    let config = lab.config(
        r#"["tcp"]"#,
        &format!(
            "accounts = [\"alice\"]\nby = \"cgroup\"\ncgroup_parent = \"{}\"",
            tree.name()
        ),
    );
    lab.egress_ok(&w1, &config, &["apply"]);
    // Slurm 22.05-24.x: <root>/system.slice/slurmstepd.scope/job_<id>/step_<s>/user/task_<n>.
    let job = tree.0.join("system.slice/slurmstepd.scope/job_77");
    let task = job.join("step_0/user/task_0");
    std::fs::create_dir_all(&task).unwrap();
    let other = uid("se-other").to_string();
    let start = |id: &str| {
        let args = [
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
        ];
        lab.egress(&w1, &config, &args)
    };
    let started = start("77");
    assert!(common::succeeded(started, "job start").contains("egress path on"));
    // Nothing in the set until a task starts.
    assert!(set_elements::<u64>(&lab.net, &w1, "jobs").is_empty());

    let attached = in_task(&task, &w1, &config, "77");
    let want_level = 4; // /<tree>/system.slice/slurmstepd.scope/job_77
    assert!(
        attached.contains(&format!("level {want_level} own false first true")),
        "{attached}"
    );
    let id = std::fs::metadata(&job).unwrap().ino();
    assert_eq!(set_elements::<u64>(&lab.net, &w1, "jobs"), [id].into());
    let ruleset = lab.net.ok(
        &w1,
        &["nft", "list", "chain", "inet", "slurm_egress", "select"],
    );
    assert!(
        ruleset.contains(&format!("socket cgroupv2 level {want_level} @jobs")),
        "{ruleset}"
    );
    // A second task changes nothing; `apply` agrees with the table as the task left it.
    assert!(in_task(&task, &w1, &config, "77").contains("first false"));
    lab.egress_ok(&w1, &config, &["check"]);

    // The job's processes get out; the same user elsewhere does not.
    let probe = probe();
    let as_task = |cgroup: &Path| {
        let script = format!(
            "echo $$ >{}/cgroup.procs && exec setpriv --reuid={other} --regid={other} \
             --clear-groups {probe}",
            cgroup.display()
        );
        let out = Command::new("nsenter")
            .args([&format!("--net=/run/netns/{w1}"), "/bin/sh", "-c", &script])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(as_task(&task), NATTED);
    // A flushed set gets the job's cgroup back from the ledger (as `watch` does it).
    lab.net.ok(
        &w1,
        &["nft", "flush", "set", "inet", "slurm_egress", "jobs"],
    );
    assert!(as_task(&task).starts_with("error="));
    assert!(
        lab.egress_ok(&w1, &config, &["apply"])
            .contains(&format!("element {id}"))
    );
    assert_eq!(as_task(&task), NATTED);
    let elsewhere = tree.0.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    assert!(as_task(&elsewhere).starts_with("error="));

    // The job ends: its member leaves the set; Slurm's cgroup is Slurm's to remove.
    lab.egress_ok(
        &w1,
        &config,
        &["job", "end", "--job-id", "77", "--node", "w1"],
    );
    assert!(set_elements::<u64>(&lab.net, &w1, "jobs").is_empty());
    assert!(job.is_dir());
    assert_eq!(as_task(&task).split('=').next(), Some("error"));

    // Without the node policy a selected job's start fails (in the prolog, which drains the
    // node) and records nothing.
    lab.egress_ok(&w1, &config, &["remove"]);
    let out = start("78");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("run `slurm-egress apply`"), "{stderr}");
    assert_eq!(lab.egress_ok(&w1, &config, &["jobs"]).lines().count(), 1);
}

/// Runs `attach_in_child` in a process placed in cgroup `dir`, in worker `w`'s network
/// namespace and this mount namespace (which `ip netns exec` would change).
fn in_task(dir: &Path, w: &str, config: &Path, job: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    let script = format!(
        "echo $$ >{}/cgroup.procs && exec {} --exact attach_in_child --nocapture",
        dir.display(),
        exe.display()
    );
    let out = Command::new("nsenter")
        .args([&format!("--net=/run/netns/{w}"), "/bin/sh", "-c", &script])
        .env("SE_ATTACH_JOB", job)
        .env("SE_ATTACH_CONFIG", config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Not a test of its own: the plugin's task hook, run by [`in_task`] in a child process.
#[test]
fn attach_in_child() {
    let (Some(job), Some(config)) = (
        std::env::var_os("SE_ATTACH_JOB"),
        std::env::var_os("SE_ATTACH_CONFIG"),
    ) else {
        return;
    };
    let config = slurm_egress::config::Config::load(Path::new(&config)).unwrap();
    let job: u32 = job.to_str().unwrap().parse().unwrap();
    match slurm_egress::jobs::attach(&config, job).unwrap() {
        slurm_egress::jobs::Attached::Joined { cgroup, first } => println!(
            "attached {} id {} level {} own {} first {first}",
            cgroup.path, cgroup.id, cgroup.level, cgroup.own
        ),
        other => panic!("{other:?}"),
    }
}
