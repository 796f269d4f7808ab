//! Reading one table back from the kernel.

use super::codec::{self, NlChain, NlRule, NlSet, NlTable, RuleBuilder, SetContent};
use super::error::{Error, Result};
use super::model::{self, ChainKind, Family, Hook, KeyType, Policy, Rule};
use super::nl::{self, Msg, Socket};
use nftnl::nftnl_sys as sys;
use std::collections::{BTreeSet, HashMap};
use std::fmt;

/// A table as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveTable {
    pub family: Family,
    pub name: String,
    /// `NFT_TABLE_F_*`; ours are 0 (a dormant table evaluates nothing).
    pub flags: u32,
    /// Named sets; the anonymous ones are part of the rules that use them.
    pub sets: Vec<LiveSet>,
    pub chains: Vec<LiveChain>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSet {
    pub name: String,
    /// `None` when the set is not one we could have made (other key type, flags, a map...).
    pub key: Option<KeyType>,
    /// `type uid` for ours, else the raw key type, length and flags.
    pub definition: String,
    /// Decoded per `key`; empty when `key` is `None`.
    pub elements: BTreeSet<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveChain {
    pub name: String,
    /// `type route hook output priority mangle; policy accept;`, empty for a regular chain.
    pub definition: String,
    pub rules: Vec<LiveRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveRule {
    pub handle: u64,
    /// The rule's expressions as libnftnl prints them (normalised, see `codec`): what
    /// comparisons use.
    pub expressions: String,
    /// The rule in the model, when it is one we could have written.
    pub rule: Option<Rule>,
}

impl fmt::Display for LiveRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Some(rule) => rule.fmt(f),
            None => f.write_str(&self.expressions),
        }
    }
}

impl fmt::Display for LiveTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "table {} {} {{", self.family, self.name)?;
        if self.flags != 0 {
            writeln!(f, "\tflags {:#x}", self.flags)?;
        }
        let mut first = true;
        for set in &self.sets {
            f.write_str(if first { "" } else { "\n" })?;
            let key = set.key;
            let mut elements = set
                .elements
                .iter()
                .filter_map(|e| key.map(|k| k.element(*e)));
            model::write_set(f, "\t", &set.name, &set.definition, &mut elements)?;
            f.write_str("\n")?;
            first = false;
        }
        for chain in &self.chains {
            f.write_str(if first { "" } else { "\n" })?;
            model::write_chain(f, "\t", &chain.name, &chain.definition, &chain.rules)?;
            f.write_str("\n")?;
            first = false;
        }
        f.write_str("}")
    }
}

/// A read is several dumps, so it can race with changes. Every reply carries the ruleset
/// generation: a read during which it did not move is a snapshot. It moves with every
/// transaction in the namespace, though, set elements of running jobs included, so under
/// steady element churn no read is a snapshot; then two successive reads that agree on
/// everything but set elements are accepted (the latter, whose element lists are each one
/// dump, a recent state of that set). Elements are what `add_elements` changes concurrently
/// anyway; structure changes are rare.
const READ_ATTEMPTS: usize = 10;

pub(crate) fn read(sock: &mut Socket, family: Family, name: &str) -> Result<Option<LiveTable>> {
    let object = format!("table {family} {name}");
    let mut previous = None;
    for _ in 0..READ_ATTEMPTS {
        let (table, snapshot) = read_once(sock, family, name, &object)?;
        let structure = table.as_ref().map(without_elements);
        if snapshot || previous.as_ref() == Some(&structure) {
            return Ok(table);
        }
        previous = Some(structure);
    }
    Err(Error::reply(
        object,
        "the table kept changing while it was read",
    ))
}

fn without_elements(table: &LiveTable) -> LiveTable {
    let mut table = table.clone();
    for set in &mut table.sets {
        set.elements.clear();
    }
    table
}

/// Tracks the generation stamped on every reply; `consistent` is false when it moved or a dump
/// was interrupted.
struct Generation {
    seen: Option<u16>,
    consistent: bool,
}

impl Generation {
    fn check(&mut self, msg: &Msg<'_>) {
        if msg.flags & libc::NLM_F_DUMP_INTR as u16 != 0 {
            self.consistent = false;
        }
        let generation = msg.generation();
        if self.seen.is_some() && self.seen != generation {
            self.consistent = false;
        }
        self.seen = generation;
    }
}

/// A table that vanished between two dumps shows up as ENOENT: the read is redone.
fn vanished(err: &Error) -> bool {
    matches!(err, Error::Refused { .. }) && err.errno() == Some(libc::ENOENT)
}

struct RawSet {
    name: String,
    flags: u32,
    datatype: u32,
    key_len: u32,
    map: bool,
    elements: Vec<Vec<u8>>,
}

/// The table (`None`: there is none), and whether the ruleset generation stayed the same
/// throughout (a table that vanished half-way reads as `(None, false)`).
fn read_once(
    sock: &mut Socket,
    family: Family,
    name: &str,
    object: &str,
) -> Result<(Option<LiveTable>, bool)> {
    let mut generation = Generation {
        seen: None,
        consistent: true,
    };
    let fam = family.nfproto();
    let cname = codec::cstr(name);

    let mut flags = None;
    let result = sock.request(
        object,
        "list the table",
        |buf, seq| {
            let table = codec::table_obj(family, name);
            // SAFETY: `buf` has room for any message.
            unsafe {
                let h = nl::header(buf, libc::NFT_MSG_GETTABLE, fam, libc::NLM_F_ACK, seq);
                sys::nftnl_table_nlmsg_build_payload(h.cast(), table.ptr());
            }
        },
        |msg| {
            generation.check(msg);
            let table = NlTable::new();
            parse(object, "table", || unsafe {
                sys::nftnl_table_nlmsg_parse(msg.header().cast(), table.ptr())
            })?;
            // SAFETY: reading attributes of a parsed table.
            flags = Some(unsafe {
                if sys::nftnl_table_is_set(table.ptr(), sys::NFTNL_TABLE_FLAGS as u16) {
                    sys::nftnl_table_get_u32(table.ptr(), sys::NFTNL_TABLE_FLAGS as u16)
                } else {
                    0
                }
            });
            Ok(())
        },
    );
    match result {
        Err(e) if vanished(&e) => return Ok((None, true)),
        other => other?,
    }
    let Some(flags) = flags else {
        return Err(Error::reply(object, "no table in the kernel's answer"));
    };

    // Sets, then each set's elements.
    let mut sets: Vec<RawSet> = Vec::new();
    let result = sock.request(
        object,
        "list sets",
        |buf, seq| {
            let set = NlSet::new();
            // SAFETY: as above; the set only carries the table filter.
            unsafe {
                sys::nftnl_set_set_str(set.ptr(), sys::NFTNL_SET_TABLE as u16, cname.as_ptr());
                let h = nl::header(buf, libc::NFT_MSG_GETSET, fam, libc::NLM_F_DUMP, seq);
                sys::nftnl_set_nlmsg_build_payload(h.cast(), set.ptr());
            }
        },
        |msg| {
            generation.check(msg);
            let set = NlSet::new();
            parse(object, "set", || unsafe {
                sys::nftnl_set_nlmsg_parse(msg.header().cast(), set.ptr())
            })?;
            // SAFETY: reading attributes of a parsed set.
            unsafe {
                let s = set.ptr();
                let table = codec::string(sys::nftnl_set_get_str(s, sys::NFTNL_SET_TABLE as u16));
                if table.as_deref() != Some(name) {
                    return Ok(());
                }
                let u32_of = |attr: u32| sys::nftnl_set_get_u32(s, attr as u16);
                sets.push(RawSet {
                    name: codec::string(sys::nftnl_set_get_str(s, sys::NFTNL_SET_NAME as u16))
                        .unwrap_or_default(),
                    flags: u32_of(sys::NFTNL_SET_FLAGS),
                    datatype: u32_of(sys::NFTNL_SET_KEY_TYPE),
                    key_len: u32_of(sys::NFTNL_SET_KEY_LEN),
                    map: sys::nftnl_set_is_set(s, sys::NFTNL_SET_DATA_TYPE as u16),
                    elements: Vec::new(),
                });
            }
            Ok(())
        },
    );
    match result {
        Err(e) if vanished(&e) => return Ok((None, false)),
        other => other?,
    }
    for raw in &mut sets {
        let set = codec::set_obj(family, name, &codec::cstr(&raw.name));
        let set_object = format!("set {family} {name} {}", raw.name);
        let result = sock.request(
            &set_object,
            "list elements",
            |buf, seq| unsafe {
                // SAFETY: as above.
                let h = nl::header(buf, libc::NFT_MSG_GETSETELEM, fam, libc::NLM_F_DUMP, seq);
                sys::nftnl_set_elems_nlmsg_build_payload(h.cast(), set.ptr());
            },
            |msg| {
                generation.check(msg);
                parse(&set_object, "elements", || unsafe {
                    sys::nftnl_set_elems_nlmsg_parse(msg.header().cast(), set.ptr())
                })
            },
        );
        match result {
            Err(e) if vanished(&e) => return Ok((None, false)),
            other => other?,
        }
        raw.elements = codec::elements(&set);
    }

    let mut chains: Vec<LiveChain> = Vec::new();
    let result = sock.request(
        object,
        "list chains",
        |buf, seq| {
            let chain = NlChain::new();
            // SAFETY: as above.
            unsafe {
                sys::nftnl_chain_set_str(
                    chain.ptr(),
                    sys::NFTNL_CHAIN_TABLE as u16,
                    cname.as_ptr(),
                );
                let h = nl::header(buf, libc::NFT_MSG_GETCHAIN, fam, libc::NLM_F_DUMP, seq);
                sys::nftnl_chain_nlmsg_build_payload(h.cast(), chain.ptr());
            }
        },
        |msg| {
            generation.check(msg);
            let chain = NlChain::new();
            parse(object, "chain", || unsafe {
                sys::nftnl_chain_nlmsg_parse(msg.header().cast(), chain.ptr())
            })?;
            if let Some(c) = live_chain(&chain, name) {
                chains.push(c);
            }
            Ok(())
        },
    );
    match result {
        Err(e) if vanished(&e) => return Ok((None, false)),
        other => other?,
    }

    let anon: HashMap<String, SetContent> = sets
        .iter()
        .filter(|s| s.flags & libc::NFT_SET_ANONYMOUS as u32 != 0)
        .map(|s| {
            let content = SetContent::new(s.datatype, s.key_len, s.flags, s.elements.clone());
            (s.name.clone(), content)
        })
        .collect();
    let resolve = |set: &str, _id: Option<u32>| anon.get(set);
    let mut check = RuleBuilder::new(family, name);
    let result = sock.request(
        object,
        "list rules",
        |buf, seq| {
            let rule = NlRule::new();
            // SAFETY: as above.
            unsafe {
                sys::nftnl_rule_set_str(rule.ptr(), sys::NFTNL_RULE_TABLE as u16, cname.as_ptr());
                let h = nl::header(buf, libc::NFT_MSG_GETRULE, fam, libc::NLM_F_DUMP, seq);
                sys::nftnl_rule_nlmsg_build_payload(h.cast(), rule.ptr());
            }
        },
        |msg| {
            generation.check(msg);
            let rule = NlRule::new();
            parse(object, "rule", || unsafe {
                sys::nftnl_rule_nlmsg_parse(msg.header().cast(), rule.ptr())
            })?;
            // SAFETY: reading attributes of a parsed rule.
            let (table, chain, handle) = unsafe {
                let r = rule.ptr();
                (
                    codec::string(sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_TABLE as u16)),
                    codec::string(sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_CHAIN as u16)),
                    sys::nftnl_rule_get_u64(r, sys::NFTNL_RULE_HANDLE as u16),
                )
            };
            if table.as_deref() != Some(name) {
                return Ok(());
            }
            let expressions = codec::render(&rule, &resolve);
            let decoded =
                codec::decode(&rule, &resolve).filter(|decoded| check.text(decoded) == expressions);
            let live = LiveRule {
                handle,
                expressions,
                rule: decoded,
            };
            match chains.iter_mut().find(|c| Some(&c.name) == chain.as_ref()) {
                Some(c) => c.rules.push(live),
                // A chain created after the chain dump: the generation check catches it.
                None => generation.consistent = false,
            }
            Ok(())
        },
    );
    match result {
        Err(e) if vanished(&e) => return Ok((None, false)),
        other => other?,
    }

    let sets = sets
        .into_iter()
        .filter(|s| s.flags & libc::NFT_SET_ANONYMOUS as u32 == 0)
        .map(live_set)
        .collect();
    let table = LiveTable {
        family,
        name: name.to_owned(),
        flags,
        sets,
        chains,
    };
    Ok((Some(table), generation.consistent))
}

fn parse(object: &str, what: &str, f: impl FnOnce() -> i32) -> Result<()> {
    if f() < 0 {
        return Err(Error::reply(
            object,
            format!("cannot parse a {what} message"),
        ));
    }
    Ok(())
}

fn live_set(raw: RawSet) -> LiveSet {
    let key = KeyType::from_datatype(raw.datatype)
        .filter(|k| raw.key_len == k.len() && raw.flags == 0 && !raw.map);
    let definition = match key {
        Some(k) => format!("type {k}"),
        None => format!(
            "type {} (key length {}, flags {:#x}{})",
            KeyType::from_datatype(raw.datatype)
                .map_or_else(|| format!("#{}", raw.datatype), |k| k.to_string()),
            raw.key_len,
            raw.flags,
            if raw.map { ", a map" } else { "" }
        ),
    };
    let elements = match key {
        Some(k) => raw.elements.iter().filter_map(|e| k.decode(e)).collect(),
        None => BTreeSet::new(),
    };
    LiveSet {
        name: raw.name,
        key,
        definition,
        elements,
    }
}

/// A chain of table `table` from a parsed dump message; `None` for other tables.
fn live_chain(chain: &NlChain, table: &str) -> Option<LiveChain> {
    let c = chain.ptr();
    // SAFETY: reading attributes of a parsed chain.
    unsafe {
        let is_set = |attr: u32| sys::nftnl_chain_is_set(c, attr as u16);
        let get_u32 = |attr: u32| sys::nftnl_chain_get_u32(c, attr as u16);
        let get_str = |attr: u32| codec::string(sys::nftnl_chain_get_str(c, attr as u16));
        if get_str(sys::NFTNL_CHAIN_TABLE).as_deref() != Some(table) {
            return None;
        }
        let definition = if is_set(sys::NFTNL_CHAIN_HOOKNUM) {
            let kind = get_str(sys::NFTNL_CHAIN_TYPE).unwrap_or_default();
            let hooknum = get_u32(sys::NFTNL_CHAIN_HOOKNUM);
            let priority = sys::nftnl_chain_get_s32(c, sys::NFTNL_CHAIN_PRIO as u16);
            let policy = get_u32(sys::NFTNL_CHAIN_POLICY);
            let base = BaseChain {
                kind: [ChainKind::Filter, ChainKind::Route, ChainKind::Nat]
                    .into_iter()
                    .find(|k| k.as_str() == kind),
                hook: Hook::ALL.into_iter().find(|h| h.number() == hooknum),
                priority,
                policy: [Policy::Accept, Policy::Drop]
                    .into_iter()
                    .find(|p| p.verdict() == policy),
            };
            match base {
                BaseChain {
                    kind: Some(kind),
                    hook: Some(hook),
                    priority,
                    policy: Some(policy),
                } => model::BaseChain {
                    kind,
                    hook,
                    priority,
                    policy,
                }
                .to_string(),
                _ => format!("type {kind} hook #{hooknum} priority {priority}; policy #{policy};"),
            }
        } else {
            String::new()
        };
        Some(LiveChain {
            name: get_str(sys::NFTNL_CHAIN_NAME).unwrap_or_default(),
            definition,
            rules: Vec::new(),
        })
    }
}

/// A base chain's attributes as far as they are known to the model.
struct BaseChain {
    kind: Option<ChainKind>,
    hook: Option<Hook>,
    priority: i32,
    policy: Option<Policy>,
}
