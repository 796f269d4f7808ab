//! The NAT router role: `slurm-egress router apply | check | remove`, ready configs for
//! keepalived and conntrackd, and the hook that ties them together.
//!
//! A router forwards between its inside interface (the fabric: workers and the other routers)
//! and its outside one, and nowhere else; it SNATs what leaves to the floating `public_ip`, or
//! masquerades to its own outside address. That is [`table`] plus per-interface forwarding, made
//! true by `apply` the way the worker side does it: everything validated first, then a diff
//! against the live state, then the nftables part in one transaction.
//!
//! High availability uses existing engines. keepalived (VRRPv3) moves the virtual IP the workers
//! route to, and `public_ip` with it, to the live router with the highest priority.
//! conntrackd (FTFW) copies every forwarded connection's state, NAT mapping included, to the
//! other routers, and keepalived's notify hook (`router notify`) has the new master commit
//! that state into its kernel before traffic needs it: with `public_ip`, a connection keeps
//! its public address and port across a failover, so it survives. Masquerade cannot offer
//! that: the address is the dead router's own.
//!
//! Choices, explained in `slurm/router/README.md`: every router starts as backup with
//! `nopreempt` (a router that comes back does not take the addresses back and move every
//! connection a second time); unicast VRRP to `peers` (no multicast needed on the fabric);
//! conntrackd over UDP to the one peer, or multicast to several; no `use_vmac` (IPoIB has no
//! Ethernet MAC to virtualise, and the macvlan it would create is an interface the forwarding
//! rules do not name).

mod addresses;
pub mod cli;
mod conntrackd;
mod forwarding;
mod keepalived;
mod table;

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

pub use conntrackd::Transition;
pub use table::{TABLE, table};

use crate::config::{self, Config, Location};
use crate::netfilter::{self, Family, Netfilter, Table};
use crate::routing::{self, Link, Routing};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("slurm-egress router must run as root (it changes nftables, sysctls and addresses)")]
    NotRoot,
    #[error("{path}: no [router] section: this is not a NAT router's config")]
    NotARouter { path: PathBuf },
    #[error("{path}: router.sync is off: this router runs no conntrackd")]
    NoSync { path: PathBuf },
    /// The config names something this machine does not have, or cannot work with.
    #[error("{path}:{at}: {key}: {message}")]
    Config {
        path: PathBuf,
        at: Location,
        key: &'static str,
        message: String,
    },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{action}: {source}")]
    Netlink {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Routing(#[from] routing::Error),
    #[error(transparent)]
    Netfilter(#[from] netfilter::Error),
}

fn require_root() -> Result<(), Error> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::NotRoot)
    }
}

fn router_of(config: &Config) -> Result<&config::Router, Error> {
    config.router.as_ref().ok_or_else(|| Error::NotARouter {
        path: config.path.clone(),
    })
}

/// The router config checked against this machine, with what the machine told us.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The config file (the notify hook is pointed at it).
    pub path: PathBuf,
    pub router: config::Router,
    /// This router's own address on the inside subnet of the virtual IP: VRRP adverts and
    /// conntrackd's sync messages are sent from it.
    pub inside_addr: Ipv4Addr,
    /// This router's own addresses on the outside (without `public_ip`).
    pub outside_addrs: Vec<Ipv4Addr>,
}

impl Setup {
    /// Reads the interfaces and checks the config against them. Needs no privileges.
    pub async fn load(config: &Config) -> Result<Setup, Error> {
        let router = router_of(config)?;
        let routing = Routing::connect()?;
        let inside = routing.link(&router.inside).await?;
        let outside = routing.link(&router.outside).await?;
        Setup::check(&config.path, router, inside.as_ref(), outside.as_ref())
    }

    /// The judgement itself, without the kernel: every way the interfaces and the addresses
    /// can disagree with the config is an error naming the key and its line.
    pub fn check(
        path: &Path,
        r: &config::Router,
        inside: Option<&Link>,
        outside: Option<&Link>,
    ) -> Result<Setup, Error> {
        let bad = |at: Location, key: &'static str, message: String| Error::Config {
            path: path.to_owned(),
            at,
            key,
            message,
        };
        let inside = inside.ok_or_else(|| {
            bad(
                r.inside.at,
                "router.inside",
                format!("no interface {:?} in this network namespace", *r.inside),
            )
        })?;
        let outside = outside.ok_or_else(|| {
            bad(
                r.outside.at,
                "router.outside",
                format!("no interface {:?} in this network namespace", *r.outside),
            )
        })?;
        // keepalived adds the floating addresses as /32s; they are not the router's own.
        let own = |link: &Link, floating: Option<Ipv4Addr>| -> Vec<Ipv4Net> {
            link.addresses
                .iter()
                .filter(|net| !(net.prefix_len() == 32 && Some(net.addr()) == floating))
                .copied()
                .collect()
        };
        let inside_own = own(inside, Some(*r.virtual_ip));
        let outside_own = own(outside, r.public_ip.as_ref().map(|p| p.value));
        let list = |nets: &[Ipv4Net]| {
            if nets.is_empty() {
                "none".to_owned()
            } else {
                let texts: Vec<String> = nets.iter().map(ToString::to_string).collect();
                texts.join(", ")
            }
        };
        let subnet_of = |nets: &[Ipv4Net], ip: Ipv4Addr| {
            nets.iter()
                .find(|net| net.prefix_len() < 32 && net.contains(&ip))
                .copied()
        };

        let vip = *r.virtual_ip;
        if inside_own.iter().any(|net| net.addr() == vip) {
            return Err(bad(
                r.virtual_ip.at,
                "router.virtual_ip",
                format!(
                    "{vip} is {}'s own address; the virtual IP must be one that keepalived moves",
                    inside.name
                ),
            ));
        }
        let Some(inside_net) = subnet_of(&inside_own, vip) else {
            return Err(bad(
                r.virtual_ip.at,
                "router.virtual_ip",
                format!(
                    "{vip} is not in a subnet of {} (its addresses: {})",
                    inside.name,
                    list(&inside_own)
                ),
            ));
        };
        for peer in &r.peers {
            if inside_own.iter().any(|net| net.addr() == peer.value) {
                return Err(bad(
                    peer.at,
                    "router.peers",
                    format!(
                        "{} is this router's own address; list the other routers",
                        peer.value
                    ),
                ));
            }
            if !inside_net.contains(&peer.value) {
                return Err(bad(
                    peer.at,
                    "router.peers",
                    format!(
                        "{} is not in {}, the subnet of {} that holds the virtual IP",
                        peer.value,
                        inside_net.trunc(),
                        inside.name
                    ),
                ));
            }
        }
        let outside_addrs: Vec<Ipv4Addr> = outside_own.iter().map(|n| n.addr()).collect();
        match &r.public_ip {
            Some(public) => {
                if outside_addrs.contains(&public.value) {
                    return Err(bad(
                        public.at,
                        "router.public_ip",
                        format!(
                            "{} is {}'s own address; the public address must be one that \
                             keepalived moves",
                            public.value, outside.name
                        ),
                    ));
                }
                if subnet_of(&outside_own, public.value).is_none() {
                    return Err(bad(
                        public.at,
                        "router.public_ip",
                        format!(
                            "{} is not in a subnet of {} (its addresses: {})",
                            public.value,
                            outside.name,
                            list(&outside_own)
                        ),
                    ));
                }
            }
            None if outside_addrs.is_empty() => {
                return Err(bad(
                    r.outside.at,
                    "router.outside",
                    format!(
                        "{} has no IPv4 address to masquerade to (or set router.public_ip)",
                        outside.name
                    ),
                ));
            }
            None => {}
        }
        Ok(Setup {
            path: path.to_owned(),
            router: r.clone(),
            inside_addr: inside_net.addr(),
            outside_addrs,
        })
    }
}

/// What `apply` would change, or what `check` found.
#[derive(Debug, Default)]
pub struct Plan {
    pub netfilter: Vec<netfilter::Difference>,
    pub forwarding: Vec<forwarding::Difference>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.netfilter.is_empty() && self.forwarding.is_empty()
    }

    pub fn len(&self) -> usize {
        self.netfilter.len() + self.forwarding.len()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.netfilter {
            writeln!(f, "nftables: {d}")?;
        }
        for d in &self.forwarding {
            writeln!(f, "sysctl: {d}")?;
        }
        Ok(())
    }
}

/// A validated router with its live state read.
pub struct Router {
    setup: Setup,
    table: Table,
    nft: Netfilter,
    sysctls: forwarding::Sysctls,
    pub plan: Plan,
}

impl Router {
    /// Everything that can fail on bad input fails here, before any change.
    pub async fn load(config: &Config) -> Result<Router, Error> {
        require_root()?;
        let setup = Setup::load(config).await?;
        let table = table(&setup.router);
        let mut nft = Netfilter::open()?;
        let live = nft.read(Family::Inet, TABLE)?;
        let sysctls = forwarding::Sysctls::new();
        let r = &setup.router;
        let plan = Plan {
            netfilter: netfilter::diff(&table, live.as_ref()),
            forwarding: sysctls.diff([r.inside.as_str(), r.outside.as_str()])?,
        };
        Ok(Router {
            setup,
            table,
            nft,
            sysctls,
            plan,
        })
    }

    /// Makes the plan true: the filter and NAT table first (in one transaction), so that
    /// forwarding is never on without it; then forwarding, after recording what it was.
    pub async fn apply(&mut self) -> Result<(), Error> {
        if !self.plan.netfilter.is_empty() {
            self.nft.apply(&self.table)?;
        }
        if !self.plan.forwarding.is_empty() {
            let mut record = forwarding::Record::read(&self.setup.router.state_dir)?;
            for d in &self.plan.forwarding {
                record.remember(&d.interface, d.live);
            }
            record.save()?;
            for d in &self.plan.forwarding {
                self.sysctls.write(&d.interface, true)?;
            }
        }
        Ok(())
    }
}

/// Takes out what `apply` made: forwarding goes back to the values `apply` recorded (first,
/// so that nothing is forwarded unfiltered), then the table goes. Returns a line per change.
pub async fn remove(config: &Config) -> Result<Vec<String>, Error> {
    require_root()?;
    let router = router_of(config)?;
    let mut done = forwarding::restore(&forwarding::Sysctls::new(), &router.state_dir)?;
    let mut nft = Netfilter::open()?;
    if nft.delete(Family::Inet, TABLE)? {
        done.push(format!("deleted nftables table inet {TABLE}"));
    }
    Ok(done)
}

/// Removes `virtual_ip` and `public_ip` from this node's interfaces, where a killed keepalived
/// left them (a live keepalived removes them itself when it stops). For keepalived's unit, before
/// it starts and after it stops; never while keepalived runs.
pub async fn release(config: &Config) -> Result<Vec<String>, Error> {
    require_root()?;
    let r = router_of(config)?;
    let mut targets = vec![(r.inside.as_str(), *r.virtual_ip)];
    if let Some(public) = &r.public_ip {
        targets.push((r.outside.as_str(), public.value));
    }
    addresses::release(&targets).await
}

/// keepalived's `keepalived.conf` for this router.
pub async fn keepalived_config(config: &Config) -> Result<String, Error> {
    let setup = Setup::load(config).await?;
    let hook = if setup.router.sync {
        Some(keepalived::Hook::this_binary(&setup.path)?)
    } else {
        None
    };
    Ok(keepalived::config(&setup, hook.as_ref(), &hostname()))
}

/// conntrackd's `conntrackd.conf` for this router.
pub async fn conntrackd_config(config: &Config) -> Result<String, Error> {
    let setup = Setup::load(config).await?;
    conntrackd::config(&setup, &hostname())
}

/// keepalived's notify hook: hands connection state over on a VRRP state change, the way
/// conntrack-tools' primary-backup.sh does. Returns a line per conntrackd command.
pub fn notify(config: &Config, transition: Transition) -> Result<conntrackd::Report, Error> {
    require_root()?;
    let router = router_of(config)?;
    if !router.sync {
        return Err(Error::NoSync {
            path: config.path.clone(),
        });
    }
    Ok(conntrackd::notify(router, transition))
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "this router".to_owned())
}

/// Writes `text` to `path` atomically (a temporary file renamed over it), creating the
/// directory; for configs that daemons read.
pub fn write_file(path: &Path, text: &str) -> Result<(), Error> {
    let file_error = |source| Error::File {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(file_error)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text).map_err(|source| Error::File {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(file_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A router of the seed site, with two peers, for this module's tests and its submodules'.
    pub(super) const TOML: &str = r#"
[routing]
table = 201
table_name = "alinat"
mark = 0x1
mask = 0x1
priority = 1000
interface = "ib0"
gateway = "10.20.3.227"
protocols = ["tcp"]

[router]
inside = "ib0"
outside = "eth9"
virtual_ip = "10.20.3.227"
public_ip = "140.181.2.227"
priority = 150
peers = ["10.20.3.2", "10.20.3.3"]
advert_interval = 0.1
virtual_router_id = 51
"#;

    /// A generated config file's lines, trimmed, without blanks and comments.
    pub(super) fn body(text: &str) -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }

    pub(super) fn config(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/slurm-egress/config.toml")).unwrap()
    }

    pub(super) fn link(name: &str, addresses: &[&str]) -> Link {
        Link {
            index: 7,
            name: name.into(),
            up: true,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    pub(super) fn setup(text: &str) -> Setup {
        let c = config(text);
        let (ib0, eth9) = (
            link("ib0", &["10.20.3.1/16"]),
            link("eth9", &["140.181.2.1/24"]),
        );
        Setup::check(&c.path, c.router.as_ref().unwrap(), Some(&ib0), Some(&eth9)).unwrap()
    }

    fn error(text: &str, inside: Option<&[&str]>, outside: Option<&[&str]>) -> String {
        let c = config(text);
        let ib0 = inside.map(|a| link("ib0", a));
        let eth9 = outside.map(|a| link("eth9", a));
        Setup::check(
            &c.path,
            c.router.as_ref().unwrap(),
            ib0.as_ref(),
            eth9.as_ref(),
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn setup_finds_the_own_addresses_and_ignores_held_floating_ones() {
        let s = setup(TOML);
        assert_eq!(s.inside_addr, Ipv4Addr::new(10, 20, 3, 1));
        assert_eq!(s.outside_addrs, [Ipv4Addr::new(140, 181, 2, 1)]);
        // The master holds both floating addresses as /32s: still the same router.
        let c = config(TOML);
        let ib0 = link("ib0", &["10.20.3.227/32", "10.20.3.1/16"]);
        let eth9 = link("eth9", &["140.181.2.1/24", "140.181.2.227/32"]);
        let s = Setup::check(&c.path, c.router.as_ref().unwrap(), Some(&ib0), Some(&eth9)).unwrap();
        assert_eq!(s.inside_addr, Ipv4Addr::new(10, 20, 3, 1));
        assert_eq!(s.outside_addrs, [Ipv4Addr::new(140, 181, 2, 1)]);
    }

    #[test]
    fn machine_errors_name_the_key_and_line() {
        let ok_in: &[&str] = &["10.20.3.1/16"];
        let ok_out: &[&str] = &["140.181.2.1/24"];
        type Addresses<'a> = Option<&'a [&'a str]>;
        let cases: [(&str, Addresses, Addresses, &str); 9] = [
            (
                TOML,
                None,
                Some(ok_out),
                ":13:10: router.inside: no interface \"ib0\" in this network namespace",
            ),
            (
                TOML,
                Some(ok_in),
                None,
                ":14:11: router.outside: no interface \"eth9\" in this network namespace",
            ),
            (
                TOML,
                Some(&["10.30.3.1/16"]),
                Some(ok_out),
                ":15:14: router.virtual_ip: 10.20.3.227 is not in a subnet of ib0 \
                 (its addresses: 10.30.3.1/16)",
            ),
            (
                TOML,
                Some(&[]),
                Some(ok_out),
                "router.virtual_ip: 10.20.3.227 is not in a subnet of ib0 (its addresses: none)",
            ),
            (
                TOML,
                Some(&["10.20.3.227/16"]),
                Some(ok_out),
                "router.virtual_ip: 10.20.3.227 is ib0's own address",
            ),
            (
                TOML,
                Some(&["10.20.3.2/16"]),
                Some(ok_out),
                ":18:10: router.peers: 10.20.3.2 is this router's own address",
            ),
            (
                TOML,
                Some(&["10.20.3.225/29"]),
                Some(ok_out),
                ":18:10: router.peers: 10.20.3.2 is not in 10.20.3.224/29, the subnet of ib0",
            ),
            (
                TOML,
                Some(ok_in),
                Some(&["140.181.60.1/24"]),
                ":16:13: router.public_ip: 140.181.2.227 is not in a subnet of eth9",
            ),
            (
                &TOML.replace("public_ip = \"140.181.2.227\"\n", ""),
                Some(ok_in),
                Some(&[]),
                "router.outside: eth9 has no IPv4 address to masquerade to",
            ),
        ];
        for (text, inside, outside, want) in cases {
            let e = error(text, inside, outside);
            assert!(e.contains(want), "{inside:?} {outside:?}: {e}");
            assert!(e.starts_with("/etc/slurm-egress/config.toml:"), "{e}");
        }
        let ib0 = link("ib0", &["10.20.3.1/16"]);
        let c = config(TOML);
        let e = Setup::check(
            &c.path,
            c.router.as_ref().unwrap(),
            Some(&ib0),
            Some(&link("eth9", &["140.181.2.227/24"])),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("router.public_ip: 140.181.2.227 is eth9's own address"),
            "{e}"
        );
    }

    #[test]
    fn a_worker_config_is_not_a_router_config() {
        let worker = &TOML[..TOML.find("[router]").unwrap()];
        let e = router_of(&config(worker)).unwrap_err().to_string();
        assert_eq!(
            e,
            "/etc/slurm-egress/config.toml: no [router] section: this is not a NAT router's config"
        );
    }

    #[test]
    fn the_shipped_example_is_a_router_config() {
        let c = config(include_str!("../../slurm/router/config.toml.example"));
        let r = c.router.unwrap();
        assert_eq!((r.inside.as_str(), r.outside.as_str()), ("ib0", "eth9"));
        assert_eq!(
            r.public_ip.map(|p| p.value),
            Some(Ipv4Addr::new(140, 181, 2, 227))
        );
        assert_eq!((r.priority, r.peers.len(), r.sync), (150, 2, true));
        assert_eq!(c.routing.gateway.value, r.virtual_ip.value);
    }

    /// The notify hook finds conntrackd through <state_dir>/conntrackd.conf: the units must
    /// write and use exactly that file, under the default state_dir.
    #[test]
    fn the_shipped_units_agree_with_the_notify_hook() {
        let dir = Path::new(config::DEFAULT_ROUTER_STATE_DIR);
        let conf = conntrackd::config_path(dir);
        let conntrackd = include_str!("../../slurm/router/slurm-egress-conntrackd.service");
        for want in [
            format!("conntrackd-config --output {}\n", conf.display()),
            format!("ExecStart=/usr/sbin/conntrackd -C {}\n", conf.display()),
            format!("rm -f {}/conntrackd.lock\n", dir.display()),
        ] {
            assert!(conntrackd.contains(&want), "{want}");
        }
        let keepalived = include_str!("../../slurm/router/slurm-egress-keepalived.service");
        for want in [
            "ExecStartPre=/usr/sbin/slurm-egress router release\n",
            "ExecStopPost=/usr/sbin/slurm-egress router release\n",
            "Requires=slurm-egress-router.service\n",
        ] {
            assert!(keepalived.contains(want), "{want}");
        }
        let router = include_str!("../../slurm/router/slurm-egress-router.service");
        assert!(router.contains("ExecStart=/usr/sbin/slurm-egress router apply\n"));
        assert!(router.contains("ExecStop=/usr/sbin/slurm-egress router remove\n"));
    }
}
