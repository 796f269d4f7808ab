//! The worker-side lab: a fabric that joins worker nodes (`ib0`), the normal gateway and a NAT
//! router; an "internet" host behind the NAT router that tells each client which source
//! address it saw; an internal service behind the normal gateway (the exceptions' target).
//!
//! ```text
//!   w1 ib0 10.20.1.1 ─┐                       ┌─ nat fab0 10.20.3.227 ── out0 203.0.113.1 ── inet 203.0.113.10
//!   w2 ib0 10.20.1.2 ─┼─ fab: bridge br0 ─────┤   (forwards, masquerades)
//!                     │                       └─ gw  fab0 10.20.0.1 ──── svc0 198.51.100.1 ── svc 198.51.100.10
//!                                                  (drops and counts all but the service)
//! ```
//! Workers have `default via 10.20.0.1`, the closed default path.

use std::path::PathBuf;
use std::process::Output;

use super::{BIN, Net, PYTHON, Scratch, ok, probe_py, wait_until};

pub const GATEWAY: &str = "10.20.0.1";
pub const VIP: &str = "10.20.3.227";
pub const NAT_OUTSIDE: &str = "203.0.113.1";
pub const INTERNET: &str = "203.0.113.10";
pub const SERVICE: &str = "198.51.100.10";
pub const TCP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 8081;

pub struct Lab {
    pub net: Net,
    pub scratch: Scratch,
    pub fab: String,
    pub gw: String,
    pub nat: String,
    pub inet: String,
    pub svc: String,
    pub workers: Vec<String>,
}

impl Lab {
    pub fn new(tag: &str, workers: usize) -> Lab {
        super::ensure_users();
        let mut net = Net::new(tag);
        let scratch = Scratch::new(tag);
        let fab = net.host("fab");
        net.bridge(&fab, "br0");

        let gw = net.host("gw");
        net.plug(&gw, "fab0", &fab, "br0", "p-gw");
        net.addr(&gw, "fab0", "10.20.0.1/16");
        let svc = net.host("svc");
        net.link(&gw, "svc0", &svc, "eth0");
        net.addr(&gw, "svc0", "198.51.100.1/24");
        net.addr(&svc, "eth0", "198.51.100.10/24");
        ok(&[
            "ip",
            "-n",
            &svc,
            "route",
            "add",
            "10.20.0.0/16",
            "via",
            "198.51.100.1",
        ]);
        net.sysctl(&gw, "net.ipv4.ip_forward", "1");
        // The closed default path: everything but the internal service is silently dropped.
        ok(&["ip", "-n", &gw, "route", "add", "blackhole", "default"]);
        net.ok(
            &gw,
            &[
                "nft",
                "add table inet se_gw; \
                 add chain inet se_gw forward { type filter hook forward priority 0; policy drop; }; \
                 add rule inet se_gw forward ip daddr 198.51.100.0/24 accept; \
                 add rule inet se_gw forward ip saddr 198.51.100.0/24 accept",
            ],
        );

        let nat = net.host("nat");
        net.plug(&nat, "fab0", &fab, "br0", "p-nat");
        net.addr(&nat, "fab0", &format!("{VIP}/16"));
        let inet = net.host("inet");
        net.link(&nat, "out0", &inet, "eth0");
        net.addr(&nat, "out0", "203.0.113.1/24");
        net.addr(&inet, "eth0", "203.0.113.10/24");
        net.sysctl(&nat, "net.ipv4.ip_forward", "1");
        net.ok(
            &nat,
            &[
                "nft",
                "add table ip se_nat; \
                 add chain ip se_nat post { type nat hook postrouting priority 100; }; \
                 add rule ip se_nat post oifname out0 masquerade",
            ],
        );

        let probe = probe_py();
        let probe = probe.to_str().unwrap();
        net.spawn(&inet, &[PYTHON, probe, "serve", INTERNET, "8080", "8081"]);
        net.spawn(&svc, &[PYTHON, probe, "serve", SERVICE, "8080", "8081"]);

        let mut names = Vec::new();
        for i in 1..=workers {
            let w = net.host(&format!("w{i}"));
            net.plug(&w, "ib0", &fab, "br0", &format!("p-w{i}"));
            net.addr(&w, "ib0", &format!("10.20.1.{i}/16"));
            ok(&["ip", "-n", &w, "route", "add", "default", "via", GATEWAY]);
            // `ip netns exec` mounts /etc/netns/<ns>/iproute2 over /etc/iproute2: the table
            // name a worker registers stays in its namespace's copy.
            let etc = PathBuf::from("/etc/netns").join(&w);
            std::fs::create_dir_all(&etc).unwrap();
            ok(&["cp", "-a", "/etc/iproute2", etc.to_str().unwrap()]);
            // A clean start, whatever the machine's own copy holds.
            let _ = std::fs::remove_file(etc.join("iproute2/rt_tables.d/slurm-egress.conf"));
            names.push(w);
        }
        for host in [&gw, &nat] {
            net.count(
                host,
                "ip saddr 10.20.1.0/24 ip daddr 203.0.113.10",
                "internet",
            );
            net.count(
                host,
                "ip saddr 10.20.1.0/24 ip daddr 198.51.100.10",
                "service",
            );
        }
        let lab = Lab {
            net,
            scratch,
            fab,
            gw,
            nat,
            inet,
            svc,
            workers: names,
        };
        // The servers are up when a root client on the NAT router reaches them.
        for (from, to) in [(&lab.nat, INTERNET), (&lab.gw, SERVICE)] {
            wait_until(
                "the probe servers",
                std::time::Duration::from_secs(10),
                || {
                    lab.net
                        .ok(
                            from,
                            &[PYTHON, probe, "tcp", to, "8080", "--timeout", "0.5"],
                        )
                        .starts_with("peer=")
                },
            );
        }
        lab.net.reset_counters(&lab.gw);
        lab.net.reset_counters(&lab.nat);
        lab
    }

    /// Adds the Slurm controller's host, `ctl` (10.20.0.10), to the fabric.
    pub fn add_controller(&mut self) -> String {
        let ctl = self.net.host("ctl");
        self.net.plug(&ctl, "eth0", &self.fab, "br0", "p-ctl");
        self.net.addr(&ctl, "eth0", "10.20.0.10/16");
        ctl
    }

    /// The seed site's config with this lab's addresses; `select` replaces the `[select]`
    /// body and `protocols` the protocol list.
    pub fn config(&self, protocols: &str, select: &str) -> PathBuf {
        let state = self.scratch.path("state");
        let text = format!(
            r#"[routing]
table = 201
table_name = "alinat"
mark = 0x1
mask = 0x1
priority = 1000
interface = "ib0"
gateway = "{VIP}"
protocols = {protocols}
exceptions = [
  {{ to = "10.20.0.0/16" }},
  {{ to = "198.51.100.0/24", via = "{GATEWAY}" }},
]

[select]
{select}

[jobs]
state_dir = "{}"
"#,
            state.display()
        );
        let path = self.scratch.path("config.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The seed site's selection.
    pub fn seed_config(&self) -> PathBuf {
        self.config(
            r#"["tcp"]"#,
            r#"users = ["aliprod", "alise", "rgrosso"]
groups = ["alice"]
accounts = ["alice"]"#,
        )
    }

    /// Runs `slurm-egress --config <config> <args>` in worker `w`.
    pub fn egress(&self, w: &str, config: &std::path::Path, args: &[&str]) -> Output {
        let mut all = vec![BIN, "--config", config.to_str().unwrap()];
        all.extend_from_slice(args);
        self.net.exec(w, &all)
    }

    /// Like [`Lab::egress`], but must exit 0; returns stdout.
    pub fn egress_ok(&self, w: &str, config: &std::path::Path, args: &[&str]) -> String {
        super::succeeded(
            self.egress(w, config, args),
            &format!("slurm-egress {args:?}"),
        )
    }

    /// A TCP exchange from worker `w` as `user` to `host`; the probe's one-line answer.
    pub fn tcp(&self, w: &str, user: &str, host: &str, mode: &str) -> String {
        let probe = probe_py();
        super::as_user(
            w,
            user,
            &[
                PYTHON,
                probe.to_str().unwrap(),
                "tcp",
                host,
                "8080",
                "--mode",
                mode,
                "--timeout",
                "1.5",
            ],
        )
    }

    pub fn udp(&self, w: &str, user: &str, host: &str) -> String {
        let probe = probe_py();
        super::as_user(
            w,
            user,
            &[
                PYTHON,
                probe.to_str().unwrap(),
                "udp",
                host,
                "8081",
                "--timeout",
                "1.5",
            ],
        )
    }

    /// Packets from the workers to the internet host seen by the normal gateway and by the
    /// NAT router, since the last reset.
    pub fn internet_counts(&self) -> (u64, u64) {
        (
            self.net.counted(&self.gw, "internet"),
            self.net.counted(&self.nat, "internet"),
        )
    }

    pub fn reset_counts(&self) {
        self.net.reset_counters(&self.gw);
        self.net.reset_counters(&self.nat);
    }
}
