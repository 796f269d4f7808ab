//! The site configuration: one TOML file, parsed strictly and checked before anything is
//! touched.
//!
//! Parsing is pure (no NSS, no kernel): what can be judged from the text alone is judged here,
//! with the file, line and key of every mistake. What needs the machine (do the users exist, is
//! the interface there, is the gateway on its subnet) is judged by the modules that own those
//! facts, using the [`Location`]s kept here so their errors point at the same line.

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Deserialize;
use serde::de::{self, Deserializer};
use toml::Spanned;

/// Where `slurm-egress` and the plugin look when no path is given.
pub const DEFAULT_PATH: &str = "/etc/slurm-egress/config.toml";

/// Where the job ledger lives unless `[jobs] state_dir` says otherwise: on tmpfs, so it is
/// empty after a reboot, exactly like the nftables sets it mirrors.
pub const DEFAULT_STATE_DIR: &str = "/run/slurm-egress";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, unknown keys and values of the wrong shape; toml's message already names
    /// the line and column.
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}:{at}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        at: Location,
        key: &'static str,
        message: String,
    },
}

/// A position in the config file, 1-based, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A value together with where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub at: Location,
}

impl<T> Deref for Located<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, for error messages downstream.
    pub path: PathBuf,
    pub routing: Routing,
    pub select: Select,
    pub jobs: Jobs,
    /// The NAT router role (`[router]`); `None` on a worker, where `router` commands refuse.
    pub router: Option<Router>,
}

#[derive(Debug, Clone)]
pub struct Routing {
    pub table: u32,
    pub table_name: String,
    pub mark: u32,
    pub mask: u32,
    pub priority: u32,
    pub interface: Located<String>,
    pub gateway: Located<Ipv4Addr>,
    pub protocols: Protocols,
    pub exceptions: Vec<Exception>,
}

/// Which packets of a selected socket take the egress path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocols {
    All,
    /// IP protocol numbers, sorted, without duplicates.
    Only(Vec<Protocol>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
}

impl Protocol {
    /// The IP protocol number, as `meta l4proto` sees it.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Icmp => 1,
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

/// A destination that selected processes still reach the normal way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exception {
    pub to: Ipv4Net,
    /// `None`: on-link through the routing interface.
    pub via: Option<Ipv4Addr>,
    pub at: Location,
}

/// A user or group as written: a name to resolve through NSS, or a numeric id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Principal {
    Id(u32),
    Name(String),
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::Id(id) => write!(f, "{id}"),
            Principal::Name(name) => f.write_str(name),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Select {
    pub users: Vec<Located<Principal>>,
    pub groups: Vec<Located<Principal>>,
    pub accounts: Vec<String>,
    pub by: By,
}

/// What the node marks for a selected job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum By {
    /// The job owner's uid: every process of that user on the node, while the job runs
    /// (and, for `users`/`groups`, always).
    #[default]
    Uid,
    /// The job's cgroup v2: exactly the processes of the selected jobs. `parent` is where the
    /// plugin makes a cgroup per job when Slurm gives jobs none in the cgroup v2 hierarchy,
    /// relative to its root, without leading or trailing `/` (`slurm-egress`).
    Cgroup { parent: String },
}

/// Where per-job cgroups go unless `select.cgroup_parent` says otherwise.
pub const DEFAULT_CGROUP_PARENT: &str = "slurm-egress";

#[derive(Debug, Clone)]
pub struct Jobs {
    pub on_error: OnError,
    pub state_dir: PathBuf,
}

/// What the plugin does when it cannot give a selected job its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Fail the prolog: Slurm drains the node and requeues the job, as for any failed prolog.
    Drain,
    /// Log and let the job run without egress.
    Continue,
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks `text`; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let raw: raw::File = toml::from_str(text).map_err(|e| Error::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let lines = LineIndex::new(text);
        let invalid =
            |span: std::ops::Range<usize>, key: &'static str, message: String| Error::Invalid {
                path: path.to_owned(),
                at: lines.locate(span.start),
                key,
                message,
            };
        let locate = |span: std::ops::Range<usize>| lines.locate(span.start);

        let r = raw.routing;
        let table = *r.table.get_ref();
        if matches!(table, 0 | 253..=255) || table > i32::MAX as u32 {
            return Err(invalid(
                r.table.span(),
                "routing.table",
                format!(
                    "{table} is reserved (0, 253 default, 254 main, 255 local); use 1-252 or 256 and up"
                ),
            ));
        }
        let name = r.table_name.get_ref();
        if name.is_empty()
            || name.len() > 64
            || name.starts_with(|c: char| c.is_ascii_digit())
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(invalid(
                r.table_name.span(),
                "routing.table_name",
                format!(
                    "{name:?} is not a usable routing table name (letters, digits, '_', '-', '.'; not starting with a digit)"
                ),
            ));
        }
        if matches!(
            name.as_str(),
            "main" | "local" | "default" | "unspec" | "all"
        ) {
            return Err(invalid(
                r.table_name.span(),
                "routing.table_name",
                format!("{name:?} is one of iproute2's reserved table names"),
            ));
        }
        let mask = *r.mask.get_ref();
        let mark = *r.mark.get_ref();
        if mask == 0 {
            return Err(invalid(
                r.mask.span(),
                "routing.mask",
                "must have at least one bit set".into(),
            ));
        }
        if mark == 0 {
            return Err(invalid(
                r.mark.span(),
                "routing.mark",
                "must not be 0: unmarked packets carry 0".into(),
            ));
        }
        if mark & !mask != 0 {
            return Err(invalid(
                r.mark.span(),
                "routing.mark",
                format!("{mark:#x} has bits outside mask {mask:#x}"),
            ));
        }
        let priority = *r.priority.get_ref();
        if !(1..=32765).contains(&priority) {
            return Err(invalid(
                r.priority.span(),
                "routing.priority",
                format!(
                    "{priority} must be between 1 and 32765 (0 is the local rule, 32766 main, 32767 default)"
                ),
            ));
        }
        let interface = r.interface.get_ref();
        if interface.is_empty()
            || interface.len() > 15
            || interface.contains(|c: char| c == '/' || c.is_whitespace())
        {
            return Err(invalid(
                r.interface.span(),
                "routing.interface",
                format!("{interface:?} is not a valid interface name"),
            ));
        }
        let protocols = {
            let span = r.protocols.span();
            let list = r.protocols.into_inner();
            if list.is_empty() {
                return Err(invalid(
                    span,
                    "routing.protocols",
                    "must name at least one of \"tcp\", \"udp\", \"icmp\", or be [\"all\"]".into(),
                ));
            }
            if list.contains(&raw::Protocol::All) {
                if list.len() > 1 {
                    return Err(invalid(
                        span,
                        "routing.protocols",
                        "\"all\" cannot be combined with other protocols".into(),
                    ));
                }
                Protocols::All
            } else {
                let mut only: Vec<Protocol> = list
                    .into_iter()
                    .map(|p| match p {
                        raw::Protocol::Tcp => Protocol::Tcp,
                        raw::Protocol::Udp => Protocol::Udp,
                        raw::Protocol::Icmp => Protocol::Icmp,
                        raw::Protocol::All => unreachable!("handled above"),
                    })
                    .collect();
                only.sort();
                only.dedup();
                Protocols::Only(only)
            }
        };
        let mut exceptions: Vec<Exception> = Vec::new();
        for e in r.exceptions {
            let span = e.span();
            let e = e.into_inner();
            let to = e.to.into_inner().0;
            if to.prefix_len() == 0 {
                return Err(invalid(
                    span,
                    "routing.exceptions",
                    format!("{to}: an exception cannot be the default route"),
                ));
            }
            if let Some(other) = exceptions.iter().find(|x| x.to == to) {
                return Err(invalid(
                    span,
                    "routing.exceptions",
                    format!("{to} is listed twice (first at line {})", other.at.line),
                ));
            }
            exceptions.push(Exception {
                to,
                via: e.via.map(|v| v.into_inner()),
                at: locate(span),
            });
        }

        let s = raw.select.unwrap_or_default();
        let locate_all = |list: Vec<Spanned<Principal>>| -> Vec<Located<Principal>> {
            list.into_iter()
                .map(|p| Located {
                    at: locate(p.span()),
                    value: p.into_inner(),
                })
                .collect()
        };
        for account in &s.accounts {
            let value = account.get_ref();
            if value.is_empty() || value.contains(|c: char| c.is_whitespace() || c == ',') {
                return Err(invalid(
                    account.span(),
                    "select.accounts",
                    format!("{value:?} is not a Slurm account name"),
                ));
            }
        }
        let by = match (s.by.as_ref().map(|b| b.get_ref().as_str()), s.cgroup_parent) {
            (None | Some("uid"), None) => By::Uid,
            (None | Some("uid"), Some(parent)) => {
                return Err(invalid(
                    parent.span(),
                    "select.cgroup_parent",
                    "only used with by = \"cgroup\"".to_owned(),
                ));
            }
            (Some("cgroup"), parent) => By::Cgroup {
                parent: match parent {
                    None => DEFAULT_CGROUP_PARENT.to_owned(),
                    Some(p) => cgroup_parent(p.get_ref())
                        .map_err(|m| invalid(p.span(), "select.cgroup_parent", m.to_owned()))?,
                },
            },
            (Some(other), _) => {
                let span = s.by.as_ref().map(|b| b.span()).unwrap_or_default();
                return Err(invalid(
                    span,
                    "select.by",
                    format!("{other:?} is neither \"uid\" nor \"cgroup\""),
                ));
            }
        };
        let select = Select {
            by,
            users: locate_all(s.users),
            groups: locate_all(s.groups),
            accounts: s
                .accounts
                .into_iter()
                .map(|a| a.into_inner().to_lowercase())
                .collect(),
        };

        let j = raw.jobs.unwrap_or_default();
        let state_dir = state_dir(j.state_dir, DEFAULT_STATE_DIR, "jobs.state_dir", &invalid)?;

        let router = match raw.router {
            Some(r) => Some(parse_router(r, invalid, locate)?),
            None => None,
        };

        Ok(Config {
            path: path.to_owned(),
            routing: Routing {
                table,
                table_name: r.table_name.into_inner(),
                mark,
                mask,
                priority,
                interface: Located {
                    at: locate(r.interface.span()),
                    value: r.interface.into_inner(),
                },
                gateway: Located {
                    at: locate(r.gateway.span()),
                    value: r.gateway.into_inner(),
                },
                protocols,
                exceptions,
            },
            select,
            jobs: Jobs {
                on_error: j.on_error.unwrap_or(OnError::Drain),
                state_dir,
            },
            router,
        })
    }

    /// Is this Slurm account one whose jobs are selected? Slurm stores accounts in lower case.
    pub fn selects_account(&self, account: &str) -> bool {
        self.select
            .accounts
            .iter()
            .any(|a| a.eq_ignore_ascii_case(account))
    }
}

/// A `cgroup_parent` as written, checked: a path below the cgroup v2 root, made of plain names.
fn cgroup_parent(written: &str) -> Result<String, &'static str> {
    let parent = written.trim_matches('/');
    let plain = |c: &str| {
        !c.is_empty() && c != "." && c != ".." && !c.starts_with("cgroup.") && !c.contains('\n')
    };
    if parent.is_empty() || !parent.split('/').all(plain) {
        return Err(
            "a path below the cgroup v2 root, like \"slurm-egress\" (no \"..\", not the root)",
        );
    }
    Ok(parent.to_owned())
}

// ---- [router]: the NAT router role (`slurm-egress router ...`) -------------------------------

/// Where a router keeps its runtime files unless `[router] state_dir` says otherwise: the
/// forwarding values `router apply` found, and the conntrackd config, socket and lock the
/// shipped units and the keepalived notify hook agree on. On tmpfs, like what it describes.
pub const DEFAULT_ROUTER_STATE_DIR: &str = "/run/slurm-egress/router";

/// The router role as written. What needs the machine (do the interfaces exist, is the virtual
/// IP on the inside subnet) is judged by [`crate::router`], using these locations.
#[derive(Debug, Clone)]
pub struct Router {
    /// The fabric side: the workers and the other routers.
    pub inside: Located<String>,
    /// The public side.
    pub outside: Located<String>,
    /// The workers' `routing.gateway`, held by the VRRP master.
    pub virtual_ip: Located<Ipv4Addr>,
    /// The floating address on `outside` that forwarded connections are SNATed to, held by the
    /// master too; `None`: masquerade to the router's own outside address.
    pub public_ip: Option<Located<Ipv4Addr>>,
    /// This router's VRRP priority, 1-254: the highest live router becomes master.
    pub priority: u8,
    /// The other routers' inside addresses.
    pub peers: Vec<Located<Ipv4Addr>>,
    /// The VRRP advertisement interval in centiseconds (VRRPv3's unit).
    pub advert_centis: u16,
    pub virtual_router_id: u8,
    /// Synchronise connection state with conntrackd.
    pub sync: bool,
    pub state_dir: PathBuf,
}

impl Router {
    /// The advertisement interval in seconds, as keepalived's `advert_int` takes it.
    pub fn advert_seconds(&self) -> String {
        let (s, c) = (self.advert_centis / 100, self.advert_centis % 100);
        match c {
            0 => s.to_string(),
            c if c % 10 == 0 => format!("{s}.{}", c / 10),
            c => format!("{s}.{c:02}"),
        }
    }
}

/// A name the kernel could give an interface (and that is safe in a /proc path).
fn interface_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
}

fn is_unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast())
}

/// `invalid` and `located` are [`Config::parse`]'s: an error at a span of the file, and the
/// place of a span.
fn parse_router(
    r: raw::RawRouter,
    invalid: impl Fn(std::ops::Range<usize>, &'static str, String) -> Error,
    located: impl Fn(std::ops::Range<usize>) -> Location,
) -> Result<Router, Error> {
    for (name, key) in [(&r.inside, "router.inside"), (&r.outside, "router.outside")] {
        if !interface_name_ok(name.get_ref()) {
            return Err(invalid(
                name.span(),
                key,
                format!("{:?} is not a valid interface name", name.get_ref()),
            ));
        }
    }
    if r.inside.get_ref() == r.outside.get_ref() {
        return Err(invalid(
            r.outside.span(),
            "router.outside",
            format!(
                "{:?} is also router.inside (line {}): a router forwards between two interfaces",
                r.outside.get_ref(),
                located(r.inside.span()).line
            ),
        ));
    }
    let vip = *r.virtual_ip.get_ref();
    if !is_unicast(vip) {
        return Err(invalid(
            r.virtual_ip.span(),
            "router.virtual_ip",
            format!("{vip} is not a unicast address"),
        ));
    }
    if let Some(public) = &r.public_ip {
        let ip = *public.get_ref();
        if !is_unicast(ip) || ip == vip {
            return Err(invalid(
                public.span(),
                "router.public_ip",
                if ip == vip {
                    format!("{ip} is also router.virtual_ip; the public address is on the outside")
                } else {
                    format!("{ip} is not a unicast address")
                },
            ));
        }
    }
    let priority = *r.priority.get_ref();
    if !(1..=254).contains(&priority) {
        return Err(invalid(
            r.priority.span(),
            "router.priority",
            format!(
                "{priority} is out of range: use 1 to 254 (255 means the address owner in VRRP)"
            ),
        ));
    }
    let mut peers: Vec<Located<Ipv4Addr>> = Vec::new();
    for peer in &r.peers {
        let ip = *peer.get_ref();
        let why = if !is_unicast(ip) {
            Some("is not a unicast address".to_owned())
        } else if ip == vip {
            Some("is the virtual IP, not a router's own address".to_owned())
        } else if r.public_ip.as_ref().is_some_and(|p| *p.get_ref() == ip) {
            Some("is router.public_ip, not a router's inside address".to_owned())
        } else {
            peers
                .iter()
                .find(|p| p.value == ip)
                .map(|p| format!("is listed twice (first at line {})", p.at.line))
        };
        if let Some(why) = why {
            return Err(invalid(peer.span(), "router.peers", format!("{ip} {why}")));
        }
        peers.push(Located {
            value: ip,
            at: located(peer.span()),
        });
    }
    let advert_centis = match &r.advert_interval {
        None => 100,
        Some(a) => {
            let seconds = a.get_ref().0;
            let centis = (seconds * 100.0).round();
            if !seconds.is_finite() || !(1.0..=4095.0).contains(&centis) {
                return Err(invalid(
                    a.span(),
                    "router.advert_interval",
                    format!("{seconds} s is out of range: VRRPv3 allows 0.01 to 40.95 s"),
                ));
            }
            if (seconds * 100.0 - centis).abs() > 1e-6 {
                return Err(invalid(
                    a.span(),
                    "router.advert_interval",
                    format!("{seconds} s is not a whole number of centiseconds (VRRPv3's unit)"),
                ));
            }
            centis as u16
        }
    };
    let vrid = *r.virtual_router_id.get_ref();
    if !(1..=255).contains(&vrid) {
        return Err(invalid(
            r.virtual_router_id.span(),
            "router.virtual_router_id",
            format!("{vrid} is out of range: use 1 to 255, the same on every router"),
        ));
    }
    let sync = match &r.sync {
        Some(s) if *s.get_ref() && peers.is_empty() => {
            return Err(invalid(
                s.span(),
                "router.sync",
                "there are no router.peers to synchronise connection state with".into(),
            ));
        }
        Some(s) => *s.get_ref(),
        None => !peers.is_empty(),
    };
    let state_dir = state_dir(
        r.state_dir.clone(),
        DEFAULT_ROUTER_STATE_DIR,
        "router.state_dir",
        &invalid,
    )?;
    Ok(Router {
        inside: Located {
            at: located(r.inside.span()),
            value: r.inside.into_inner(),
        },
        outside: Located {
            at: located(r.outside.span()),
            value: r.outside.into_inner(),
        },
        virtual_ip: Located {
            at: located(r.virtual_ip.span()),
            value: vip,
        },
        public_ip: r.public_ip.map(|p| Located {
            at: located(p.span()),
            value: p.into_inner(),
        }),
        priority: priority as u8,
        peers,
        advert_centis,
        virtual_router_id: vrid as u8,
        sync,
        state_dir,
    })
}

// ---- end of [router] -------------------------------------------------------------------------

/// A state directory as written, or `default`; it must be absolute (a relative one would
/// depend on the directory slurmd or systemd happened to start us in).
fn state_dir(
    written: Option<Spanned<String>>,
    default: &str,
    key: &'static str,
    invalid: &impl Fn(std::ops::Range<usize>, &'static str, String) -> Error,
) -> Result<PathBuf, Error> {
    let Some(dir) = written else {
        return Ok(PathBuf::from(default));
    };
    let value = PathBuf::from(dir.get_ref());
    if !value.is_absolute() {
        return Err(invalid(
            dir.span(),
            key,
            format!("{} must be an absolute path", value.display()),
        ));
    }
    Ok(value)
}

/// Byte offsets to line and column.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex { starts }
    }

    fn locate(&self, offset: usize) -> Location {
        let line = self.starts.partition_point(|&s| s <= offset);
        Location {
            line,
            column: offset - self.starts[line - 1] + 1,
        }
    }
}

/// The file's shape, as serde sees it. Unknown keys are errors: a typo must not silently
/// become a default.
mod raw {
    use super::*;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub routing: RawRouting,
        pub select: Option<RawSelect>,
        pub jobs: Option<RawJobs>,
        pub router: Option<RawRouter>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RawRouting {
        pub table: Spanned<u32>,
        pub table_name: Spanned<String>,
        pub mark: Spanned<u32>,
        pub mask: Spanned<u32>,
        pub priority: Spanned<u32>,
        pub interface: Spanned<String>,
        pub gateway: Spanned<Ipv4Addr>,
        pub protocols: Spanned<Vec<Protocol>>,
        #[serde(default)]
        pub exceptions: Vec<Spanned<RawException>>,
    }

    #[derive(Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "lowercase")]
    pub enum Protocol {
        Tcp,
        Udp,
        Icmp,
        All,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RawException {
        pub to: Spanned<Cidr>,
        pub via: Option<Spanned<Ipv4Addr>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct RawSelect {
        #[serde(default)]
        pub users: Vec<Spanned<Principal>>,
        #[serde(default)]
        pub groups: Vec<Spanned<Principal>>,
        #[serde(default)]
        pub accounts: Vec<Spanned<String>>,
        pub by: Option<Spanned<String>>,
        pub cgroup_parent: Option<Spanned<String>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct RawJobs {
        pub on_error: Option<OnError>,
        pub state_dir: Option<Spanned<String>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RawRouter {
        pub inside: Spanned<String>,
        pub outside: Spanned<String>,
        pub virtual_ip: Spanned<Ipv4Addr>,
        pub public_ip: Option<Spanned<Ipv4Addr>>,
        pub priority: Spanned<i64>,
        #[serde(default)]
        pub peers: Vec<Spanned<Ipv4Addr>>,
        pub advert_interval: Option<Spanned<Seconds>>,
        pub virtual_router_id: Spanned<i64>,
        pub sync: Option<Spanned<bool>>,
        pub state_dir: Option<Spanned<String>>,
    }

    /// A duration in seconds, written as an integer (`1`) or a float (`0.1`).
    pub struct Seconds(pub f64);

    impl<'de> Deserialize<'de> for Seconds {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl de::Visitor<'_> for Visitor {
                type Value = Seconds;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a number of seconds, like 1 or 0.1")
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seconds, E> {
                    Ok(Seconds(v as f64))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seconds, E> {
                    Ok(Seconds(v as f64))
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Seconds, E> {
                    Ok(Seconds(v))
                }
            }
            d.deserialize_any(Visitor)
        }
    }

    /// An IPv4 network written with its prefix length and no host bits: `10.20.1.5/16` is
    /// refused rather than silently widened, because it is usually a typo.
    pub struct Cidr(pub Ipv4Net);

    impl<'de> Deserialize<'de> for Cidr {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let text = String::deserialize(d)?;
            let net: Ipv4Net = if text.contains('/') {
                text.parse().map_err(|_| {
                    de::Error::custom(format!("{text:?} is not an IPv4 network like 10.20.0.0/16"))
                })?
            } else {
                let addr: Ipv4Addr = text.parse().map_err(|_| {
                    de::Error::custom(format!("{text:?} is not an IPv4 network like 10.20.0.0/16"))
                })?;
                Ipv4Net::from(addr)
            };
            if net.trunc() != net {
                return Err(de::Error::custom(format!(
                    "{text:?} has host bits set; did you mean {}?",
                    net.trunc()
                )));
            }
            Ok(Cidr(net))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed site's configuration, exactly as the issue writes it.
    pub const SEED: &str = r#"
[routing]
table = 201                 # routing table id
table_name = "alinat"       # so that `ip route show table alinat` works
mark = 0x1                  # fwmark put on selected packets
mask = 0x1                  # the bits of the mark that belong to us
priority = 1000             # ip rule priority
interface = "ib0"
gateway = "10.20.3.227"     # the NAT routers' virtual IP
protocols = ["tcp"]         # any of "tcp", "udp", "icmp"; or ["all"]
# destinations that selected processes still reach the normal way
exceptions = [
  { to = "10.20.0.0/16" },                        # on-link, through `interface`
  { to = "10.10.24.0/24", via = "10.20.0.1" },
  { to = "140.181.2.0/24", via = "10.20.0.1" },
  { to = "140.181.60.0/24", via = "10.20.0.1" },
]

[select]
users = ["aliprod", "alise", "rgrosso"]   # names or numeric uids; always selected
groups = ["alice"]                         # members always selected, primary or supplementary
accounts = ["alice"]                       # Slurm accounts: their jobs, while they run (plugin issue)
"#;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(text, Path::new("/etc/slurm-egress/config.toml"))
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    fn seed_with(from: &str, to: &str) -> String {
        assert!(SEED.contains(from), "{from:?} not in the seed config");
        SEED.replacen(from, to, 1)
    }

    #[test]
    fn seed_config_is_accepted_as_written() {
        let c = parse(SEED).unwrap();
        let r = &c.routing;
        assert_eq!((r.table, r.table_name.as_str()), (201, "alinat"));
        assert_eq!((r.mark, r.mask, r.priority), (1, 1, 1000));
        assert_eq!(r.interface.value, "ib0");
        assert_eq!(r.interface.at.line, 8);
        assert_eq!(r.gateway.value, Ipv4Addr::new(10, 20, 3, 227));
        assert_eq!(r.protocols, Protocols::Only(vec![Protocol::Tcp]));
        let exceptions: Vec<(String, Option<Ipv4Addr>)> = r
            .exceptions
            .iter()
            .map(|e| (e.to.to_string(), e.via))
            .collect();
        let via = Some(Ipv4Addr::new(10, 20, 0, 1));
        assert_eq!(
            exceptions,
            [
                ("10.20.0.0/16".to_string(), None),
                ("10.10.24.0/24".to_string(), via),
                ("140.181.2.0/24".to_string(), via),
                ("140.181.60.0/24".to_string(), via),
            ]
        );
        let users: Vec<String> = c.select.users.iter().map(|u| u.to_string()).collect();
        assert_eq!(users, ["aliprod", "alise", "rgrosso"]);
        assert_eq!(c.select.users[2].at.line, 20);
        assert_eq!(c.select.groups[0].value, Principal::Name("alice".into()));
        assert!(c.selects_account("alice") && c.selects_account("ALICE"));
        assert!(!c.selects_account("alice2"));
        assert_eq!(c.jobs.on_error, OnError::Drain);
        assert_eq!(c.jobs.state_dir, Path::new(DEFAULT_STATE_DIR));
    }

    #[test]
    fn numeric_ids_and_optional_sections() {
        let c = parse(
            r#"
[routing]
table = 300
table_name = "egress"
mark = 0x100
mask = 0xff00
priority = 900
interface = "eth0"
gateway = "10.20.0.1"
protocols = ["udp", "tcp", "udp", "icmp"]
[select]
users = [1001, "bob"]
groups = [2000]
[jobs]
on_error = "continue"
state_dir = "/run/egress-test"
"#,
        )
        .unwrap();
        assert_eq!(
            c.routing.protocols,
            Protocols::Only(vec![Protocol::Tcp, Protocol::Udp, Protocol::Icmp])
        );
        assert_eq!(c.routing.exceptions, []);
        assert_eq!(c.select.users[0].value, Principal::Id(1001));
        assert_eq!(c.select.users[1].value, Principal::Name("bob".into()));
        assert_eq!(c.jobs.on_error, OnError::Continue);
        assert_eq!(c.jobs.state_dir, Path::new("/run/egress-test"));
        let all = parse(&seed_with(r#"["tcp"]"#, r#"["all"]"#)).unwrap();
        assert_eq!(all.routing.protocols, Protocols::All);
    }

    #[test]
    fn typo_in_a_key_names_the_key_and_line() {
        let e = error(&seed_with("priority = 1000", "priorty = 1000"));
        assert!(e.contains("unknown field `priorty`"), "{e}");
        assert!(e.contains("line 7"), "{e}");
        let e = error(&seed_with("[select]", "[selekt]"));
        assert!(e.contains("selekt") && e.contains("line 19"), "{e}");
    }

    #[test]
    fn bad_cidr_names_the_value_and_line() {
        let e = error(&seed_with("10.10.24.0/24", "10.10.24.0/33"));
        assert!(
            e.contains("\"10.10.24.0/33\" is not an IPv4 network"),
            "{e}"
        );
        assert!(e.contains("line 14"), "{e}");
        let e = error(&seed_with("10.10.24.0/24", "10.10.24.7/24"));
        assert!(
            e.contains("host bits set; did you mean 10.10.24.0/24"),
            "{e}"
        );
        let e = error(&seed_with(
            r#"via = "10.20.0.1" },"#,
            r#"via = "10.20.0" },"#,
        ));
        assert!(
            e.contains("line 14") && e.contains("invalid IPv4 address"),
            "{e}"
        );
    }

    #[test]
    fn mark_outside_mask_is_refused() {
        let e = error(&seed_with("mark = 0x1 ", "mark = 0x3 "));
        assert_eq!(
            e,
            "/etc/slurm-egress/config.toml:5:8: routing.mark: 0x3 has bits outside mask 0x1"
        );
        let e = error(&seed_with("mask = 0x1 ", "mask = 0x0 "));
        assert!(e.contains(":6:8: routing.mask"), "{e}");
        let e = error(&seed_with("mark = 0x1 ", "mark = 0 "));
        assert!(e.contains("routing.mark: must not be 0"), "{e}");
    }

    #[test]
    fn other_value_errors_name_their_key() {
        for (from, to, key, line) in [
            ("table = 201", "table = 254", "routing.table", 3),
            ("\"alinat\"", "\"main\"", "routing.table_name", 4),
            ("\"alinat\"", "\"ali nat\"", "routing.table_name", 4),
            ("priority = 1000", "priority = 0", "routing.priority", 7),
            ("priority = 1000", "priority = 40000", "routing.priority", 7),
            (
                "\"ib0\"",
                "\"an-interface-name-too-long\"",
                "routing.interface",
                8,
            ),
            (r#"["tcp"]"#, "[]", "routing.protocols", 10),
            (r#"["tcp"]"#, r#"["all", "tcp"]"#, "routing.protocols", 10),
            (
                "{ to = \"10.20.0.0/16\" },",
                "{ to = \"10.10.24.0/24\" },",
                "routing.exceptions",
                14,
            ),
            (
                "accounts = [\"alice\"]",
                "accounts = [\"a b\"]",
                "select.accounts",
                22,
            ),
            (
                "accounts = [\"alice\"]",
                "accounts = [\"alice\"]\nby = \"gid\"",
                "select.by",
                23,
            ),
            (
                "accounts = [\"alice\"]",
                "accounts = [\"alice\"]\ncgroup_parent = \"x\"",
                "select.cgroup_parent",
                23,
            ),
            (
                "accounts = [\"alice\"]",
                "accounts = [\"alice\"]\nby = \"cgroup\"\ncgroup_parent = \"a/../b\"",
                "select.cgroup_parent",
                24,
            ),
            (
                "accounts = [\"alice\"]",
                "accounts = [\"alice\"]\nby = \"cgroup\"\ncgroup_parent = \"/\"",
                "select.cgroup_parent",
                24,
            ),
        ] {
            let e = error(&seed_with(from, to));
            assert!(
                e.starts_with(&format!("/etc/slurm-egress/config.toml:{line}:")),
                "{from} -> {to}: {e}"
            );
            assert!(e.contains(&format!(": {key}: ")), "{from} -> {to}: {e}");
        }
    }

    #[test]
    fn select_by_cgroup() {
        assert_eq!(parse(SEED).unwrap().select.by, By::Uid);
        let with = |extra: &str| {
            parse(&seed_with(
                "accounts = [\"alice\"]",
                &format!("accounts = [\"alice\"]\n{extra}"),
            ))
            .unwrap()
            .select
            .by
        };
        assert_eq!(
            with("by = \"cgroup\""),
            By::Cgroup {
                parent: DEFAULT_CGROUP_PARENT.into()
            }
        );
        assert_eq!(
            with("by = \"cgroup\"\ncgroup_parent = \"/site/egress/\""),
            By::Cgroup {
                parent: "site/egress".into()
            }
        );
        assert_eq!(with("by = \"uid\""), By::Uid);
    }

    #[test]
    fn wrong_types_and_missing_keys_are_refused() {
        let e = error(&seed_with(r#"["tcp"]"#, r#"["sctp"]"#));
        assert!(e.contains("line 10") && e.contains("sctp"), "{e}");
        let e = error(&seed_with("gateway = \"10.20.3.227\"", "gateway = \"vip\""));
        assert!(e.contains("line 9"), "{e}");
        let e = error(&seed_with("table = 201 ", ""));
        assert!(e.contains("missing field `table`"), "{e}");
        let e = error(&seed_with(
            r#"users = ["aliprod""#,
            r#"users = [-1, "aliprod""#,
        ));
        assert!(e.contains("line 20"), "{e}");
        let e = error("[jobs]\non_error = \"ignore\"\n");
        assert!(e.contains("ignore") || e.contains("routing"), "{e}");
        let e = error(&format!("{SEED}\n[jobs]\nstate_dir = \"run/x\"\n"));
        assert!(
            e.contains("jobs.state_dir: run/x must be an absolute path"),
            "{e}"
        );
    }

    #[test]
    fn unreadable_file_names_the_path() {
        let e = Config::load(Path::new("/nonexistent/slurm-egress.toml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read config /nonexistent/slurm-egress.toml: "),
            "{e}"
        );
    }

    // ---- [router] ----

    /// The router section as the issue writes it, after the seed site's worker sections.
    const ROUTER: &str = r#"
[router]
inside = "ib0"                      # fabric side: the workers and the other routers
outside = "eth9"                    # public side
virtual_ip = "10.20.3.227"          # the workers' routing.gateway; must be in inside's subnet
public_ip = "140.181.2.227"         # optional floating SNAT address on outside; masquerade if absent
priority = 150                      # this router's VRRP priority, 1..=254
peers = ["10.20.3.1", "10.20.3.2"]  # the other routers' inside addresses (unicast VRRP, conntrackd)
advert_interval = 1.0               # seconds, sub-second allowed
virtual_router_id = 51              # 1..=255, the same on every router
sync = true                         # synchronise connection state with conntrackd
"#;

    fn router_with(from: &str, to: &str) -> String {
        assert!(ROUTER.contains(from), "{from:?} not in the router section");
        format!("{SEED}{}", ROUTER.replacen(from, to, 1))
    }

    #[test]
    fn router_section_is_accepted_as_written() {
        assert!(parse(SEED).unwrap().router.is_none());
        let c = parse(&format!("{SEED}{ROUTER}")).unwrap();
        let r = c.router.unwrap();
        let first = SEED.lines().count() + 1; // the blank line that starts ROUTER
        assert_eq!((r.inside.as_str(), r.outside.as_str()), ("ib0", "eth9"));
        assert_eq!(r.inside.at.line, first + 2);
        assert_eq!(*r.virtual_ip, Ipv4Addr::new(10, 20, 3, 227));
        assert_eq!(
            r.public_ip.as_ref().map(|p| p.value),
            Some(Ipv4Addr::new(140, 181, 2, 227))
        );
        assert_eq!((r.priority, r.virtual_router_id), (150, 51));
        let peers: Vec<Ipv4Addr> = r.peers.iter().map(|p| p.value).collect();
        assert_eq!(
            peers,
            [Ipv4Addr::new(10, 20, 3, 1), Ipv4Addr::new(10, 20, 3, 2)]
        );
        assert_eq!(r.peers[1].at.line, first + 7);
        assert_eq!((r.advert_centis, r.advert_seconds().as_str()), (100, "1"));
        assert!(r.sync);
        assert_eq!(r.state_dir, Path::new(DEFAULT_ROUTER_STATE_DIR));
    }

    #[test]
    fn router_defaults_and_intervals() {
        let minimal = "[router]\ninside = \"ib0\"\noutside = \"eth9\"\n\
                       virtual_ip = \"10.20.3.227\"\npriority = 100\nvirtual_router_id = 7\n";
        let r = parse(&format!("{SEED}{minimal}")).unwrap().router.unwrap();
        assert!(r.public_ip.is_none() && r.peers.is_empty());
        assert_eq!(r.advert_centis, 100);
        assert!(!r.sync, "no peers: nothing to synchronise with");
        let r = parse(&format!(
            "{SEED}{minimal}peers = [\"10.20.3.2\"]\nstate_dir = \"/run/x\"\n"
        ))
        .unwrap()
        .router
        .unwrap();
        assert!(r.sync, "sync is on by default when there are peers");
        assert_eq!(r.state_dir, Path::new("/run/x"));
        for (written, centis, seconds) in [
            ("0.1", 10, "0.1"),
            ("1", 100, "1"),
            ("0.05", 5, "0.05"),
            ("2.5", 250, "2.5"),
            ("40.95", 4095, "40.95"),
        ] {
            let text = router_with(
                "advert_interval = 1.0",
                &format!("advert_interval = {written}"),
            );
            let r = parse(&text).unwrap().router.unwrap();
            assert_eq!(
                (r.advert_centis, r.advert_seconds().as_str()),
                (centis, seconds)
            );
        }
    }

    #[test]
    fn router_errors_name_the_key_and_line() {
        let first = SEED.lines().count() + 1; // the blank line that starts ROUTER
        let sync_off = "sync = false ";
        for (from, to, key, line, why) in [
            (
                "outside = \"eth9\"",
                "outside = \"ib0\"",
                "router.outside",
                3,
                "is also router.inside",
            ),
            (
                "inside = \"ib0\"",
                "inside = \"ib 0\"",
                "router.inside",
                2,
                "not a valid interface",
            ),
            (
                "outside = \"eth9\"",
                "outside = \"../x\"",
                "router.outside",
                3,
                "not a valid interface",
            ),
            (
                "\"10.20.3.227\"",
                "\"224.0.0.18\"",
                "router.virtual_ip",
                4,
                "not a unicast",
            ),
            (
                "\"140.181.2.227\"",
                "\"10.20.3.227\"",
                "router.public_ip",
                5,
                "is also router.virtual_ip",
            ),
            (
                "priority = 150",
                "priority = 255",
                "router.priority",
                6,
                "out of range: use 1 to 254",
            ),
            (
                "priority = 150",
                "priority = 0",
                "router.priority",
                6,
                "out of range",
            ),
            (
                "\"10.20.3.2\"]",
                "\"10.20.3.1\"]",
                "router.peers",
                7,
                "listed twice (first at line",
            ),
            (
                "\"10.20.3.2\"]",
                "\"10.20.3.227\"]",
                "router.peers",
                7,
                "is the virtual IP",
            ),
            (
                "advert_interval = 1.0",
                "advert_interval = 0.005",
                "router.advert_interval",
                8,
                "centiseconds",
            ),
            (
                "advert_interval = 1.0",
                "advert_interval = 0",
                "router.advert_interval",
                8,
                "out of range",
            ),
            (
                "advert_interval = 1.0",
                "advert_interval = 41",
                "router.advert_interval",
                8,
                "0.01 to 40.95",
            ),
            (
                "virtual_router_id = 51",
                "virtual_router_id = 256",
                "router.virtual_router_id",
                9,
                "1 to 255",
            ),
            (
                "virtual_router_id = 51",
                "virtual_router_id = 0",
                "router.virtual_router_id",
                9,
                "1 to 255",
            ),
            (
                "peers = [\"10.20.3.1\", \"10.20.3.2\"]",
                "peers = []",
                "router.sync",
                10,
                "no router.peers",
            ),
        ] {
            let e = error(&router_with(from, to));
            assert!(
                e.starts_with(&format!("/etc/slurm-egress/config.toml:{}:", first + line)),
                "{from} -> {to}: {e}"
            );
            assert!(
                e.contains(&format!(": {key}: ")) && e.contains(why),
                "{from} -> {to}: {e}"
            );
        }
        let e = error(&format!("{SEED}{}state_dir = \"run\"\n", ROUTER));
        assert!(
            e.contains("router.state_dir: run must be an absolute path"),
            "{e}"
        );
        let e = error(&router_with("sync = true", sync_off.trim()).replace("priority", "priorty"));
        assert!(e.contains("unknown field `priorty`"), "{e}");
        let e = error(&router_with(
            "advert_interval = 1.0",
            "advert_interval = \"fast\"",
        ));
        assert!(e.contains("a number of seconds"), "{e}");
        let e = error(&router_with(
            "virtual_ip = \"10.20.3.227\"",
            "virtual_ip = \"10.20.3\"",
        ));
        assert!(e.contains(&format!("line {}", first + 4)), "{e}");
    }
}
