//! The desired state: one nftables table as plain data, and how it reads (`Display`).
//!
//! The vocabulary is deliberately small: only what slurm-egress writes. Everything here renders
//! in `nft` syntax that `nft -f` accepts and that compiles to the same kernel expressions as
//! ours, so an admin can read `check` output next to `nft list`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::ops::BitOr;

/// Address family of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `inet`: IPv4 and IPv6.
    Inet,
    /// `ip`: IPv4 only.
    Ip,
}

impl Family {
    pub(crate) fn nfproto(self) -> u16 {
        match self {
            Family::Inet => libc::NFPROTO_INET as u16,
            Family::Ip => libc::NFPROTO_IPV4 as u16,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Inet => "inet",
            Family::Ip => "ip",
        })
    }
}

/// Key type of a named set. The kernel only stores a number; these are nftables' userland
/// datatype ids (`include/datatype.h`), so `nft list` prints `type uid` and formats the
/// elements properly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// `type uid`, matched with `meta skuid`; host byte order.
    Uid,
    /// `type gid`, matched with `meta skgid`; host byte order.
    Gid,
    /// `type ipv4_addr`; elements are `u32::from(Ipv4Addr)`, sent in network byte order.
    Ipv4Addr,
    /// `type cgroupsv2`, matched with `socket cgroupv2 level N`: a cgroup v2 id (the inode
    /// number of the cgroup's directory), 64 bits in host byte order.
    CgroupV2,
}

impl KeyType {
    /// The nftables datatype id (TYPE_UID = 24, TYPE_GID = 25, TYPE_IPADDR = 7,
    /// TYPE_CGROUPV2 = 46).
    pub(crate) fn datatype(self) -> u32 {
        match self {
            KeyType::Uid => 24,
            KeyType::Gid => 25,
            KeyType::Ipv4Addr => 7,
            KeyType::CgroupV2 => 46,
        }
    }

    pub(crate) fn from_datatype(datatype: u32) -> Option<Self> {
        [
            KeyType::Uid,
            KeyType::Gid,
            KeyType::Ipv4Addr,
            KeyType::CgroupV2,
        ]
        .into_iter()
        .find(|k| k.datatype() == datatype)
    }

    /// The key's length in bytes.
    pub(crate) fn len(self) -> u32 {
        match self {
            KeyType::Uid | KeyType::Gid | KeyType::Ipv4Addr => 4,
            KeyType::CgroupV2 => 8,
        }
    }

    /// nftables' byte order of the key (`BYTEORDER_HOST_ENDIAN` = 1, `BIG_ENDIAN` = 2).
    pub(crate) fn byteorder(self) -> u32 {
        match self {
            KeyType::Uid | KeyType::Gid | KeyType::CgroupV2 => 1,
            KeyType::Ipv4Addr => 2,
        }
    }

    /// The element as the kernel stores it. Values too large for a 32-bit key are cut to
    /// their low 32 bits; [`Set::new`] never makes such elements.
    pub(crate) fn encode(self, value: u64) -> Vec<u8> {
        match self {
            KeyType::Uid | KeyType::Gid => (value as u32).to_ne_bytes().to_vec(),
            KeyType::Ipv4Addr => (value as u32).to_be_bytes().to_vec(),
            KeyType::CgroupV2 => value.to_ne_bytes().to_vec(),
        }
    }

    /// The value of a stored key, if it has this key's length.
    pub(crate) fn decode(self, bytes: &[u8]) -> Option<u64> {
        Some(match self {
            KeyType::Uid | KeyType::Gid => u32::from_ne_bytes(bytes.try_into().ok()?).into(),
            KeyType::Ipv4Addr => u32::from_be_bytes(bytes.try_into().ok()?).into(),
            KeyType::CgroupV2 => u64::from_ne_bytes(bytes.try_into().ok()?),
        })
    }

    /// One element as `nft` writes it (`nft` shows cgroup ids as paths when it can resolve
    /// them; the number is what the kernel holds).
    pub fn element(self, value: u64) -> String {
        match self {
            KeyType::Uid | KeyType::Gid | KeyType::CgroupV2 => value.to_string(),
            KeyType::Ipv4Addr => Ipv4Addr::from(value as u32).to_string(),
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyType::Uid => "uid",
            KeyType::Gid => "gid",
            KeyType::Ipv4Addr => "ipv4_addr",
            KeyType::CgroupV2 => "cgroupsv2",
        })
    }
}

/// The table we own. Nothing outside it is ever touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub family: Family,
    pub name: String,
    pub sets: Vec<Set>,
    pub chains: Vec<Chain>,
}

/// A named set (no flags: a plain hash of keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub name: String,
    pub key: KeyType,
    /// See [`KeyType`] for what the number means.
    pub elements: BTreeSet<u64>,
}

impl Set {
    pub fn new(name: &str, key: KeyType, elements: impl IntoIterator<Item = u64>) -> Self {
        Set {
            name: name.to_owned(),
            key,
            elements: elements.into_iter().collect(),
        }
    }

    /// `type uid` as `nft` writes it; also what the live set is compared against.
    pub(crate) fn definition(&self) -> String {
        format!("type {}", self.key)
    }
}

/// A chain; a base chain when `base` is set, else only reachable by `jump`/`goto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

/// Where a base chain hooks into the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseChain {
    pub kind: ChainKind,
    pub hook: Hook,
    pub priority: i32,
    pub policy: Policy,
}

impl BaseChain {
    pub const PRIORITY_RAW: i32 = -300;
    pub const PRIORITY_MANGLE: i32 = -150;
    pub const PRIORITY_DSTNAT: i32 = -100;
    pub const PRIORITY_FILTER: i32 = 0;
    pub const PRIORITY_SECURITY: i32 = 50;
    pub const PRIORITY_SRCNAT: i32 = 100;
}

/// `type filter|route|nat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    Filter,
    /// Re-routes locally generated packets whose mark changed (output hook only).
    Route,
    Nat,
}

impl ChainKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ChainKind::Filter => "filter",
            ChainKind::Route => "route",
            ChainKind::Nat => "nat",
        }
    }
}

/// Netfilter hook (`NF_INET_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    pub(crate) const ALL: [Hook; 5] = [
        Hook::Prerouting,
        Hook::Input,
        Hook::Forward,
        Hook::Output,
        Hook::Postrouting,
    ];

    pub(crate) fn number(self) -> u32 {
        match self {
            Hook::Prerouting => libc::NF_INET_PRE_ROUTING as u32,
            Hook::Input => libc::NF_INET_LOCAL_IN as u32,
            Hook::Forward => libc::NF_INET_FORWARD as u32,
            Hook::Output => libc::NF_INET_LOCAL_OUT as u32,
            Hook::Postrouting => libc::NF_INET_POST_ROUTING as u32,
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Prerouting => "prerouting",
            Hook::Input => "input",
            Hook::Forward => "forward",
            Hook::Output => "output",
            Hook::Postrouting => "postrouting",
        })
    }
}

/// What a base chain does with packets no rule decided on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Accept,
    Drop,
}

impl Policy {
    pub(crate) fn verdict(self) -> u32 {
        match self {
            Policy::Accept => libc::NF_ACCEPT as u32,
            Policy::Drop => libc::NF_DROP as u32,
        }
    }
}

/// One rule: all matches must hold, then the statements run in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub statements: Vec<Statement>,
}

/// Conntrack states (`ct state`), combinable with `|`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CtState(u32);

impl CtState {
    pub const INVALID: CtState = CtState(1);
    pub const ESTABLISHED: CtState = CtState(2);
    pub const RELATED: CtState = CtState(4);
    pub const NEW: CtState = CtState(8);
    pub const UNTRACKED: CtState = CtState(64);

    const NAMES: [(CtState, &'static str); 5] = [
        (CtState::INVALID, "invalid"),
        (CtState::ESTABLISHED, "established"),
        (CtState::RELATED, "related"),
        (CtState::NEW, "new"),
        (CtState::UNTRACKED, "untracked"),
    ];

    /// The kernel's bit mask (`NF_CT_STATE_*_BIT`).
    pub fn bits(self) -> u32 {
        self.0
    }

    pub(crate) fn from_bits(bits: u32) -> Self {
        CtState(bits)
    }
}

impl BitOr for CtState {
    type Output = CtState;
    fn bitor(self, rhs: CtState) -> CtState {
        CtState(self.0 | rhs.0)
    }
}

impl fmt::Display for CtState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        let mut first = true;
        for (state, name) in CtState::NAMES {
            if rest & state.0 != 0 {
                f.write_str(if first { "" } else { "," })?;
                f.write_str(name)?;
                rest &= !state.0;
                first = false;
            }
        }
        if rest != 0 || first {
            write!(f, "{}{rest:#x}", if first { "" } else { "," })?;
        }
        Ok(())
    }
}

/// A condition on the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `meta l4proto tcp` / `meta l4proto { tcp, udp }` (IP protocol numbers).
    L4Proto(Vec<u8>),
    /// `ct state established,related`: the connection is in one of these states.
    CtState(CtState),
    /// `ct mark & mask == value`.
    CtMark { mask: u32, value: u32 },
    /// `meta skuid @set`: the socket's owner is in the named `type uid` set.
    SkUidIn(String),
    /// `meta skgid @set`: the socket's group is in the named `type gid` set.
    SkGidIn(String),
    /// `socket cgroupv2 level N @set`: the socket was created in a cgroup whose ancestor at
    /// depth `level` of the cgroup v2 hierarchy (its root is level 0) is in the named
    /// `type cgroupsv2` set.
    SocketCgroupIn { level: u32, set: String },
    /// `iifname "ib0"` (exact name).
    IifName(String),
    /// `oifname "eth9"` (exact name).
    OifName(String),
    /// `ip daddr 203.0.113.5`: an IPv4 packet to this address (in an `inet` table, IPv6
    /// packets do not match).
    IpDaddr(Ipv4Addr),
}

/// An action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    /// `meta mark set meta mark & ~mask | value`: sets the bits in `mask` to `value`, keeps the
    /// others (other software may own them).
    MetaMark {
        mask: u32,
        value: u32,
    },
    /// `ct mark set ct mark & ~mask | value`, likewise on the connection.
    CtMark {
        mask: u32,
        value: u32,
    },
    Counter,
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
    Masquerade,
    /// `snat ip to ADDR`.
    Snat(Ipv4Addr),
}

fn l4proto_name(proto: u8) -> Option<&'static str> {
    Some(match proto {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        33 => "dccp",
        47 => "gre",
        50 => "esp",
        51 => "ah",
        58 => "ipv6-icmp",
        132 => "sctp",
        136 => "udplite",
        _ => return None,
    })
}

fn write_l4proto(f: &mut fmt::Formatter<'_>, proto: u8) -> fmt::Result {
    match l4proto_name(proto) {
        Some(name) => f.write_str(name),
        None => write!(f, "{proto}"),
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::L4Proto(protos) if protos.len() == 1 => {
                f.write_str("meta l4proto ")?;
                write_l4proto(f, protos[0])
            }
            Match::L4Proto(protos) => {
                f.write_str("meta l4proto {")?;
                for (i, proto) in protos.iter().enumerate() {
                    f.write_str(if i == 0 { " " } else { ", " })?;
                    write_l4proto(f, *proto)?;
                }
                f.write_str(" }")
            }
            Match::CtState(states) => write!(f, "ct state {states}"),
            Match::CtMark {
                mask: u32::MAX,
                value,
            } => write!(f, "ct mark {value:#010x}"),
            Match::CtMark { mask, value } => write!(f, "ct mark & {mask:#010x} == {value:#010x}"),
            Match::SkUidIn(set) => write!(f, "meta skuid @{set}"),
            Match::SkGidIn(set) => write!(f, "meta skgid @{set}"),
            Match::SocketCgroupIn { level, set } => {
                write!(f, "socket cgroupv2 level {level} @{set}")
            }
            Match::IifName(name) => write!(f, "iifname \"{name}\""),
            Match::OifName(name) => write!(f, "oifname \"{name}\""),
            Match::IpDaddr(addr) => write!(f, "ip daddr {addr}"),
        }
    }
}

impl fmt::Display for Statement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Statement::MetaMark { mask, value } => write!(
                f,
                "meta mark set meta mark & {:#010x} | {value:#010x}",
                !mask
            ),
            Statement::CtMark { mask, value } => {
                write!(f, "ct mark set ct mark & {:#010x} | {value:#010x}", !mask)
            }
            Statement::Counter => f.write_str("counter"),
            Statement::Accept => f.write_str("accept"),
            Statement::Drop => f.write_str("drop"),
            Statement::Return => f.write_str("return"),
            Statement::Jump(chain) => write!(f, "jump {chain}"),
            Statement::Goto(chain) => write!(f, "goto {chain}"),
            Statement::Masquerade => f.write_str("masquerade"),
            Statement::Snat(addr) => write!(f, "snat ip to {addr}"),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let matches = self.matches.iter().map(|m| m as &dyn fmt::Display);
        let statements = self.statements.iter().map(|s| s as &dyn fmt::Display);
        for (i, part) in matches.chain(statements).enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            part.fmt(f)?;
        }
        Ok(())
    }
}

/// The priority as `nft` names it when it is one of the standard ones.
pub(crate) fn priority_name(priority: i32) -> Option<&'static str> {
    Some(match priority {
        BaseChain::PRIORITY_RAW => "raw",
        BaseChain::PRIORITY_MANGLE => "mangle",
        BaseChain::PRIORITY_DSTNAT => "dstnat",
        BaseChain::PRIORITY_FILTER => "filter",
        BaseChain::PRIORITY_SECURITY => "security",
        BaseChain::PRIORITY_SRCNAT => "srcnat",
        _ => return None,
    })
}

impl fmt::Display for BaseChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type {} hook {} priority ",
            self.kind.as_str(),
            self.hook
        )?;
        match priority_name(self.priority) {
            Some(name) => f.write_str(name)?,
            None => write!(f, "{}", self.priority)?,
        }
        let policy = match self.policy {
            Policy::Accept => "accept",
            Policy::Drop => "drop",
        };
        write!(f, "; policy {policy};")
    }
}

/// Writes `chain NAME { ... }` with `indent` tabs before each line of the block.
pub(crate) fn write_chain<R: fmt::Display>(
    f: &mut fmt::Formatter<'_>,
    indent: &str,
    name: &str,
    definition: &str,
    rules: &[R],
) -> fmt::Result {
    writeln!(f, "{indent}chain {name} {{")?;
    if !definition.is_empty() {
        writeln!(f, "{indent}\t{definition}")?;
    }
    for rule in rules {
        writeln!(f, "{indent}\t{rule}")?;
    }
    write!(f, "{indent}}}")
}

/// Writes `set NAME { type ...; elements = { ... } }` in `nft list` layout.
pub(crate) fn write_set(
    f: &mut fmt::Formatter<'_>,
    indent: &str,
    name: &str,
    definition: &str,
    elements: &mut dyn Iterator<Item = String>,
) -> fmt::Result {
    writeln!(f, "{indent}set {name} {{")?;
    writeln!(f, "{indent}\t{definition}")?;
    let mut first = true;
    for element in elements {
        if first {
            write!(f, "{indent}\telements = {{ {element}")?;
            first = false;
        } else {
            write!(f, ", {element}")?;
        }
    }
    if !first {
        writeln!(f, " }}")?;
    }
    write!(f, "{indent}}}")
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let definition = self.base.map(|b| b.to_string()).unwrap_or_default();
        write_chain(f, "", &self.name, &definition, &self.rules)
    }
}

impl fmt::Display for Set {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut elements = self.elements.iter().map(|e| self.key.element(*e));
        write_set(f, "", &self.name, &self.definition(), &mut elements)
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table {} {} {{", self.family, self.name)?;
        let mut first = true;
        for set in &self.sets {
            f.write_str(if first { "" } else { "\n" })?;
            let mut elements = set.elements.iter().map(|e| set.key.element(*e));
            write_set(f, "\t", &set.name, &set.definition(), &mut elements)?;
            f.write_str("\n")?;
            first = false;
        }
        for chain in &self.chains {
            f.write_str(if first { "" } else { "\n" })?;
            let definition = chain.base.map(|b| b.to_string()).unwrap_or_default();
            write_chain(f, "\t", &chain.name, &definition, &chain.rules)?;
            f.write_str("\n")?;
            first = false;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(matches: Vec<Match>, statements: Vec<Statement>) -> Rule {
        Rule {
            matches,
            statements,
        }
    }

    #[test]
    fn rules_read_like_nft() {
        let r = rule(
            vec![
                Match::L4Proto(vec![6]),
                Match::CtState(CtState::NEW),
                Match::SkUidIn("users".into()),
            ],
            vec![Statement::CtMark { mask: 1, value: 1 }],
        );
        assert_eq!(
            r.to_string(),
            "meta l4proto tcp ct state new meta skuid @users ct mark set ct mark & 0xfffffffe | 0x00000001"
        );
        let r = rule(
            vec![
                Match::L4Proto(vec![6, 17, 250]),
                Match::CtState(CtState::ESTABLISHED | CtState::RELATED),
                Match::CtMark {
                    mask: 0xff00,
                    value: 0x100,
                },
                Match::CtMark {
                    mask: u32::MAX,
                    value: 7,
                },
                Match::SkGidIn("groups".into()),
                Match::IifName("ib0".into()),
                Match::OifName("eth9".into()),
            ],
            vec![
                Statement::MetaMark {
                    mask: 0xff00,
                    value: 0x100,
                },
                Statement::Counter,
                Statement::Snat(Ipv4Addr::new(203, 0, 113, 5)),
                Statement::Masquerade,
                Statement::Jump("a".into()),
                Statement::Goto("b".into()),
                Statement::Return,
                Statement::Drop,
                Statement::Accept,
            ],
        );
        assert_eq!(
            r.to_string(),
            "meta l4proto { tcp, udp, 250 } ct state established,related \
             ct mark & 0x0000ff00 == 0x00000100 ct mark 0x00000007 meta skgid @groups \
             iifname \"ib0\" oifname \"eth9\" meta mark set meta mark & 0xffff00ff | 0x00000100 \
             counter snat ip to 203.0.113.5 masquerade jump a goto b return drop accept"
        );
    }

    #[test]
    fn ct_states_list_known_names_then_unknown_bits() {
        assert_eq!(CtState::NEW.to_string(), "new");
        let all = CtState::UNTRACKED | CtState::NEW | CtState::INVALID | CtState::from_bits(0x100);
        assert_eq!(all.to_string(), "invalid,new,untracked,0x100");
        assert_eq!(CtState::from_bits(0).to_string(), "0x0");
    }

    #[test]
    fn tables_read_like_nft_list() {
        let table = Table {
            family: Family::Ip,
            name: "t".into(),
            sets: vec![
                Set::new(
                    "a",
                    KeyType::Ipv4Addr,
                    [u32::from(Ipv4Addr::new(198, 51, 100, 1)).into()],
                ),
                Set::new("b", KeyType::Gid, []),
            ],
            chains: vec![
                Chain {
                    name: "post".into(),
                    base: Some(BaseChain {
                        kind: ChainKind::Nat,
                        hook: Hook::Postrouting,
                        priority: BaseChain::PRIORITY_SRCNAT + 5,
                        policy: Policy::Accept,
                    }),
                    rules: vec![rule(vec![], vec![Statement::Masquerade])],
                },
                Chain {
                    name: "empty".into(),
                    base: None,
                    rules: vec![],
                },
            ],
        };
        assert_eq!(
            table.to_string(),
            "table ip t {
	set a {
		type ipv4_addr
		elements = { 198.51.100.1 }
	}

	set b {
		type gid
	}

	chain post {
		type nat hook postrouting priority 105; policy accept;
		masquerade
	}

	chain empty {
	}
}"
        );
        assert_eq!(table.sets[1].to_string(), "set b {\n\ttype gid\n}");
        assert_eq!(
            table.chains[0].to_string(),
            "chain post {\n\ttype nat hook postrouting priority 105; policy accept;\n\tmasquerade\n}"
        );
    }

    #[test]
    fn keys_encode_as_the_kernel_and_nft_expect() {
        assert_eq!(KeyType::Uid.encode(1001), 1001u32.to_ne_bytes());
        assert_eq!(KeyType::Ipv4Addr.encode(0xc6336401), [198, 51, 100, 1]);
        assert_eq!(
            KeyType::Ipv4Addr.decode(&[198, 51, 100, 1]),
            Some(0xc6336401)
        );
        assert_eq!(KeyType::Ipv4Addr.element(0xc6336401), "198.51.100.1");
        // cgroup ids are 64 bits wide; a key of the wrong length is no element.
        let id = 0x1_0000_002c_u64;
        assert_eq!(KeyType::CgroupV2.encode(id), id.to_ne_bytes());
        assert_eq!(KeyType::CgroupV2.decode(&id.to_ne_bytes()), Some(id));
        assert_eq!(KeyType::CgroupV2.decode(&[1, 2, 3, 4]), None);
        for key in [
            KeyType::Uid,
            KeyType::Gid,
            KeyType::Ipv4Addr,
            KeyType::CgroupV2,
        ] {
            assert_eq!(KeyType::from_datatype(key.datatype()), Some(key));
        }
    }
}
