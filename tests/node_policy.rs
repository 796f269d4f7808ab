//! The node policy (`slurm-egress apply | check | remove`) in a lab of network namespaces,
//! judged by where packets went: the NAT router (and the source address the internet host
//! saw) or the normal gateway, which drops and counts.

mod common;

use common::lab::{self, INTERNET, SERVICE};
use common::{Net, ok};

const NATTED: &str = "peer=203.0.113.1";

fn nft_tables(net: &Net, ns: &str) -> String {
    net.ok(ns, &["nft", "list", "tables"])
}

/// Selected by name, by primary group and by supplementary group: out through the NAT router;
/// another user and root: the normal gateway. No packet of a selected connection ever reaches
/// the normal gateway.
#[test]
fn selected_users_go_out_natted_and_others_stay_closed() {
    let lab = lab::Lab::new("sel", 1);
    let w = &lab.workers[0];
    let config = lab.seed_config();
    lab.egress_ok(w, &config, &["apply"]);

    for user in ["aliprod", "rgrosso", "se-prim", "se-supp"] {
        lab.reset_counts();
        assert_eq!(lab.tcp(w, user, INTERNET, "hello"), NATTED, "{user}");
        let (gw, nat) = lab.internet_counts();
        assert_eq!(
            gw, 0,
            "{user}: packets of a selected connection reached the normal gateway"
        );
        assert!(
            nat >= 4,
            "{user}: only {nat} packets through the NAT router"
        );
    }
    for user in ["se-other", "root"] {
        lab.reset_counts();
        let answer = lab.tcp(w, user, INTERNET, "hello");
        assert!(answer.starts_with("error="), "{user} got out: {answer}");
        let (gw, nat) = lab.internet_counts();
        assert!(gw >= 1, "{user}: the normal gateway saw nothing");
        assert_eq!(
            nat, 0,
            "{user}: an unselected packet reached the NAT router"
        );
    }
}

/// Packets the kernel sends after the application closed its socket: RSTs answering data
/// that arrives after close, ACKs of FIN retransmissions in TIME_WAIT, and an abortive close.
#[test]
fn teardown_packets_take_the_egress_path_too() {
    let lab = lab::Lab::new("tear", 1);
    let w = &lab.workers[0];
    lab.egress_ok(w, &lab.seed_config(), &["apply"]);
    lab.net
        .count(&lab.nat, "ip saddr 10.20.1.1 tcp flags rst", "rst");
    lab.net
        .count(&lab.nat, "ip saddr 203.0.113.10 tcp flags fin", "fin");

    for mode in ["rst", "finretx", "linger"] {
        lab.reset_counts();
        assert_eq!(lab.tcp(w, "aliprod", INTERNET, mode), NATTED, "{mode}");
        // The server keeps the connection busy for up to 1.5 s after the client closed.
        std::thread::sleep(std::time::Duration::from_millis(2000));
        let (gw, nat) = lab.internet_counts();
        let rsts = lab.net.counted(&lab.nat, "rst");
        let fins = lab.net.counted(&lab.nat, "fin");
        assert_eq!(
            gw, 0,
            "{mode}: {gw} teardown packet(s) went to the normal gateway"
        );
        match mode {
            "rst" | "linger" => assert!(rsts >= 1, "{mode}: no RST crossed the NAT router"),
            _ => assert!(
                fins >= 2,
                "finretx: the server never retransmitted its FIN ({fins})"
            ),
        }
        assert!(nat >= 5, "{mode}: {nat} packets via NAT");
    }
}

/// Exceptions keep the normal path, on-link and via the normal gateway.
#[test]
fn exceptions_keep_the_normal_path() {
    let mut lab = lab::Lab::new("exc", 2);
    let (w1, w2) = (lab.workers[0].clone(), lab.workers[1].clone());
    let probe = common::probe_py();
    lab.net.spawn(
        &w2,
        &[
            common::PYTHON,
            probe.to_str().unwrap(),
            "serve",
            "10.20.1.2",
            "8080",
            "8081",
        ],
    );
    lab.egress_ok(&w1, &lab.seed_config(), &["apply"]);
    lab.net.count(&lab.nat, "ip daddr 10.20.1.2", "w2");

    // Via the normal gateway to the internal service: not NATed, so it sees the worker.
    assert_eq!(lab.tcp(&w1, "aliprod", SERVICE, "hello"), "peer=10.20.1.1");
    assert_eq!(lab.net.counted(&lab.nat, "service"), 0);
    assert!(lab.net.counted(&lab.gw, "service") >= 4);
    // On-link: straight to the other worker.
    common::wait_until(
        "the server on w2",
        std::time::Duration::from_secs(5),
        || lab.tcp(&w1, "aliprod", "10.20.1.2", "hello") == "peer=10.20.1.1",
    );
    assert_eq!(lab.net.counted(&lab.nat, "w2"), 0);
}

/// UDP takes the egress path only when configured.
#[test]
fn udp_follows_the_protocol_list() {
    let lab = lab::Lab::new("udp", 1);
    let w = &lab.workers[0];
    let tcp_only = lab.seed_config();
    lab.egress_ok(w, &tcp_only, &["apply"]);
    assert!(lab.udp(w, "aliprod", INTERNET).starts_with("error="));

    let both = lab.config(r#"["tcp", "udp"]"#, r#"users = ["aliprod"]"#);
    let out = lab.egress_ok(w, &both, &["apply"]);
    assert!(out.contains("applied"), "{out}");
    lab.reset_counts();
    assert_eq!(lab.udp(w, "aliprod", INTERNET), NATTED);
    assert_eq!(lab.udp(w, "se-other", INTERNET).get(..6), Some("error="));
    let (gw, nat) = lab.internet_counts();
    assert!(gw >= 1 && nat >= 1, "gw {gw} nat {nat}");
    // `rgrosso` left the selection with this config.
    assert!(
        lab.tcp(w, "rgrosso", INTERNET, "hello")
            .starts_with("error=")
    );
}

/// A second apply changes nothing and says so; dry runs change nothing.
#[test]
fn apply_is_idempotent_and_dry_run_changes_nothing() {
    let lab = lab::Lab::new("idem", 1);
    let w = &lab.workers[0];
    let config = lab.seed_config();
    let dry = lab.egress_ok(w, &config, &["apply", "--dry-run"]);
    assert!(
        dry.contains("dry run:") && dry.contains("table inet slurm_egress"),
        "{dry}"
    );
    assert!(!nft_tables(&lab.net, w).contains("slurm_egress"));
    assert!(!lab.net.ok(w, &["ip", "rule"]).contains("1000:"));

    let first = lab.egress_ok(w, &config, &["apply"]);
    assert!(first.contains("applied"), "{first}");
    let ruleset = lab
        .net
        .ok(w, &["nft", "list", "table", "inet", "slurm_egress"]);
    let rules = lab.net.ok(w, &["ip", "rule"]);
    let routes = lab.net.ok(w, &["ip", "route", "show", "table", "alinat"]);
    assert!(
        rules.contains("1000:\tfrom all fwmark 0x1/0x1 lookup alinat"),
        "{rules}"
    );
    assert!(
        routes.contains("default via 10.20.3.227 dev ib0"),
        "{routes}"
    );
    assert!(routes.contains("10.20.0.0/16 dev ib0"), "{routes}");
    assert!(
        routes.contains("198.51.100.0/24 via 10.20.0.1 dev ib0"),
        "{routes}"
    );

    let second = lab.egress_ok(w, &config, &["apply"]);
    assert_eq!(second.trim(), "in sync: nothing to do");
    assert_eq!(
        lab.net
            .ok(w, &["nft", "list", "table", "inet", "slurm_egress"]),
        ruleset
    );
    assert_eq!(lab.net.ok(w, &["ip", "rule"]), rules);
    assert_eq!(
        lab.net.ok(w, &["ip", "route", "show", "table", "alinat"]),
        routes
    );
    let check = lab.egress(w, &config, &["check"]);
    assert_eq!(check.status.code(), Some(0));
}

/// `check` sees each kind of drift, exits 1, and `apply` repairs it.
#[test]
fn check_finds_drift_and_apply_repairs_it() {
    let lab = lab::Lab::new("drift", 1);
    let w = &lab.workers[0];
    let config = lab.seed_config();
    lab.egress_ok(w, &config, &["apply"]);
    for (tamper, expect) in [
        (
            "ip route del 198.51.100.0/24 table alinat",
            "ip route missing in table alinat: 198.51.100.0/24 via 10.20.0.1 dev ib0",
        ),
        (
            "ip rule del priority 1000",
            "ip rule missing: priority 1000 fwmark 0x1/0x1 lookup alinat",
        ),
        (
            "ip route flush table alinat",
            "ip route missing in table alinat: default via 10.20.3.227 dev ib0",
        ),
        ("nft delete table inet slurm_egress", "slurm_egress"),
        ("nft flush chain inet slurm_egress select", "select"),
        ("nft add element inet slurm_egress users { 4242 }", "4242"),
        (
            "ip route add 203.0.113.0/24 via 10.20.0.1 table alinat",
            "ip route not in the config, in table alinat: 203.0.113.0/24 via 10.20.0.1",
        ),
    ] {
        let args: Vec<&str> = tamper.split(' ').collect();
        lab.net.ok(w, &args);
        let check = lab.egress(w, &config, &["check"]);
        let out = String::from_utf8_lossy(&check.stdout);
        assert_eq!(check.status.code(), Some(1), "{tamper}: {out}");
        assert!(out.contains(expect), "{tamper}: {out}");
        assert!(out.contains("drift:"), "{out}");
        lab.egress_ok(w, &config, &["apply"]);
        assert_eq!(
            lab.egress(w, &config, &["check"]).status.code(),
            Some(0),
            "{tamper}"
        );
        lab.reset_counts();
        assert_eq!(
            lab.tcp(w, "aliprod", INTERNET, "hello"),
            NATTED,
            "after {tamper}"
        );
        assert_eq!(lab.internet_counts().0, 0);
    }
}

/// `remove` takes out exactly what `apply` made, and nothing else.
#[test]
fn remove_leaves_nothing_behind() {
    let lab = lab::Lab::new("rm", 1);
    let w = &lab.workers[0];
    let config = lab.seed_config();
    // Someone else's rule and table, which must survive.
    lab.net.ok(
        w,
        &[
            "ip", "rule", "add", "priority", "2000", "fwmark", "0x8", "lookup", "main",
        ],
    );
    lab.net
        .ok(w, &["nft", "add", "table", "inet", "someone_else"]);
    let rules_before = lab.net.ok(w, &["ip", "rule"]);

    lab.egress_ok(w, &config, &["apply"]);
    assert_eq!(lab.tcp(w, "aliprod", INTERNET, "hello"), NATTED);
    let out = lab.egress_ok(w, &config, &["remove"]);
    assert!(
        out.contains("deleted nftables table inet slurm_egress"),
        "{out}"
    );

    assert_eq!(nft_tables(&lab.net, w).trim(), "table inet someone_else");
    assert_eq!(lab.net.ok(w, &["ip", "rule"]), rules_before);
    assert_eq!(lab.net.ok(w, &["ip", "route", "show", "table", "201"]), "");
    let names = format!("/etc/netns/{w}/iproute2/rt_tables.d/slurm-egress.conf");
    assert!(!std::path::Path::new(&names).exists());
    assert!(
        lab.tcp(w, "aliprod", INTERNET, "hello")
            .starts_with("error=")
    );
    assert_eq!(
        lab.egress_ok(w, &config, &["remove"]).trim(),
        "nothing to remove"
    );
    assert_eq!(lab.egress(w, &config, &["check"]).status.code(), Some(1));
}

/// Bad input gets an error naming the key and line, exit 2, and changes nothing.
#[test]
fn bad_input_is_refused_before_anything_changes() {
    let lab = lab::Lab::new("bad", 1);
    let w = &lab.workers[0];
    let good = std::fs::read_to_string(lab.seed_config()).unwrap();
    let cases = [
        (
            "\"aliprod\"",
            "\"no-such-user\"",
            ":16:10: select.users: no user \"no-such-user\"",
        ),
        (
            "[\"alice\"]\naccounts",
            "[\"no-such-group\"]\naccounts",
            "select.groups: no group \"no-such-group\"",
        ),
        (
            "interface = \"ib0\"",
            "interface = \"ib9\"",
            ":7:13: routing.interface: no interface \"ib9\" in this network namespace",
        ),
        (
            "gateway = \"10.20.3.227\"",
            "gateway = \"10.30.3.227\"",
            ":8:11: routing.gateway: 10.30.3.227 is not reachable from ib0: not on its subnets (10.20.1.1/16)",
        ),
        (
            "via = \"10.20.0.1\"",
            "via = \"10.99.0.1\"",
            "routing.exceptions: 198.51.100.0/24: via 10.99.0.1 is not reachable",
        ),
        (
            "priority = 1000",
            "priorty = 1000",
            "unknown field `priorty`",
        ),
        (
            "mark = 0x1",
            "mark = 0x2",
            "routing.mark: 0x2 has bits outside mask 0x1",
        ),
        (
            "\"10.20.0.0/16\"",
            "\"10.20.0.0/40\"",
            "\"10.20.0.0/40\" is not an IPv4 network",
        ),
        (
            "table = 201",
            "table = 255",
            "routing.table: 255 is reserved",
        ),
    ];
    for (from, to, expect) in cases {
        assert!(good.contains(from), "{from}");
        let path = lab.scratch.path("bad.toml");
        std::fs::write(&path, good.replacen(from, to, 1)).unwrap();
        for command in [&["apply"][..], &["apply", "--dry-run"], &["check"]] {
            let out = lab.egress(w, &path, command);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{to} {command:?}: {err}");
            assert!(err.contains(expect), "{to}: {err}");
        }
        assert!(!nft_tables(&lab.net, w).contains("slurm_egress"), "{to}");
        assert!(!lab.net.ok(w, &["ip", "rule"]).contains("1000:"), "{to}");
    }
    // A table name that iproute2 already gives to another id.
    let path = lab.scratch.path("clash.toml");
    std::fs::write(&path, good.replacen("\"alinat\"", "\"main\"", 1)).unwrap();
    let err = String::from_utf8_lossy(&lab.egress(w, &path, &["apply"]).stderr).into_owned();
    assert!(err.contains("routing.table_name"), "{err}");
    // A missing config file.
    let out = lab.egress(w, std::path::Path::new("/nonexistent.toml"), &["apply"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config /nonexistent.toml"));

    // Not root.
    let good_path = lab.seed_config();
    let out = ok(&[
        "ip",
        "netns",
        "exec",
        w,
        "setpriv",
        "--reuid",
        "se-other",
        "--regid",
        "se-other",
        "--clear-groups",
        "sh",
        "-c",
        &format!(
            "{} --config {} apply; echo status=$?",
            common::BIN,
            good_path.display()
        ),
    ]);
    assert!(out.contains("status=2"), "{out}");
    assert!(!nft_tables(&lab.net, w).contains("slurm_egress"));
}

/// The seed site's config, exactly as the issue writes it, applies on a node of its shape.
#[test]
fn seed_config_applies_as_written() {
    let lab = lab::Lab::new("seed", 1);
    let w = &lab.workers[0];
    let text = include_str!("../slurm/config.toml.example");
    let path = lab.scratch.path("seed.toml");
    // Only the ledger location differs from the shipped file, to keep the test's state apart.
    std::fs::write(
        &path,
        format!(
            "{text}\n[jobs]\nstate_dir = \"{}\"\n",
            lab.scratch.path("state").display()
        ),
    )
    .unwrap();
    let out = lab.egress_ok(w, &path, &["apply"]);
    assert!(out.contains("applied"), "{out}");
    let routes = lab.net.ok(w, &["ip", "route", "show", "table", "alinat"]);
    for want in [
        "default via 10.20.3.227 dev ib0",
        "10.10.24.0/24 via 10.20.0.1 dev ib0",
        "140.181.2.0/24 via 10.20.0.1 dev ib0",
        "140.181.60.0/24 via 10.20.0.1 dev ib0",
        "10.20.0.0/16 dev ib0",
    ] {
        assert!(routes.contains(want), "{want}: {routes}");
    }
    assert_eq!(lab.tcp(w, "alise", INTERNET, "hello"), NATTED);
}

/// Set members of running jobs (recorded in the ledger) survive `apply`, and `apply` puts
/// them back when someone flushed the set.
#[test]
fn running_jobs_survive_apply_and_a_flushed_set_comes_back() {
    let lab = lab::Lab::new("ledger", 1);
    let w = &lab.workers[0];
    let config = lab.seed_config();
    lab.egress_ok(w, &config, &["apply"]);
    let other = common::uid("se-other");
    let start = lab.egress_ok(
        w,
        &config,
        &[
            "job",
            "start",
            "--job-id",
            "41",
            "--uid",
            &other.to_string(),
            "--account",
            "alice",
            "--node",
            "w1",
        ],
    );
    assert!(start.contains("selected (account alice)"), "{start}");
    let not = lab.egress_ok(
        w,
        &config,
        &[
            "job",
            "start",
            "--job-id",
            "42",
            "--uid",
            &other.to_string(),
            "--account",
            "physics",
            "--node",
            "w1",
        ],
    );
    assert!(not.contains("not selected"), "{not}");
    assert_eq!(common::set_elements(&lab.net, w, "jobs"), [other].into());

    assert_eq!(
        lab.egress_ok(w, &config, &["apply"]).trim(),
        "in sync: nothing to do"
    );
    assert_eq!(common::set_elements(&lab.net, w, "jobs"), [other].into());

    lab.net
        .ok(w, &["nft", "flush", "set", "inet", "slurm_egress", "jobs"]);
    let check = lab.egress(w, &config, &["check"]);
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stdout).contains(&other.to_string()));
    lab.egress_ok(w, &config, &["apply"]);
    assert_eq!(common::set_elements(&lab.net, w, "jobs"), [other].into());
    assert_eq!(lab.tcp(w, "se-other", INTERNET, "hello"), NATTED);

    let listing = lab.egress_ok(w, &config, &["jobs", "--node", "w1"]);
    assert!(
        listing.contains("41") && listing.contains("account alice") && !listing.contains(" 42 "),
        "{listing}"
    );
    let end = lab.egress_ok(
        w,
        &config,
        &["job", "end", "--job-id", "41", "--node", "w1"],
    );
    assert!(end.contains("egress path off"), "{end}");
    assert!(common::set_elements::<u32>(&lab.net, w, "jobs").is_empty());
    // An unknown job ends quietly (epilogs run where no prolog did).
    let again = lab.egress_ok(
        w,
        &config,
        &["job", "end", "--job-id", "41", "--node", "w1"],
    );
    assert!(again.contains("not recorded"), "{again}");
    assert!(
        lab.tcp(w, "se-other", INTERNET, "hello")
            .starts_with("error=")
    );
}
