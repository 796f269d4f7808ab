//! Policy routing over rtnetlink: the `ip rule` that sends marked packets to the egress table,
//! the table's routes (exceptions, then the default via the routers' virtual IP), and the
//! table's name in `/etc/iproute2/rt_tables.d/`.
//!
//! The rule and every route we add carry our own routing protocol number ([`PROTOCOL`]), the
//! way routing daemons tag theirs: that is how `remove` finds exactly what `apply` made and
//! leaves every other rule alone. The kernel has no "replace" for rules, so rules are found by
//! dumping and matching the attributes we own (priority, mark, mask, table).

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use crate::config::{Config, Location};

/// The routing protocol number on our rules and routes (`ip rule show` prints it as
/// `proto 230`, or by name once `rt_protos.d` knows it). Unassigned in iproute2's list.
pub const PROTOCOL: u8 = 230;

/// Where iproute2 reads table names; overridden per network namespace by `ip netns exec`
/// through `/etc/netns/<name>/iproute2`.
const IPROUTE2_DIR: &str = "/etc/iproute2";
const NAME_FILE: &str = "rt_tables.d/slurm-egress.conf";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open a route netlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The config names something this machine does not have or cannot do.
    #[error("{path}:{at}: {key}: {message}")]
    Config {
        path: PathBuf,
        at: Location,
        key: &'static str,
        message: String,
    },
    #[error(
        "{path}:{line}: table {found} conflicts with {key} = {want:?}; pick another table or name"
    )]
    NameTaken {
        path: PathBuf,
        line: usize,
        found: String,
        key: &'static str,
        want: String,
    },
    #[error("{action}: {}", errno_message(.source))]
    Netlink {
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn errno_message(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            format!("{e} (slurm-egress must run as root, with CAP_NET_ADMIN)")
        }
        _ => e.to_string(),
    }
}

fn netlink_error(action: impl Into<String>, e: rtnetlink::Error) -> Error {
    let source = match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => io::Error::other(other.to_string()),
    };
    Error::Netlink {
        action: action.into(),
        source,
    }
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => Some(-msg.raw_code()),
        _ => None,
    }
}

/// An interface as the policy needs it.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub up: bool,
    pub addresses: Vec<Ipv4Net>,
}

/// The `ip rule` we want.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub priority: u32,
    pub mark: u32,
    pub mask: u32,
    pub table: u32,
}

/// A route in the egress table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub to: Ipv4Net,
    pub via: Option<Ipv4Addr>,
    pub dev: String,
    pub index: u32,
}

/// `default via 10.20.3.227` / `10.20.0.0/16`, as `ip route` writes a route's start.
fn write_destination(
    f: &mut fmt::Formatter<'_>,
    to: Ipv4Net,
    via: Option<Ipv4Addr>,
) -> fmt::Result {
    if to.prefix_len() == 0 {
        f.write_str("default")?;
    } else {
        write!(f, "{to}")?;
    }
    match via {
        Some(via) => write!(f, " via {via}"),
        None => Ok(()),
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_destination(f, self.to, self.via)?;
        write!(f, " dev {}", self.dev)
    }
}

/// Everything this module makes true on a node, as plain data.
#[derive(Debug, Clone)]
pub struct Policy {
    pub rule: Rule,
    pub table_name: String,
    /// Exceptions first, default last: the order they are added in.
    pub routes: Vec<Route>,
}

impl Policy {
    /// Derives the desired state from the config and the live interface, refusing what the
    /// kernel would refuse later (or, worse, accept and misroute): a gateway that is not on a
    /// subnet of the interface.
    pub fn new(config: &Config, link: Option<&Link>) -> Result<Policy, Error> {
        let r = &config.routing;
        let bad = |at: Location, key: &'static str, message: String| Error::Config {
            path: config.path.clone(),
            at,
            key,
            message,
        };
        let link = link.ok_or_else(|| {
            bad(
                r.interface.at,
                "routing.interface",
                format!("no interface {:?} in this network namespace", *r.interface),
            )
        })?;
        if !link.up {
            return Err(bad(
                r.interface.at,
                "routing.interface",
                format!("{} is down", link.name),
            ));
        }
        if link.addresses.is_empty() {
            return Err(bad(
                r.interface.at,
                "routing.interface",
                format!("{} has no IPv4 address", link.name),
            ));
        }
        let on_link = |gw: Ipv4Addr| {
            link.addresses
                .iter()
                .any(|net| net.contains(&gw) && net.addr() != gw && net.prefix_len() < 32)
        };
        let addresses = || {
            link.addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !on_link(*r.gateway) {
            return Err(bad(
                r.gateway.at,
                "routing.gateway",
                format!(
                    "{} is not reachable from {}: not on its subnets ({})",
                    *r.gateway,
                    link.name,
                    addresses()
                ),
            ));
        }
        let mut routes = Vec::new();
        for e in &r.exceptions {
            if let Some(via) = e.via.filter(|v| !on_link(*v)) {
                return Err(bad(
                    e.at,
                    "routing.exceptions",
                    format!(
                        "{}: via {via} is not reachable from {}: not on its subnets ({})",
                        e.to,
                        link.name,
                        addresses()
                    ),
                ));
            }
            routes.push(Route {
                to: e.to,
                via: e.via,
                dev: link.name.clone(),
                index: link.index,
            });
        }
        routes.push(Route {
            to: Ipv4Net::default(),
            via: Some(*r.gateway),
            dev: link.name.clone(),
            index: link.index,
        });
        Ok(Policy {
            rule: Rule {
                priority: r.priority,
                mark: r.mark,
                mask: r.mask,
                table: r.table,
            },
            table_name: r.table_name.clone(),
            routes,
        })
    }

    /// What differs between this and the live state; empty when in sync.
    pub fn diff(&self, live: &Live) -> Vec<Difference> {
        let mut out = Vec::new();
        if live.table_name.as_deref() != Some(self.table_name.as_str()) {
            out.push(Difference::TableName {
                table: self.rule.table,
                name: self.table_name.clone(),
            });
        }
        let have_rule = live.rules.iter().any(|r| r.matches(&self.rule));
        for stale in live
            .rules
            .iter()
            .filter(|r| r.ours && !r.matches(&self.rule))
        {
            out.push(Difference::StaleRule(stale.clone()));
        }
        if !have_rule {
            out.push(Difference::MissingRule(self.rule, self.table_name.clone()));
        }
        let mut live_routes: BTreeMap<Ipv4Net, &LiveRoute> =
            live.routes.iter().map(|r| (r.to, r)).collect();
        for want in &self.routes {
            match live_routes.remove(&want.to) {
                Some(have) if have.is(want) => {}
                Some(have) => out.push(Difference::WrongRoute {
                    want: want.clone(),
                    have: have.clone(),
                    table: self.table_name.clone(),
                }),
                None => out.push(Difference::MissingRoute(
                    want.clone(),
                    self.table_name.clone(),
                )),
            }
        }
        for extra in live_routes.into_values() {
            out.push(Difference::ExtraRoute(
                extra.clone(),
                self.table_name.clone(),
            ));
        }
        out
    }
}

/// A rule as dumped from the kernel.
#[derive(Debug, Clone)]
pub struct LiveRule {
    pub priority: u32,
    pub mark: Option<u32>,
    pub mask: Option<u32>,
    pub table: u32,
    /// It selects on more than the mark (addresses, interfaces, uid range, ...).
    pub other_selectors: bool,
    /// Tagged with [`PROTOCOL`]: we made it.
    pub ours: bool,
    message: RuleMessage,
}

impl LiveRule {
    fn matches(&self, want: &Rule) -> bool {
        self.priority == want.priority
            && self.mark == Some(want.mark)
            && self.mask.unwrap_or(u32::MAX) == want.mask
            && self.table == want.table
            && !self.other_selectors
            && self.message.header.action == RuleAction::ToTable
    }
}

impl fmt::Display for LiveRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.priority)?;
        match (self.mark, self.mask) {
            (Some(mark), Some(mask)) => write!(f, "fwmark {mark:#x}/{mask:#x} ")?,
            (Some(mark), None) => write!(f, "fwmark {mark:#x} ")?,
            _ => {}
        }
        if self.other_selectors {
            f.write_str("(more selectors) ")?;
        }
        write!(f, "lookup {}", self.table)
    }
}

/// A route in the egress table as dumped from the kernel.
#[derive(Debug, Clone)]
pub struct LiveRoute {
    pub to: Ipv4Net,
    pub via: Option<Ipv4Addr>,
    pub index: Option<u32>,
    pub kind: RouteType,
    pub ours: bool,
    message: RouteMessage,
}

impl LiveRoute {
    fn is(&self, want: &Route) -> bool {
        self.kind == RouteType::Unicast && self.via == want.via && self.index == Some(want.index)
    }
}

impl fmt::Display for LiveRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind != RouteType::Unicast {
            write!(f, "{:?} ", self.kind)?;
        }
        write_destination(f, self.to, self.via)?;
        if let Some(index) = self.index {
            write!(f, " dev #{index}")?;
        }
        Ok(())
    }
}

/// The live counterpart of [`Policy`].
#[derive(Debug, Clone, Default)]
pub struct Live {
    /// Every IPv4 rule that points at the table or carries our tag.
    pub rules: Vec<LiveRule>,
    /// Every route in the table.
    pub routes: Vec<LiveRoute>,
    /// The name our `rt_tables.d` file gives the table, if the file exists.
    pub table_name: Option<String>,
}

/// One way in which the live state differs from the policy; prints as a line for `check` and
/// `apply --dry-run`.
#[derive(Debug, Clone)]
pub enum Difference {
    MissingRule(Rule, String),
    StaleRule(LiveRule),
    MissingRoute(Route, String),
    WrongRoute {
        want: Route,
        have: LiveRoute,
        table: String,
    },
    ExtraRoute(LiveRoute, String),
    TableName {
        table: u32,
        name: String,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::MissingRule(r, name) => write!(
                f,
                "ip rule missing: priority {} fwmark {:#x}/{:#x} lookup {name}",
                r.priority, r.mark, r.mask
            ),
            Difference::StaleRule(r) => write!(f, "ip rule not in the config: {r}"),
            Difference::MissingRoute(r, table) => {
                write!(f, "ip route missing in table {table}: {r}")
            }
            Difference::WrongRoute { want, have, table } => {
                write!(
                    f,
                    "ip route differs in table {table}: have {have}, want {want}"
                )
            }
            Difference::ExtraRoute(r, table) => {
                write!(f, "ip route not in the config, in table {table}: {r}")
            }
            Difference::TableName { table, name } => write!(
                f,
                "routing table name missing: {IPROUTE2_DIR}/{NAME_FILE} should say \"{table} {name}\""
            ),
        }
    }
}

/// A route netlink connection in the current network namespace.
pub struct Routing {
    handle: Handle,
}

impl Routing {
    /// Opens the socket and spawns its connection task on the current tokio runtime.
    pub fn connect() -> Result<Routing, Error> {
        let (connection, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(Error::Socket)?;
        tokio::spawn(connection);
        Ok(Routing { handle })
    }

    /// Looks up an interface and its IPv4 addresses; `None` if there is no such interface.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, Error> {
        let mut links = self.handle.link().get().match_name(name).execute();
        let message = match links.try_next().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => return Ok(None),
            Err(e) => return Err(netlink_error(format!("look up interface {name}"), e)),
        };
        let index = message.header.index;
        let name = message
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
            .unwrap_or_else(|| name.to_owned());
        let up = message.header.flags.contains(LinkFlags::Up);
        let mut addresses = Vec::new();
        let mut dump = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(a) = dump
            .try_next()
            .await
            .map_err(|e| netlink_error(format!("list addresses of {name}"), e))?
        {
            if a.header.index != index {
                continue;
            }
            for attr in &a.attributes {
                if let AddressAttribute::Local(std::net::IpAddr::V4(ip)) = attr
                    && let Ok(net) = Ipv4Net::new(*ip, a.header.prefix_len)
                {
                    addresses.push(net);
                }
            }
        }
        Ok(Some(Link {
            index,
            name,
            up,
            addresses,
        }))
    }

    /// Reads the rules and routes that belong to `table` (plus every rule we tagged).
    pub async fn read(&self, table: u32) -> Result<Live, Error> {
        let mut live = Live::default();
        let mut rules = self.handle.rule().get(IpVersion::V4).execute();
        while let Some(message) = rules
            .try_next()
            .await
            .map_err(|e| netlink_error("list ip rules", e))?
        {
            let rule = live_rule(message);
            if rule.table == table || rule.ours {
                live.rules.push(rule);
            }
        }
        let mut filter = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(table)
            .protocol(RouteProtocol::Unspec)
            .scope(RouteScope::Universe)
            .kind(RouteType::Unspec)
            .build();
        filter.header.flags = RouteFlags::empty();
        let mut routes = self.handle.route().get(filter).execute();
        while let Some(message) = routes
            .try_next()
            .await
            .map_err(|e| netlink_error(format!("list routes of table {table}"), e))?
        {
            if let Some(route) = live_route(message, table) {
                live.routes.push(route);
            }
        }
        live.table_name = registered_name(table);
        Ok(live)
    }

    /// Makes each difference go away: routes first (the table is complete before anything
    /// points at it), stale rules out, the rule last.
    pub async fn apply(&self, table: u32, differences: &[Difference]) -> Result<(), Error> {
        let mut ordered: Vec<&Difference> = differences.iter().collect();
        ordered.sort_by_key(|d| match d {
            Difference::TableName { .. } => 0,
            Difference::MissingRoute(..) | Difference::WrongRoute { .. } => 1,
            Difference::ExtraRoute(..) => 2,
            Difference::StaleRule(..) => 3,
            Difference::MissingRule(..) => 4,
        });
        for d in ordered {
            match d {
                Difference::TableName { table, name } => register_name(*table, name)?,
                Difference::MissingRoute(r, _) | Difference::WrongRoute { want: r, .. } => {
                    self.add_route(r, table).await?
                }
                Difference::ExtraRoute(r, table) => {
                    self.del_route(r, &format!("delete route {r} from table {table}"))
                        .await?
                }
                Difference::StaleRule(r) => self.del_rule(r).await?,
                Difference::MissingRule(r, _) => self.add_rule(r).await?,
            }
        }
        Ok(())
    }

    /// Takes out what [`Routing::apply`] made: our tagged rules, our tagged routes in the
    /// table, and the table's name. What others made stays.
    pub async fn remove(&self, table: u32) -> Result<Vec<String>, Error> {
        let live = self.read(table).await?;
        let mut done = Vec::new();
        for rule in live.rules.iter().filter(|r| r.ours) {
            self.del_rule(rule).await?;
            done.push(format!("deleted ip rule {rule}"));
        }
        for route in live.routes.iter().filter(|r| r.ours) {
            self.del_route(route, &format!("delete route {route} from table {table}"))
                .await?;
            done.push(format!("deleted ip route {route} table {table}"));
        }
        if unregister_name()? {
            done.push(format!("deleted {IPROUTE2_DIR}/{NAME_FILE}"));
        }
        Ok(done)
    }

    async fn add_route(&self, r: &Route, table: u32) -> Result<(), Error> {
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(table)
            .destination_prefix(r.to.addr(), r.to.prefix_len())
            .output_interface(r.index)
            .protocol(RouteProtocol::Other(PROTOCOL))
            .kind(RouteType::Unicast);
        builder = match r.via {
            Some(gw) => builder.gateway(gw).scope(RouteScope::Universe),
            None => builder.scope(RouteScope::Link),
        };
        self.handle
            .route()
            .add(builder.build())
            .replace()
            .execute()
            .await
            .map_err(|e| netlink_error(format!("add route {r} table {table}"), e))
    }

    async fn del_route(&self, r: &LiveRoute, action: &str) -> Result<(), Error> {
        match self.handle.route().del(r.message.clone()).execute().await {
            Err(e) if errno_of(&e) == Some(libc::ESRCH) => Ok(()),
            other => other.map_err(|e| netlink_error(action, e)),
        }
    }

    async fn add_rule(&self, r: &Rule) -> Result<(), Error> {
        let mut request = self
            .handle
            .rule()
            .add()
            .v4()
            .priority(r.priority)
            .fw_mark(r.mark)
            .table_id(r.table)
            .action(RuleAction::ToTable);
        let message = request.message_mut();
        message.attributes.push(RuleAttribute::FwMask(r.mask));
        message
            .attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Other(PROTOCOL)));
        match request.execute().await {
            // Someone else made the same rule first: it does what ours would.
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => Ok(()),
            other => other.map_err(|e| {
                netlink_error(
                    format!(
                        "add ip rule priority {} fwmark {:#x}/{:#x} lookup {}",
                        r.priority, r.mark, r.mask, r.table
                    ),
                    e,
                )
            }),
        }
    }

    async fn del_rule(&self, r: &LiveRule) -> Result<(), Error> {
        match self.handle.rule().del(r.message.clone()).execute().await {
            Err(e) if matches!(errno_of(&e), Some(libc::ENOENT) | Some(libc::ESRCH)) => Ok(()),
            other => other.map_err(|e| netlink_error(format!("delete ip rule {r}"), e)),
        }
    }
}

fn live_rule(message: RuleMessage) -> LiveRule {
    let mut rule = LiveRule {
        priority: 0,
        mark: None,
        mask: None,
        table: u32::from(message.header.table),
        other_selectors: message.header.dst_len != 0
            || message.header.src_len != 0
            || message.header.tos != 0,
        ours: false,
        message: RuleMessage::default(),
    };
    for attr in &message.attributes {
        match attr {
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::FwMark(m) => rule.mark = Some(*m),
            RuleAttribute::FwMask(m) => rule.mask = Some(*m),
            RuleAttribute::Table(t) => rule.table = *t,
            RuleAttribute::Protocol(p) => rule.ours = *p == RouteProtocol::Other(PROTOCOL),
            RuleAttribute::Iifname(_)
            | RuleAttribute::Oifname(_)
            | RuleAttribute::UidRange(_)
            | RuleAttribute::IpProtocol(_)
            | RuleAttribute::SourcePortRange(_)
            | RuleAttribute::DestinationPortRange(_)
            | RuleAttribute::Goto(_) => rule.other_selectors = true,
            // The kernel reports these on every rule; u32::MAX (-1) means "not set".
            RuleAttribute::SuppressIfGroup(v) | RuleAttribute::SuppressPrefixLen(v) => {
                rule.other_selectors |= *v != u32::MAX
            }
            _ => {}
        }
    }
    rule.message = message;
    rule
}

fn live_route(message: RouteMessage, table: u32) -> Option<LiveRoute> {
    let mut in_table = u32::from(message.header.table);
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut via = None;
    let mut index = None;
    for attr in &message.attributes {
        match attr {
            RouteAttribute::Table(t) => in_table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => via = Some(*a),
            RouteAttribute::Oif(i) => index = Some(*i),
            _ => {}
        }
    }
    if in_table != table {
        return None;
    }
    let to = Ipv4Net::new(dst, message.header.destination_prefix_length).ok()?;
    Some(LiveRoute {
        to,
        via,
        index,
        kind: message.header.kind,
        ours: message.header.protocol == RouteProtocol::Other(PROTOCOL),
        message,
    })
}

/// The name our file gives `table`, if it exists and says so.
fn registered_name(table: u32) -> Option<String> {
    let text = std::fs::read_to_string(Path::new(IPROUTE2_DIR).join(NAME_FILE)).ok()?;
    parse_names(&text)
        .into_iter()
        .find(|(_, id, _)| *id == table)
        .map(|(_, _, name)| name)
}

/// `(line, id, name)` for every entry of an `rt_tables` file.
fn parse_names(text: &str) -> Vec<(usize, u32, String)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.split('#').next()?.trim();
            let mut words = line.split_whitespace();
            let id = words.next()?;
            let name = words.next()?;
            let id = if let Some(hex) = id.strip_prefix("0x") {
                u32::from_str_radix(hex, 16).ok()?
            } else {
                id.parse().ok()?
            };
            Some((i + 1, id, name.to_owned()))
        })
        .collect()
}

/// Refuses a table id or name that iproute2's own files already give to something else:
/// `ip route show table alinat` would then show the wrong table.
pub fn check_table_name(config: &Config) -> Result<(), Error> {
    let (table, name) = (config.routing.table, config.routing.table_name.as_str());
    let dir = Path::new(IPROUTE2_DIR);
    let mut files = vec![dir.join("rt_tables")];
    if let Ok(entries) = std::fs::read_dir(dir.join("rt_tables.d")) {
        let mut more: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .filter(|p| !p.ends_with(NAME_FILE))
            .collect();
        more.sort();
        files.extend(more);
    }
    for path in files {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for (line, id, found) in parse_names(&text) {
            let clash = if id == table && found != name {
                Some("routing.table")
            } else if found == name && id != table {
                Some("routing.table_name")
            } else {
                None
            };
            if let Some(key) = clash {
                return Err(Error::NameTaken {
                    path,
                    line,
                    found: format!("{id} {found}"),
                    key,
                    want: if key == "routing.table" {
                        table.to_string()
                    } else {
                        name.to_owned()
                    },
                });
            }
        }
    }
    Ok(())
}

fn register_name(table: u32, name: &str) -> Result<(), Error> {
    let path = Path::new(IPROUTE2_DIR).join(NAME_FILE);
    let text = format!(
        "# Written by slurm-egress apply, removed by slurm-egress remove.\n{table} {name}\n"
    );
    let file_error = |source| Error::File {
        path: path.clone(),
        source,
    };
    let dir = path.parent().expect("NAME_FILE has a directory");
    std::fs::create_dir_all(dir).map_err(file_error)?;
    let tmp = path.with_extension("conf.tmp");
    std::fs::write(&tmp, text).map_err(file_error)?;
    std::fs::rename(&tmp, &path).map_err(file_error)
}

fn unregister_name() -> Result<bool, Error> {
    let path = Path::new(IPROUTE2_DIR).join(NAME_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(Error::File { path, source }),
    }
}
