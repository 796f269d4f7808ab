//! `slurm-egress router apply | check | remove | release` on one router, without keepalived:
//! the virtual IP is put on the router by hand where a test needs it. The lab is `common::ha`.

mod common;

use common::ha::{Ha, Options, PUBLIC, SELECTED, VIP};

fn lab(tag: &str, public_ip: bool) -> Ha {
    Ha::new(
        tag,
        Options {
            routers: 1,
            public_ip,
            sync: false,
            daemons: false,
            ..Options::default()
        },
    )
}

fn forwarding(lab: &Ha, interface: &str) -> String {
    let key = format!("net.ipv4.conf.{interface}.forwarding");
    lab.net
        .ok(&lab.router(1).ns, &["sysctl", "-n", &key])
        .trim()
        .to_owned()
}

fn tables(lab: &Ha) -> String {
    lab.net.ok(&lab.router(1).ns, &["nft", "list", "tables"])
}

fn our_table(lab: &Ha) -> String {
    lab.net.ok(
        &lab.router(1).ns,
        &["nft", "list", "table", "inet", "slurm_egress_router"],
    )
}

/// Before `router apply` the node forwards nothing; after it, the selected user's traffic is
/// forwarded and masqueraded to the router's own address; after `router remove`, nothing again.
#[test]
fn apply_makes_a_node_a_router_and_remove_undoes_it() {
    let lab = lab("rapp", false);
    let ns = lab.router(1).ns.clone();
    lab.net.ok(
        &ns,
        &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "ib0"],
    );
    assert_eq!(
        lab.connect(SELECTED).detail,
        lab.router(1).outside,
        "masqueraded to r1's own address"
    );
    let out = lab.router_ok(1, &["router", "remove"]);
    assert!(
        out.contains("deleted nftables table inet slurm_egress_router"),
        "{out}"
    );
    let a = lab.connect(SELECTED);
    assert!(!a.ok, "forwarded without the router role: {a:?}");
    lab.router_ok(1, &["router", "apply"]);
    let a = lab.connect(SELECTED);
    assert!(a.ok && a.detail == lab.router(1).outside, "{a:?}");
    let listing = our_table(&lab);
    assert!(
        listing.contains("iifname \"ib0\" oifname \"eth9\" counter packets")
            && listing.contains("iifname \"ib0\" oifname \"eth9\" masquerade"),
        "{listing}"
    );
}

#[test]
fn apply_is_idempotent_and_dry_run_changes_nothing() {
    let lab = lab("ridem", true);
    lab.router_ok(1, &["router", "remove"]);
    assert_eq!(
        (forwarding(&lab, "ib0"), forwarding(&lab, "eth9")),
        ("0".into(), "0".into())
    );

    let dry = lab.router_ok(1, &["router", "apply", "--dry-run"]);
    assert_eq!(
        dry,
        "nftables: table inet slurm_egress_router is missing\n\
         sysctl: net.ipv4.conf.ib0.forwarding is 0, want 1\n\
         sysctl: net.ipv4.conf.eth9.forwarding is 0, want 1\n\
         dry run: 3 change(s) not applied\n"
    );
    assert!(!tables(&lab).contains("slurm_egress_router"));
    assert_eq!(forwarding(&lab, "ib0"), "0");

    let first = lab.router_ok(1, &["router", "apply"]);
    assert!(first.ends_with("applied 3 change(s)\n"), "{first}");
    let listing = our_table(&lab);
    for want in [
        "chain forward {\n\t\ttype filter hook forward priority filter; policy drop;",
        "ct state invalid counter packets 0 bytes 0 drop",
        "iifname \"eth9\" oifname \"ib0\" ct state established,related counter",
        &format!("iifname \"ib0\" oifname \"eth9\" snat ip to {PUBLIC}"),
        &format!("iifname \"eth9\" ip daddr {PUBLIC} ct state new counter packets 0 bytes 0 drop"),
    ] {
        assert!(listing.contains(want), "{want}:\n{listing}");
    }
    // Forwarding on the two interfaces only.
    assert_eq!(
        (forwarding(&lab, "ib0"), forwarding(&lab, "eth9")),
        ("1".into(), "1".into())
    );
    assert_eq!(forwarding(&lab, "lo"), "0");
    assert_eq!(forwarding(&lab, "all"), "0");

    let second = lab.router_ok(1, &["router", "apply"]);
    assert_eq!(second, "in sync: nothing to do\n");
    assert_eq!(our_table(&lab), listing);
    let check = lab.router_cmd(1, &["router", "check"]);
    assert_eq!(check.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&check.stdout), "in sync\n");
}

#[test]
fn check_finds_drift_and_apply_repairs_it() {
    let lab = lab("rdrift", true);
    let ns = lab.router(1).ns.clone();
    for (tamper, expect) in [
        (
            "sysctl -qw net.ipv4.conf.eth9.forwarding=0",
            "sysctl: net.ipv4.conf.eth9.forwarding is 0, want 1",
        ),
        (
            // Global forwarding switched on and off again: that resets every interface.
            "sysctl -qw net.ipv4.ip_forward=1; sysctl -qw net.ipv4.ip_forward=0",
            "sysctl: net.ipv4.conf.ib0.forwarding is 0, want 1",
        ),
        (
            "nft delete table inet slurm_egress_router",
            "nftables: table inet slurm_egress_router is missing",
        ),
        (
            "nft flush chain inet slurm_egress_router postrouting",
            "nftables: chain postrouting: rule 1 missing: want \"iifname \"ib0\" oifname \"eth9\" \
             snat ip to 203.0.113.227\"",
        ),
        (
            "nft add rule inet slurm_egress_router forward accept",
            "nftables: chain forward: unexpected rule 4: \"accept\"",
        ),
        (
            "nft delete chain inet slurm_egress_router input",
            "nftables: chain input is missing",
        ),
    ] {
        lab.net.ok(&ns, &["sh", "-c", tamper]);
        let check = lab.router_cmd(1, &["router", "check"]);
        let out = String::from_utf8_lossy(&check.stdout);
        assert_eq!(check.status.code(), Some(1), "{tamper}: {out}");
        assert!(out.contains(expect), "{tamper}:\n{out}");
        assert!(out.contains("drift: "), "{out}");
        lab.router_ok(1, &["router", "apply"]);
        assert_eq!(
            lab.router_cmd(1, &["router", "check"]).status.code(),
            Some(0),
            "after repairing {tamper}"
        );
    }
}

/// `remove` restores the forwarding values `apply` found (on where it was on before, off where
/// it was off), deletes exactly its table, and leaves other tables alone.
#[test]
fn remove_restores_forwarding_and_leaves_nothing_behind() {
    let lab = lab("rrm", true);
    let ns = lab.router(1).ns.clone();
    lab.router_ok(1, &["router", "remove"]);
    // eth9 forwarded before slurm-egress; ib0 did not. Someone else has a table.
    lab.net
        .ok(&ns, &["sysctl", "-qw", "net.ipv4.conf.eth9.forwarding=1"]);
    lab.net
        .ok(&ns, &["nft", "add", "table", "inet", "someone_else"]);
    let out = lab.router_ok(1, &["router", "apply"]);
    assert!(out.contains("applied 2 change(s)"), "{out}");
    let record = std::fs::read_to_string(lab.router(1).dir.join("forwarding")).unwrap();
    assert!(
        record.ends_with("ib0 0\n"),
        "only what apply changed: {record}"
    );

    let out = lab.router_ok(1, &["router", "remove"]);
    assert_eq!(
        out,
        format!(
            "net.ipv4.conf.ib0.forwarding set back to 0\ndeleted {}\n\
             deleted nftables table inet slurm_egress_router\n",
            lab.router(1).dir.join("forwarding").display()
        )
    );
    assert_eq!(
        (forwarding(&lab, "ib0"), forwarding(&lab, "eth9")),
        ("0".into(), "1".into())
    );
    assert_eq!(
        tables(&lab).trim(),
        "table inet se_count\ntable inet someone_else"
    );
    assert!(!lab.router(1).dir.join("forwarding").exists());
    assert_eq!(
        lab.router_ok(1, &["router", "remove"]),
        "nothing to remove\n"
    );
    assert_eq!(
        lab.router_cmd(1, &["router", "check"]).status.code(),
        Some(1)
    );
}

/// What a killed keepalived leaves is taken away, and only that.
#[test]
fn release_takes_away_the_floating_addresses() {
    let lab = lab("rrel", true);
    let ns = lab.router(1).ns.clone();
    lab.net.ok(
        &ns,
        &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "ib0"],
    );
    lab.net.ok(
        &ns,
        &["ip", "addr", "add", &format!("{PUBLIC}/32"), "dev", "eth9"],
    );
    let out = lab.router_ok(1, &["router", "release"]);
    assert_eq!(
        out,
        format!("deleted {VIP}/32 from ib0\ndeleted {PUBLIC}/32 from eth9\n")
    );
    let addresses = lab.net.ok(&ns, &["ip", "-4", "-o", "addr"]);
    assert!(
        !addresses.contains(VIP) && !addresses.contains(PUBLIC),
        "{addresses}"
    );
    assert!(addresses.contains("10.20.3.1/16") && addresses.contains("203.0.113.1/24"));
    assert_eq!(
        lab.router_ok(1, &["router", "release"]),
        "nothing to release\n"
    );
}

/// The configs slurm-egress prints are ones keepalived accepts, and the notify hook says
/// clearly when conntrackd is not there.
#[test]
fn printed_configs_are_accepted_and_notify_reports_a_missing_conntrackd() {
    let lab = Ha::new(
        "rcfg",
        Options {
            routers: 2,
            daemons: false,
            ..Options::default()
        },
    );
    let r = lab.router(1);
    let conf = r.dir.join("keepalived.conf");
    lab.router_ok(
        1,
        &[
            "router",
            "keepalived-config",
            "--output",
            conf.to_str().unwrap(),
        ],
    );
    let test = lab.net.exec(
        &r.ns,
        &[
            "keepalived",
            "--config-test",
            "--use-file",
            conf.to_str().unwrap(),
        ],
    );
    assert!(
        test.status.success(),
        "keepalived -t: {}",
        String::from_utf8_lossy(&test.stderr)
    );
    let printed = lab.router_ok(1, &["router", "conntrackd-config"]);
    assert!(
        printed.contains("IPv4_Destination_Address 10.20.3.2"),
        "{printed}"
    );
    let out = lab.router_cmd(1, &["router", "notify", "backup"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("conntrackd does not answer"), "{text}");
    let log = std::fs::read_to_string(r.dir.join("notify.log")).unwrap();
    assert!(
        log.contains(" backup: conntrackd -s (check that conntrackd runs): failed"),
        "{log}"
    );
}

/// Bad input: an error naming the key and its line, exit 2, and nothing changed.
#[test]
fn bad_input_is_refused_before_anything_changes() {
    let lab = lab("rbad", true);
    lab.router_ok(1, &["router", "remove"]);
    let good = std::fs::read_to_string(&lab.router(1).config).unwrap();
    let line = |key: &str| {
        good.lines()
            .position(|l| l.starts_with(key))
            .map(|i| i + 1)
            .unwrap()
    };
    let cases = [
        (
            "outside = \"eth9\"",
            "outside = \"ib0\"",
            format!(
                ":{}:11: router.outside: \"ib0\" is also router.inside",
                line("outside")
            ),
        ),
        (
            "outside = \"eth9\"",
            "outside = \"eth7\"",
            format!(
                ":{}:11: router.outside: no interface \"eth7\" in this network namespace",
                line("outside")
            ),
        ),
        (
            "inside = \"ib0\"",
            "inside = \"ib9\"",
            format!(
                ":{}:10: router.inside: no interface \"ib9\"",
                line("inside")
            ),
        ),
        (
            &format!("virtual_ip = \"{VIP}\""),
            "virtual_ip = \"10.30.3.227\"",
            format!(
                ":{}:14: router.virtual_ip: 10.30.3.227 is not in a subnet of ib0 \
                 (its addresses: 10.20.3.1/16)",
                line("virtual_ip")
            ),
        ),
        (
            "priority = 150",
            "priority = 255",
            format!(
                ":{}:12: router.priority: 255 is out of range",
                line("priority = 150")
            ),
        ),
        (
            "advert_interval = 0.1",
            "advert_interval = 0.001",
            format!(":{}:19: router.advert_interval", line("advert_interval")),
        ),
        (
            "peers = []",
            "peers = [\"10.30.0.2\"]",
            "router.peers: 10.30.0.2 is not in 10.20.0.0/16".to_owned(),
        ),
        (
            &format!("public_ip = \"{PUBLIC}\""),
            "public_ip = \"198.51.100.227\"",
            "router.public_ip: 198.51.100.227 is not in a subnet of eth9".to_owned(),
        ),
        (
            "virtual_router_id = 51",
            "virtual_router_id = 300",
            "router.virtual_router_id: 300 is out of range".to_owned(),
        ),
        (
            "sync = false",
            "sync = true",
            "router.sync: there are no router.peers".to_owned(),
        ),
        (
            "[router]",
            "[routerr]",
            "unknown field `routerr`".to_owned(),
        ),
    ];
    let path = lab.scratch.path("bad.toml");
    for (from, to, expect) in &cases {
        assert!(good.contains(from), "{from}");
        std::fs::write(&path, good.replacen(from, to, 1)).unwrap();
        for command in [
            &["router", "apply"][..],
            &["router", "apply", "--dry-run"],
            &["router", "check"],
            &["router", "keepalived-config"],
        ] {
            let mut args = vec![common::BIN, "--config", path.to_str().unwrap()];
            args.extend_from_slice(command);
            let out = lab.net.exec(&lab.router(1).ns, &args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{to} {command:?}: {err}");
            assert!(err.contains(expect.as_str()), "{to} {command:?}:\n{err}");
            assert!(out.stdout.is_empty(), "{to} {command:?} printed something");
        }
        assert!(!tables(&lab).contains("slurm_egress_router"), "{to}");
        assert_eq!(forwarding(&lab, "ib0"), "0", "{to}");
    }
    // A worker's config is not a router's.
    let out = lab.net.exec(
        &lab.router(1).ns,
        &[
            common::BIN,
            "--config",
            lab.worker_config.to_str().unwrap(),
            "router",
            "apply",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no [router] section"));
    // Not root.
    let out = common::ok(&[
        "ip",
        "netns",
        "exec",
        &lab.router(1).ns,
        "setpriv",
        "--reuid",
        "se-other",
        "--regid",
        "se-other",
        "--clear-groups",
        "sh",
        "-c",
        &format!(
            "{} --config {} router apply; echo status=$?",
            common::BIN,
            lab.router(1).config.display()
        ),
    ]);
    assert!(out.contains("status=2"), "{out}");
    assert!(!tables(&lab).contains("slurm_egress_router"));
}
