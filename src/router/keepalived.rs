//! keepalived.conf for a router: one VRRPv3 instance that moves the virtual IP (and
//! `public_ip`) to the live router with the highest priority.

use std::path::{Path, PathBuf};

use super::{Error, Setup};

/// The VRRP instance's name, in keepalived's log and in its notify calls.
pub const INSTANCE: &str = "slurm_egress";

/// The command keepalived runs on a state change: this very binary, with this config.
pub struct Hook {
    pub exe: PathBuf,
    pub config: PathBuf,
}

impl Hook {
    /// keepalived splits the notify line on blanks and refuses scripts that a non-root user
    /// could replace, so both paths must be absolute and plain.
    pub fn this_binary(config: &Path) -> Result<Hook, Error> {
        let file_error = |path: &Path, source| Error::File {
            path: path.to_owned(),
            source,
        };
        let exe =
            std::env::current_exe().map_err(|e| file_error(Path::new("/proc/self/exe"), e))?;
        let config = std::fs::canonicalize(config).map_err(|e| file_error(config, e))?;
        for path in [&exe, &config] {
            let text = path.to_string_lossy();
            if text.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
                return Err(file_error(
                    path,
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "a path with blanks or quotes cannot go into keepalived's notify line",
                    ),
                ));
            }
        }
        Ok(Hook { exe, config })
    }

    fn line(&self, state: &str) -> String {
        format!(
            "{} --config {} router notify {state}",
            self.exe.display(),
            self.config.display()
        )
    }
}

/// The config text. `hook` is `None` when connection state is not synchronised.
pub fn config(setup: &Setup, hook: Option<&Hook>, host: &str) -> String {
    let r = &setup.router;
    let mut out = String::new();
    let mut line = |text: &str| {
        out.push_str(text);
        out.push('\n');
    };
    line(&format!(
        "# keepalived.conf of the slurm-egress NAT router {host}, made by\n\
         # `slurm-egress router keepalived-config` from {}.\n\
         # Change that file and make this one again; do not edit it.",
        setup.path.display()
    ));
    line("global_defs {");
    line("    # VRRPv3: advertisement intervals below one second.");
    line("    vrrp_version 3");
    line("    # The notify hook runs as root, from a path only root can change.");
    line("    script_user root");
    line("    enable_script_security");
    line("}");
    line("");
    line(&format!("vrrp_instance {INSTANCE} {{"));
    line("    # Every router starts as a backup; a master stays master while it lives, even when");
    line("    # a router with a higher priority comes back: moving the addresses again would");
    line("    # only put every connection through a second handover.");
    line("    state BACKUP");
    line("    nopreempt");
    line(&format!("    interface {}", *r.inside));
    line(&format!("    virtual_router_id {}", r.virtual_router_id));
    line(&format!("    priority {}", r.priority));
    line(&format!("    advert_int {}", r.advert_seconds()));
    if !r.peers.is_empty() {
        line("    # Adverts go to the other routers directly: no multicast needed on the fabric.");
        line(&format!("    unicast_src_ip {}", setup.inside_addr));
        line("    unicast_peer {");
        for peer in &r.peers {
            line(&format!("        {}", peer.value));
        }
        line("    }");
    }
    line("    # The outside link down is a fault: the addresses go to a router that can forward.");
    line("    track_interface {");
    line(&format!("        {}", *r.outside));
    line("    }");
    line("    virtual_ipaddress {");
    line(&format!("        {}/32 dev {}", *r.virtual_ip, *r.inside));
    if let Some(public) = &r.public_ip {
        line(&format!("        {}/32 dev {}", public.value, *r.outside));
    }
    line("    }");
    if let Some(hook) = hook {
        line("    # Connection state: a new master commits what conntrackd received from the old");
        line(
            "    # one; a backup asks the master for everything (conntrack-tools' primary-backup).",
        );
        for state in ["master", "backup", "fault"] {
            line(&format!("    notify_{state} \"{}\"", hook.line(state)));
        }
    }
    line("}");
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::{TOML, body, setup};
    use super::*;

    #[test]
    fn seed_router_with_sync() {
        let hook = Hook {
            exe: "/usr/sbin/slurm-egress".into(),
            config: "/etc/slurm-egress/config.toml".into(),
        };
        let text = config(&setup(TOML), Some(&hook), "alinat1");
        assert!(
            text.starts_with("# keepalived.conf of the slurm-egress NAT router alinat1, made by\n")
        );
        let notify = "/usr/sbin/slurm-egress --config /etc/slurm-egress/config.toml router notify";
        assert_eq!(
            body(&text),
            [
                "global_defs {",
                "vrrp_version 3",
                "script_user root",
                "enable_script_security",
                "}",
                "vrrp_instance slurm_egress {",
                "state BACKUP",
                "nopreempt",
                "interface ib0",
                "virtual_router_id 51",
                "priority 150",
                "advert_int 0.1",
                "unicast_src_ip 10.20.3.1",
                "unicast_peer {",
                "10.20.3.2",
                "10.20.3.3",
                "}",
                "track_interface {",
                "eth9",
                "}",
                "virtual_ipaddress {",
                "10.20.3.227/32 dev ib0",
                "140.181.2.227/32 dev eth9",
                "}",
                &format!("notify_master \"{notify} master\""),
                &format!("notify_backup \"{notify} backup\""),
                &format!("notify_fault \"{notify} fault\""),
                "}",
            ]
        );
    }

    #[test]
    fn lone_router_with_masquerade_and_no_sync() {
        let text = TOML
            .replace("public_ip = \"140.181.2.227\"\n", "")
            .replace("peers = [\"10.20.3.2\", \"10.20.3.3\"]\n", "");
        let lines = body(&config(&setup(&text), None, "r"));
        assert!(!lines.iter().any(|l| l.contains("unicast")), "{lines:?}");
        assert!(!lines.iter().any(|l| l.contains("notify")), "{lines:?}");
        assert!(!lines.iter().any(|l| l.contains("dev eth9")), "{lines:?}");
        assert!(lines.contains(&"10.20.3.227/32 dev ib0".to_owned()));
    }
}
