//! What a job start and a job end cost on a node: slurm-egress's in-process netlink (the
//! SPANK plugin's path) against running `nft` for the same set change.
//!
//! Run with `benches/run.sh` (root): the benchmark moves itself into a fresh network
//! namespace of its own, so it touches nothing of the machine's, and needs no cleanup.
//!
//! Measured, per operation, 1000 times each:
//! * in the plugin: `jobs::start` / `jobs::end` called in this process: decision, ledger
//!   under its lock, one nftables transaction (through `slurm-egress watch` when it runs,
//!   else in-process);
//! * as a whole prolog/epilog process: the same call in a forked child, timed from fork to
//!   reaping the child, so the process's exit (where the kernel may make a closing netlink
//!   socket wait) is included, as slurmd sees it;
//! * `nft add element` / `nft delete element`, run as a program, the way a prolog script
//!   would;
//! * bursts of [`BURST`] jobs on one node at once, each in a process of its own like the
//!   prologs and epilogs slurmd forks: all starting, half ending while as many start (some
//!   owners losing their last job while others gain one), all ending. Timed from the moment
//!   the forked processes are let go until the last has exited; afterwards the `jobs` set and
//!   the ledger must be exactly what the jobs still running call for, or the benchmark fails.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use slurm_egress::config::Config;
use slurm_egress::jobs::{self, Job};
use slurm_egress::ledger::Ledger;
use slurm_egress::netfilter::{Family, Netfilter};
use slurm_egress::node::{JOBS, TABLE};

const RUNS: usize = 1000;
const UID: u32 = 5001;
/// Jobs per burst.
const BURST: u32 = 1000;

fn config(state: &Path) -> Config {
    Config::parse(&config_text(state), Path::new("bench.toml")).expect("bench config")
}

fn config_text(state: &Path) -> String {
    format!(
        r#"[routing]
table = 201
table_name = "alinat"
mark = 0x1
mask = 0x1
priority = 1000
interface = "ib0"
gateway = "10.20.3.227"
protocols = ["tcp"]
[select]
users = [4001]
groups = [4002]
accounts = ["alice"]
[jobs]
state_dir = "{}"
"#,
        state.display()
    )
}

fn job(id: u32) -> Job {
    job_of(id, UID)
}

fn job_of(id: u32, uid: u32) -> Job {
    Job {
        id,
        uid,
        account: Some("alice".into()),
        node: "bench".into(),
    }
}

/// Whether a job start or end in a child succeeded; says why not.
fn ok<T>(result: Result<T, jobs::Error>) -> bool {
    result
        .inspect_err(|e| eprintln!("job_latency: in a child: {e}"))
        .is_ok()
}

/// Reaps finished children (the detached closers) without waiting.
fn reap() {
    while let Ok(status) = nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
    {
        if status == nix::sys::wait::WaitStatus::StillAlive {
            break;
        }
    }
}

/// Runs `f` in a forked child and returns the time until the child is reaped.
fn in_child(f: impl FnOnce() -> bool) -> Duration {
    let start = Instant::now();
    // SAFETY: the benchmark is single-threaded; the child runs `f` and `_exit`s.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => {
            let ok = f();
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            let status = nix::sys::wait::waitpid(child, None).expect("waitpid");
            assert_eq!(
                status,
                nix::sys::wait::WaitStatus::Exited(child, 0),
                "child failed"
            );
            start.elapsed()
        }
    }
}

fn nft(args: &str) -> Duration {
    let start = Instant::now();
    let status = Command::new("nft")
        .args(args.split(' '))
        .status()
        .expect("run nft");
    assert!(status.success(), "nft {args}");
    start.elapsed()
}

struct Stats {
    p50: Duration,
    p99: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    Stats {
        p50: v[v.len() / 2],
        p99: v[v.len() * 99 / 100],
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// Moves this process into a network namespace and a mount namespace of its own, with a
/// private copy of /etc/iproute2 (where `apply` registers the table name), the way
/// `ip netns exec` does: nothing of the machine's is touched.
fn private_namespaces(etc: &Path) {
    use nix::mount::{MsFlags, mount};
    use nix::sched::{CloneFlags, unshare};
    unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS).expect("unshare namespaces");
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .expect("make mounts private");
    std::fs::create_dir_all(etc.join("rt_tables.d")).unwrap();
    std::fs::copy("/etc/iproute2/rt_tables", etc.join("rt_tables")).unwrap();
    mount(
        Some(etc),
        "/etc/iproute2",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind a private /etc/iproute2");
}

/// Job start and end latencies, in this process and as separate processes.
struct Phase {
    start_in: Vec<Duration>,
    end_in: Vec<Duration>,
    start_proc: Vec<Duration>,
    end_proc: Vec<Duration>,
}

/// `RUNS` job starts and ends of one uid, so that every end removes it from the set.
fn phase(config: &Config, first_id: u32) -> Phase {
    let mut p = Phase {
        start_in: Vec::new(),
        end_in: Vec::new(),
        start_proc: Vec::new(),
        end_proc: Vec::new(),
    };
    for i in 0..RUNS as u32 {
        let id = first_id + 2 * i;
        let t = Instant::now();
        jobs::start(config, &job(id)).unwrap();
        p.start_in.push(t.elapsed());
        let t = Instant::now();
        jobs::end(config, id, "bench").unwrap();
        p.end_in.push(t.elapsed());
        p.start_proc
            .push(in_child(|| ok(jobs::start(config, &job(id + 1)))));
        p.end_proc
            .push(in_child(|| ok(jobs::end(config, id + 1, "bench"))));
        reap();
    }
    // Let detached closers finish before the next phase.
    std::thread::sleep(Duration::from_millis(500));
    reap();
    p
}

/// One job start or end, as a prolog or epilog process does it.
#[derive(Clone, Copy)]
enum Op {
    Start { id: u32, uid: u32 },
    End { id: u32 },
}

/// Runs every op in a forked process of its own, all let go at once; returns the time from
/// letting them go until the last one is reaped. Forking is not timed: slurmd forks its
/// prologs anyway, and the per-process figures above include it.
fn burst(config: &Config, ops: &[Op]) -> Duration {
    let (go_read, go_write) = nix::unistd::pipe().expect("pipe");
    let mut children = Vec::with_capacity(ops.len());
    for &op in ops {
        // SAFETY: the benchmark is single-threaded; the child runs the op and `_exit`s.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                drop(go_write);
                // Blocks until the parent closes its write end: the start signal.
                let _ = nix::unistd::read(go_read.as_fd(), &mut [0u8]);
                let result = match op {
                    Op::Start { id, uid } => jobs::start(config, &job_of(id, uid)).map(|_| ()),
                    Op::End { id } => jobs::end(config, id, "bench").map(|_| ()),
                };
                unsafe { libc::_exit(if ok(result) { 0 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => children.push(child),
        }
    }
    drop(go_read);
    let start = Instant::now();
    drop(go_write);
    for child in children {
        let status = nix::sys::wait::waitpid(child, None).expect("waitpid");
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(child, 0),
            "a job start or end failed in the burst"
        );
    }
    start.elapsed()
}

/// Like [`burst`], but each op on a thread of this process: the same work without the
/// processes' own cost (forking done, the rest: scheduling a thousand of them, exiting).
fn burst_threads(config: &Config, ops: &[Op]) -> Duration {
    let go = std::sync::Barrier::new(ops.len() + 1);
    std::thread::scope(|s| {
        let threads: Vec<_> = ops
            .iter()
            .map(|&op| {
                let go = &go;
                s.spawn(move || {
                    go.wait();
                    ok(match op {
                        Op::Start { id, uid } => jobs::start(config, &job_of(id, uid)).map(|_| ()),
                        Op::End { id } => jobs::end(config, id, "bench").map(|_| ()),
                    })
                })
            })
            .collect();
        go.wait();
        let start = Instant::now();
        for t in threads {
            assert!(t.join().unwrap(), "a job start or end failed in the burst");
        }
        start.elapsed()
    })
}

/// Fails loudly unless the ledger holds exactly `running` (job id to uid) and the `jobs`
/// set exactly their owners.
fn check_exact(config: &Config, running: &BTreeMap<u32, u32>, what: &str) {
    let ledger: BTreeMap<u32, u32> = Ledger::lock(&config.jobs.state_dir)
        .and_then(|l| l.read("bench"))
        .expect("read the ledger")
        .jobs
        .iter()
        .map(|j| (j.id, j.uid))
        .collect();
    assert!(
        ledger == *running,
        "{what}: the ledger is wrong: {} jobs recorded, {} running; missing {:?}, extra {:?}",
        ledger.len(),
        running.len(),
        running
            .keys()
            .filter(|id| !ledger.contains_key(id))
            .collect::<Vec<_>>(),
        ledger
            .keys()
            .filter(|id| !running.contains_key(id))
            .collect::<Vec<_>>()
    );
    let want: BTreeSet<u64> = running.values().map(|&uid| uid.into()).collect();
    let table = Netfilter::open()
        .and_then(|mut n| n.read(Family::Inet, TABLE))
        .expect("read the nftables table")
        .expect("the node table exists");
    let set = &table
        .sets
        .iter()
        .find(|s| s.name == JOBS)
        .expect("the jobs set")
        .elements;
    assert!(
        *set == want,
        "{what}: the jobs set is wrong: missing {:?}, extra {:?}",
        want.difference(set).collect::<Vec<_>>(),
        set.difference(&want).collect::<Vec<_>>()
    );
}

/// The three bursts, run by `burst`, each checked for exactness; job ids from `first_id` on.
fn bursts(config: &Config, first_id: u32, burst: fn(&Config, &[Op]) -> Duration) -> [Duration; 3] {
    // 250 owners with four jobs each.
    let uid = |i: u32| 7000 + i % 250;
    let mut running = BTreeMap::new();
    let ops: Vec<Op> = (0..BURST)
        .map(|i| Op::Start {
            id: first_id + i,
            uid: uid(i),
        })
        .collect();
    let all_start = burst(config, &ops);
    running.extend((0..BURST).map(|i| (first_id + i, uid(i))));
    check_exact(config, &running, "after the start burst");

    // The odd jobs end: owners 7001, 7003, ... lose all four. Meanwhile as many start: 60
    // of those owners get a new job (they must stay in the set), the rest are new owners.
    let mut ops = Vec::new();
    for i in (1..BURST).step_by(2) {
        ops.push(Op::End { id: first_id + i });
        running.remove(&(first_id + i));
    }
    for j in 0..BURST / 2 {
        let id = first_id + BURST + j;
        let uid = if j < BURST / 4 {
            7001 + 2 * (j % 60)
        } else {
            9000 + j
        };
        ops.push(Op::Start { id, uid });
        running.insert(id, uid);
    }
    let mixed = burst(config, &ops);
    check_exact(config, &running, "after the mixed burst");

    let ops: Vec<Op> = running.keys().map(|&id| Op::End { id }).collect();
    let all_end = burst(config, &ops);
    running.clear();
    check_exact(config, &running, "after the end burst");
    [all_start, mixed, all_end]
}

/// `slurm-egress watch`, stopped by its PID when dropped, also when the benchmark fails
/// (and only by the process that started it, not by a forked child that unwinds).
struct Watch(std::process::Child, u32);

impl Drop for Watch {
    fn drop(&mut self) {
        if std::process::id() == self.1 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.0.wait();
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "run benches/run.sh as root"
    );
    // On tmpfs, like the ledger's real home (/run/slurm-egress on systemd machines).
    let state = Path::new("/dev/shm").join(format!("slurm-egress-bench-{}", std::process::id()));
    private_namespaces(&state.join("iproute2"));
    // The node's fabric interface, in this private namespace (inherited by the children).
    for cmd in [
        "ip link set lo up",
        "ip link add ib0 type veth peer name ib0-peer",
        "ip addr add 10.20.1.1/16 dev ib0",
        "ip link set ib0 up",
        "ip link set ib0-peer up",
    ] {
        let ok = Command::new(cmd.split(' ').next().unwrap())
            .args(cmd.split(' ').skip(1))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "{cmd}");
    }
    let config = config(&state);
    let config_path = state.join("config.toml");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(&config_path, config_text(&state)).unwrap();
    let apply = Command::new(env!("CARGO_BIN_EXE_slurm-egress"))
        .args(["--config", config_path.to_str().unwrap(), "apply"])
        .output()
        .expect("run slurm-egress apply");
    assert!(apply.status.success(), "{apply:?}");

    let without = phase(&config, 0);
    let without_bursts = bursts(&config, 100_000, burst);
    // Let the detached closers of the burst finish.
    std::thread::sleep(Duration::from_millis(500));
    reap();

    let watch = Watch(
        Command::new(env!("CARGO_BIN_EXE_slurm-egress"))
            .args(["--config", config_path.to_str().unwrap(), "watch"])
            .spawn()
            .expect("start slurm-egress watch"),
        std::process::id(),
    );
    let socket = slurm_egress::watch::socket_path(&state).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "watch did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let with = phase(&config, 10 * RUNS as u32);
    let with_bursts = bursts(&config, 200_000, burst);
    let thread_bursts = bursts(&config, 300_000, burst_threads);
    drop(watch);

    let (mut nft_add, mut nft_del) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        nft_add.push(nft(&format!("add element inet {TABLE} {JOBS} {{ {UID} }}")));
        nft_del.push(nft(&format!(
            "delete element inet {TABLE} {JOBS} {{ {UID} }}"
        )));
    }
    let _ = std::fs::remove_dir_all(&state);

    let nft_add = stats(nft_add);
    let nft_del = stats(nft_del);
    println!("job start and end on one node, {RUNS} runs each\n");
    println!("{:<60} {:>10} {:>10} {:>9}", "", "p50", "p99", "nft/ours");
    let row = |name: &str, v: Vec<Duration>, nft: &Stats| {
        let s = stats(v);
        println!(
            "{name:<60} {:>10} {:>10} {:>8.1}x",
            ms(s.p50),
            ms(s.p99),
            nft.p99.as_secs_f64() / s.p99.as_secs_f64()
        );
    };
    println!("with `slurm-egress watch` serving the set (the recommended setup):");
    row("  job start, in the plugin", with.start_in, &nft_add);
    row("  job end, in the plugin", with.end_in, &nft_del);
    row(
        "  job start, whole prolog process (fork to exit)",
        with.start_proc,
        &nft_add,
    );
    row(
        "  job end, whole epilog process (fork to exit)",
        with.end_proc,
        &nft_del,
    );
    println!("without it (the plugin's own netlink socket, closed by a helper):");
    row("  job start, in the plugin", without.start_in, &nft_add);
    row("  job end, in the plugin", without.end_in, &nft_del);
    row(
        "  job start, whole prolog process (fork to exit)",
        without.start_proc,
        &nft_add,
    );
    row(
        "  job end, whole epilog process (fork to exit)",
        without.end_proc,
        &nft_del,
    );
    println!("running nft, as a prolog/epilog script would:");
    println!(
        "{:<60} {:>10} {:>10}",
        "  nft add element",
        ms(nft_add.p50),
        ms(nft_add.p99)
    );
    println!(
        "{:<60} {:>10} {:>10}",
        "  nft delete element",
        ms(nft_del.p50),
        ms(nft_del.p99)
    );
    println!("\n(nft/ours: how many times longer nft takes at p99; ledger on tmpfs)");

    println!("\n{BURST} jobs at once on one node (total time; set and ledger checked)\n");
    println!(
        "{:<48} {:>10} {:>10} {:>10}",
        "", "processes", "processes", "threads"
    );
    println!(
        "{:<48} {:>10} {:>10} {:>10}",
        "", "watch", "no watch", "watch"
    );
    for (i, name) in [
        format!("{BURST} jobs start"),
        format!("{} jobs end while {} start", BURST / 2, BURST / 2),
        format!("{BURST} jobs end"),
    ]
    .iter()
    .enumerate()
    {
        println!(
            "{:<48} {:>10} {:>10} {:>10}",
            format!("  {name}"),
            ms(with_bursts[i]),
            ms(without_bursts[i]),
            ms(thread_bursts[i])
        );
    }
    println!(
        "\n(processes: one forked per job, like slurmd's prologs and epilogs, all let go at \
         once;\nthreads: the same in one process)"
    );
    println!("\nset and ledger after every burst: exact");
}
