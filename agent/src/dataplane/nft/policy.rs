//! The NetworkPolicy program of one node (`policy::compile::Program`) as an nftables table
//! (`inet weft-policy`), written in one atomic batch: named interval sets of prefixes, named
//! sets of (address, protocol, port) for named ports, two verdict maps from a local pod's
//! address to its chain, and the chains. Two base chains sit on the forward hook: egress at
//! priority 0, ingress at 1. An accept in the first hands the packet to the second; a drop in
//! either is final. Each starts by accepting established and related packets, so that a
//! connection a policy allowed when it began lives on after the policy is gone; with
//! [`TableOptions::strict`] only the replies and related packets are accepted so, and every
//! packet a pod sends goes through its chains: a connection no longer allowed stops at its next
//! packet (docs/network-policy.md, "Established connections"). [`PolicyTable`]
//! writes a program whose shape (chains and rules) is that of the one before it as the set and
//! map elements that changed, also in one batch: pods coming, going and changing labels touch
//! elements only. The encoding follows include/uapi/linux/netfilter/nf_tables.h, as the rest
//! of `nft`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

use super::{
    Attrs, Chain, ChainType, Expr, Family, Hook, META_L4PROTO, META_NFPROTO, NFPROTO_IPV4,
    NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_NEWSET, NFT_MSG_NEWTABLE,
    NFT_REG_1, NFT_REG_VERDICT, NFTA_CHAIN_NAME, NFTA_CHAIN_TABLE, NFTA_DATA_VALUE,
    NFTA_DATA_VERDICT, NFTA_LIST_ELEM, NFTA_SET_FLAGS, NFTA_SET_ID, NFTA_SET_KEY_LEN,
    NFTA_SET_KEY_TYPE, NFTA_SET_NAME, NFTA_SET_TABLE, NFTA_VERDICT_CODE, NLM_F_APPEND,
    NLM_F_CREATE, NftError, NftSocket, PAYLOAD_NETWORK, PAYLOAD_TRANSPORT, Verdict, ct_state_load,
    meta_load, payload_load, table_attrs, verdict,
};
use crate::policy::compile::{Action, PeerMatch, PortCond, Program};
use crate::policy::model::{Direction, PolicyKey, Protocol};

pub const TABLE: &str = "weft-policy";

pub(super) const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
pub(super) const NFTA_COUNTER_BYTES: u16 = 1;
pub(super) const NFTA_COUNTER_PACKETS: u16 = 2;
const NFTA_LOG_PREFIX: u16 = 2;
/// NF_LOG_PREFIXLEN without its terminating NUL.
const LOG_PREFIX_MAX: usize = 127;
const NFTA_LIMIT_RATE: u16 = 1;
const NFTA_LIMIT_UNIT: u16 = 2;
const NFTA_LIMIT_BURST: u16 = 3;
const NFTA_LIMIT_TYPE: u16 = 4;
pub(super) const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NFT_SET_INTERVAL: u32 = 0x4;
pub(super) const NFT_SET_MAP: u32 = 0x8;
pub(super) const NFT_DATA_VERDICT: u32 = 0xffff_ff00;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_DREG: u16 = 3;
const NFTA_LOOKUP_SET_ID: u16 = 4;
/// The 32-bit registers after the first: concatenations fill consecutive ones.
const NFT_REG32_01: u32 = 9;
const NFT_REG32_02: u32 = 10;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_LTE: u32 = 3;
const NFT_CMP_GTE: u32 = 5;
/// nft's datatypes, for `nft list` only: ipv4_addr, inet_proto, inet_service, and their
/// concatenation (6 bits a field).
pub(super) const TYPE_IPV4: u32 = 7;
const TYPE_SERVICE_TUPLE: u32 = (((7 << 6) | 12) << 6) | 13;
/// Elements per NEWSETELEM message: an attribute's length is 16 bits.
const ELEMENTS_PER_MESSAGE: usize = 256;
/// IP_CT_ESTABLISHED and IP_CT_RELATED as `ct state` bits.
const CT_ESTABLISHED: u32 = 1 << 1;
const CT_RELATED: u32 = 1 << 2;
/// `NFT_CT_DIRECTION` and its value for replies (`IP_CT_DIR_REPLY`).
const NFT_CT_DIRECTION: u32 = 1;
const IP_CT_DIR_REPLY: u8 = 1;

const EGRESS_MAP: &str = "egress-pods";
const INGRESS_MAP: &str = "ingress-pods";

fn addr_set(i: usize) -> String {
    format!("addrs-{i}")
}

fn service_set(i: usize) -> String {
    format!("ports-{i}")
}

/// Ids name sets within one batch: the address sets first, then the port sets, then the maps.
struct Ids {
    addrs: u32,
    services: u32,
}

impl Ids {
    fn of(p: &Program) -> Ids {
        Ids { addrs: 1, services: 1 + p.addrs.len() as u32 }
    }
    fn addr(&self, i: usize) -> u32 {
        self.addrs + i as u32
    }
    fn service(&self, i: usize) -> u32 {
        self.services + i as u32
    }
    fn map(&self, p: &Program, d: Direction) -> u32 {
        self.services + p.services.len() as u32 + if d == Direction::Egress { 0 } else { 1 }
    }
}

pub(super) type Message = (u16, u16, Attrs);

/// How the table treats what the policies do not say.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableOptions {
    /// What a dispatch chain drops is also logged, rate-limited, naming the policies
    /// (`--policy-log`).
    pub log: bool,
    /// Established connections are checked packet by packet, not only when they begin
    /// (`--policy-strict`).
    pub strict: bool,
}

/// The whole table as one batch: replaced atomically, as weft's other tables.
fn batch(p: &Program, opts: TableOptions) -> Vec<Message> {
    let ids = Ids::of(p);
    let mut out: Vec<Message> = vec![
        (NFT_MSG_NEWTABLE, NLM_F_CREATE, table_attrs(TABLE)),
        (NFT_MSG_DELTABLE, 0, table_attrs(TABLE)),
        (NFT_MSG_NEWTABLE, NLM_F_CREATE, table_attrs(TABLE)),
    ];
    for (i, set) in p.addrs.iter().enumerate() {
        out.push((
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            set_attrs(&addr_set(i), ids.addr(i), NFT_SET_INTERVAL, 4, TYPE_IPV4),
        ));
        let elems: Vec<Attrs> =
            intervals(set).iter().map(|(key, end)| element(key, None, *end)).collect();
        out.extend(elements(&addr_set(i), ids.addr(i), elems));
    }
    for (i, set) in p.services.iter().enumerate() {
        out.push((
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            set_attrs(&service_set(i), ids.service(i), 0, 12, TYPE_SERVICE_TUPLE),
        ));
        let elems = set.iter().filter_map(|(ip, proto, port)| service_key(*ip, *proto, *port));
        let elems: Vec<Attrs> = elems.map(|k| element(&k, None, false)).collect();
        out.extend(elements(&service_set(i), ids.service(i), elems));
    }
    for (i, c) in p.chains.iter().enumerate() {
        out.push((NFT_MSG_NEWCHAIN, NLM_F_CREATE, regular_chain(&chain_name(i, &c.name))));
    }
    for (d, name, map) in
        [(Direction::Egress, EGRESS_MAP, &p.egress), (Direction::Ingress, INGRESS_MAP, &p.ingress)]
    {
        let mut a = set_attrs(name, ids.map(p, d), NFT_SET_MAP, 4, TYPE_IPV4);
        a.u32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
        out.push((NFT_MSG_NEWSET, NLM_F_CREATE, a));
        let elems = map.iter().filter_map(|(ip, chain)| {
            let IpAddr::V4(v4) = ip else { return None };
            Some(element(&v4.octets(), Some(&chain_name(*chain, &p.chains[*chain].name)), false))
        });
        out.extend(elements(name, ids.map(p, d), elems.collect()));
    }
    for (d, priority) in [(Direction::Egress, 0), (Direction::Ingress, 1)] {
        let name = base_name(d);
        out.push((NFT_MSG_NEWCHAIN, NLM_F_CREATE, base_chain(name, priority)));
        let map = if d == Direction::Egress { EGRESS_MAP } else { INGRESS_MAP };
        let mut dispatch = ipv4();
        dispatch.push(payload_load(PAYLOAD_NETWORK, addr_offset(d, true), 4));
        dispatch.push(lookup(map, ids.map(p, d), Some(NFT_REG_VERDICT)));
        for exprs in established(opts.strict).into_iter().chain([dispatch]) {
            out.push((NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, rule(name, exprs)));
        }
    }
    for (i, c) in p.chains.iter().enumerate() {
        let name = chain_name(i, &c.name);
        let d = c.direction;
        for r in &c.rules {
            let mut exprs = Vec::new();
            if let PeerMatch::In(s) = r.peer {
                exprs.extend(ipv4());
                exprs.push(payload_load(PAYLOAD_NETWORK, addr_offset(d, false), 4));
                exprs.push(lookup(&addr_set(s), ids.addr(s), None));
            }
            exprs.extend(port_exprs(&r.port, &ids));
            exprs.push(match &r.action {
                Action::Accept => verdict(Verdict::Accept),
                Action::Return => verdict(Verdict::Return),
                Action::Jump(c) => jump(&chain_name(*c, &p.chains[*c].name)),
            });
            out.push((NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, rule(&name, exprs)));
        }
        if c.drop_at_end {
            if opts.log {
                let exprs = vec![log_limit(), log_prefix(c.direction, &c.isolated_by)];
                out.push((NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, rule(&name, exprs)));
            }
            let mut counter = Attrs::default();
            counter.raw(NFTA_COUNTER_BYTES, &0u64.to_be_bytes());
            counter.raw(NFTA_COUNTER_PACKETS, &0u64.to_be_bytes());
            let exprs = vec![Expr { name: "counter", data: counter }, verdict(Verdict::Drop)];
            out.push((NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, rule(&name, exprs)));
        }
    }
    out
}

/// Installs the program in the current namespace.
pub fn install(sock: &mut NftSocket, p: &Program, opts: TableOptions) -> Result<(), NftError> {
    sock.send_batch(Family::Inet as u8, &batch(p, opts))
}

/// At most this many denials a second are logged per dispatch chain (a burst of twice that):
/// a flood of denied packets must not flood the kernel log.
const LOG_PER_SECOND: u64 = 10;

fn log_limit() -> Expr {
    let mut a = Attrs::default();
    a.raw(NFTA_LIMIT_RATE, &LOG_PER_SECOND.to_be_bytes())
        .raw(NFTA_LIMIT_UNIT, &1u64.to_be_bytes())
        .u32(NFTA_LIMIT_BURST, 2 * LOG_PER_SECOND as u32)
        .u32(NFTA_LIMIT_TYPE, 0);
    Expr { name: "limit", data: a }
}

/// `log prefix "weft-policy deny in x/a,x/b: "`, cut to the kernel's 127 bytes.
fn log_prefix(d: Direction, policies: &[PolicyKey]) -> Expr {
    let names: Vec<String> = policies.iter().map(ToString::to_string).collect();
    let dir = if d == Direction::Ingress { "in" } else { "out" };
    let mut text = format!("weft-policy deny {dir} {}", names.join(","));
    if text.len() > LOG_PREFIX_MAX - 2 {
        let mut cut = LOG_PREFIX_MAX - 5;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text.push_str(": ");
    let mut a = Attrs::default();
    a.str(NFTA_LOG_PREFIX, &text);
    Expr { name: "log", data: a }
}

/// The dispatch chains of the installed program by index, with their direction and the
/// policies they stand for.
#[derive(Clone, Debug, Default)]
pub struct Counters(BTreeMap<usize, (Direction, Vec<PolicyKey>)>);

/// The drop counters of the dispatch chains `counters` names.
pub fn denied(sock: &mut NftSocket, counters: &Counters) -> Result<Vec<Denied>, NftError> {
    let mut out = Vec::new();
    for (chain, packets, bytes) in sock.counters(Family::Inet, TABLE)? {
        let index = chain.split_once('-').and_then(|(i, _)| i.parse::<usize>().ok());
        let Some((direction, policies)) = index.and_then(|i| counters.0.get(&i)) else {
            continue;
        };
        out.push(Denied { direction: *direction, policies: policies.clone(), packets, bytes });
    }
    Ok(out)
}

/// What one dispatch chain has dropped since the table was last written whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub direction: Direction,
    /// The policies isolating the pods it serves.
    pub policies: Vec<PolicyKey>,
    pub packets: u64,
    pub bytes: u64,
}

fn base_name(d: Direction) -> &'static str {
    match d {
        Direction::Egress => "egress",
        Direction::Ingress => "ingress",
    }
}

/// A chain's kernel name: unique by its index, readable by the program's name (nft allows
/// 255 bytes).
fn chain_name(i: usize, name: &str) -> String {
    let mut s = format!("{i}-{name}");
    s.truncate(250);
    s
}

/// Where a chain finds its own pod (the dispatch key) or the other end: egress dispatches on
/// the source and looks at the destination, ingress the other way round.
fn addr_offset(d: Direction, own: bool) -> u32 {
    match (d, own) {
        (Direction::Egress, true) | (Direction::Ingress, false) => 12,
        (Direction::Egress, false) | (Direction::Ingress, true) => 16,
    }
}

pub(super) fn ipv4() -> Vec<Expr> {
    vec![meta_load(META_NFPROTO), cmp_raw(NFT_REG_1, NFT_CMP_EQ, &[NFPROTO_IPV4])]
}

/// The rules ahead of the dispatch: `ct state established,related accept`, or when strict
/// `ct state related accept` and `ct state established ct direction reply accept`.
fn established(strict: bool) -> Vec<Vec<Expr>> {
    let state_in = |bits: u32| {
        vec![ct_state_load(), super::bitwise(&bits.to_ne_bytes()), cmp_raw(NFT_REG_1, 1, &[0; 4])]
    };
    if !strict {
        let mut all = state_in(CT_ESTABLISHED | CT_RELATED);
        all.push(verdict(Verdict::Accept));
        return vec![all];
    }
    let mut related = state_in(CT_RELATED);
    related.push(verdict(Verdict::Accept));
    let mut replies = state_in(CT_ESTABLISHED);
    replies.push(super::ct_load(NFT_CT_DIRECTION));
    replies.push(cmp_raw(NFT_REG_1, NFT_CMP_EQ, &[IP_CT_DIR_REPLY]));
    replies.push(verdict(Verdict::Accept));
    vec![related, replies]
}

fn cmp_raw(reg: u32, op: u32, value: &[u8]) -> Expr {
    let mut a = Attrs::default();
    a.u32(1, reg).u32(2, op).data_value(3, value);
    Expr { name: "cmp", data: a }
}

fn l4proto(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
        Protocol::Sctp => 132,
    }
}

fn port_exprs(c: &PortCond, ids: &Ids) -> Vec<Expr> {
    let proto =
        |p: Protocol| vec![meta_load(META_L4PROTO), cmp_raw(NFT_REG_1, NFT_CMP_EQ, &[l4proto(p)])];
    match c {
        PortCond::Any => Vec::new(),
        PortCond::Protocol(p) => proto(*p),
        PortCond::Range { protocol, first, last } => {
            let mut v = proto(*protocol);
            v.push(payload_load(PAYLOAD_TRANSPORT, 2, 2));
            if first == last {
                v.push(cmp_raw(NFT_REG_1, NFT_CMP_EQ, &first.to_be_bytes()));
            } else {
                v.push(cmp_raw(NFT_REG_1, NFT_CMP_GTE, &first.to_be_bytes()));
                v.push(cmp_raw(NFT_REG_1, NFT_CMP_LTE, &last.to_be_bytes()));
            }
            v
        }
        PortCond::Named(s) => {
            // daddr . l4proto . th dport in consecutive 32-bit registers.
            let mut v = ipv4();
            v.push(payload_load(PAYLOAD_NETWORK, 16, 4));
            v.push(load_into(meta_load(META_L4PROTO), NFT_REG32_01));
            v.push(load_into(payload_load(PAYLOAD_TRANSPORT, 2, 2), NFT_REG32_02));
            v.push(lookup(&service_set(*s), ids.service(*s), None));
            v
        }
    }
}

/// The same load, into another register (the destination is each expression's attribute 1).
fn load_into(mut e: Expr, reg: u32) -> Expr {
    let rest = e.data.0.split_off(8);
    e.data.0.clear();
    e.data.u32(1, reg);
    e.data.0.extend_from_slice(&rest);
    e
}

/// `lookup` of register 1 in a set; in a map, the value goes to `dreg` (the verdict register
/// for a verdict map).
pub(super) fn lookup(set: &str, id: u32, dreg: Option<u32>) -> Expr {
    let mut a = Attrs::default();
    a.str(NFTA_LOOKUP_SET, set).u32(NFTA_LOOKUP_SREG, NFT_REG_1).u32(NFTA_LOOKUP_SET_ID, id);
    if let Some(reg) = dreg {
        a.u32(NFTA_LOOKUP_DREG, reg);
    }
    Expr { name: "lookup", data: a }
}

fn verdict_data(code: i32, chain: Option<&str>) -> Attrs {
    let mut v = Attrs::default();
    v.raw(NFTA_VERDICT_CODE, &code.to_be_bytes());
    if let Some(c) = chain {
        v.str(NFTA_VERDICT_CHAIN, c);
    }
    let mut data = Attrs::default();
    data.nested(NFTA_DATA_VERDICT, &v);
    data
}

fn jump(chain: &str) -> Expr {
    let mut a = Attrs::default();
    a.u32(1, NFT_REG_VERDICT).nested(2, &verdict_data(NFT_JUMP, Some(chain)));
    Expr { name: "immediate", data: a }
}

fn rule(chain: &str, exprs: Vec<Expr>) -> Attrs {
    super::exprs_attrs(TABLE, chain, exprs)
}

fn regular_chain(name: &str) -> Attrs {
    regular_chain_in(TABLE, name)
}

pub(super) fn regular_chain_in(table: &str, name: &str) -> Attrs {
    let mut a = Attrs::default();
    a.str(NFTA_CHAIN_TABLE, table).str(NFTA_CHAIN_NAME, name);
    a
}

fn base_chain(name: &str, priority: i32) -> Attrs {
    base_chain_in(TABLE, name, Hook::Forward, priority)
}

/// A filter chain on `hook` (accepting by default, as all of weft's).
pub(super) fn base_chain_in(table: &str, name: &str, hook: Hook, priority: i32) -> Attrs {
    let chain =
        Chain { name: name.to_owned(), kind: ChainType::Filter, hook, priority, rules: Vec::new() };
    super::chain_attrs(table, &chain)
}

fn set_attrs(name: &str, id: u32, flags: u32, key_len: u32, key_type: u32) -> Attrs {
    set_attrs_in(TABLE, name, id, flags, key_len, key_type)
}

pub(super) fn set_attrs_in(
    table: &str,
    name: &str,
    id: u32,
    flags: u32,
    key_len: u32,
    key_type: u32,
) -> Attrs {
    let mut a = Attrs::default();
    a.str(NFTA_SET_TABLE, table)
        .str(NFTA_SET_NAME, name)
        .u32(NFTA_SET_FLAGS, flags)
        .u32(NFTA_SET_KEY_TYPE, key_type)
        .u32(NFTA_SET_KEY_LEN, key_len)
        .u32(NFTA_SET_ID, id);
    a
}

pub(super) fn element(key: &[u8], jump_to: Option<&str>, interval_end: bool) -> Attrs {
    let mut k = Attrs::default();
    k.raw(NFTA_DATA_VALUE, key);
    let mut e = Attrs::default();
    e.nested(NFTA_SET_ELEM_KEY, &k);
    if let Some(chain) = jump_to {
        e.nested(NFTA_SET_ELEM_DATA, &verdict_data(NFT_JUMP, Some(chain)));
    }
    if interval_end {
        e.u32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
    }
    e
}

/// NEWSETELEM messages for `set`, made in this batch as `id`, a bounded number of elements
/// each.
fn elements(set: &str, id: u32, elems: Vec<Attrs>) -> Vec<Message> {
    element_messages(NFT_MSG_NEWSETELEM, set, Some(id), elems)
}

fn element_messages(kind: u16, set: &str, id: Option<u32>, elems: Vec<Attrs>) -> Vec<Message> {
    element_messages_in(TABLE, kind, set, id, elems)
}

/// Element messages for `set` of `table`, a bounded number of elements each.
pub(super) fn element_messages_in(
    table: &str,
    kind: u16,
    set: &str,
    id: Option<u32>,
    elems: Vec<Attrs>,
) -> Vec<Message> {
    elems
        .chunks(ELEMENTS_PER_MESSAGE)
        .map(|chunk| {
            let mut list = Attrs::default();
            for e in chunk {
                list.nested(NFTA_LIST_ELEM, e);
            }
            let mut a = Attrs::default();
            a.str(NFTA_SET_ELEM_LIST_TABLE, table).str(NFTA_SET_ELEM_LIST_SET, set);
            if let Some(id) = id {
                a.u32(NFTA_SET_ELEM_LIST_SET_ID, id);
            }
            a.nested(NFTA_SET_ELEM_LIST_ELEMENTS, &list);
            let flags = if kind == NFT_MSG_NEWSETELEM { NLM_F_CREATE } else { 0 };
            (kind, flags, a)
        })
        .collect()
}

/// How [`PolicyTable::apply`] wrote a program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// The table was replaced whole (the first program, or a new shape).
    Whole,
    /// This many elements were deleted or added in place.
    Elements(usize),
}

/// The table as this agent last wrote it, so that the next program can be written as the
/// elements that changed.
#[derive(Debug, Default)]
pub struct PolicyTable {
    installed: Option<Program>,
    /// How many rules the table had when it was last written whole.
    rules: usize,
    opts: TableOptions,
}

impl PolicyTable {
    pub fn new(opts: TableOptions) -> PolicyTable {
        PolicyTable { installed: None, rules: 0, opts }
    }

    /// Whether the kernel still holds the table as written (it exists, with as many rules):
    /// something else may have flushed the ruleset. Set elements are not compared. When it is
    /// not intact, the next [`PolicyTable::apply`] writes it whole.
    pub fn intact(&mut self, sock: &mut NftSocket) -> Result<bool, NftError> {
        if self.installed.is_none() {
            return Ok(true);
        }
        let intact = sock.table_exists(Family::Inet, TABLE)?
            && sock.rule_count(Family::Inet, TABLE)? == self.rules;
        if !intact {
            self.installed = None;
        }
        Ok(intact)
    }

    /// The drop counters of the dispatch chains, with the policies each stands for.
    pub fn denied(&self, sock: &mut NftSocket) -> Result<Vec<Denied>, NftError> {
        denied(sock, &self.counters())
    }

    /// What the installed dispatch chains' counters stand for: read under a lock, so that
    /// the dump of the counters ([`denied`]) need not hold it.
    pub fn counters(&self) -> Counters {
        let chains = self.installed.iter().flat_map(|p| p.chains.iter().enumerate());
        let dispatch = chains.filter(|(_, c)| c.drop_at_end);
        Counters(dispatch.map(|(i, c)| (i, (c.direction, c.isolated_by.clone()))).collect())
    }

    /// Makes the table enforce `p`. After a failure the table is written whole next time: what
    /// the kernel holds is then not known.
    pub fn apply(&mut self, sock: &mut NftSocket, p: &Program) -> Result<Written, NftError> {
        let installed = self.installed.take();
        let written = match installed {
            Some(old) if old.same_shape(p) => {
                let (messages, count) = element_changes(&old, p);
                if !messages.is_empty() {
                    sock.send_batch(Family::Inet as u8, &messages)?;
                }
                Written::Elements(count)
            }
            _ => {
                let messages = batch(p, self.opts);
                sock.send_batch(Family::Inet as u8, &messages)?;
                self.rules = messages.iter().filter(|m| m.0 == NFT_MSG_NEWRULE).count();
                Written::Whole
            }
        };
        self.installed = Some(p.clone());
        Ok(written)
    }
}

/// The deletions, then the additions, that turn `old`'s elements into `new`'s (same shape),
/// and how many elements they touch. An interval set changes by whole runs: a run and its end
/// are deleted or added together.
fn element_changes(old: &Program, new: &Program) -> (Vec<Message>, usize) {
    let mut deletes = Vec::new();
    let mut adds = Vec::new();
    let mut count = 0;
    let mut change = |set: &str, gone: Vec<Attrs>, came: Vec<Attrs>| {
        count += gone.len() + came.len();
        deletes.extend(element_messages(NFT_MSG_DELSETELEM, set, None, gone));
        adds.extend(element_messages(NFT_MSG_NEWSETELEM, set, None, came));
    };
    for (i, (was, is)) in old.addrs.iter().zip(&new.addrs).enumerate() {
        let (was, is) = (runs(was), runs(is));
        let elems = |a: &BTreeSet<Run>, b: &BTreeSet<Run>| -> Vec<Attrs> {
            a.difference(b).flat_map(|r| r.elements()).collect()
        };
        change(&addr_set(i), elems(&was, &is), elems(&is, &was));
    }
    for (i, (was, is)) in old.services.iter().zip(&new.services).enumerate() {
        let elems = |a: &BTreeSet<_>, b: &BTreeSet<_>| -> Vec<Attrs> {
            a.difference(b)
                .filter_map(|(ip, proto, port)| service_key(*ip, *proto, *port))
                .map(|k| element(&k, None, false))
                .collect()
        };
        change(&service_set(i), elems(was, is), elems(is, was));
    }
    for (name, was, is) in
        [(EGRESS_MAP, &old.egress, &new.egress), (INGRESS_MAP, &old.ingress, &new.ingress)]
    {
        let keys: BTreeSet<&IpAddr> = was.keys().chain(is.keys()).collect();
        let (mut gone, mut came) = (Vec::new(), Vec::new());
        for ip in keys.into_iter().filter(|ip| was.get(ip) != is.get(ip)) {
            let IpAddr::V4(v4) = ip else { continue };
            if was.contains_key(ip) {
                gone.push(element(&v4.octets(), None, false));
            }
            if let Some(c) = is.get(ip) {
                came.push(element(
                    &v4.octets(),
                    Some(&chain_name(*c, &new.chains[*c].name)),
                    false,
                ));
            }
        }
        change(name, gone, came);
    }
    deletes.extend(adds);
    (deletes, count)
}

/// One maximal run of an interval set: its first address and the address after its last
/// (`None` when it runs to the end of the space).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Run {
    first: [u8; 4],
    end: Option<[u8; 4]>,
}

impl Run {
    fn elements(&self) -> Vec<Attrs> {
        let mut out = vec![element(&self.first, None, false)];
        if let Some(end) = self.end {
            out.push(element(&end, None, true));
        }
        out
    }
}

fn runs(set: &BTreeSet<IpNet>) -> BTreeSet<Run> {
    let mut out = BTreeSet::new();
    let mut bounds = intervals(set).into_iter().peekable();
    while let Some((first, _)) = bounds.next() {
        let end = bounds.next_if(|(_, is_end)| *is_end).map(|(k, _)| k);
        out.insert(Run { first, end });
    }
    out
}

/// (address, protocol, port) as a concatenated key: each field padded to 4 bytes.
fn service_key(ip: IpAddr, proto: Protocol, port: u16) -> Option<Vec<u8>> {
    let IpAddr::V4(v4) = ip else { return None };
    let mut k = v4.octets().to_vec();
    k.extend_from_slice(&[l4proto(proto), 0, 0, 0]);
    k.extend_from_slice(&port.to_be_bytes());
    k.extend_from_slice(&[0, 0]);
    Some(k)
}

/// An interval set's elements: each maximal run of addresses as its first address and, unless
/// it runs to the end of the space, the address after it flagged as an interval end.
pub fn intervals(set: &BTreeSet<IpNet>) -> Vec<([u8; 4], bool)> {
    // [first, last] as numbers, sorted, then joined where they touch or overlap.
    let mut ranges: Vec<(u64, u64)> = set
        .iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => {
                Some((u64::from(u32::from(n.network())), u64::from(u32::from(n.broadcast()))))
            }
            IpNet::V6(_) => None,
        })
        .collect();
    ranges.sort_unstable();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (first, last) in ranges {
        match runs.last_mut() {
            Some(run) if first <= run.1 + 1 => run.1 = run.1.max(last),
            _ => runs.push((first, last)),
        }
    }
    let octets = |a: u64| Ipv4Addr::from(a as u32).octets();
    let mut out = Vec::new();
    for (first, last) in runs {
        out.push((octets(first), false));
        if last < u64::from(u32::MAX) {
            out.push((octets(last + 1), true));
        }
    }
    out
}

#[cfg(test)]
mod packets;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_merged_and_end_after_their_last_address() {
        let set: BTreeSet<IpNet> = ["10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32", "192.168.0.0/16"]
            .iter()
            .map(|s| s.parse().expect("net"))
            .collect();
        let got = intervals(&set);
        let want = vec![
            ([10, 0, 0, 1], false),
            ([10, 0, 0, 4], true),
            ([192, 168, 0, 0], false),
            ([192, 169, 0, 0], true),
        ];
        assert_eq!(got, want);
        let all: BTreeSet<IpNet> = ["0.0.0.0/0".parse().expect("net")].into();
        assert_eq!(intervals(&all), vec![([0, 0, 0, 0], false)]);
    }

    #[test]
    fn a_changed_run_is_deleted_and_added_whole_with_deletions_first() {
        let net = |s: &str| -> IpNet { s.parse().expect("net") };
        let mut old = Program::default();
        old.addrs.push([net("10.0.0.2/32"), net("10.0.0.9/32")].into());
        let mut new = old.clone();
        // 10.0.0.3 joins the run of 10.0.0.2; the run of 10.0.0.9 is untouched.
        new.addrs[0].insert(net("10.0.0.3/32"));
        let (messages, count) = element_changes(&old, &new);
        assert_eq!(count, 4, "the old run's start and end, the new run's start and end");
        let kinds: Vec<u16> = messages.iter().map(|m| m.0).collect();
        assert_eq!(kinds, [NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM]);
        let (none, zero) = element_changes(&new, &new);
        assert!(none.is_empty() && zero == 0);
    }

    #[test]
    fn a_pod_moving_to_another_chain_is_one_deletion_and_one_addition() {
        use crate::policy::compile::Chain as PolicyChain;
        let chain = |name: &str| PolicyChain {
            name: name.into(),
            direction: Direction::Ingress,
            rules: Vec::new(),
            drop_at_end: true,
            isolated_by: Vec::new(),
        };
        let ip: IpAddr = "10.32.1.1".parse().expect("ip");
        let mut old = Program {
            chains: vec![chain("isolated-in-0"), chain("isolated-in-1")],
            ..Program::default()
        };
        old.ingress.insert(ip, 0);
        let mut new = old.clone();
        new.ingress.insert(ip, 1);
        let (messages, count) = element_changes(&old, &new);
        assert_eq!(count, 2);
        assert_eq!(messages.len(), 2);
        new.ingress.clear();
        assert_eq!(element_changes(&old, &new).1, 1, "a pod gone is one deletion");
    }

    #[test]
    fn a_long_log_prefix_is_cut_to_the_kernels_limit() {
        let key = |i: usize| PolicyKey { namespace: "default".into(), name: format!("policy-{i}") };
        let prefix =
            |e: Expr| String::from_utf8_lossy(&e.data.0[4..]).trim_end_matches('\0').to_owned();
        let short = prefix(log_prefix(Direction::Ingress, &[key(1)]));
        assert_eq!(short, "weft-policy deny in default/policy-1: ");
        let many: Vec<PolicyKey> = (0..20).map(key).collect();
        let long = prefix(log_prefix(Direction::Egress, &many));
        assert!(long.len() <= LOG_PREFIX_MAX, "{} bytes", long.len());
        assert!(
            long.starts_with("weft-policy deny out default/policy-0,") && long.ends_with("...: ")
        );
    }

    #[test]
    fn service_keys_pad_each_field_to_four_bytes() {
        let k = service_key("10.32.1.1".parse().expect("ip"), Protocol::Udp, 81);
        assert_eq!(k, Some(vec![10, 32, 1, 1, 17, 0, 0, 0, 0, 81, 0, 0]));
    }

    /// Runs `f` on a thread of its own in a fresh network namespace (only that thread
    /// moves; processes it starts are in it too).
    fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: unshare affects only this thread, which nothing else uses.
                let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "unshare(CLONE_NEWNET) needs root: {}",
                    std::io::Error::last_os_error()
                );
                f()
            })
            .join()
            .expect("the namespace thread")
        })
    }

    #[test]
    fn the_kernel_takes_a_program_with_every_kind_of_rule() {
        use serde_json::json;

        use crate::policy::tests::{policy, with};
        let c = with(vec![
            policy(
                "x",
                "named",
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]}),
            ),
            policy(
                "x",
                "range",
                json!({"podSelector": {"matchLabels": {"pod": "a"}},
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}],
                             "ports": [{"protocol": "UDP", "port": 80, "endPort": 81}, {"protocol": "SCTP"}]}]}),
            ),
            policy(
                "y",
                "except",
                json!({"podSelector": {}, "policyTypes": ["Egress"],
                "egress": [{"to": [{"ipBlock": {"cidr": "10.32.0.0/16", "except": ["10.32.1.2/32"]}}],
                            "ports": [{"port": "serve-80-tcp"}, {"port": 81}]}]}),
            ),
        ]);
        let program = Program::compile(&c, "n1");
        assert!(!program.ingress.is_empty() && !program.egress.is_empty());
        let listed = in_fresh_netns(|| {
            let mut sock = NftSocket::open().expect("netlink");
            let list = || {
                let out = std::process::Command::new("nft")
                    .args(["list", "table", "inet", TABLE])
                    .output();
                String::from_utf8_lossy(&out.expect("nft runs").stdout).into_owned()
            };
            let strict = TableOptions { strict: true, log: true };
            install(&mut sock, &program, strict).expect("the kernel takes the strict batch");
            let strict = list();
            for want in
                ["ct state related accept", "ct state established ct direction reply accept"]
            {
                assert!(strict.contains(want), "no {want:?} in\n{strict}");
            }
            assert!(strict.contains("log prefix"), "no log rule in\n{strict}");
            install(&mut sock, &program, TableOptions::default()).expect("the kernel takes it");
            // Installing again replaces it whole.
            install(&mut sock, &program, TableOptions::default()).expect("and takes it again");
            // A table deleted behind the writer's back is noticed and written whole again.
            let mut table = PolicyTable::default();
            assert_eq!(table.apply(&mut sock, &program).expect("applied"), Written::Whole);
            assert!(table.intact(&mut sock).expect("checked"), "just written");
            sock.delete_table(Family::Inet, TABLE).expect("deleted");
            assert!(!table.intact(&mut sock).expect("checked"), "a deleted table is intact");
            assert_eq!(table.apply(&mut sock, &program).expect("applied"), Written::Whole);
            assert!(table.intact(&mut sock).expect("checked"), "written again");
            list()
        });
        assert!(!listed.contains("log prefix"), "a log rule without --policy-log:\n{listed}");
        for want in [
            "ip saddr vmap @egress-pods",
            "ip daddr vmap @ingress-pods",
            "ct state established,related accept",
            "elements = { 10.32.0.0/16 }",
            "ip daddr @addrs-1 return",
            "udp dport 80-81 accept",
            "meta l4proto sctp accept",
            "tcp dport 81 accept",
            "ip daddr . meta l4proto . th dport @ports-",
            "counter packets 0 bytes 0 drop",
        ] {
            assert!(listed.contains(want), "no {want:?} in\n{listed}");
        }
    }

    /// The scale: 1000 policies over 5000 pods in 50 namespaces. The whole table must
    /// go into the kernel in one batch, and a pod's arrival must then be an in-place change.
    #[test]
    fn the_kernel_takes_a_thousand_policies_over_five_thousand_pods() {
        use std::net::Ipv4Addr;

        use crate::policy::eval::Cluster;
        use crate::policy::model::{Namespace, Pod, PodKey};
        use crate::policy::tests::policy;
        use serde_json::json;

        let labels = |pairs: &[(&str, String)]| -> crate::policy::model::Labels {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
        };
        let mut c = Cluster::default();
        for n in 0..50u32 {
            let ns = format!("ns{n}");
            c.add_namespace(Namespace {
                name: ns.clone(),
                labels: labels(&[("team", format!("t{}", n % 5))]),
            });
            for i in 0..100u32 {
                let k = n * 100 + i;
                c.add_pod(Pod {
                    key: PodKey::new(&ns, &format!("p{i}")),
                    labels: labels(&[("app", format!("a{}", i % 20))]),
                    ips: vec![IpAddr::V4(Ipv4Addr::from(0x0a20_0000 + k + 1))],
                    node: format!("n{}", k % 3),
                    host_network: false,
                    finished: false,
                    ports: Vec::new(),
                });
            }
            for j in 0..20u32 {
                c.add_policy(policy(
                    &ns,
                    &format!("pol{j}"),
                    json!({"podSelector": {"matchLabels": {"app": format!("a{j}")}},
                    "ingress": [{"from": [
                        {"namespaceSelector": {"matchLabels": {"team": format!("t{}", j % 5)}},
                         "podSelector": {"matchLabels": {"app": format!("a{}", (j + 1) % 20)}}},
                        {"ipBlock": {"cidr": "10.96.0.0/12", "except": ["10.96.0.0/24"]}}],
                        "ports": [{"protocol": "TCP", "port": 8000 + j}]}]}),
                ));
            }
        }
        let t = std::time::Instant::now();
        let program = Program::compile(&c, "n0");
        let compiled = t.elapsed();
        let mut grown = c.clone();
        grown.add_pod(Pod {
            key: PodKey::new("ns0", "new"),
            labels: labels(&[("app", "a1".to_owned())]),
            ips: vec!["10.33.0.1".parse().expect("ip")],
            node: "n0".into(),
            host_network: false,
            finished: false,
            ports: Vec::new(),
        });
        let next = Program::compile(&grown, "n0");
        assert!(program.same_shape(&next), "a pod under known policies is elements only");
        let (whole, in_place) = in_fresh_netns(|| {
            let mut sock = NftSocket::open().expect("netlink");
            let mut table = PolicyTable::default();
            let t = std::time::Instant::now();
            let first = table.apply(&mut sock, &program).expect("the kernel takes the table");
            let whole = t.elapsed();
            assert_eq!(first, Written::Whole);
            let t = std::time::Instant::now();
            let second = table.apply(&mut sock, &next).expect("and the change");
            assert!(matches!(second, Written::Elements(n) if n > 0), "{second:?}");
            (whole, t.elapsed())
        });
        eprintln!(
            "1000 policies, 5000 pods: compiled in {compiled:?}: {} chains, {} sets, {} local \
             pods; whole table {:?}, one new pod in place {:?}",
            program.chains.len(),
            program.addrs.len() + program.services.len(),
            program.ingress.len(),
            whole,
            in_place
        );
    }

    #[test]
    fn loads_can_target_another_register() {
        let e = load_into(payload_load(PAYLOAD_TRANSPORT, 2, 2), NFT_REG32_02);
        let plain = payload_load(PAYLOAD_TRANSPORT, 2, 2);
        assert_eq!(e.data.0.len(), plain.data.0.len());
        assert_eq!(&e.data.0[4..8], &NFT_REG32_02.to_be_bytes());
        assert_eq!(&e.data.0[8..], &plain.data.0[8..]);
    }
}
