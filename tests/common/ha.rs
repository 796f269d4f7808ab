//! The router lab: a worker and two or three NAT routers on a fabric bridge, the routers'
//! outside interfaces on a second bridge with an "internet" host that tells each client which
//! source address it saw. keepalived and conntrackd run in the routers' namespaces with the
//! configs `slurm-egress router keepalived-config | conntrackd-config` print, each with its own
//! files in the router's state directory, started by the test and stopped by PID.
//!
//! ```text
//!  w1 ib0 10.20.1.1 ─┐                                  ┌─ r1 eth9 203.0.113.1 ─┐
//!                    ├─ fab: br0 ─┬─ r1 ib0 10.20.3.1 ──┤                       │
//!                    │            ├─ r2 ib0 10.20.3.2 ──┼─ r2 eth9 203.0.113.2 ─┼─ out: br0 ─ inet 203.0.113.10
//!                    │            └─ r3 ib0 10.20.3.3 ──┴─ r3 eth9 203.0.113.3 ─┘
//!  gw fab0 10.20.0.1 ─┘ (the worker's default route; forwards nothing)
//!  virtual IP 10.20.3.227 on the master's ib0 (the worker's routing.gateway)
//!  public_ip 203.0.113.227 on the master's eth9 (the SNAT address)
//! ```
//! Priorities: r1 150, r2 100, r3 50. The worker applies the real node policy: `aliprod` is
//! selected, `se-other` is not; its default route leads to a gateway that forwards nothing.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{BIN, Net, PYTHON, Scratch, ok, primary_gid, wait_until};

pub const VIP: &str = "10.20.3.227";
/// The normal (closed) gateway of the worker.
pub const GATEWAY: &str = "10.20.0.1";
pub const PUBLIC: &str = "203.0.113.227";
pub const INTERNET: &str = "203.0.113.10";
pub const PORT: &str = "8080";
pub const SELECTED: &str = "aliprod";
pub const UNSELECTED: &str = "se-other";

pub fn ha_probe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/ha_probe.py")
}

/// CLOCK_MONOTONIC in seconds: the probe's clock (Python's `time.monotonic()`).
pub fn now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// How the lab is built.
#[derive(Debug, Clone)]
pub struct Options {
    pub routers: usize,
    /// `router.advert_interval`, as written in the TOML.
    pub advert: &'static str,
    pub public_ip: bool,
    pub sync: bool,
    /// Start keepalived (and conntrackd, with `sync`) on every router.
    pub daemons: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            routers: 2,
            advert: "0.1",
            public_ip: true,
            sync: true,
            daemons: true,
        }
    }
}

pub struct Router {
    pub name: String,
    pub ns: String,
    /// Its `router.state_dir`: configs, conntrackd's socket and lock, pid files, logs.
    pub dir: PathBuf,
    pub config: PathBuf,
    pub inside: String,
    pub outside: String,
    pub priority: u8,
    keepalived: Option<Child>,
    conntrackd: Option<Child>,
    /// Length of keepalived.log when the running keepalived started.
    log_mark: u64,
}

/// When a crash happened (CLOCK_MONOTONIC seconds).
#[derive(Debug, Clone, Copy)]
pub struct Crash {
    /// keepalived stopped: no advert after this.
    pub frozen: f64,
    /// Both links were down: no packet through this router after this (a few ms later).
    pub down: f64,
}

pub struct Ha {
    pub net: Net,
    pub scratch: Scratch,
    pub opts: Options,
    pub fab: String,
    pub out: String,
    pub inet: String,
    pub gw: String,
    pub worker: String,
    pub worker_config: PathBuf,
    pub routers: Vec<Router>,
}

fn signal(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

/// Waits (bounded) for a child we started; SIGKILLs it at the deadline.
fn reap(child: &mut Child, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn log_file(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

impl Ha {
    pub fn new(tag: &str, opts: Options) -> Ha {
        super::ensure_users();
        assert!((1..=3).contains(&opts.routers));
        let mut net = Net::new(tag);
        let scratch = Scratch::new(tag);
        let fab = net.host("fab");
        net.bridge(&fab, "br0");
        let out = net.host("out");
        net.bridge(&out, "br0");

        let inet = net.host("inet");
        net.plug(&inet, "eth0", &out, "br0", "p-inet");
        net.addr(&inet, "eth0", &format!("{INTERNET}/24"));
        let probe = ha_probe();
        net.spawn(
            &inet,
            &[PYTHON, probe.to_str().unwrap(), "serve", INTERNET, PORT],
        );

        // The closed default path: a gateway that forwards nothing (and counts what it gets).
        let gw = net.host("gw");
        net.plug(&gw, "fab0", &fab, "br0", "p-gw");
        net.addr(&gw, "fab0", &format!("{GATEWAY}/16"));
        net.count(
            &gw,
            "ip saddr 10.20.1.0/24 ip daddr 203.0.113.10",
            "forwarded",
        );

        let worker = net.host("w1");
        net.plug(&worker, "ib0", &fab, "br0", "p-w1");
        net.addr(&worker, "ib0", "10.20.1.1/16");
        ok(&[
            "ip", "-n", &worker, "route", "add", "default", "via", GATEWAY,
        ]);
        // The table name the worker registers goes to its namespace's copy of /etc/iproute2.
        let etc = PathBuf::from("/etc/netns").join(&worker);
        std::fs::create_dir_all(&etc).unwrap();
        ok(&["cp", "-a", "/etc/iproute2", etc.to_str().unwrap()]);

        let worker_config = scratch.path("worker.toml");
        std::fs::write(&worker_config, worker_toml(&scratch)).unwrap();

        let mut routers = Vec::new();
        for i in 1..=opts.routers {
            let name = format!("r{i}");
            let ns = net.host(&name);
            net.plug(&ns, "ib0", &fab, "br0", &format!("p-{name}"));
            net.plug(&ns, "eth9", &out, "br0", &format!("q-{name}"));
            let inside = format!("10.20.3.{i}");
            let outside = format!("203.0.113.{i}");
            net.addr(&ns, "ib0", &format!("{inside}/16"));
            net.addr(&ns, "eth9", &format!("{outside}/24"));
            let dir = scratch.path(&name);
            std::fs::create_dir_all(&dir).unwrap();
            let priority = [150, 100, 50][i - 1];
            let peers: Vec<String> = (1..=opts.routers)
                .filter(|p| *p != i)
                .map(|p| format!("\"10.20.3.{p}\""))
                .collect();
            let config = scratch.path(&format!("{name}.toml"));
            let mut text = worker_toml(&scratch);
            text += &format!(
                "\n[router]\ninside = \"ib0\"\noutside = \"eth9\"\nvirtual_ip = \"{VIP}\"\n{}\
                 priority = {priority}\npeers = [{}]\nadvert_interval = {}\n\
                 virtual_router_id = 51\nsync = {}\nstate_dir = \"{}\"\n",
                if opts.public_ip {
                    format!("public_ip = \"{PUBLIC}\"\n")
                } else {
                    String::new()
                },
                peers.join(", "),
                opts.advert,
                opts.sync,
                dir.display()
            );
            std::fs::write(&config, text).unwrap();
            net.count(
                &ns,
                "ip saddr 10.20.1.0/24 ip daddr 203.0.113.10",
                "forwarded",
            );
            routers.push(Router {
                name,
                ns,
                dir,
                config,
                inside,
                outside,
                priority,
                keepalived: None,
                conntrackd: None,
                log_mark: 0,
            });
        }
        let mut ha = Ha {
            net,
            scratch,
            opts,
            fab,
            out,
            inet,
            gw,
            worker,
            worker_config,
            routers,
        };
        ha.worker_ok(&["apply"]);
        for i in 1..=ha.routers.len() {
            ha.router_ok(i, &["router", "apply"]);
        }
        // The probe server answers.
        let r1 = ha.routers[0].ns.clone();
        wait_until("the probe server", Duration::from_secs(10), || {
            let out = ha.net.exec(
                &r1,
                &[
                    PYTHON,
                    ha_probe().to_str().unwrap(),
                    "loop",
                    INTERNET,
                    PORT,
                    "--duration",
                    "0.001",
                ],
            );
            String::from_utf8_lossy(&out.stdout).contains(" ok ")
        });
        if ha.opts.daemons {
            // r1 first, so that it is the master; then the others, which must find it.
            ha.start(1);
            ha.wait_master(1, Duration::from_secs(10));
            for i in 2..=ha.routers.len() {
                ha.start(i);
            }
            for i in 2..=ha.routers.len() {
                ha.wait_state(i, "BACKUP", Duration::from_secs(10));
            }
        }
        ha.reset_counts();
        ha
    }

    pub fn router(&self, i: usize) -> &Router {
        &self.routers[i - 1]
    }

    /// `slurm-egress --config <router i's config> <args>` in router i.
    pub fn router_cmd(&self, i: usize, args: &[&str]) -> Output {
        let r = self.router(i);
        let mut all = vec![BIN, "--config", r.config.to_str().unwrap()];
        all.extend_from_slice(args);
        self.net.exec(&r.ns, &all)
    }

    pub fn router_ok(&self, i: usize, args: &[&str]) -> String {
        super::succeeded(
            self.router_cmd(i, args),
            &format!("r{i}: slurm-egress {args:?}"),
        )
    }

    pub fn worker_ok(&self, args: &[&str]) -> String {
        let mut all = vec![BIN, "--config", self.worker_config.to_str().unwrap()];
        all.extend_from_slice(args);
        super::succeeded(
            self.net.exec(&self.worker, &all),
            &format!("worker: slurm-egress {args:?}"),
        )
    }

    /// Starts conntrackd (with sync) and keepalived on router i, as the shipped units do:
    /// configs written by slurm-egress, conntrackd's stale lock removed, the addresses a
    /// killed keepalived left released.
    pub fn start(&mut self, i: usize) {
        if self.opts.sync {
            let conf = self.router(i).dir.join("conntrackd.conf");
            self.router_ok(
                i,
                &[
                    "router",
                    "conntrackd-config",
                    "--output",
                    conf.to_str().unwrap(),
                ],
            );
            let r = &mut self.routers[i - 1];
            let _ = std::fs::remove_file(r.dir.join("conntrackd.lock"));
            let log = log_file(&r.dir.join("conntrackd.log"));
            let child = Command::new("ip")
                .args(["netns", "exec", &r.ns, "conntrackd", "-C"])
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start conntrackd");
            r.conntrackd = Some(child);
            let (ns, conf) = (r.ns.clone(), conf.clone());
            wait_until(
                &format!("conntrackd on r{i}"),
                Duration::from_secs(5),
                || {
                    self.net
                        .exec(&ns, &["conntrackd", "-C", conf.to_str().unwrap(), "-s"])
                        .status
                        .success()
                },
            );
        }
        let conf = self.router(i).dir.join("keepalived.conf");
        self.router_ok(
            i,
            &[
                "router",
                "keepalived-config",
                "--output",
                conf.to_str().unwrap(),
            ],
        );
        self.router_ok(i, &["router", "release"]);
        let r = &mut self.routers[i - 1];
        let log_path = r.dir.join("keepalived.log");
        r.log_mark = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let log = log_file(&log_path);
        let _ = std::fs::remove_file(r.dir.join("vrrp.pid"));
        let child = Command::new("ip")
            .args(["netns", "exec", &r.ns, "keepalived"])
            .args(["--dont-fork", "--log-console", "--log-detail", "--vrrp"])
            .args(["--no-syslog", "--use-file"])
            .arg(&conf)
            .arg("--pid")
            .arg(r.dir.join("keepalived.pid"))
            .arg("--vrrp_pid")
            .arg(r.dir.join("vrrp.pid"))
            .arg("--checkers_pid")
            .arg(r.dir.join("checkers.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start keepalived");
        r.keepalived = Some(child);
        let vrrp = r.dir.join("vrrp.pid");
        wait_until(
            &format!("keepalived's VRRP process on r{i}"),
            Duration::from_secs(5),
            || read_pid(&vrrp).is_some(),
        );
    }

    /// A crash: keepalived (both processes) and conntrackd freeze at once, the links go down,
    /// then the processes are killed.
    pub fn crash(&mut self, i: usize) -> Crash {
        let r = &mut self.routers[i - 1];
        let mut keepalived = r.keepalived.take().expect("keepalived runs");
        let vrrp = read_pid(&r.dir.join("vrrp.pid")).expect("keepalived's VRRP pid");
        let mut conntrackd = r.conntrackd.take();
        let mut pids = vec![keepalived.id(), vrrp];
        pids.extend(conntrackd.as_ref().map(Child::id));
        let frozen = now();
        for pid in &pids {
            signal(*pid, Signal::SIGSTOP);
        }
        for link in ["ib0", "eth9"] {
            ok(&["ip", "-n", &r.ns, "link", "set", link, "down"]);
        }
        let down = now();
        for pid in &pids {
            signal(*pid, Signal::SIGKILL);
        }
        reap(&mut keepalived, Duration::from_secs(5));
        if let Some(c) = conntrackd.as_mut() {
            reap(c, Duration::from_secs(5));
        }
        Crash { frozen, down }
    }

    /// Router i comes back as after a reboot: the addresses the killed keepalived left are
    /// released (the test asserts they were there), the connection table is empty, links up,
    /// `router apply` finds everything in place, the daemons start. Returns what `release`
    /// printed.
    pub fn revive(&mut self, i: usize) -> String {
        let released = self.router_ok(i, &["router", "release"]);
        let ns = self.router(i).ns.clone();
        let _ = self.net.exec(&ns, &["conntrack", "-F"]);
        for link in ["ib0", "eth9"] {
            ok(&["ip", "-n", &ns, "link", "set", link, "up"]);
        }
        let applied = self.router_ok(i, &["router", "apply"]);
        assert_eq!(applied.trim(), "in sync: nothing to do");
        self.start(i);
        released
    }

    /// A graceful stop: SIGTERM to keepalived, which gives the addresses up. Returns when it
    /// was sent.
    pub fn stop_keepalived(&mut self, i: usize) -> f64 {
        let r = &mut self.routers[i - 1];
        let mut keepalived = r.keepalived.take().expect("keepalived runs");
        let at = now();
        signal(keepalived.id(), Signal::SIGTERM);
        reap(&mut keepalived, Duration::from_secs(5));
        at
    }

    /// The routers that hold the virtual IP.
    pub fn masters(&self) -> Vec<usize> {
        (1..=self.routers.len())
            .filter(|i| {
                let r = self.router(*i);
                let out = self
                    .net
                    .exec(&r.ns, &["ip", "-4", "-o", "addr", "show", "dev", "ib0"]);
                String::from_utf8_lossy(&out.stdout).contains(&format!(" {VIP}/32 "))
            })
            .collect()
    }

    pub fn wait_master(&self, i: usize, within: Duration) {
        wait_until(&format!("r{i} alone holding {VIP}"), within, || {
            self.masters() == [i]
        });
    }

    /// Waits until router i holds the virtual IP; a crashed router may still hold it too
    /// (with its links down), as a killed keepalived leaves it.
    pub fn wait_holder(&self, i: usize, within: Duration) {
        wait_until(&format!("r{i} holding {VIP}"), within, || {
            self.masters().contains(&i)
        });
    }

    /// What the running keepalived of router i logged since it started.
    pub fn keepalived_log(&self, i: usize) -> String {
        let r = self.router(i);
        let text = std::fs::read(r.dir.join("keepalived.log")).unwrap_or_default();
        String::from_utf8_lossy(&text[(r.log_mark as usize).min(text.len())..]).into_owned()
    }

    pub fn wait_state(&self, i: usize, state: &str, within: Duration) {
        wait_until(&format!("r{i} in {state} state"), within, || {
            self.keepalived_log(i)
                .contains(&format!("Entering {state} STATE"))
        });
    }

    /// Packets from the worker to the internet host that arrived at each router.
    pub fn counts(&self) -> Vec<u64> {
        self.routers
            .iter()
            .map(|r| self.net.counted(&r.ns, "forwarded"))
            .collect()
    }

    /// Packets from the worker to the internet host that reached the closed gateway.
    pub fn gateway_count(&self) -> u64 {
        self.net.counted(&self.gw, "forwarded")
    }

    pub fn reset_counts(&self) {
        for r in &self.routers {
            self.net.reset_counters(&r.ns);
        }
        self.net.reset_counters(&self.gw);
    }

    fn as_user(&self, user: &str, args: &[&str]) -> Command {
        let gid = primary_gid(user);
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.worker, "setpriv", "--init-groups"])
            .args(["--reuid", user, "--regid", &gid, PYTHON])
            .arg(ha_probe())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// One new connection from the worker as `user`: its attempt line.
    pub fn connect(&self, user: &str) -> Attempt {
        let out = self
            .as_user(user, &["loop", INTERNET, PORT, "--duration", "0.001"])
            .output()
            .expect("run the probe");
        let text = String::from_utf8_lossy(&out.stdout);
        attempts(&text)
            .pop()
            .unwrap_or_else(|| panic!("no attempt: {text}"))
    }

    /// New connections from the selected user, one per `interval`, for `duration`.
    pub fn connect_loop(&self, interval: f64, timeout: f64, duration: f64) -> Probe {
        let args = [
            "loop".to_string(),
            INTERNET.into(),
            PORT.into(),
            "--interval".into(),
            interval.to_string(),
            "--timeout".into(),
            timeout.to_string(),
            "--duration".into(),
            duration.to_string(),
        ];
        self.spawn_selected(&args)
    }

    /// One connection of the selected user that receives a number every `interval`.
    pub fn stream(&self, interval: f64, duration: f64) -> Probe {
        let args = [
            "stream".to_string(),
            INTERNET.into(),
            PORT.into(),
            "--interval".into(),
            interval.to_string(),
            "--duration".into(),
            duration.to_string(),
        ];
        self.spawn_selected(&args)
    }

    /// The probe with `args`, started as the selected user.
    fn spawn_selected(&self, args: &[String]) -> Probe {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Probe(Some(
            self.as_user(SELECTED, &args)
                .spawn()
                .unwrap_or_else(|e| panic!("start the probe {args:?}: {e}")),
        ))
    }
}

impl Drop for Ha {
    fn drop(&mut self) {
        for r in &mut self.routers {
            if let Some(mut k) = r.keepalived.take() {
                signal(k.id(), Signal::SIGTERM);
                reap(&mut k, Duration::from_secs(3));
                if let Some(vrrp) = read_pid(&r.dir.join("vrrp.pid")) {
                    // Only if that process is still keepalived's VRRP child.
                    let comm = std::fs::read_to_string(format!("/proc/{vrrp}/comm"));
                    if comm.is_ok_and(|c| c.trim() == "keepalived") {
                        signal(vrrp, Signal::SIGKILL);
                    }
                }
            }
            if let Some(mut c) = r.conntrackd.take() {
                signal(c.id(), Signal::SIGTERM);
                reap(&mut c, Duration::from_secs(3));
            }
        }
    }
}

fn worker_toml(scratch: &Scratch) -> String {
    format!(
        r#"[routing]
table = 201
table_name = "alinat"
mark = 0x1
mask = 0x1
priority = 1000
interface = "ib0"
gateway = "{VIP}"
protocols = ["tcp", "udp"]
exceptions = [{{ to = "10.20.0.0/16" }}]

[select]
users = ["{SELECTED}"]

[jobs]
state_dir = "{}"
"#,
        scratch.path("w1-state").display()
    )
}

/// A probe running on the worker; stopped by PID if the test ends before it does.
pub struct Probe(Option<Child>);

impl Probe {
    /// Waits for the probe to end by itself; its stdout.
    pub fn finish(mut self) -> String {
        let child = self.0.take().unwrap();
        let out = child.wait_with_output().expect("wait for the probe");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            signal(child.id(), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// One connection attempt of the loop.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub start: f64,
    pub end: f64,
    pub ok: bool,
    /// The source address the internet host saw, or why it failed.
    pub detail: String,
}

pub fn attempts(text: &str) -> Vec<Attempt> {
    text.lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 4, "probe line {line:?}");
            Attempt {
                start: f[0].parse().unwrap(),
                end: f[1].parse().unwrap(),
                ok: f[2] == "ok",
                detail: f[3].to_owned(),
            }
        })
        .collect()
}

/// The longest time between the starts of two successive successful attempts, and when the
/// first of the two started.
pub fn longest_gap(attempts: &[Attempt]) -> (f64, f64) {
    let starts: Vec<f64> = attempts.iter().filter(|a| a.ok).map(|a| a.start).collect();
    starts
        .windows(2)
        .map(|w| (w[1] - w[0], w[0]))
        .fold((0.0, 0.0), |best, g| if g.0 > best.0 { g } else { best })
}

/// What the stream probe reported.
#[derive(Debug, Clone)]
pub struct Stream {
    pub peer: String,
    pub received: u64,
    pub consecutive: bool,
    pub begin: f64,
    pub end: f64,
    pub last: f64,
    /// Pauses longer than four intervals: (start, length).
    pub stalls: Vec<(f64, f64)>,
    pub error: String,
}

pub fn stream(text: &str) -> Stream {
    let field = |name: &str| -> String {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {text:?}"))
            .to_owned()
    };
    let stalls = field("stalls");
    Stream {
        peer: field("peer"),
        received: field("received").parse().unwrap(),
        consecutive: field("consecutive") == "1",
        begin: field("begin").parse().unwrap(),
        end: field("end").parse().unwrap(),
        last: field("last").parse().unwrap(),
        stalls: if stalls == "-" {
            vec![]
        } else {
            stalls
                .split(',')
                .map(|s| {
                    let (a, d) = s.split_once('+').unwrap();
                    (a.parse().unwrap(), d.parse().unwrap())
                })
                .collect()
        },
        error: field("error"),
    }
}

/// Min, median and max.
pub fn summary(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (v[0], median, v[v.len() - 1])
}
