//! nftables over netlink: the tables slurm-egress owns, described as plain data ([`Table`]),
//! applied in one transaction, read back, compared, and set elements changed in place.
//!
//! Why netlink and not `nft`: one transaction per change, no process to spawn in a Slurm
//! prolog, and errors as errnos. Why one table rebuilt whole: the batch "add table, delete
//! table, add table, everything in it" works whether or not the table exists and swaps the old
//! table for the new one atomically, without touching anything else on the host. Set elements
//! (the users and jobs allowed out) change often and are changed in place, so running
//! connections and counters are not disturbed.

mod codec;
mod diff;
mod error;
mod live;
mod model;
mod nl;

pub use diff::{Difference, diff};
pub use error::{Error, Result};
pub use live::{LiveChain, LiveRule, LiveSet, LiveTable};
pub use model::{
    BaseChain, Chain, ChainKind, CtState, Family, Hook, KeyType, Match, Policy, Rule, Set,
    Statement, Table,
};

use codec::{NlChain, NlRule, NlSet, NlTable, RuleBuilder};
use nftnl::nftnl_sys as sys;
use nl::{Batch, Socket};
use std::collections::{BTreeSet, HashMap};
use std::ffi::c_char;

/// Elements per netlink message: keeps each message far below the 64 KiB attribute limit.
const ELEMENTS_PER_MESSAGE: usize = 1000;
/// nf_tables names (tables, sets, chains) are at most 255 bytes plus the NUL.
const NAME_MAX: usize = 255;
/// The deepest ancestor `socket cgroupv2` can look at (the kernel's limit).
const MAX_CGROUP_LEVEL: u32 = 255;

/// A netlink socket on nf_tables in the network namespace of the calling thread.
pub struct Netfilter {
    sock: Socket,
}

impl Netfilter {
    /// Opens the socket. Cheap (a few system calls, microseconds): fine to do per operation.
    pub fn open() -> Result<Netfilter> {
        let sock = Socket::open().map_err(|source| Error::Netlink {
            object: "nf_tables".to_owned(),
            action: "open",
            source,
        })?;
        Ok(Netfilter { sock })
    }

    /// Lets go of the socket without waiting for the kernel to free removed set elements
    /// (see [`Netfilter::remove_elements`]): for short-lived processes such as a Slurm prolog
    /// or epilog, whose exit would otherwise wait 5-30 ms after any recent removal in the
    /// network namespace. A short-lived child process takes the wait instead.
    pub fn close_detached(self) {
        self.sock.close_detached();
    }

    /// This socket's netlink port id: the nf_tables notifications its transactions cause
    /// carry it, which lets a listener tell its own changes from everybody else's.
    pub fn portid(&self) -> Result<u32> {
        self.sock.portid().map_err(|source| Error::Netlink {
            object: "nf_tables".to_owned(),
            action: "read the port id",
            source,
        })
    }

    /// The live table, or `None` if there is no such table.
    pub fn read(&mut self, family: Family, name: &str) -> Result<Option<LiveTable>> {
        live::read(&mut self.sock, family, name)
    }

    /// Makes the live table equal to `desired` in one transaction and returns what differed
    /// (empty: nothing was sent). If only set elements differ they are added and removed in
    /// place; otherwise the whole table is replaced atomically.
    ///
    /// Elements added with [`Netfilter::add_elements`] survive only if `desired` has them:
    /// the desired state is the whole truth.
    pub fn apply(&mut self, desired: &Table) -> Result<Vec<Difference>> {
        validate(desired)?;
        let live = self.read(desired.family, &desired.name)?;
        let differences = diff(desired, live.as_ref());
        if differences.is_empty() {
            return Ok(differences);
        }
        let batch = if differences.iter().any(Difference::is_structural) {
            rebuild(desired)
        } else {
            fix_elements(desired, &differences)
        };
        self.sock.transact(batch)?;
        Ok(differences)
    }

    /// Removes the table and everything in it; returns whether it existed. Idempotent.
    pub fn delete(&mut self, family: Family, name: &str) -> Result<bool> {
        let table = codec::table_obj(family, name);
        let mut batch = Batch::new();
        push_table(&mut batch, family, name, &table, libc::NFT_MSG_DELTABLE);
        match self.sock.transact(batch) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Adds elements to a set in one transaction. Elements already there are fine.
    pub fn add_elements(
        &mut self,
        family: Family,
        table: &str,
        set: &str,
        key: KeyType,
        elements: &[u64],
    ) -> Result<()> {
        if elements.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::new();
        push_elements(&mut batch, family, table, set, key, elements, false);
        self.sock.transact(batch)
    }

    /// Removes elements from a set in one transaction. Elements not there are fine; a missing
    /// set or table is an error (`ENOENT`).
    ///
    /// The removal is committed when this returns (~0.1 ms). Closing the socket afterwards
    /// (dropping this handle, or the process exiting) is slow: the kernel then waits for the
    /// removed elements to be freed (an RCU grace period, 5-30 ms), holding the nf_tables
    /// mutex, so a burst of removals from short-lived processes serializes at their exits.
    /// A long-lived process should keep its handle.
    pub fn remove_elements(
        &mut self,
        family: Family,
        table: &str,
        set: &str,
        key: KeyType,
        elements: &[u64],
    ) -> Result<()> {
        if elements.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::new();
        push_elements(&mut batch, family, table, set, key, elements, true);
        self.sock.transact(batch)
    }
}

fn table_object(family: Family, table: &str) -> String {
    format!("table {family} {table}")
}

fn set_object(family: Family, table: &str, set: &str) -> String {
    format!("set {family} {table} {set}")
}

fn chain_object(family: Family, table: &str, chain: &str) -> String {
    format!("chain {family} {table} {chain}")
}

fn push_table(batch: &mut Batch, family: Family, name: &str, table: &NlTable, ty: i32) {
    let (action, flags) = if ty == libc::NFT_MSG_NEWTABLE {
        ("add the table", libc::NLM_F_CREATE | libc::NLM_F_ACK)
    } else {
        ("delete the table", libc::NLM_F_ACK)
    };
    batch.push(table_object(family, name), action, |buf| unsafe {
        // SAFETY: the batch gives room for any message.
        let h = nl::header(buf, ty, family.nfproto(), flags, 0);
        sys::nftnl_table_nlmsg_build_payload(h.cast(), table.ptr());
    });
}

/// Writes one element message for `set` (which has its elements added).
fn push_set_elements(batch: &mut Batch, object: String, family: Family, set: &NlSet, ty: i32) {
    // No NLM_F_EXCL: adding an element that exists succeeds (with EXCL it would fail with
    // EEXIST and abort the whole transaction).
    let (action, flags) = if ty == libc::NFT_MSG_NEWSETELEM {
        ("add elements", libc::NLM_F_CREATE | libc::NLM_F_ACK)
    } else {
        ("delete elements", libc::NLM_F_ACK)
    };
    batch.push(object, action, |buf: *mut c_char| unsafe {
        // SAFETY: as in `push_table`; chunks keep the message far below the buffer size.
        let h = nl::header(buf, ty, family.nfproto(), flags, 0);
        sys::nftnl_set_elems_nlmsg_build_payload(h.cast(), set.ptr());
    });
}

/// Adds, or removes, elements of a named set.
///
/// Removal is "add, then delete" in the same transaction: deleting an element that is not
/// there fails with ENOENT and would abort the transaction, and the kernel only tells which
/// message failed, not which element. Adding first (a no-op for present elements) makes the
/// delete always find its element, so removal is idempotent and still one round trip, on any
/// kernel (the `DESTROYSETELEM` message that ignores absent elements needs Linux 6.3).
fn push_elements(
    batch: &mut Batch,
    family: Family,
    table: &str,
    set: &str,
    key: KeyType,
    elements: &[u64],
    remove: bool,
) {
    let name = codec::cstr(set);
    for chunk in elements.chunks(ELEMENTS_PER_MESSAGE) {
        let nl = codec::set_obj(family, table, &name);
        for value in chunk {
            codec::add_element(&nl, &key.encode(*value));
        }
        let object = set_object(family, table, set);
        push_set_elements(batch, object.clone(), family, &nl, libc::NFT_MSG_NEWSETELEM);
        if remove {
            push_set_elements(batch, object, family, &nl, libc::NFT_MSG_DELSETELEM);
        }
    }
}

/// The transaction that replaces the table with `desired`, whatever exists now.
fn rebuild(desired: &Table) -> Batch {
    let (family, name) = (desired.family, desired.name.as_str());
    let mut batch = Batch::new();
    let table = codec::table_obj(family, name);
    // Adding first makes the delete succeed when the table does not exist yet.
    push_table(&mut batch, family, name, &table, libc::NFT_MSG_NEWTABLE);
    push_table(&mut batch, family, name, &table, libc::NFT_MSG_DELTABLE);
    push_table(&mut batch, family, name, &table, libc::NFT_MSG_NEWTABLE);

    let mut builder = RuleBuilder::new(family, name);
    let mut set_ids = HashMap::new();
    for set in &desired.sets {
        let id = builder.set_id();
        set_ids.insert(set.name.clone(), id);
        let nl = codec::set_obj(family, name, &codec::cstr(&set.name));
        codec::define_set(&nl, set.key.datatype(), set.key.len(), 0, id);
        codec::set_key_byteorder(&nl, set.key.byteorder());
        push_new_set(&mut batch, set_object(family, name, &set.name), family, &nl);
        let elements: Vec<u64> = set.elements.iter().copied().collect();
        push_elements(
            &mut batch, family, name, &set.name, set.key, &elements, false,
        );
    }
    // All chains before any rule: rules jump to chains.
    for chain in &desired.chains {
        let nl = codec::chain_obj(family, name, &chain.name);
        if let Some(base) = chain.base {
            let kind = codec::cstr(base.kind.as_str());
            // SAFETY: setting attributes on an object we own; libnftnl copies strings.
            unsafe {
                let c = nl.ptr();
                sys::nftnl_chain_set_u32(c, sys::NFTNL_CHAIN_HOOKNUM as u16, base.hook.number());
                sys::nftnl_chain_set_s32(c, sys::NFTNL_CHAIN_PRIO as u16, base.priority);
                sys::nftnl_chain_set_str(c, sys::NFTNL_CHAIN_TYPE as u16, kind.as_ptr());
                sys::nftnl_chain_set_u32(c, sys::NFTNL_CHAIN_POLICY as u16, base.policy.verdict());
            }
        }
        push_chain(
            &mut batch,
            chain_object(family, name, &chain.name),
            family,
            &nl,
        );
    }
    for chain in &desired.chains {
        for (i, rule) in chain.rules.iter().enumerate() {
            let object = format!(
                "rule {} of {}",
                i + 1,
                chain_object(family, name, &chain.name)
            );
            let (nl, anon) = builder.rule(&chain.name, rule, &set_ids);
            for set in anon {
                let content = &set.content;
                let s = codec::set_obj(family, name, c"__set%d");
                define_anon(&s, content, set.id);
                push_new_set(&mut batch, format!("set of {object}"), family, &s);
                push_set_elements(
                    &mut batch,
                    format!("set of {object}"),
                    family,
                    &s,
                    libc::NFT_MSG_NEWSETELEM,
                );
            }
            push_rule(&mut batch, object, family, &nl);
        }
    }
    batch
}

fn define_anon(set: &NlSet, content: &codec::SetContent, id: u32) {
    codec::define_set(set, content.datatype, content.key_len, content.flags, id);
    for element in &content.elements {
        codec::add_element(set, element);
    }
}

fn push_new_set(batch: &mut Batch, object: String, family: Family, set: &NlSet) {
    batch.push(object, "add the set", |buf| unsafe {
        // SAFETY: as in `push_table`.
        let flags = libc::NLM_F_CREATE | libc::NLM_F_ACK;
        let h = nl::header(buf, libc::NFT_MSG_NEWSET, family.nfproto(), flags, 0);
        sys::nftnl_set_nlmsg_build_payload(h.cast(), set.ptr());
    });
}

fn push_chain(batch: &mut Batch, object: String, family: Family, chain: &NlChain) {
    batch.push(object, "add the chain", |buf| unsafe {
        // SAFETY: as in `push_table`.
        let flags = libc::NLM_F_CREATE | libc::NLM_F_ACK;
        let h = nl::header(buf, libc::NFT_MSG_NEWCHAIN, family.nfproto(), flags, 0);
        sys::nftnl_chain_nlmsg_build_payload(h.cast(), chain.ptr());
    });
}

fn push_rule(batch: &mut Batch, object: String, family: Family, rule: &NlRule) {
    batch.push(object, "add the rule", |buf| unsafe {
        // SAFETY: as in `push_table`.
        let flags = libc::NLM_F_CREATE | libc::NLM_F_APPEND | libc::NLM_F_ACK;
        let h = nl::header(buf, libc::NFT_MSG_NEWRULE, family.nfproto(), flags, 0);
        sys::nftnl_rule_nlmsg_build_payload(h.cast(), rule.ptr());
    });
}

/// The transaction that adds the missing and removes the unexpected elements.
fn fix_elements(desired: &Table, differences: &[Difference]) -> Batch {
    let mut batch = Batch::new();
    for set in &desired.sets {
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for d in differences {
            match d {
                Difference::ElementMissing { set: s, value, .. } if *s == set.name => {
                    add.push(*value)
                }
                Difference::ElementUnexpected { set: s, value, .. } if *s == set.name => {
                    remove.push(*value)
                }
                _ => {}
            }
        }
        let (family, table) = (desired.family, desired.name.as_str());
        if !add.is_empty() {
            push_elements(&mut batch, family, table, &set.name, set.key, &add, false);
        }
        if !remove.is_empty() {
            push_elements(&mut batch, family, table, &set.name, set.key, &remove, true);
        }
    }
    batch
}

/// Checks what the kernel would refuse with a less helpful errno, or silently misread.
fn validate(table: &Table) -> Result<()> {
    let (family, tname) = (table.family, table.name.as_str());
    let name_ok = |object: String, name: &str| {
        if name.is_empty() || name.len() > NAME_MAX || name.contains('\0') {
            return Err(Error::invalid(
                object,
                format!("a name must be 1 to {NAME_MAX} bytes without NUL"),
            ));
        }
        Ok(())
    };
    name_ok(table_object(family, tname), tname)?;
    let mut seen = BTreeSet::new();
    for set in &table.sets {
        let object = set_object(family, tname, &set.name);
        name_ok(object.clone(), &set.name)?;
        if !seen.insert(&set.name) {
            return Err(Error::invalid(object, "defined twice"));
        }
        if let Some(too_big) = set
            .elements
            .iter()
            .find(|e| set.key.len() == 4 && **e > u64::from(u32::MAX))
        {
            return Err(Error::invalid(
                object,
                format!("element {too_big} does not fit a {} key", set.key),
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for chain in &table.chains {
        let object = chain_object(family, tname, &chain.name);
        name_ok(object.clone(), &chain.name)?;
        if !seen.insert(&chain.name) {
            return Err(Error::invalid(object, "defined twice"));
        }
    }
    for chain in &table.chains {
        for (i, rule) in chain.rules.iter().enumerate() {
            let object = format!(
                "rule {} of {}",
                i + 1,
                chain_object(family, tname, &chain.name)
            );
            validate_rule(table, rule).map_err(|why| Error::invalid(object, why))?;
        }
    }
    Ok(())
}

fn validate_rule(table: &Table, rule: &Rule) -> std::result::Result<(), String> {
    let set_of = |name: &str, key: KeyType| match table.sets.iter().find(|s| s.name == name) {
        Some(s) if s.key == key => Ok(()),
        Some(s) => Err(format!("set {name} has type {}, this needs {key}", s.key)),
        None => Err(format!("no set {name} in the table")),
    };
    for m in &rule.matches {
        match m {
            Match::L4Proto(protos) if protos.is_empty() => Err("empty protocol list".to_owned())?,
            Match::CtState(states) if states.bits() == 0 => Err("empty ct state".to_owned())?,
            Match::SkUidIn(set) => set_of(set, KeyType::Uid)?,
            Match::SkGidIn(set) => set_of(set, KeyType::Gid)?,
            Match::SocketCgroupIn { level, .. } if *level > MAX_CGROUP_LEVEL => Err(format!(
                "cgroup level {level} is deeper than the kernel allows ({MAX_CGROUP_LEVEL})"
            ))?,
            Match::SocketCgroupIn { set, .. } => set_of(set, KeyType::CgroupV2)?,
            Match::IifName(name) | Match::OifName(name)
                if name.is_empty() || name.len() >= 16 || name.contains('\0') =>
            {
                Err(format!("interface name \"{name}\" is not 1 to 15 bytes"))?
            }
            _ => {}
        }
    }
    for s in &rule.statements {
        if let Statement::Jump(target) | Statement::Goto(target) = s {
            match table.chains.iter().find(|c| c.name == *target) {
                Some(c) if c.base.is_none() => {}
                Some(_) => Err(format!("cannot jump to base chain {target}"))?,
                None => Err(format!("no chain {target} in the table"))?,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(rule: Rule) -> Table {
        Table {
            family: Family::Inet,
            name: "t".into(),
            sets: vec![Set::new("users", KeyType::Uid, [])],
            chains: vec![
                Chain {
                    name: "base".into(),
                    base: Some(BaseChain {
                        kind: ChainKind::Filter,
                        hook: Hook::Input,
                        priority: 0,
                        policy: Policy::Accept,
                    }),
                    rules: vec![rule],
                },
                Chain {
                    name: "regular".into(),
                    base: None,
                    rules: vec![],
                },
            ],
        }
    }

    fn invalid(rule: Rule) -> String {
        let err = validate(&table(rule)).unwrap_err();
        let source = std::error::Error::source(&err).map(ToString::to_string);
        format!("{err}: {}", source.unwrap_or_default())
    }

    fn statement(s: Statement) -> Rule {
        Rule {
            matches: vec![],
            statements: vec![s],
        }
    }

    fn matching(m: Match) -> Rule {
        Rule {
            matches: vec![m],
            statements: vec![],
        }
    }

    #[test]
    fn validation_names_the_rule_and_the_reason() {
        assert!(validate(&table(statement(Statement::Jump("regular".into())))).is_ok());
        let prefix = "rule 1 of chain inet t base is invalid: ";
        let cases = [
            (
                statement(Statement::Jump("base".into())),
                "cannot jump to base chain base",
            ),
            (
                statement(Statement::Goto("nowhere".into())),
                "no chain nowhere in the table",
            ),
            (
                matching(Match::SkGidIn("users".into())),
                "set users has type uid, this needs gid",
            ),
            (
                matching(Match::SkUidIn("jobs".into())),
                "no set jobs in the table",
            ),
            (
                matching(Match::IifName("a-very-long-name".into())),
                "interface name \"a-very-long-name\" is not 1 to 15 bytes",
            ),
            (matching(Match::L4Proto(vec![])), "empty protocol list"),
            (
                matching(Match::CtState(CtState::from_bits(0))),
                "empty ct state",
            ),
        ];
        for (rule, why) in cases {
            assert_eq!(invalid(rule), format!("{prefix}{why}"));
        }
        let mut t = table(statement(Statement::Accept));
        t.chains[1].name = "base".into();
        assert_eq!(
            validate(&t).unwrap_err().to_string(),
            "chain inet t base is invalid"
        );
        t.name = "bad\0name".into();
        assert_eq!(
            validate(&t).unwrap_err().to_string(),
            "table inet bad\0name is invalid"
        );
    }

    #[test]
    fn permission_errors_say_why() {
        let eperm = std::io::Error::from_raw_os_error(libc::EPERM);
        assert_eq!(
            error::eperm_hint(&eperm, false),
            " (this needs root: CAP_NET_ADMIN in the current network namespace)"
        );
        assert_eq!(
            error::eperm_hint(&eperm, true),
            " (another process owns the table: nftables `flags owner`)"
        );
        let enoent = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(error::eperm_hint(&enoent, false), "");
        let err = Error::Refused {
            object: "table inet t".into(),
            action: "add the table",
            source: eperm,
        };
        assert!(
            err.to_string()
                .starts_with("table inet t: the kernel refused to add the table ("),
            "{err}"
        );
        assert_eq!(err.errno(), Some(libc::EPERM));
    }
}
