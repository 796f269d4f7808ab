//! Translation between the model and libnftnl objects: building kernel expressions from rules,
//! rendering expressions as text, and reading rules back.
//!
//! Live and desired rules are compared by their rendered expressions (libnftnl's own
//! `nftnl_expr_snprintf`, one `[ ... ]` per expression), so the comparison is exact for any
//! rule, including ones this module cannot express. Two things are normalised because the
//! kernel legitimately reports them differently from what was sent: counter values, and
//! anonymous sets, whose names the kernel picks (`__set0`) and which are rendered by content.
//! A live rule is mapped back to the model only if the mapped rule renders to exactly the live
//! text, so a decoded rule is always the true rule.

use super::model::{CtState, Family, Match, Rule, Statement};
use nftnl::nftnl_sys as sys;
use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::net::Ipv4Addr;
use std::ptr::NonNull;

/// nftables datatype id of `inet_proto` (keys of `meta l4proto { ... }` sets).
const TYPE_INET_PROTOCOL: u32 = 12;
/// `NFT_SOCKET_CGROUPV2` (not in the libc crate).
const NFT_SOCKET_CGROUPV2: u32 = 3;
/// Interface names are compared over the whole `IFNAMSIZ` buffer, as `nft` does.
const IFNAMSIZ: usize = 16;
/// `NF_NAT_RANGE_MAP_IPS`: the kernel sets it on a nat expression with an address register and
/// reports it back, so we send it too.
const NAT_RANGE_MAP_IPS: u32 = 1;
/// Where the destination address is in an IPv4 header.
const IPV4_DADDR_OFFSET: u32 = 16;
/// Name template of anonymous sets; the kernel replaces `%d`.
const ANON_SET_NAME: &CStr = c"__set%d";
pub(crate) const ANON_SET_FLAGS: u32 = (libc::NFT_SET_ANONYMOUS | libc::NFT_SET_CONSTANT) as u32;

fn alloc<T>(ptr: *mut T) -> NonNull<T> {
    // Like libstd on allocation failure (and like the nftnl crate).
    NonNull::new(ptr).unwrap_or_else(|| std::process::abort())
}

macro_rules! owned {
    ($name:ident, $raw:ty, $alloc:path, $free:path) => {
        /// An owned libnftnl object, freed on drop.
        pub(crate) struct $name(NonNull<$raw>);

        impl $name {
            pub fn new() -> Self {
                // SAFETY: allocation without arguments.
                $name(alloc(unsafe { $alloc() }))
            }

            pub fn ptr(&self) -> *mut $raw {
                self.0.as_ptr()
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: we own the object.
                unsafe { $free(self.0.as_ptr()) }
            }
        }
    };
}

owned!(
    NlTable,
    sys::nftnl_table,
    sys::nftnl_table_alloc,
    sys::nftnl_table_free
);
owned!(
    NlChain,
    sys::nftnl_chain,
    sys::nftnl_chain_alloc,
    sys::nftnl_chain_free
);
owned!(
    NlSet,
    sys::nftnl_set,
    sys::nftnl_set_alloc,
    sys::nftnl_set_free
);
owned!(
    NlRule,
    sys::nftnl_rule,
    sys::nftnl_rule_alloc,
    sys::nftnl_rule_free
);

/// A C string for libnftnl; names are validated before anything is sent, so an interior NUL
/// can only reach here through `diff`, where an empty name is as good as any.
pub(crate) fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

/// Reads a string attribute; `None` when unset.
pub(crate) fn string(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: libnftnl returns NUL-terminated strings it owns.
    Some(
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned(),
    )
}

pub(crate) fn table_obj(family: Family, name: &str) -> NlTable {
    let table = NlTable::new();
    let name = cstr(name);
    // SAFETY: setting attributes on an object we own; libnftnl copies strings.
    unsafe {
        sys::nftnl_table_set_u32(
            table.ptr(),
            sys::NFTNL_TABLE_FAMILY as u16,
            u32::from(family.nfproto()),
        );
        sys::nftnl_table_set_str(table.ptr(), sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
    }
    table
}

/// A set object (definition only, until elements are added).
pub(crate) fn set_obj(family: Family, table: &str, name: &CStr) -> NlSet {
    let set = NlSet::new();
    let table = cstr(table);
    // SAFETY: as in `table_obj`.
    unsafe {
        sys::nftnl_set_set_u32(
            set.ptr(),
            sys::NFTNL_SET_FAMILY as u16,
            u32::from(family.nfproto()),
        );
        sys::nftnl_set_set_str(set.ptr(), sys::NFTNL_SET_TABLE as u16, table.as_ptr());
        sys::nftnl_set_set_str(set.ptr(), sys::NFTNL_SET_NAME as u16, name.as_ptr());
    }
    set
}

/// Sets the key type and length, flags and transaction id of a set to be created.
pub(crate) fn define_set(set: &NlSet, datatype: u32, key_len: u32, flags: u32, id: u32) {
    // SAFETY: as in `table_obj`.
    unsafe {
        sys::nftnl_set_set_u32(set.ptr(), sys::NFTNL_SET_KEY_TYPE as u16, datatype);
        sys::nftnl_set_set_u32(set.ptr(), sys::NFTNL_SET_KEY_LEN as u16, key_len);
        if flags != 0 {
            sys::nftnl_set_set_u32(set.ptr(), sys::NFTNL_SET_FLAGS as u16, flags);
        }
        sys::nftnl_set_set_u32(set.ptr(), sys::NFTNL_SET_ID as u16, id);
    }
}

/// Tells `nft` the byte order of the keys: without it `nft list` assumes big endian and shows
/// uid 1001 as 3909287936. The kernel stores this user data without looking at it.
pub(crate) fn set_key_byteorder(set: &NlSet, byteorder: u32) {
    let mut udata = vec![sys::NFTNL_UDATA_SET_KEYBYTEORDER as u8, 4];
    udata.extend_from_slice(&byteorder.to_ne_bytes());
    // SAFETY: libnftnl copies the data.
    unsafe {
        sys::nftnl_set_set_data(
            set.ptr(),
            sys::NFTNL_SET_USERDATA as u16,
            udata.as_ptr().cast(),
            udata.len() as u32,
        );
    }
}

pub(crate) fn add_element(set: &NlSet, key: &[u8]) {
    // SAFETY: the element is handed over to the set, which frees it; the key is copied.
    unsafe {
        let elem = alloc(sys::nftnl_set_elem_alloc()).as_ptr();
        sys::nftnl_set_elem_set(
            elem,
            sys::NFTNL_SET_ELEM_KEY as u16,
            key.as_ptr().cast(),
            key.len() as u32,
        );
        sys::nftnl_set_elem_add(set.ptr(), elem);
    }
}

/// The keys of the elements held by a set object (after parsing a dump).
pub(crate) fn elements(set: &NlSet) -> Vec<Vec<u8>> {
    unsafe extern "C" fn each(elem: *mut sys::nftnl_set_elem, data: *mut c_void) -> c_int {
        // SAFETY: `data` is the `Vec` below; `elem` is valid during the callback.
        unsafe {
            let out = &mut *data.cast::<Vec<Vec<u8>>>();
            let mut len = 0u32;
            let key = sys::nftnl_set_elem_get(elem, sys::NFTNL_SET_ELEM_KEY as u16, &mut len);
            if !key.is_null() {
                out.push(std::slice::from_raw_parts(key.cast::<u8>(), len as usize).to_vec());
            }
        }
        0
    }
    let mut out: Vec<Vec<u8>> = Vec::new();
    // SAFETY: `each` only touches `out`, which outlives the call.
    unsafe {
        sys::nftnl_set_elem_foreach(
            set.ptr(),
            Some(each),
            (&mut out as *mut Vec<Vec<u8>>).cast(),
        );
    }
    out
}

pub(crate) fn chain_obj(family: Family, table: &str, name: &str) -> NlChain {
    let chain = NlChain::new();
    let (table, name) = (cstr(table), cstr(name));
    // SAFETY: as in `table_obj`.
    unsafe {
        sys::nftnl_chain_set_u32(
            chain.ptr(),
            sys::NFTNL_CHAIN_FAMILY as u16,
            u32::from(family.nfproto()),
        );
        sys::nftnl_chain_set_str(chain.ptr(), sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
        sys::nftnl_chain_set_str(chain.ptr(), sys::NFTNL_CHAIN_NAME as u16, name.as_ptr());
    }
    chain
}

/// The anonymous set behind `meta l4proto { tcp, udp }`, created in the same transaction as
/// its rule and bound to it.
pub(crate) struct AnonSet {
    pub id: u32,
    pub content: SetContent,
}

/// What an anonymous set holds; its text stands in for its name in rendered rules.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct SetContent {
    pub datatype: u32,
    pub key_len: u32,
    pub flags: u32,
    pub elements: Vec<Vec<u8>>,
}

impl SetContent {
    pub fn new(datatype: u32, key_len: u32, flags: u32, mut elements: Vec<Vec<u8>>) -> Self {
        elements.sort();
        elements.dedup();
        SetContent {
            datatype,
            key_len,
            flags,
            elements,
        }
    }

    fn text(&self) -> String {
        let elements: Vec<String> = self
            .elements
            .iter()
            .map(|e| e.iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        format!(
            "{{ type {} len {} flags {:#x}: {} }}",
            self.datatype,
            self.key_len,
            self.flags,
            elements.join(" ")
        )
    }
}

/// Builds rules for one table. Set ids tie lookups to sets created in the same transaction.
pub(crate) struct RuleBuilder {
    family: Family,
    table: CString,
    next_set_id: u32,
}

type Expr = *mut sys::nftnl_expr;

fn put_u32(e: Expr, attr: u32, value: u32) {
    // SAFETY: `e` is a live expression being built.
    unsafe { sys::nftnl_expr_set_u32(e, attr as u16, value) }
}

fn put_bytes(e: Expr, attr: u32, data: &[u8]) {
    // SAFETY: as above; libnftnl copies the data.
    unsafe { sys::nftnl_expr_set(e, attr as u16, data.as_ptr().cast(), data.len() as u32) };
}

fn put_str(e: Expr, attr: u32, s: &CStr) {
    // SAFETY: as above; libnftnl copies the string.
    unsafe { sys::nftnl_expr_set_str(e, attr as u16, s.as_ptr()) };
}

/// Appends expressions to one rule.
struct Exprs<'a>(&'a NlRule);

impl Exprs<'_> {
    fn add(&self, name: &CStr, fill: impl FnOnce(Expr)) {
        // SAFETY: the rule takes ownership of the expression.
        unsafe {
            let e = alloc(sys::nftnl_expr_alloc(name.as_ptr())).as_ptr();
            fill(e);
            sys::nftnl_rule_add_expr(self.0.ptr(), e);
        }
    }

    fn meta_load(&self, key: c_int) {
        self.add(c"meta", |e| {
            put_u32(e, sys::NFTNL_EXPR_META_KEY, key as u32);
            put_u32(e, sys::NFTNL_EXPR_META_DREG, libc::NFT_REG_1 as u32);
        });
    }

    fn meta_set(&self, key: c_int) {
        self.add(c"meta", |e| {
            put_u32(e, sys::NFTNL_EXPR_META_KEY, key as u32);
            put_u32(e, sys::NFTNL_EXPR_META_SREG, libc::NFT_REG_1 as u32);
        });
    }

    fn ct_load(&self, key: c_int) {
        self.add(c"ct", |e| {
            put_u32(e, sys::NFTNL_EXPR_CT_KEY, key as u32);
            put_u32(e, sys::NFTNL_EXPR_CT_DREG, libc::NFT_REG_1 as u32);
        });
    }

    fn ct_set(&self, key: c_int) {
        self.add(c"ct", |e| {
            put_u32(e, sys::NFTNL_EXPR_CT_KEY, key as u32);
            put_u32(e, sys::NFTNL_EXPR_CT_SREG, libc::NFT_REG_1 as u32);
        });
    }

    fn cmp(&self, op: c_int, data: &[u8]) {
        self.add(c"cmp", |e| {
            put_u32(e, sys::NFTNL_EXPR_CMP_SREG, libc::NFT_REG_1 as u32);
            put_u32(e, sys::NFTNL_EXPR_CMP_OP, op as u32);
            put_bytes(e, sys::NFTNL_EXPR_CMP_DATA, data);
        });
    }

    /// `reg 1 = (reg 1 & mask) ^ xor` on 32 bits.
    fn bitwise(&self, mask: u32, xor: u32) {
        self.add(c"bitwise", |e| {
            put_u32(e, sys::NFTNL_EXPR_BITWISE_SREG, libc::NFT_REG_1 as u32);
            put_u32(e, sys::NFTNL_EXPR_BITWISE_DREG, libc::NFT_REG_1 as u32);
            put_u32(e, sys::NFTNL_EXPR_BITWISE_LEN, 4);
            put_bytes(e, sys::NFTNL_EXPR_BITWISE_MASK, &mask.to_ne_bytes());
            put_bytes(e, sys::NFTNL_EXPR_BITWISE_XOR, &xor.to_ne_bytes());
        });
    }

    /// `reg 1 = len bytes at offset of the network header`.
    fn network_load(&self, offset: u32, len: u32) {
        self.add(c"payload", |e| {
            put_u32(e, sys::NFTNL_EXPR_PAYLOAD_DREG, libc::NFT_REG_1 as u32);
            put_u32(
                e,
                sys::NFTNL_EXPR_PAYLOAD_BASE,
                libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
            );
            put_u32(e, sys::NFTNL_EXPR_PAYLOAD_OFFSET, offset);
            put_u32(e, sys::NFTNL_EXPR_PAYLOAD_LEN, len);
        });
    }

    fn lookup(&self, set: &CStr, id: u32) {
        self.add(c"lookup", |e| {
            put_u32(e, sys::NFTNL_EXPR_LOOKUP_SREG, libc::NFT_REG_1 as u32);
            put_str(e, sys::NFTNL_EXPR_LOOKUP_SET, set);
            put_u32(e, sys::NFTNL_EXPR_LOOKUP_SET_ID, id);
        });
    }

    fn verdict(&self, code: c_int, chain: Option<&str>) {
        self.add(c"immediate", |e| {
            put_u32(e, sys::NFTNL_EXPR_IMM_DREG, libc::NFT_REG_VERDICT as u32);
            put_u32(e, sys::NFTNL_EXPR_IMM_VERDICT, code as u32);
            if let Some(chain) = chain {
                put_str(e, sys::NFTNL_EXPR_IMM_CHAIN, &cstr(chain));
            }
        });
    }
}

fn ifname(name: &str) -> Vec<u8> {
    let mut data = name.as_bytes().to_vec();
    data.resize(IFNAMSIZ.max(data.len() + 1), 0);
    data
}

impl RuleBuilder {
    pub fn new(family: Family, table: &str) -> Self {
        RuleBuilder {
            family,
            table: cstr(table),
            next_set_id: 1,
        }
    }

    /// A fresh id for a set created in this transaction.
    pub fn set_id(&mut self) -> u32 {
        let id = self.next_set_id;
        self.next_set_id += 1;
        id
    }

    /// The rule as libnftnl objects, plus the anonymous sets it needs (to be created before it
    /// in the same transaction). `set_ids` gives the ids of named sets created alongside.
    pub fn rule(
        &mut self,
        chain: &str,
        rule: &Rule,
        set_ids: &HashMap<String, u32>,
    ) -> (NlRule, Vec<AnonSet>) {
        let nl = NlRule::new();
        let chain = cstr(chain);
        // SAFETY: as in `table_obj`.
        unsafe {
            sys::nftnl_rule_set_u32(
                nl.ptr(),
                sys::NFTNL_RULE_FAMILY as u16,
                u32::from(self.family.nfproto()),
            );
            sys::nftnl_rule_set_str(nl.ptr(), sys::NFTNL_RULE_TABLE as u16, self.table.as_ptr());
            sys::nftnl_rule_set_str(nl.ptr(), sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
        }
        let x = Exprs(&nl);
        let mut anon = Vec::new();
        let named = |name: &str| (cstr(name), set_ids.get(name).copied().unwrap_or(0));
        for m in &rule.matches {
            match m {
                Match::L4Proto(protos) if protos.len() == 1 => {
                    x.meta_load(libc::NFT_META_L4PROTO);
                    x.cmp(libc::NFT_CMP_EQ, &protos[..1]);
                }
                Match::L4Proto(protos) => {
                    x.meta_load(libc::NFT_META_L4PROTO);
                    let id = self.set_id();
                    x.lookup(ANON_SET_NAME, id);
                    let elements = protos.iter().map(|p| vec![*p]).collect();
                    anon.push(AnonSet {
                        id,
                        content: SetContent::new(TYPE_INET_PROTOCOL, 1, ANON_SET_FLAGS, elements),
                    });
                }
                Match::CtState(states) => {
                    x.ct_load(libc::NFT_CT_STATE);
                    x.bitwise(states.bits(), 0);
                    x.cmp(libc::NFT_CMP_NEQ, &0u32.to_ne_bytes());
                }
                Match::CtMark { mask, value } => {
                    x.ct_load(libc::NFT_CT_MARK);
                    if *mask != u32::MAX {
                        x.bitwise(*mask, 0);
                    }
                    x.cmp(libc::NFT_CMP_EQ, &value.to_ne_bytes());
                }
                Match::SkUidIn(set) | Match::SkGidIn(set) => {
                    let key = match m {
                        Match::SkUidIn(_) => libc::NFT_META_SKUID,
                        _ => libc::NFT_META_SKGID,
                    };
                    x.meta_load(key);
                    let (name, id) = named(set);
                    x.lookup(&name, id);
                }
                Match::SocketCgroupIn { level, set } => {
                    x.add(c"socket", |e| {
                        put_u32(e, sys::NFTNL_EXPR_SOCKET_KEY, NFT_SOCKET_CGROUPV2);
                        put_u32(e, sys::NFTNL_EXPR_SOCKET_DREG, libc::NFT_REG_1 as u32);
                        put_u32(e, sys::NFTNL_EXPR_SOCKET_LEVEL, *level);
                    });
                    let (name, id) = named(set);
                    x.lookup(&name, id);
                }
                Match::IifName(name) => {
                    x.meta_load(libc::NFT_META_IIFNAME);
                    x.cmp(libc::NFT_CMP_EQ, &ifname(name));
                }
                Match::OifName(name) => {
                    x.meta_load(libc::NFT_META_OIFNAME);
                    x.cmp(libc::NFT_CMP_EQ, &ifname(name));
                }
                Match::IpDaddr(addr) => {
                    // As nft does: in an inet table, first make sure it is IPv4.
                    if self.family == Family::Inet {
                        x.meta_load(libc::NFT_META_NFPROTO);
                        x.cmp(libc::NFT_CMP_EQ, &[libc::NFPROTO_IPV4 as u8]);
                    }
                    x.network_load(IPV4_DADDR_OFFSET, 4);
                    x.cmp(libc::NFT_CMP_EQ, &addr.octets());
                }
            }
        }
        for s in &rule.statements {
            match s {
                Statement::MetaMark { mask, value } => {
                    x.meta_load(libc::NFT_META_MARK);
                    x.bitwise(!mask, *value);
                    x.meta_set(libc::NFT_META_MARK);
                }
                Statement::CtMark { mask, value } => {
                    x.ct_load(libc::NFT_CT_MARK);
                    x.bitwise(!mask, *value);
                    x.ct_set(libc::NFT_CT_MARK);
                }
                Statement::Counter => x.add(c"counter", |_| {}),
                Statement::Accept => x.verdict(libc::NF_ACCEPT, None),
                Statement::Drop => x.verdict(libc::NF_DROP, None),
                Statement::Return => x.verdict(libc::NFT_RETURN, None),
                Statement::Jump(chain) => x.verdict(libc::NFT_JUMP, Some(chain)),
                Statement::Goto(chain) => x.verdict(libc::NFT_GOTO, Some(chain)),
                Statement::Masquerade => x.add(c"masq", |_| {}),
                Statement::Snat(addr) => {
                    x.add(c"immediate", |e| {
                        put_u32(e, sys::NFTNL_EXPR_IMM_DREG, libc::NFT_REG_1 as u32);
                        put_bytes(e, sys::NFTNL_EXPR_IMM_DATA, &addr.octets());
                    });
                    x.add(c"nat", |e| {
                        put_u32(e, sys::NFTNL_EXPR_NAT_TYPE, libc::NFT_NAT_SNAT as u32);
                        put_u32(e, sys::NFTNL_EXPR_NAT_FAMILY, libc::NFPROTO_IPV4 as u32);
                        put_u32(e, sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, libc::NFT_REG_1 as u32);
                        // The kernel reports the max register too (same as min).
                        put_u32(e, sys::NFTNL_EXPR_NAT_REG_ADDR_MAX, libc::NFT_REG_1 as u32);
                        put_u32(e, sys::NFTNL_EXPR_NAT_FLAGS, NAT_RANGE_MAP_IPS);
                    });
                }
            }
        }
        (nl, anon)
    }

    /// The comparison text of a desired rule (see the module docs).
    pub fn text(&mut self, rule: &Rule) -> String {
        let (nl, anon) = self.rule("", rule, &HashMap::new());
        let by_id: HashMap<u32, &SetContent> = anon.iter().map(|a| (a.id, &a.content)).collect();
        render(&nl, &|_, id| id.and_then(|id| by_id.get(&id).copied()))
    }
}

/// One expression of a rule, with what mapping it back needs.
enum Ex {
    MetaLoad(u32),
    MetaSet(u32),
    CtLoad(u32),
    CtSet(u32),
    Cmp(u32, Vec<u8>),
    Bitwise(Vec<u8>, Vec<u8>),
    Lookup(String),
    /// `socket load <key> => reg 1` at a cgroup level.
    Socket(u32, u32),
    /// A load from the packet: base, offset, length.
    Payload(u32, u32, u32),
    Verdict(i32, Option<String>),
    ImmData(Vec<u8>),
    Counter,
    Masq,
    Nat,
    Other,
}

/// Calls `f` on every expression of a rule, in order.
fn for_each_expr(rule: &NlRule, mut f: impl FnMut(Expr)) {
    unsafe extern "C" fn each(e: *mut sys::nftnl_expr, data: *mut c_void) -> c_int {
        // SAFETY: `data` is the closure below, alive for the whole foreach.
        let f = unsafe { &mut *data.cast::<&mut dyn FnMut(Expr)>() };
        f(e);
        0
    }
    let mut f: &mut dyn FnMut(Expr) = &mut f;
    // SAFETY: `each` only calls `f`.
    unsafe {
        sys::nftnl_expr_foreach(
            rule.ptr(),
            Some(each),
            (&mut f as *mut &mut dyn FnMut(Expr)).cast(),
        );
    }
}

fn has(e: Expr, attr: u32) -> bool {
    // SAFETY: reading an attribute of a live expression.
    unsafe { sys::nftnl_expr_is_set(e, attr as u16) }
}

fn get_u32(e: Expr, attr: u32) -> Option<u32> {
    // SAFETY: as above.
    has(e, attr).then(|| unsafe { sys::nftnl_expr_get_u32(e, attr as u16) })
}

fn get_bytes(e: Expr, attr: u32) -> Vec<u8> {
    let mut len = 0u32;
    // SAFETY: as above; the data is copied out before the expression can go away.
    unsafe {
        let data = sys::nftnl_expr_get(e, attr as u16, &mut len);
        if data.is_null() {
            return Vec::new();
        }
        std::slice::from_raw_parts(data.cast::<u8>(), len as usize).to_vec()
    }
}

fn get_str(e: Expr, attr: u32) -> Option<String> {
    // SAFETY: as above.
    string(unsafe { sys::nftnl_expr_get_str(e, attr as u16) })
}

fn name_of(e: Expr) -> String {
    get_str(e, sys::NFTNL_EXPR_NAME).unwrap_or_default()
}

fn classify(e: Expr) -> Ex {
    use sys::*;
    let key = |attr| get_u32(e, attr).unwrap_or(u32::MAX);
    match name_of(e).as_str() {
        "meta" if has(e, NFTNL_EXPR_META_SREG) => Ex::MetaSet(key(NFTNL_EXPR_META_KEY)),
        "meta" => Ex::MetaLoad(key(NFTNL_EXPR_META_KEY)),
        "ct" if has(e, NFTNL_EXPR_CT_SREG) => Ex::CtSet(key(NFTNL_EXPR_CT_KEY)),
        "ct" => Ex::CtLoad(key(NFTNL_EXPR_CT_KEY)),
        "cmp" => Ex::Cmp(key(NFTNL_EXPR_CMP_OP), get_bytes(e, NFTNL_EXPR_CMP_DATA)),
        "bitwise" => Ex::Bitwise(
            get_bytes(e, NFTNL_EXPR_BITWISE_MASK),
            get_bytes(e, NFTNL_EXPR_BITWISE_XOR),
        ),
        "lookup" => Ex::Lookup(get_str(e, NFTNL_EXPR_LOOKUP_SET).unwrap_or_default()),
        "socket" => Ex::Socket(key(NFTNL_EXPR_SOCKET_KEY), key(NFTNL_EXPR_SOCKET_LEVEL)),
        "payload" if !has(e, NFTNL_EXPR_PAYLOAD_SREG) => Ex::Payload(
            key(NFTNL_EXPR_PAYLOAD_BASE),
            key(NFTNL_EXPR_PAYLOAD_OFFSET),
            key(NFTNL_EXPR_PAYLOAD_LEN),
        ),
        "immediate" if has(e, NFTNL_EXPR_IMM_VERDICT) => Ex::Verdict(
            key(NFTNL_EXPR_IMM_VERDICT) as i32,
            get_str(e, NFTNL_EXPR_IMM_CHAIN),
        ),
        "immediate" => Ex::ImmData(get_bytes(e, NFTNL_EXPR_IMM_DATA)),
        "counter" => Ex::Counter,
        "masq" => Ex::Masq,
        "nat" => Ex::Nat,
        _ => Ex::Other,
    }
}

/// Resolves a lookup's set (by name for live rules, by id for rules being built) to the content
/// of an anonymous set; `None` for named sets.
pub(crate) type Anon<'a> = dyn Fn(&str, Option<u32>) -> Option<&'a SetContent> + 'a;

/// The comparison text of a rule: `[ meta load l4proto => reg 1 ] [ cmp eq reg 1 0x00000006 ]`.
pub(crate) fn render(rule: &NlRule, anon: &Anon<'_>) -> String {
    let mut parts = Vec::new();
    for_each_expr(rule, |e| parts.push(render_expr(e, anon)));
    parts.join(" ")
}

fn render_expr(e: Expr, anon: &Anon<'_>) -> String {
    use sys::*;
    let name = name_of(e);
    match name.as_str() {
        // The kernel reports live packet and byte counts.
        "counter" => "[ counter ]".to_owned(),
        // Anonymous sets by content; the kernel also always reports flags (0) that a new
        // lookup does not carry, so those are only shown when set.
        "lookup" => {
            let set = get_str(e, NFTNL_EXPR_LOOKUP_SET).unwrap_or_default();
            let id = get_u32(e, NFTNL_EXPR_LOOKUP_SET_ID);
            let set = anon(&set, id).map_or(set, SetContent::text);
            let mut out = format!(
                "[ lookup reg {} set {set}",
                get_u32(e, NFTNL_EXPR_LOOKUP_SREG).unwrap_or(0)
            );
            if let Some(dreg) = get_u32(e, NFTNL_EXPR_LOOKUP_DREG) {
                out += &format!(" dreg {dreg}");
            }
            if let Some(flags) = get_u32(e, NFTNL_EXPR_LOOKUP_FLAGS).filter(|f| *f != 0) {
                out += &format!(" flags {flags:#x}");
            }
            out + " ]"
        }
        // libnftnl leaves the level out of its text; a rule at another level is another rule.
        "socket" => match get_u32(e, NFTNL_EXPR_SOCKET_LEVEL) {
            Some(level) => format!("[ socket {} level {level} ]", snprintf(e)),
            None => format!("[ socket {} ]", snprintf(e)),
        },
        _ => format!("[ {name} {} ]", snprintf(e)),
    }
}

fn snprintf(e: Expr) -> String {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: libnftnl writes at most `buf.len()` bytes, NUL included.
        let n = unsafe {
            sys::nftnl_expr_snprintf(
                buf.as_mut_ptr().cast(),
                buf.len(),
                e,
                sys::NFTNL_OUTPUT_DEFAULT,
                0,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            return "?".to_owned();
        };
        if n < buf.len() {
            buf.truncate(n);
            return String::from_utf8_lossy(&buf).trim().to_owned();
        }
        buf.resize(n + 1, 0);
    }
}

fn u32_of(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

/// Maps a live rule back to the model, if it is one we could have written; `anon` resolves
/// anonymous sets by name. The caller checks the result by rendering it again.
pub(crate) fn decode(rule: &NlRule, anon: &Anon<'_>) -> Option<Rule> {
    let mut exprs = Vec::new();
    for_each_expr(rule, |e| exprs.push(classify(e)));
    let mut matches = Vec::new();
    let mut statements = Vec::new();
    let mut rest = exprs.as_slice();
    let (mark, skuid, skgid) = (
        libc::NFT_META_MARK as u32,
        libc::NFT_META_SKUID as u32,
        libc::NFT_META_SKGID as u32,
    );
    let (l4proto, iifname, oifname) = (
        libc::NFT_META_L4PROTO as u32,
        libc::NFT_META_IIFNAME as u32,
        libc::NFT_META_OIFNAME as u32,
    );
    let (ct_state, ct_mark) = (libc::NFT_CT_STATE as u32, libc::NFT_CT_MARK as u32);
    let (nfproto, network) = (
        libc::NFT_META_NFPROTO as u32,
        libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
    );
    let ipv4 = [libc::NFPROTO_IPV4 as u8];
    let daddr = |d: &[u8]| Some(Ipv4Addr::from(<[u8; 4]>::try_from(d).ok()?));
    let (eq, neq) = (libc::NFT_CMP_EQ as u32, libc::NFT_CMP_NEQ as u32);
    let ifname = |data: &[u8]| {
        let name = data.split(|b| *b == 0).next().unwrap_or_default();
        String::from_utf8(name.to_vec()).ok()
    };
    while !rest.is_empty() {
        let (m, used): (Option<Match>, usize) = match rest {
            [Ex::MetaLoad(k), Ex::Cmp(op, d), ..] if *k == l4proto && *op == eq && d.len() == 1 => {
                (Some(Match::L4Proto(d.clone())), 2)
            }
            [Ex::MetaLoad(k), Ex::Lookup(set), ..] if *k == l4proto => {
                let content = anon(set, None)?;
                let protos = content.elements.iter().map(|e| e.first().copied());
                (Some(Match::L4Proto(protos.collect::<Option<_>>()?)), 2)
            }
            [Ex::CtLoad(k), Ex::Bitwise(m, x), Ex::Cmp(op, d), ..]
                if *k == ct_state && *op == neq && u32_of(x) == Some(0) && u32_of(d) == Some(0) =>
            {
                (Some(Match::CtState(CtState::from_bits(u32_of(m)?))), 3)
            }
            [Ex::CtLoad(k), Ex::Bitwise(m, x), Ex::Cmp(op, d), ..]
                if *k == ct_mark && *op == eq && u32_of(x) == Some(0) =>
            {
                let (mask, value) = (u32_of(m)?, u32_of(d)?);
                (Some(Match::CtMark { mask, value }), 3)
            }
            [Ex::CtLoad(k), Ex::Cmp(op, d), ..] if *k == ct_mark && *op == eq => {
                let value = u32_of(d)?;
                (
                    Some(Match::CtMark {
                        mask: u32::MAX,
                        value,
                    }),
                    2,
                )
            }
            [Ex::MetaLoad(k), Ex::Lookup(set), ..] if *k == skuid => {
                (Some(Match::SkUidIn(set.clone())), 2)
            }
            [Ex::MetaLoad(k), Ex::Lookup(set), ..] if *k == skgid => {
                (Some(Match::SkGidIn(set.clone())), 2)
            }
            [Ex::Socket(k, level), Ex::Lookup(set), ..] if *k == NFT_SOCKET_CGROUPV2 => (
                Some(Match::SocketCgroupIn {
                    level: *level,
                    set: set.clone(),
                }),
                2,
            ),
            [Ex::MetaLoad(k), Ex::Cmp(op, d), ..] if *k == iifname && *op == eq => {
                (Some(Match::IifName(ifname(d)?)), 2)
            }
            [Ex::MetaLoad(k), Ex::Cmp(op, d), ..] if *k == oifname && *op == eq => {
                (Some(Match::OifName(ifname(d)?)), 2)
            }
            // Inet tables check the protocol first; ip tables load straight away. The caller's
            // re-rendering rejects a form that does not fit the table's family.
            [
                Ex::MetaLoad(k),
                Ex::Cmp(op, p),
                Ex::Payload(b, 16, 4),
                Ex::Cmp(op2, d),
                ..,
            ] if *k == nfproto && *op == eq && p[..] == ipv4 && *b == network && *op2 == eq => {
                (Some(Match::IpDaddr(daddr(d)?)), 4)
            }
            [Ex::Payload(b, 16, 4), Ex::Cmp(op, d), ..] if *b == network && *op == eq => {
                (Some(Match::IpDaddr(daddr(d)?)), 2)
            }
            _ => (None, 0),
        };
        if let Some(m) = m {
            if !statements.is_empty() {
                return None; // the model has matches before statements only
            }
            matches.push(m);
            rest = &rest[used..];
            continue;
        }
        let (s, used) = match rest {
            [Ex::MetaLoad(k), Ex::Bitwise(m, x), Ex::MetaSet(k2), ..] if *k == mark && k2 == k => {
                let (mask, value) = (!u32_of(m)?, u32_of(x)?);
                (Statement::MetaMark { mask, value }, 3)
            }
            [Ex::CtLoad(k), Ex::Bitwise(m, x), Ex::CtSet(k2), ..] if *k == ct_mark && k2 == k => {
                let (mask, value) = (!u32_of(m)?, u32_of(x)?);
                (Statement::CtMark { mask, value }, 3)
            }
            [Ex::ImmData(a), Ex::Nat, ..] if a.len() == 4 => {
                let octets: [u8; 4] = a.as_slice().try_into().ok()?;
                (Statement::Snat(Ipv4Addr::from(octets)), 2)
            }
            [Ex::Counter, ..] => (Statement::Counter, 1),
            [Ex::Masq, ..] => (Statement::Masquerade, 1),
            [Ex::Verdict(code, chain), ..] => {
                let s = match (*code, chain) {
                    (libc::NF_ACCEPT, None) => Statement::Accept,
                    (libc::NF_DROP, None) => Statement::Drop,
                    (libc::NFT_RETURN, None) => Statement::Return,
                    (libc::NFT_JUMP, Some(c)) => Statement::Jump(c.clone()),
                    (libc::NFT_GOTO, Some(c)) => Statement::Goto(c.clone()),
                    _ => return None,
                };
                (s, 1)
            }
            _ => return None,
        };
        statements.push(s);
        rest = &rest[used..];
    }
    Some(Rule {
        matches,
        statements,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::model::Family;

    fn rule(matches: Vec<Match>, statements: Vec<Statement>) -> Rule {
        Rule {
            matches,
            statements,
        }
    }

    /// What the builder sends, mapped back: the rule again (no kernel involved).
    fn round_trip(family: Family, r: &Rule) -> (String, Option<Rule>) {
        let mut b = RuleBuilder::new(family, "t");
        let (nl, _) = b.rule("c", r, &HashMap::new());
        let none = |_: &str, _: Option<u32>| None;
        (render(&nl, &none), decode(&nl, &none))
    }

    #[test]
    fn ip_daddr_is_encoded_as_nft_does_and_read_back() {
        let r = rule(
            vec![
                Match::IifName("eth9".into()),
                Match::IpDaddr(Ipv4Addr::new(203, 0, 113, 227)),
                Match::CtState(CtState::NEW),
            ],
            vec![Statement::Counter, Statement::Drop],
        );
        let (inet, decoded) = round_trip(Family::Inet, &r);
        assert!(
            inet.contains(
                "[ meta load nfproto => reg 1 ] [ cmp eq reg 1 0x00000002 ] \
                 [ payload load 4b @ network header + 16 => reg 1 ] [ cmp eq reg 1 0xe37100cb ]"
            ),
            "{inet}"
        );
        assert_eq!(decoded.as_ref(), Some(&r));
        let (ip, decoded) = round_trip(Family::Ip, &r);
        assert!(
            !ip.contains("nfproto")
                && ip.contains("[ payload load 4b @ network header + 16 => reg 1 ]"),
            "{ip}"
        );
        assert_eq!(decoded.as_ref(), Some(&r));
        assert_eq!(
            r.to_string(),
            "iifname \"eth9\" ip daddr 203.0.113.227 ct state new counter drop"
        );
    }

    #[test]
    fn router_rules_round_trip() {
        for r in [
            rule(
                vec![Match::IifName("ib0".into()), Match::OifName("eth9".into())],
                vec![Statement::Counter, Statement::Accept],
            ),
            rule(
                vec![Match::CtState(CtState::ESTABLISHED | CtState::RELATED)],
                vec![Statement::Accept],
            ),
            rule(
                vec![],
                vec![Statement::Snat(Ipv4Addr::new(203, 0, 113, 227))],
            ),
            rule(vec![], vec![Statement::Masquerade]),
        ] {
            assert_eq!(round_trip(Family::Inet, &r).1, Some(r));
        }
    }
}
