//! `slurm-egress watch` repairs the node policy after link flaps, lost addresses and
//! tampering, without anyone acting, and serves the plugin's set changes.
//!
//! Each fault is made while the watch is frozen (SIGSTOP), so that a selected user's
//! connection can be seen failing right after it; then the watch thaws and the same
//! connection must work again. Meanwhile an unselected user keeps trying to get out, and
//! none of its packets may ever reach the NAT router. How long repairs take is measured by
//! `benches/repair.sh`; these tests only bound it.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::lab::{INTERNET, Lab};
use common::{BIN, PYTHON, Scratch, probe_py, run, set_elements, uid, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const NATTED: &str = "peer=203.0.113.1";
/// The port the unselected user's connections go to, so that the routers can count them.
const UNSELECTED_PORT: &str = "9090";
/// How long a repair may take here: the goal is 1 s, this is a loaded test machine.
const REPAIR_BOUND: Duration = Duration::from_secs(5);

/// A TCP exchange from `w` as `user` to the internet host; the probe's one-line answer.
/// A short timeout: in this lab a connection that works answers within milliseconds.
fn tcp(w: &str, user: &str, port: &str) -> String {
    let probe = probe_py();
    let probe = probe.to_str().unwrap();
    let args = [PYTHON, probe, "tcp", INTERNET, port, "--timeout", "0.5"];
    common::as_user(w, user, &args)
}

/// Starts `slurm-egress watch` in `w` with `args` after `watch`, logging to `log`; its PID.
fn start_watch(lab: &mut Lab, w: &str, config: &std::path::Path, log: &str, args: &[&str]) -> u32 {
    let log = lab.scratch.path(log);
    // Debug lines of our own crate only: one per look at the node.
    let mut all = vec![
        "env",
        "RUST_LOG=slurm_egress=debug",
        BIN,
        "--config",
        config.to_str().unwrap(),
        "watch",
    ];
    all.extend_from_slice(args);
    let pid = lab.net.spawn_logged(w, &all, Some(&log));
    wait_until("the first apply", REPAIR_BOUND, || in_sync(lab, w, config));
    pid
}

fn in_sync(lab: &Lab, w: &str, config: &std::path::Path) -> bool {
    lab.egress(w, config, &["check"]).status.code() == Some(0)
}

fn log_text(lab: &Lab, name: &str) -> String {
    std::fs::read_to_string(lab.scratch.path(name)).unwrap()
}

/// The watch stopped with SIGSTOP; continued when dropped, also when the test fails.
struct Frozen(Pid);

impl Frozen {
    fn new(pid: u32) -> Frozen {
        let pid = Pid::from_raw(pid as i32);
        kill(pid, Signal::SIGSTOP).unwrap();
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// Runs a command that must succeed, retrying while another process holds the user and
/// group databases' lock (other test binaries add their users at the same time).
fn admin(args: &[&str]) {
    for _ in 0..50 {
        let out = run(args);
        if out.status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    common::ok(args);
}

/// A group and a user (primary group se-other) of this test file, created if missing.
fn ensure(group: Option<&str>, user: &str) {
    common::ensure_users();
    let exists = |db: &str, name: &str| run(&["getent", db, name]).status.success();
    if let Some(group) = group
        && !exists("group", group)
    {
        admin(&["groupadd", group]);
    }
    if !exists("passwd", user) {
        admin(&[
            "useradd",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--gid",
            "se-other",
            user,
        ]);
    }
}

/// One fault: the commands that make it (run in the worker), and the user whose connection
/// shows it.
struct Fault {
    name: &'static str,
    commands: Vec<String>,
    user: &'static str,
    /// The fault gives `user` the path (a member someone added by hand), rather than
    /// taking it away.
    gains: bool,
}

fn fault(name: &'static str, user: &'static str, commands: &[&str]) -> Fault {
    Fault {
        name,
        commands: commands.iter().map(|c| c.to_string()).collect(),
        user,
        gains: false,
    }
}

/// Connections of the unselected user se-other to `UNSELECTED_PORT`, again and again until
/// `stop`; returns every answer. Bounded: at most 10 minutes.
fn unselected_traffic(ns: &str, stop: &AtomicBool) -> Vec<String> {
    let probe = probe_py();
    let probe = probe.to_str().unwrap();
    let args = [
        PYTHON,
        probe,
        "tcp",
        INTERNET,
        UNSELECTED_PORT,
        "--timeout",
        "0.3",
    ];
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut answers = Vec::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        answers.push(common::as_user(ns, "se-other", &args));
    }
    answers
}

#[test]
fn watch_repairs_every_fault_and_unselected_traffic_never_gets_out() {
    ensure(None, "se-wjob");
    let mut lab = Lab::new("watch", 1);
    let w = lab.workers[0].clone();
    let config = lab.seed_config();
    let probe = probe_py();
    let (inet, nat, gw) = (lab.inet.clone(), lab.nat.clone(), lab.gw.clone());
    let probe = probe.to_str().unwrap();
    lab.net.spawn(
        &inet,
        &[PYTHON, probe, "serve", INTERNET, UNSELECTED_PORT, "9091"],
    );
    let unselected = format!("ip saddr 10.20.1.0/24 tcp dport {UNSELECTED_PORT}");
    lab.net.count(&nat, &unselected, "unselected");
    lab.net.count(&gw, &unselected, "unselected");
    // A long interval: every repair below comes from a notification.
    let pid = start_watch(&mut lab, &w, &config, "watch.log", &["--interval", "300"]);
    assert_eq!(tcp(&w, "aliprod", "8080"), NATTED);

    // A running job of a user selected by account only, recorded in the ledger.
    let job_owner = uid("se-wjob").to_string();
    let started = lab.egress_ok(
        &w,
        &config,
        &[
            "job",
            "start",
            "--job-id",
            "7",
            "--uid",
            &job_owner,
            "--account",
            "alice",
            "--node",
            "w1",
        ],
    );
    assert!(started.contains("egress path on"), "{started}");
    assert_eq!(tcp(&w, "se-wjob", "8080"), NATTED);

    let aliprod = uid("aliprod");
    let users_minus_aliprod = format!("nft delete element inet slurm_egress users {{ {aliprod} }}");
    let faults = [
        // The seed's open problem. The node's own network setup puts the main table's
        // default route back; selected sockets need it for their first route lookup.
        fault(
            "link flap",
            "aliprod",
            &[
                "ip link set ib0 down",
                "ip link set ib0 up",
                "ip route replace default via 10.20.0.1",
            ],
        ),
        fault("deleted ip rule", "aliprod", &["ip rule del priority 1000"]),
        fault(
            "deleted route",
            "aliprod",
            &["ip route del default table 201"],
        ),
        fault(
            "flushed routing table",
            "aliprod",
            &["ip route flush table 201"],
        ),
        fault(
            "deleted nftables table",
            "aliprod",
            &["nft delete table inet slurm_egress"],
        ),
        fault(
            "flushed nftables table",
            "aliprod",
            &["nft flush table inet slurm_egress"],
        ),
        fault(
            "flushed chain",
            "aliprod",
            &["nft flush chain inet slurm_egress select"],
        ),
        fault("nft flush ruleset", "aliprod", &["nft flush ruleset"]),
        fault(
            "jobs set members lost",
            "se-wjob",
            &["nft flush set inet slurm_egress jobs"],
        ),
        fault("users set member lost", "aliprod", &[&users_minus_aliprod]),
        Fault {
            gains: true,
            ..fault(
                "foreign users set member",
                "root",
                &["nft add element inet slurm_egress users { 0 }"],
            )
        },
    ];

    let stop = AtomicBool::new(false);
    let answers = std::thread::scope(|scope| {
        let background = scope.spawn(|| unselected_traffic(&w, &stop));
        // Whatever happens below, the background loop ends.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);

        for f in &faults {
            let frozen = Frozen::new(pid);
            for command in &f.commands {
                lab.net
                    .ok(&w, &command.split_whitespace().collect::<Vec<_>>());
            }
            let during = tcp(&w, f.user, "8080");
            if f.gains {
                assert_eq!(during, NATTED, "{}: the fault has no effect", f.name);
            } else {
                assert!(
                    during.starts_with("error="),
                    "{}: {}'s connection works right after the fault: {during}",
                    f.name,
                    f.user
                );
            }
            drop(frozen);
            let thawed = Instant::now();
            wait_until(&format!("repair after: {}", f.name), REPAIR_BOUND, || {
                (tcp(&w, f.user, "8080") == NATTED) != f.gains
            });
            wait_until(&format!("check after: {}", f.name), REPAIR_BOUND, || {
                in_sync(&lab, &w, &config)
            });
            println!(
                "{}: repaired {:?} after the watch thawed",
                f.name,
                thawed.elapsed()
            );
        }

        // The address goes, and the watch waits for it without failing; once it is back the
        // repair does not wait for anything (no back-off from the waiting).
        let frozen = Frozen::new(pid);
        lab.net.ok(&w, &["ip", "addr", "flush", "dev", "ib0"]);
        let during = tcp(&w, "aliprod", "8080");
        assert!(during.starts_with("error="), "no address: {during}");
        drop(frozen);
        wait_until("the watch waiting", REPAIR_BOUND, || {
            log_text(&lab, "watch.log").contains("waiting for the interface")
        });
        assert_eq!(lab.egress(&w, &config, &["check"]).status.code(), Some(2));
        lab.net
            .ok(&w, &["ip", "addr", "add", "10.20.1.1/16", "dev", "ib0"]);
        lab.net
            .ok(&w, &["ip", "route", "add", "default", "via", "10.20.0.1"]);
        let back = Instant::now();
        wait_until("repair after the address came back", REPAIR_BOUND, || {
            tcp(&w, "aliprod", "8080") == NATTED
        });
        println!(
            "lost address: repaired {:?} after it came back",
            back.elapsed()
        );
        wait_until("check after the address", REPAIR_BOUND, || {
            in_sync(&lab, &w, &config)
        });

        drop(_stop);
        background.join().unwrap()
    });

    // The unselected user tried all along, and never got out. (Not every attempt sends a
    // packet: without an address or a route it fails at once.)
    let at_gateway = lab.net.counted(&gw, "unselected");
    assert!(answers.iter().all(|a| a != NATTED), "{answers:?}");
    assert_eq!(lab.net.counted(&nat, "unselected"), 0);
    assert!(at_gateway >= 10, "{at_gateway} packets: {answers:?}");
    println!(
        "unselected connections during the repairs: {}, {at_gateway} packets at the normal \
         gateway, none at the NAT router",
        answers.len()
    );

    let text = log_text(&lab, "watch.log");
    for want in [
        "repaired: routing: ip route missing in table alinat: default via 10.20.3.227 dev ib0 -> added",
        "repaired: routing: ip rule missing: priority 1000 fwmark 0x1/0x1 lookup alinat -> added",
        "repaired: nftables: table inet slurm_egress is missing -> created",
        "repaired: nftables: chain select: rule 1 missing: want ",
        &format!("repaired: nftables: set jobs: element {job_owner} missing -> added"),
        &format!("repaired: nftables: set users: element {aliprod} missing -> added"),
        "repaired: nftables: set users: unexpected element 0 -> removed",
    ] {
        assert!(text.contains(want), "{want}\n{text}");
    }
    assert!(
        !text.contains("retrying in"),
        "nothing was refused:\n{text}"
    );

    // Set changes go through the watch's socket; the set and the ledger agree, and its own
    // changes are no reason to look at the node again.
    let looks = |text: &str| text.matches("node policy in sync").count();
    let before = looks(&log_text(&lab, "watch.log"));
    let job = |verb: &str, id: &str| {
        let mut args = vec!["job", verb, "--job-id", id, "--node", "w1"];
        if verb == "start" {
            args.extend(["--uid", &job_owner, "--account", "alice"]);
        }
        lab.egress_ok(&w, &config, &args)
    };
    assert!(job("start", "8").contains("egress path on"));
    job("end", "7");
    assert_eq!(set_elements(&lab.net, &w, "jobs"), [uid("se-wjob")].into());
    job("end", "8");
    assert!(set_elements::<u32>(&lab.net, &w, "jobs").is_empty());
    std::thread::sleep(Duration::from_millis(400));
    let text = log_text(&lab, "watch.log");
    assert_eq!(
        looks(&text),
        before,
        "own set changes made it look:\n{text}"
    );
    assert!(
        text.contains(&format!("jobs set: remove uid {job_owner}")),
        "{text}"
    );
    let socket = |lab: &Lab| {
        std::fs::read_dir(lab.scratch.path("state"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("watch-"))
    };
    assert!(socket(&lab), "the watch serves its socket");

    // SIGTERM: it stops, and takes its socket with it.
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    wait_until("the watch to stop", REPAIR_BOUND, || {
        log_text(&lab, "watch.log").contains("stopped")
    });
    wait_until("its socket to go", REPAIR_BOUND, || !socket(&lab));
}

/// `nft -i` holding a table of ours with the `owner` flag: until it exits, the kernel
/// refuses every change to that table from any other socket (EPERM). Killed by its PID.
struct Owner(Child);

impl Owner {
    fn new(ns: &str) -> Owner {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.as_mut().unwrap();
        stdin
            .write_all(b"add table inet slurm_egress { flags owner; }\n")
            .unwrap();
        stdin.flush().unwrap();
        Owner(child)
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn watch_backs_off_while_the_kernel_refuses_and_repairs_when_it_stops() {
    let mut lab = Lab::new("wback", 1);
    let w = lab.workers[0].clone();
    let config = lab.seed_config();
    let pid = start_watch(&mut lab, &w, &config, "watch.log", &["--interval", "300"]);

    // Someone else holds our table: every rebuild is refused.
    let frozen = Frozen::new(pid);
    lab.net
        .ok(&w, &["nft", "delete", "table", "inet", "slurm_egress"]);
    let owner = Owner::new(&w);
    wait_until("the foreign owned table", REPAIR_BOUND, || {
        let out = lab
            .net
            .exec(&w, &["nft", "list", "table", "inet", "slurm_egress"]);
        String::from_utf8_lossy(&out.stdout).contains("flags owner")
    });
    drop(frozen);

    // Meanwhile the kernel keeps sending notifications, several per 100 ms.
    let refusing = Duration::from_secs(4);
    let started = Instant::now();
    let mut changes = 0;
    while started.elapsed() < refusing {
        let verb = if changes % 2 == 0 { "add" } else { "del" };
        common::ok(&["ip", "-n", &w, "addr", verb, "10.20.99.1/32", "dev", "lo"]);
        changes += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let attempts = log_text(&lab, "watch.log").matches("retrying in").count();
    println!("{changes} address changes in {refusing:?}: {attempts} attempts");
    assert!(changes >= 40, "{changes}");
    // Without back-off, one attempt per 100 ms settle: about 40.
    assert!(
        (2..=8).contains(&attempts),
        "{attempts} attempts:\n{}",
        log_text(&lab, "watch.log")
    );
    assert!(tcp(&w, "aliprod", "8080").starts_with("error="));
    assert!(tcp(&w, "se-other", "8080").starts_with("error="));

    // The owner goes; the next retry repairs (at most the last back-off later, 3.2 s).
    drop(owner);
    let gone = Instant::now();
    wait_until(
        "the repair after the refusals",
        Duration::from_secs(15),
        || in_sync(&lab, &w, &config),
    );
    println!(
        "repaired {:?} after the refusing owner left",
        gone.elapsed()
    );
    assert_eq!(tcp(&w, "aliprod", "8080"), NATTED);
    let text = log_text(&lab, "watch.log");
    assert!(
        text.contains("the kernel refused to add the table (another process owns the table: nftables `flags owner`)"),
        "{text}"
    );
}

/// Takes the user out of the group again when the test ends, also when it fails.
struct Member {
    user: &'static str,
    group: &'static str,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = run(&["gpasswd", "-d", self.user, self.group]);
    }
}

#[test]
fn watch_follows_group_membership_within_its_interval() {
    let (user, group) = ("se-wjoin", "se-wgroup");
    ensure(Some(group), user);
    let member = Member { user, group };
    // A left-over membership of a killed run.
    let _ = run(&["gpasswd", "-d", user, group]);
    let mut lab = Lab::new("wgroup", 1);
    let w = lab.workers[0].clone();
    let config = lab.config(
        r#"["tcp"]"#,
        &format!("users = [\"aliprod\"]\ngroups = [\"{group}\"]"),
    );
    start_watch(&mut lab, &w, &config, "watch.log", &["--interval", "1"]);
    assert!(tcp(&w, user, "8080").starts_with("error="));

    // The directory changes; no notification says so, the interval finds it.
    admin(&["gpasswd", "-a", user, group]);
    let joined = Instant::now();
    wait_until("the new member's path", REPAIR_BOUND, || {
        tcp(&w, user, "8080") == NATTED
    });
    println!(
        "a new group member got out {:?} after joining",
        joined.elapsed()
    );

    admin(&["gpasswd", "-d", user, group]);
    let left = Instant::now();
    wait_until("the old member's path gone", REPAIR_BOUND, || {
        tcp(&w, user, "8080").starts_with("error=")
    });
    println!(
        "a former member lost the path {:?} after leaving",
        left.elapsed()
    );
    drop(member);

    let id = uid(user);
    let text = log_text(&lab, "watch.log");
    for want in [
        format!("repaired: nftables: set users: element {id} missing -> added"),
        format!("repaired: nftables: set users: unexpected element {id} -> removed"),
    ] {
        assert!(text.contains(&want), "{want}\n{text}");
    }
}

/// The shipped units, as systemd reads them (with the binary of this build in place of
/// /usr/sbin/slurm-egress, which systemd checks exists).
#[test]
fn the_shipped_worker_units_pass_systemd_analyze_verify() {
    let scratch = Scratch::new("wunits");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("slurm");
    let mut units = Vec::new();
    for name in ["slurm-egress-apply.service", "slurm-egress.service"] {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(text.contains("/usr/sbin/slurm-egress "), "{name}");
        let path = scratch.path(name);
        std::fs::write(&path, text.replace("/usr/sbin/slurm-egress", BIN)).unwrap();
        units.push(path.to_str().unwrap().to_owned());
    }
    let mut args = vec!["systemd-analyze", "verify"];
    args.extend(units.iter().map(String::as_str));
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("systemd-analyze (systemd) is needed to check the units");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("slurm-egress"), "{stderr}");
}
