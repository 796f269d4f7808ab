//! A real Slurm cluster (munged, slurmctld, slurmd w1 and w2) on a [`Lab`]'s fabric, driven
//! through the scripts in `tests/cluster/`, with the plugin cargo built loaded through
//! plugstack.conf. Stopped (by PID) when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::lab::Lab;
use super::wait_until;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/cluster")
        .join(name)
}

/// The plugin cargo built next to the binary under test: the newer of the one `cargo build`
/// leaves and the one `cargo test` rebuilds under `deps/` (without copying it up), so that a
/// plain `cargo test` never loads a stale plugin into slurmd.
pub fn plugin() -> PathBuf {
    let bin = Path::new(super::BIN);
    let dir = bin.parent().unwrap();
    [
        dir.join("libslurm_egress.so"),
        dir.join("deps/libslurm_egress.so"),
    ]
    .into_iter()
    .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
    .max()
    .map(|(_, p)| p)
    .unwrap_or_else(|| {
        panic!(
            "no libslurm_egress.so next to {}: run `cargo build` first",
            bin.display()
        )
    })
}

pub struct Cluster {
    pub dir: PathBuf,
    prefix: String,
}

/// A finished (or timed out) batch job.
#[derive(Debug)]
pub struct Finished {
    pub id: u32,
    /// `COMPLETED 0:0`, `FAILED 1:0`, ...
    pub state: String,
    /// The job's stdout and stderr.
    pub output: String,
}

impl Cluster {
    /// Starts the cluster on `lab` (which must have its controller) with the plugin loaded as
    /// `mode` (`required` or `optional`) with `config=<config>`.
    pub fn up(lab: &Lab, config: &Path, mode: &str) -> Cluster {
        let dir = lab.scratch.path("slurm");
        std::fs::create_dir_all(&dir).unwrap();
        let cluster = Cluster {
            dir,
            prefix: lab.net.ns(""),
        };
        let out = cluster
            .command("up.sh")
            .arg(&cluster.dir)
            .env("SE_SL_PLUGIN", plugin())
            .env("SE_SL_PLUGIN_ARGS", format!("config={}", config.display()))
            .env("SE_SL_PLUGIN_MODE", mode)
            .env("SE_SL_SLURMD_DEBUG", "verbose")
            .env("SE_SL_KEEP_ON_FAILURE", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "up.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }

    fn command(&self, name: &str) -> Command {
        let mut c = Command::new(script(name));
        c.env("SE_SL_PREFIX", &self.prefix);
        c
    }

    fn run(&self, name: &str, args: &[&str]) -> (bool, String) {
        let out = self
            .command(name)
            .arg(&self.dir)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Submits a batch job as `user` on `node` charged to `account`, running `cmd`; returns
    /// its id at once.
    pub fn submit(&self, user: &str, node: &str, account: &str, cmd: &[&str]) -> u32 {
        let mut args = vec![user, node, account, "--no-wait", "--"];
        args.extend_from_slice(cmd);
        let (ok, out) = self.run("job.sh", &args);
        assert!(ok, "sbatch failed: {out}");
        out.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no job id in {out:?}"))
    }

    /// Waits (bounded) for a job to end.
    pub fn wait(&self, id: u32) -> Finished {
        let out = self
            .command("job.sh")
            .arg("--wait")
            .arg(&self.dir)
            .args([&id.to_string(), "--timeout", "60"])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let state = out
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{id} ")))
            .map(|rest| {
                rest.split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|| format!("UNKNOWN ({out})"));
        let output =
            std::fs::read_to_string(self.dir.join(format!("jobs/{id}.out"))).unwrap_or_default();
        Finished { id, state, output }
    }

    /// Runs a batch job to its end.
    pub fn job(&self, user: &str, node: &str, account: &str, cmd: &[&str]) -> Finished {
        let id = self.submit(user, node, account, cmd);
        self.wait(id)
    }

    /// Runs a Slurm client command as root in the controller namespace.
    pub fn client(&self, args: &[&str]) -> String {
        self.client_as("root", args)
    }

    /// Runs a Slurm client command as `user` in the controller namespace.
    pub fn client_as(&self, user: &str, args: &[&str]) -> String {
        let mut all = vec![user];
        all.extend_from_slice(args);
        let (ok, out) = self.run("client.sh", &all);
        assert!(ok, "{args:?}: {out}");
        out
    }

    /// Waits until job `id` runs.
    pub fn wait_running(&self, id: u32) {
        wait_until(
            &format!("job {id} running"),
            Duration::from_secs(30),
            || {
                self.client(&["squeue", "-h", "-j", &id.to_string(), "-o", "%T"])
                    .trim()
                    == "RUNNING"
            },
        );
    }

    pub fn cancel(&self, id: u32) {
        self.client(&["scancel", &id.to_string()]);
    }

    /// `start`, `stop` or `restart` one slurmd.
    pub fn slurmd(&self, action: &str, node: &str) {
        let (ok, out) = self.run("slurmd.sh", &[action, node]);
        assert!(ok, "slurmd.sh {action} {node}: {out}");
    }

    pub fn slurmd_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.join(node).join("slurmd.log")).unwrap_or_default()
    }

    /// The node's state as sinfo reports it (`idle`, `drain`, ...).
    pub fn node_state(&self, node: &str) -> String {
        self.client(&["sinfo", "-h", "-N", "-n", node, "-o", "%t"])
            .trim()
            .to_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.command("down.sh").arg(&self.dir).output();
    }
}
