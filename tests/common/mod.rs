//! Test harness: network namespaces that a test creates and always removes, commands run
//! inside them, processes stopped by PID, packet counters read with `nft`, and the test users.
//!
//! Everything that changes network state happens in namespaces named `se-<tag>-<host>`;
//! interfaces are created directly inside them (`ip -n`), so the machine's own namespace never
//! sees a link of ours.

#![allow(dead_code)] // each test binary uses part of the harness

pub mod cluster;
pub mod ha;
pub mod lab;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_slurm-egress");
pub const PYTHON: &str = "/usr/bin/python3";

pub fn probe_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/probe.py")
}

/// Fails loudly rather than skipping: a suite that silently skips proves nothing.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests build network namespaces and must run as root"
    );
}

/// Runs a command, returning its output; panics with everything it said if it cannot start.
pub fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

/// Runs a command that must succeed and returns its stdout.
pub fn ok(args: &[&str]) -> String {
    succeeded(run(args), &format!("{args:?}"))
}

/// The stdout of a command that must have succeeded; otherwise fails the test with
/// everything it said.
pub fn succeeded(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A set of network namespaces owned by one test, removed on drop (also when the test panics),
/// together with the processes started in them.
pub struct Net {
    prefix: String,
    names: Vec<String>,
    children: Vec<Child>,
    /// Counting rules per namespace, `(matches, comment)`, to re-create on reset.
    counters: std::cell::RefCell<Vec<(String, String, String)>>,
}

impl Net {
    pub fn new(tag: &str) -> Net {
        require_root();
        // `SE_TEST_NS` keeps the namespaces of two checkouts tested at once apart.
        let prefix = format!(
            "se-{}{tag}-",
            std::env::var("SE_TEST_NS").unwrap_or_default()
        );
        // Leftovers of an earlier, killed run of this very test.
        if let Ok(entries) = std::fs::read_dir("/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) {
                    let _ = run(&["ip", "netns", "del", &name]);
                    let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&name));
                }
            }
        }
        Net {
            prefix,
            names: Vec::new(),
            children: Vec::new(),
            counters: Default::default(),
        }
    }

    /// The full name of host `host`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    /// Creates a namespace with loopback up and the sysctls a test host wants: new namespaces
    /// copy the root namespace's IPv4 settings, so nothing is left to chance.
    pub fn host(&mut self, host: &str) -> String {
        let ns = self.ns(host);
        ok(&["ip", "netns", "add", &ns]);
        self.names.push(ns.clone());
        ok(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        self.sysctl(&ns, "net.ipv4.conf.all.rp_filter", "0");
        self.sysctl(&ns, "net.ipv4.conf.default.rp_filter", "0");
        self.sysctl(&ns, "net.ipv4.ip_forward", "0");
        ns
    }

    pub fn sysctl(&self, ns: &str, key: &str, value: &str) {
        ok(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ]);
    }

    /// A bridge in `ns` with STP and multicast snooping off and bridge netfilter calls off:
    /// frames are switched, not filtered.
    pub fn bridge(&self, ns: &str, name: &str) {
        ok(&[
            "ip",
            "-n",
            ns,
            "link",
            "add",
            name,
            "type",
            "bridge",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
            "forward_delay",
            "0",
        ]);
        ok(&["ip", "-n", ns, "link", "set", name, "up"]);
        for key in [
            "bridge-nf-call-iptables",
            "bridge-nf-call-arptables",
            "bridge-nf-call-ip6tables",
        ] {
            let path = format!("/proc/sys/net/bridge/{key}");
            let _ = run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                &format!("test -e {path} && echo 0 > {path}"),
            ]);
        }
    }

    /// A veth pair with `if_a` in `ns_a` and `if_b` in `ns_b`, both up.
    pub fn link(&self, ns_a: &str, if_a: &str, ns_b: &str, if_b: &str) {
        ok(&[
            "ip", "-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns",
            ns_b,
        ]);
        ok(&["ip", "-n", ns_a, "link", "set", if_a, "up"]);
        ok(&["ip", "-n", ns_b, "link", "set", if_b, "up"]);
    }

    /// Plugs host interface `ifname` (in `ns`) into bridge `br` of `bridge_ns`.
    pub fn plug(&self, ns: &str, ifname: &str, bridge_ns: &str, br: &str, port: &str) {
        self.link(ns, ifname, bridge_ns, port);
        ok(&["ip", "-n", bridge_ns, "link", "set", port, "master", br]);
    }

    pub fn addr(&self, ns: &str, ifname: &str, cidr: &str) {
        ok(&["ip", "-n", ns, "addr", "add", cidr, "dev", ifname]);
    }

    /// `ip netns exec <ns> <args...>`.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        let mut all = vec!["ip", "netns", "exec", ns];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Like [`Net::exec`], but must succeed; returns stdout.
    pub fn ok(&self, ns: &str, args: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", ns];
        all.extend_from_slice(args);
        ok(&all)
    }

    /// Starts a long-running process in `ns`; it is stopped by its PID when the test ends.
    pub fn spawn(&mut self, ns: &str, args: &[&str]) -> u32 {
        self.spawn_logged(ns, args, None)
    }

    /// Like [`Net::spawn`], with stdout and stderr appended to `log`.
    pub fn spawn_logged(&mut self, ns: &str, args: &[&str], log: Option<&Path>) -> u32 {
        let output = || match log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            None => Stdio::null(),
        };
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(output())
            .stderr(output())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?} in {ns}: {e}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Adds a counting rule (`nft` syntax after the rule's table/chain) to the counting
    /// chain of `ns`, named by `comment`.
    pub fn count(&self, ns: &str, matches: &str, comment: &str) {
        let _ = self.exec(ns, &["nft", "add", "table", "inet", "se_count"]);
        let _ = self.exec(
            ns,
            &[
                "nft",
                "add",
                "chain",
                "inet",
                "se_count",
                "pre",
                "{ type filter hook prerouting priority -300; policy accept; }",
            ],
        );
        let rule = format!("add rule inet se_count pre {matches} counter comment \"{comment}\"");
        self.ok(ns, &["nft", &rule]);
        self.counters
            .borrow_mut()
            .push((ns.to_owned(), matches.to_owned(), comment.to_owned()));
    }

    /// Packets counted so far by the rule named `comment`.
    pub fn counted(&self, ns: &str, comment: &str) -> u64 {
        let listing = self.ok(ns, &["nft", "list", "chain", "inet", "se_count", "pre"]);
        let line = listing
            .lines()
            .find(|l| l.contains(&format!("comment \"{comment}\"")))
            .unwrap_or_else(|| panic!("no counter {comment} in {ns}:\n{listing}"));
        let after = line.split("packets ").nth(1).expect("counter packets");
        after.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Zeroes the counting rules of `ns` (nft 1.0.6 cannot reset anonymous rule counters, so
    /// the chain is flushed and its rules added again, in one transaction).
    pub fn reset_counters(&self, ns: &str) {
        let mut script = String::from("flush chain inet se_count pre\n");
        for (_, matches, comment) in self.counters.borrow().iter().filter(|c| c.0 == ns) {
            script.push_str(&format!(
                "add rule inet se_count pre {matches} counter comment \"{comment}\"\n"
            ));
        }
        self.ok(ns, &["nft", &script]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for child in &mut self.children {
            // By PID only: ip netns exec execs its command, so this is the process itself.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.names.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
        }
    }
}

/// Runs `args` in `ns` as `user` (with that user's groups), like a job would; its stdout.
pub fn as_user(ns: &str, user: &str, args: &[&str]) -> String {
    let gid = primary_gid(user);
    let mut all = vec![
        "ip",
        "netns",
        "exec",
        ns,
        "setpriv",
        "--init-groups",
        "--reuid",
        user,
        "--regid",
        &gid,
    ];
    all.extend_from_slice(args);
    let out = run(&all);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn primary_gid(user: &str) -> String {
    let out = ok(&["id", "-g", user]);
    out.trim().to_owned()
}

pub fn uid(user: &str) -> u32 {
    ok(&["id", "-u", user]).trim().parse().unwrap()
}

/// The users and groups the tests select and leave out. The seed site's names (aliprod,
/// alise, rgrosso, alice) exist so that its config is accepted as written.
pub fn ensure_users() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let exists = |db: &str, name: &str| run(&["getent", db, name]).status.success();
        for group in ["alice", "se-other"] {
            if !exists("group", group) {
                ok(&["groupadd", group]);
            }
        }
        for (user, primary, extra) in [
            ("aliprod", "se-other", None),
            ("alise", "se-other", None),
            ("rgrosso", "se-other", None),
            ("se-prim", "alice", None),
            ("se-supp", "se-other", Some("alice")),
            ("se-other", "se-other", None),
        ] {
            if !exists("passwd", user) {
                let mut args = vec![
                    "useradd",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--gid",
                    primary,
                ];
                if let Some(extra) = extra {
                    args.extend(["--groups", extra]);
                }
                args.push(user);
                ok(&args);
            }
        }
    });
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("slurm-egress-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits (bounded) until `f` holds.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The elements of a uid/gid set of the node table in `ns`, as `nft` lists them.
pub fn set_elements<T: std::str::FromStr + Ord>(
    net: &Net,
    ns: &str,
    set: &str,
) -> std::collections::BTreeSet<T> {
    let text = net.ok(ns, &["nft", "list", "set", "inet", "slurm_egress", set]);
    let Some(start) = text.find("elements = {") else {
        return Default::default();
    };
    let rest = &text[start + "elements = {".len()..];
    rest[..rest.find('}').unwrap()]
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("element {s:?} in {text}"))
        })
        .collect()
}
