//! Root tests against the real kernel, each in a private network namespace (see
//! `common::in_netns`). `nft` is only run to observe or to tamper.

mod common;

use common::netns::*;
use slurm_egress::netfilter::*;
use std::collections::BTreeSet;

const NODE: &str = "slurm_egress";

fn read(nf: &mut Netfilter, table: &Table) -> Option<LiveTable> {
    nf.read(table.family, &table.name).expect("read")
}

/// Applies `table` and checks that the kernel now has exactly it.
fn apply_and_check(nf: &mut Netfilter, table: &Table) -> Vec<Difference> {
    let fixed = nf.apply(table).expect("apply");
    let live = read(nf, table);
    let left = diff(table, live.as_ref());
    assert!(left.is_empty(), "still differs after apply: {left:?}");
    fixed
}

/// The kernel's handle of the table: a rebuilt table gets a new one (rule handles restart
/// from the same numbers in a new table, so they do not tell).
fn table_handle(table: &Table) -> Option<String> {
    let family = table.family.to_string();
    let out = std::process::Command::new("nft")
        .args(["-a", "list", "table", &family, &table.name])
        .output()
        .unwrap();
    let listing = String::from_utf8(out.stdout).unwrap();
    let first = listing.lines().next()?;
    Some(first.rsplit_once("# handle ")?.1.to_owned())
}

fn lines(diffs: &[Difference]) -> Vec<String> {
    diffs.iter().map(ToString::to_string).collect()
}

const NODE_LISTING: &str = "table inet slurm_egress {
	set users {
		type uid
		elements = { 1001, 1002 }
	}

	set groups {
		type gid
		elements = { 2000 }
	}

	set jobs {
		type uid
	}

	chain output {
		type route hook output priority mangle; policy accept;
		meta l4proto tcp jump select
	}

	chain select {
		ct state new meta skuid @users ct mark set ct mark | 0x00000001
		ct state new meta skgid @groups ct mark set ct mark | 0x00000001
		ct state new meta skuid @jobs ct mark set ct mark | 0x00000001
		ct mark & 0x00000001 == 0x00000001 meta mark set meta mark | 0x00000001
	}
}
";

#[test]
fn node_table_applies_reads_back_and_lists() {
    in_netns(|| {
        let mut nf = Netfilter::open().unwrap();
        let table = node_table();
        assert_eq!(nf.read(Family::Inet, NODE).unwrap(), None);
        let fixed = apply_and_check(&mut nf, &table);
        assert_eq!(lines(&fixed), ["table inet slurm_egress is missing"]);
        assert_eq!(nft(&["list", "table", "inet", NODE]), NODE_LISTING);

        // Every live rule maps back to the model, and to the very rules we asked for.
        let live = read(&mut nf, &table).unwrap();
        for (want, got) in table.chains.iter().zip(&live.chains) {
            let got: Vec<_> = got.rules.iter().map(|r| r.rule.clone().unwrap()).collect();
            assert_eq!(want.rules, got);
        }
        let sets: Vec<_> = live.sets.iter().map(|s| (s.name.as_str(), s.key)).collect();
        assert_eq!(
            sets,
            [
                ("users", Some(KeyType::Uid)),
                ("groups", Some(KeyType::Gid)),
                ("jobs", Some(KeyType::Uid))
            ]
        );
        assert_eq!(live.to_string(), table.to_string());
    });
}

/// `by = "cgroup"`: a set of 64-bit cgroup ids, one rule per cgroup level; the level is part
/// of the rule (libnftnl's own text leaves it out), and nft reads it all as we wrote it.
#[test]
fn cgroup_table_applies_reads_back_and_tells_levels_apart() {
    let config = slurm_egress::config::Config::parse(
        "[routing]\ntable = 201\ntable_name = \"alinat\"\nmark = 0x1\nmask = 0x1\n\
         priority = 1000\ninterface = \"ib0\"\ngateway = \"10.20.3.227\"\nprotocols = [\"tcp\"]\n\
         [select]\nby = \"cgroup\"\ncgroup_parent = \"site/egress\"\n",
        std::path::Path::new("test.toml"),
    )
    .unwrap();
    let running = slurm_egress::ledger::Running {
        cgroups: [42, 1 << 40].into(),
        levels: [5].into(),
        ..Default::default()
    };
    let table = slurm_egress::node::table(&config, &Default::default(), &running);
    in_netns(|| {
        let mut nf = Netfilter::open().unwrap();
        apply_and_check(&mut nf, &table);
        let live = read(&mut nf, &table).unwrap();
        for (want, got) in table.chains.iter().zip(&live.chains) {
            let got: Vec<_> = got.rules.iter().map(|r| r.rule.clone().unwrap()).collect();
            assert_eq!(want.rules, got);
        }
        assert_eq!(live.sets[0].elements, BTreeSet::from([42, 1 << 40]));
        let listing = nft(&["list", "table", "inet", NODE]);
        for want in [
            "type cgroupsv2",
            // The per-job cgroups slurm-egress makes: /site/egress/job_<id>.
            "ct state new socket cgroupv2 level 3 @jobs ct mark set",
            "ct state new socket cgroupv2 level 5 @jobs ct mark set",
        ] {
            assert!(listing.contains(want), "{want}: {listing}");
        }
        // Another level is another rule.
        let mut other = table.clone();
        let rules = &mut other.chains[1].rules;
        rules[1].matches[1] = Match::SocketCgroupIn {
            level: 6,
            set: "jobs".into(),
        };
        let live = read(&mut nf, &table);
        assert!(!diff(&other, live.as_ref()).is_empty());
        apply_and_check(&mut nf, &other);
        assert!(nft(&["list", "table", "inet", NODE]).contains("level 6 @jobs"));
    });
}

#[test]
fn second_apply_is_a_no_op() {
    in_netns(|| {
        let mut nf = Netfilter::open().unwrap();
        let table = node_table();
        apply_and_check(&mut nf, &table);
        let before = table_handle(&table);
        assert_eq!(nf.apply(&table).unwrap(), []);
        assert_eq!(table_handle(&table), before);
    });
}

#[test]
fn router_tables_apply_and_list() {
    in_netns(|| {
        let mut nf = Netfilter::open().unwrap();
        for snat in [None, Some("203.0.113.5".parse().unwrap())] {
            let table = router_table(snat);
            apply_and_check(&mut nf, &table);
            let listing = nft(&["list", "table", "inet", "slurm_egress_router"]);
            let nat = match snat {
                None => "oifname \"eth9\" masquerade",
                Some(_) => "oifname \"eth9\" snat ip to 203.0.113.5",
            };
            let expected = format!(
                "table inet slurm_egress_router {{
	chain forward {{
		type filter hook forward priority filter; policy drop;
		iifname \"ib0\" oifname \"eth9\" accept
		iifname \"eth9\" oifname \"ib0\" ct state established,related accept
	}}

	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		{nat}
	}}
}}
"
            );
            assert_eq!(listing, expected);
            let live = read(&mut nf, &table).unwrap();
            assert!(
                live.chains
                    .iter()
                    .all(|c| c.rules.iter().all(|r| r.rule.is_some()))
            );
        }
    });
}

/// What `nft -f` makes of our `Display` is what we would have made: the text is valid nft
/// syntax and the rules compare equal (also for an anonymous set and counters).
#[test]
fn display_loaded_by_nft_compares_equal() {
    in_netns(|| {
        let mut nf = Netfilter::open().unwrap();
        let mut node = node_table();
        node.chains[0].rules.push(Rule {
            matches: vec![Match::L4Proto(vec![6, 17])],
            statements: vec![Statement::Counter, Statement::Accept],
        });
        let ip = Table {
            family: Family::Ip,
            name: "addrs".into(),
            sets: vec![Set::new(
                "hosts",
                KeyType::Ipv4Addr,
                [u32::from(std::net::Ipv4Addr::new(198, 51, 100, 7)).into()],
            )],
            chains: vec![],
        };
        for table in [
            node,
            router_table(None),
            router_table(Some([203, 0, 113, 5].into())),
            ip,
        ] {
            let file = std::env::temp_dir().join(format!("se-nf-{}.nft", std::process::id()));
            std::fs::write(&file, format!("{table}\n")).unwrap();
            nft(&["-f", file.to_str().unwrap()]);
            std::fs::remove_file(&file).unwrap();
            let live = read(&mut nf, &table);
            assert_eq!(
                lines(&diff(&table, live.as_ref())),
                Vec::<String>::new(),
                "{table}"
            );
            assert_eq!(live.unwrap().to_string(), table.to_string());
            assert!(nf.delete(table.family, &table.name).unwrap());
        }
        // Datatype ids: nft names our key types.
        let ip = Table {
            family: Family::Ip,
            name: "addrs".into(),
            sets: vec![Set::new("hosts", KeyType::Ipv4Addr, [0xc6336407])],
            chains: vec![],
        };
        apply_and_check(&mut nf, &ip);
        let listing = nft(&["list", "table", "ip", "addrs"]);
        assert!(
            listing.contains("type ipv4_addr\n\t\telements = { 198.51.100.7 }"),
            "{listing}"
        );
    });
}

#[test]
fn added_elements_survive_an_element_only_apply() {
    in_netns(|| {
        let mut nf = Netfilter::open().unwrap();
        let mut table = node_table();
        apply_and_check(&mut nf, &table);
        let before = table_handle(&table);
        nf.add_elements(Family::Inet, NODE, "jobs", KeyType::Uid, &[5001, 5002])
            .unwrap();
        // The desired state now includes the job; a new group member comes too.
        table.sets[2].elements.extend([5001, 5002]);
        table.sets[1].elements.insert(2001);
        let fixed = apply_and_check(&mut nf, &table);
        assert_eq!(lines(&fixed), ["set groups: element 2001 missing"]);
        assert_eq!(
            table_handle(&table),
            before,
            "an element-only change must not rebuild"
        );
        let live = read(&mut nf, &table).unwrap();
        assert_eq!(live.sets[2].elements, BTreeSet::from([5001, 5002]));
    });
}

#[test]
fn drift_is_named_and_repaired() {
    in_netns(|| {
        let mut nf = Netfilter::open().unwrap();
        let table = node_table();
        apply_and_check(&mut nf, &table);
        let t = ["inet", NODE];

        let check = |nf: &mut Netfilter, expected: &[&str], rebuilds: bool| {
            let live = read(nf, &table);
            let before = table_handle(&table);
            assert_eq!(lines(&diff(&table, live.as_ref())), expected);
            let fixed = apply_and_check(nf, &table);
            assert_eq!(lines(&fixed), expected);
            assert_eq!(
                table_handle(&table) != before,
                rebuilds,
                "rebuilt: {expected:?}"
            );
        };

        // A rule deleted.
        let live = read(&mut nf, &table).unwrap();
        let handle = live.chains[1].rules[1].handle.to_string();
        nft(&["delete", "rule", t[0], t[1], "select", "handle", &handle]);
        check(
            &mut nf,
            &[
                "chain select: rule 2 missing: want \"ct state new meta skgid @groups ct mark set ct mark & 0xfffffffe | 0x00000001\"",
            ],
            true,
        );

        // A chain flushed.
        nft(&["flush", "chain", t[0], t[1], "output"]);
        check(
            &mut nf,
            &["chain output: rule 1 missing: want \"meta l4proto tcp jump select\""],
            true,
        );

        // A rule we cannot express, added by someone else: shown as libnftnl prints it.
        nft(&[
            "insert", "rule", t[0], t[1], "output", "tcp", "dport", "22", "accept",
        ]);
        let live = read(&mut nf, &table);
        let d = lines(&diff(&table, live.as_ref()));
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("chain output: unexpected rule 1: \"[ meta load l4proto => reg 1 ] [ cmp eq reg 1 0x00000006 ] [ payload load 2b @ transport header + 2 => reg 1 ]"), "{d:?}");
        apply_and_check(&mut nf, &table);

        // A rule changed in place (replaced by a different mark).
        let live = read(&mut nf, &table).unwrap();
        let handle = live.chains[1].rules[3].handle.to_string();
        let replace = ["replace", "rule", t[0], t[1], "select", "handle", &handle];
        let mut args = replace.to_vec();
        args.extend([
            "ct", "mark", "&", "0x1", "==", "0x1", "meta", "mark", "set", "0x2",
        ]);
        nft(&args);
        let live = read(&mut nf, &table);
        let d = lines(&diff(&table, live.as_ref()));
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].starts_with("chain select: rule 4 differs: live \"[ ct load mark"),
            "{d:?}"
        );
        assert!(d[0].ends_with("want \"ct mark & 0x00000001 == 0x00000001 meta mark set meta mark & 0xfffffffe | 0x00000001\""), "{d:?}");
        apply_and_check(&mut nf, &table);

        // A policy changed, an extra set, a dormant table.
        nft(&["add", "chain", t[0], t[1], "output", "{ policy drop; }"]);
        check(
            &mut nf,
            &[
                "chain output: live \"type route hook output priority mangle; policy drop;\" want \"type route hook output priority mangle; policy accept;\"",
            ],
            true,
        );
        nft(&[
            "add",
            "set",
            t[0],
            t[1],
            "extra",
            "{ type ipv4_addr; flags interval; }",
        ]);
        check(&mut nf, &["unexpected set extra"], true);
        nft(&["add", "table", t[0], t[1], "{ flags dormant; }"]);
        check(&mut nf, &["table has flags 0x1 (want none)"], true);

        // The whole table deleted.
        nft(&["delete", "table", t[0], t[1]]);
        check(&mut nf, &["table inet slurm_egress is missing"], true);

        // Elements removed and added behind our back: fixed in place.
        nft(&["delete", "element", t[0], t[1], "users", "{ 1001 }"]);
        nft(&["add", "element", t[0], t[1], "users", "{ 42 }"]);
        check(
            &mut nf,
            &[
                "set users: element 1001 missing",
                "set users: unexpected element 42",
            ],
            false,
        );
    });
}

#[test]
fn delete_is_idempotent() {
    in_netns(|| {
        let mut nf = Netfilter::open().unwrap();
        assert!(!nf.delete(Family::Inet, NODE).unwrap());
        apply_and_check(&mut nf, &node_table());
        assert!(nf.delete(Family::Inet, NODE).unwrap());
        assert!(!nf.delete(Family::Inet, NODE).unwrap());
        assert_eq!(nf.read(Family::Inet, NODE).unwrap(), None);
        assert_eq!(nft(&["list", "ruleset"]), "");
    });
}

#[test]
fn elements_add_and_remove_idempotently() {
    in_netns(|| {
        let mut nf = Netfilter::open().unwrap();
        let table = node_table();
        apply_and_check(&mut nf, &table);
        let jobs = |nf: &mut Netfilter| read(nf, &table).unwrap().sets[2].elements.clone();
        let (f, k) = (Family::Inet, KeyType::Uid);
        nf.add_elements(f, NODE, "jobs", k, &[1, 2, 3]).unwrap();
        nf.add_elements(f, NODE, "jobs", k, &[3]).unwrap();
        nf.add_elements(f, NODE, "jobs", k, &[2, 3, 4]).unwrap();
        assert_eq!(jobs(&mut nf), BTreeSet::from([1, 2, 3, 4]));
        nf.remove_elements(f, NODE, "jobs", k, &[9]).unwrap();
        nf.remove_elements(f, NODE, "jobs", k, &[4, 5, 6]).unwrap();
        nf.remove_elements(f, NODE, "jobs", k, &[4]).unwrap();
        assert_eq!(jobs(&mut nf), BTreeSet::from([1, 2, 3]));
        // Big lists span several messages in the one transaction.
        let many: Vec<u64> = (100_000..102_500).collect();
        nf.add_elements(f, NODE, "jobs", k, &many).unwrap();
        assert_eq!(jobs(&mut nf).len(), 2503);
        nf.remove_elements(f, NODE, "jobs", k, &many).unwrap();
        assert_eq!(jobs(&mut nf), BTreeSet::from([1, 2, 3]));
        assert!(nft(&["list", "set", "inet", NODE, "jobs"]).contains("elements = { 1, 2, 3 }"));
    });
}

#[test]
fn fifty_threads_adding_and_removing_leave_the_right_set() {
    in_netns(|| {
        let mut nf = Netfilter::open().unwrap();
        let table = node_table();
        apply_and_check(&mut nf, &table);
        let ns = netns_fd();
        std::thread::scope(|s| {
            for i in 0..50u64 {
                let ns = &ns;
                s.spawn(move || {
                    join_netns(ns);
                    let (f, k) = (Family::Inet, KeyType::Uid);
                    let uid = 10_000 + i;
                    // One handle per thread: closing a socket after a removal waits for an
                    // RCU grace period under the nf_tables mutex (see `remove_elements`).
                    let mut nf = Netfilter::open().unwrap();
                    for _ in 0..20 {
                        nf.add_elements(f, NODE, "jobs", k, &[uid, 20_000]).unwrap();
                        nf.remove_elements(f, NODE, "jobs", k, &[uid, 30_000])
                            .unwrap();
                    }
                    if i % 2 == 0 {
                        nf.add_elements(f, NODE, "jobs", k, &[uid]).unwrap();
                    }
                });
            }
        });
        let mut want: BTreeSet<u64> = (0..50).step_by(2).map(|i| 10_000 + i).collect();
        want.insert(20_000);
        assert_eq!(read(&mut nf, &table).unwrap().sets[2].elements, want);
    });
}

#[test]
fn kernel_refusals_name_the_message_that_failed() {
    in_netns(|| {
        let mut nf = Netfilter::open().unwrap();
        // A route chain only exists on the output hook: the kernel refuses the chain.
        let mut table = node_table();
        table.chains[0].base.as_mut().unwrap().hook = Hook::Forward;
        let err = nf.apply(&table).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EOPNOTSUPP), "{err:?}");
        assert_eq!(
            err.to_string(),
            "chain inet slurm_egress output: the kernel refused to add the chain"
        );
        // Nothing was committed.
        assert_eq!(nf.read(Family::Inet, NODE).unwrap(), None);

        let err = nf
            .add_elements(Family::Inet, NODE, "jobs", KeyType::Uid, &[1])
            .unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOENT));
        assert_eq!(
            err.to_string(),
            "set inet slurm_egress jobs: the kernel refused to add elements"
        );

        // Checked before anything is sent.
        let mut table = node_table();
        table.chains[1].rules[0].matches[1] = Match::SkUidIn("groups".into());
        let err = nf.apply(&table).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rule 1 of chain inet slurm_egress select is invalid"
        );
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert_eq!(source, "set groups has type gid, this needs uid");
    });
}

/// Drops CAP_NET_ADMIN from the calling thread (capabilities are per thread).
fn drop_net_admin() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    unsafe {
        assert_eq!(
            libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()),
            0
        );
        data[0].effective &= !(1 << 12); // CAP_NET_ADMIN
        assert_eq!(libc::syscall(libc::SYS_capset, &header, data.as_ptr()), 0);
    }
}

#[test]
fn without_cap_net_admin_the_error_says_root_is_needed() {
    in_netns(|| {
        drop_net_admin();
        let mut nf = Netfilter::open().unwrap();
        let err = nf.apply(&node_table()).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EPERM));
        assert!(err.to_string().contains("needs root"), "{err}");
        let err = nf
            .add_elements(Family::Inet, NODE, "jobs", KeyType::Uid, &[1])
            .unwrap_err();
        assert_eq!(err.errno(), Some(libc::EPERM));
        assert!(err.to_string().contains("CAP_NET_ADMIN"), "{err}");
    });
}

/// Reads and applies stay correct while jobs start and end: a read that overlaps a change is
/// redone, and an apply only ever fixes what differs.
#[test]
fn reads_and_applies_during_element_churn() {
    in_netns(|| {
        let mut nf = Netfilter::open().unwrap();
        let table = node_table();
        apply_and_check(&mut nf, &table);
        let ns = netns_fd();
        let stop = std::sync::atomic::AtomicBool::new(false);
        /// Stops the churn also when an assertion below fails (else the scope never ends).
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        std::thread::scope(|s| {
            let _stop = Stop(&stop);
            for t in 0..4u64 {
                let (ns, stop) = (&ns, &stop);
                s.spawn(move || {
                    join_netns(ns);
                    let mut nf = Netfilter::open().unwrap();
                    let (f, k) = (Family::Inet, KeyType::Uid);
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let uid = 40_000 + t * 1000 + i % 100;
                        nf.add_elements(f, NODE, "jobs", k, &[uid]).unwrap();
                        std::thread::sleep(std::time::Duration::from_micros(200));
                        nf.remove_elements(f, NODE, "jobs", k, &[uid]).unwrap();
                        i += 1;
                    }
                });
            }
            for _ in 0..500 {
                let live = read(&mut nf, &table);
                let d = diff(&table, live.as_ref());
                assert!(!d.iter().any(Difference::is_structural), "{d:?}");
                let fixed = nf.apply(&table).unwrap();
                assert!(!fixed.iter().any(Difference::is_structural), "{fixed:?}");
            }
        });
        apply_and_check(&mut nf, &table);
    });
}

/// Brings `lo` up in the calling thread's namespace.
fn loopback_up() {
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req), 0);
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &req), 0);
        libc::close(fd);
    }
}

/// Packets counted by the observer rule (`ct mark & 0x1 == 0x1 counter`).
fn marked_packets() -> u64 {
    let listing = nft(&["list", "chain", "inet", "observe", "post"]);
    let (_, rest) = listing.split_once("counter packets ").expect(&listing);
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// Real packets: a TCP connection from a socket owned by a uid in `users` gets the ct mark,
/// one from root does not.
#[test]
fn sockets_of_listed_users_are_marked() {
    in_netns(|| {
        loopback_up();
        let mut nf = Netfilter::open().unwrap();
        apply_and_check(&mut nf, &node_table());
        let observe = Table {
            family: Family::Inet,
            name: "observe".into(),
            sets: vec![],
            chains: vec![Chain {
                name: "post".into(),
                base: Some(BaseChain {
                    kind: ChainKind::Filter,
                    hook: Hook::Postrouting,
                    priority: BaseChain::PRIORITY_FILTER,
                    policy: Policy::Accept,
                }),
                rules: vec![Rule {
                    matches: vec![Match::CtMark {
                        mask: MARK,
                        value: MARK,
                    }],
                    statements: vec![Statement::Counter],
                }],
            }],
        };
        apply_and_check(&mut nf, &observe);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let connect_as = |uid: u32| {
            let ns = netns_fd();
            std::thread::scope(|s| {
                s.spawn(|| {
                    join_netns(&ns);
                    // The socket's owner is the thread's fsuid when it is created.
                    unsafe { libc::setfsuid(uid) };
                    let stream = std::net::TcpStream::connect(addr).unwrap();
                    unsafe { libc::setfsuid(0) };
                    drop(stream);
                });
            });
            drop(listener.accept().unwrap());
        };
        connect_as(0);
        assert_eq!(marked_packets(), 0);
        connect_as(1001);
        assert!(marked_packets() >= 2, "the handshake of uid 1001 is marked");
        let before = marked_packets();
        connect_as(4242);
        assert_eq!(marked_packets(), before, "uid 4242 is in no set");
        nf.add_elements(Family::Inet, NODE, "jobs", KeyType::Uid, &[4242])
            .unwrap();
        connect_as(4242);
        assert!(marked_packets() > before, "uid 4242 is now a job's");
    });
}
