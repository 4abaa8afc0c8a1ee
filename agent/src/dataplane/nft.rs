//! nftables through netlink (NETLINK_NETFILTER), without the `nft` binary. weft keeps its rules
//! in tables of its own and replaces a table as a whole in one atomic batch (create, delete,
//! re-create), so the kernel never holds half a ruleset. Only the handful of expressions weft
//! needs are encoded; the encoding follows include/uapi/linux/netfilter/nf_tables.h.

use std::io;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

pub mod policy;
pub mod traffic;

// ---- constants from the kernel's uapi headers ----
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_GETCHAIN: u16 = 4;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_COMPAT: u16 = 5;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;

const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_DESC_SIZE: u16 = 1;
/// `flags dynamic`: rules may add elements from the packet path.
const NFT_SET_EVAL: u32 = 0x20;
/// nft's `ipv4_addr` datatype (only read back by `nft list`).
const NFT_TYPE_IPADDR: u32 = 7;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;

/// Address families of nftables tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Inet = 1,
    Ip = 2,
    Bridge = 7,
    Ip6 = 10,
}

/// Netfilter hooks of the inet families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Prerouting = 0,
    Input = 1,
    Forward = 2,
    Output = 3,
    Postrouting = 4,
}

/// Chain types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
}

impl ChainType {
    fn name(self) -> &'static str {
        match self {
            ChainType::Filter => "filter",
            ChainType::Nat => "nat",
        }
    }
}

/// Comparison operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    Eq = 0,
    Neq = 1,
}

/// Rule verdicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
}

impl Verdict {
    fn code(self) -> i32 {
        match self {
            Verdict::Accept => 1,
            Verdict::Drop => 0,
            Verdict::Return => -5,
        }
    }
}

/// One match or action of a rule, at the level `nft` rules are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// `ip saddr [!=] NET`
    IpSaddr(CmpOp, Ipv4Net),
    /// `ip daddr [!=] NET`
    IpDaddr(CmpOp, Ipv4Net),
    /// `oifname [!=] NAME`
    Oifname(CmpOp, String),
    /// `iifname [!=] NAME`
    Iifname(CmpOp, String),
    /// `tcp dport PORT` / `udp dport PORT` (with the `meta l4proto` guard `nft` adds).
    Dport(L4, u16),
    /// `ct state new`
    CtStateNew,
    /// `ct count over N`: more than `N` tracked connections match this rule.
    ConnCountOver(u32),
    /// `add @SET { ip saddr ct count over N }`: the packet's IPv4 source has more than `N`
    /// tracked connections matching this rule (counted per source in the dynamic set).
    SourceConnCountOver { set: String, max: u32 },
}

/// Transport protocols of [`Match::Dport`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp = 6,
    Udp = 17,
}

/// The final statement of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Verdict(Verdict),
    /// `masquerade random-fully`
    Masquerade,
    /// `reject with tcp reset` (the rule must match TCP only)
    RejectTcpReset,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub action: Action,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: i32,
    pub rules: Vec<Rule>,
}

/// A set of IPv4 addresses that rules fill from the packet path (`flags dynamic`), used to
/// keep per-source state such as connection counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamicSet {
    pub name: String,
    /// At most this many elements; sources beyond it are not tracked (rules using the set do
    /// not match them), so a cap on the whole rule must back it up.
    pub size: u32,
}

/// A whole table, the unit weft installs and replaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub family: Family,
    pub name: String,
    pub sets: Vec<DynamicSet>,
    pub chains: Vec<Chain>,
}

impl Table {
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }
}

// ---- attribute encoding ----

/// A netlink attribute stream under construction.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn raw(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = u16::try_from(4 + value.len()).unwrap_or(u16::MAX);
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(value);
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
        self
    }
    fn str(&mut self, kind: u16, s: &str) -> &mut Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.raw(kind, &v)
    }
    fn u32(&mut self, kind: u16, v: u32) -> &mut Self {
        self.raw(kind, &v.to_be_bytes())
    }
    fn nested(&mut self, kind: u16, inner: &Attrs) -> &mut Self {
        self.raw(kind | NLA_F_NESTED, &inner.0)
    }
    fn data_value(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let mut d = Attrs::default();
        d.raw(NFTA_DATA_VALUE, value);
        self.nested(kind, &d)
    }
}

/// One low-level expression: its name and its attributes.
struct Expr {
    name: &'static str,
    data: Attrs,
}

fn payload_load(base: u32, offset: u32, len: u32) -> Expr {
    let mut a = Attrs::default();
    a.u32(1, NFT_REG_1).u32(2, base).u32(3, offset).u32(4, len);
    Expr { name: "payload", data: a }
}

fn bitwise(mask: &[u8]) -> Expr {
    let mut a = Attrs::default();
    a.u32(1, NFT_REG_1).u32(2, NFT_REG_1).u32(3, mask.len() as u32);
    a.data_value(4, mask).data_value(5, &vec![0; mask.len()]);
    Expr { name: "bitwise", data: a }
}

fn cmp(op: CmpOp, value: &[u8]) -> Expr {
    let mut a = Attrs::default();
    a.u32(1, NFT_REG_1).u32(2, op as u32).data_value(3, value);
    Expr { name: "cmp", data: a }
}

fn meta_load(key: u32) -> Expr {
    let mut a = Attrs::default();
    a.u32(1, NFT_REG_1).u32(2, key);
    Expr { name: "meta", data: a }
}

fn verdict(v: Verdict) -> Expr {
    let mut code = Attrs::default();
    code.raw(NFTA_VERDICT_CODE, &v.code().to_be_bytes());
    let mut data = Attrs::default();
    data.nested(NFTA_DATA_VERDICT, &code);
    let mut a = Attrs::default();
    a.u32(1, NFT_REG_VERDICT).nested(2, &data);
    Expr { name: "immediate", data: a }
}

/// A conntrack key (`NFTA_CT_KEY`) loaded into register 1 (`NFTA_CT_DREG`).
fn ct_load(key: u32) -> Expr {
    let mut a = Attrs::default();
    a.u32(1, NFT_REG_1).u32(2, key);
    Expr { name: "ct", data: a }
}

/// `ct state` (`NFT_CT_STATE`) loaded into register 1.
fn ct_state_load() -> Expr {
    ct_load(0)
}

/// `ct count over max` (`NFTA_CONNLIMIT_COUNT`, `NFTA_CONNLIMIT_FLAGS` = `NFT_CONNLIMIT_F_INV`:
/// the kernel's test is "at most", inverted it matches above the limit).
fn conn_count_over(max: u32) -> Expr {
    let mut a = Attrs::default();
    a.u32(1, max).u32(2, 1);
    Expr { name: "connlimit", data: a }
}

/// `add @set { <register 1> <expr> }`: adds the key in register 1 to `set` with a stateful
/// expression of its own, and matches when that expression matches.
fn dynset_add(set: &str, expr: Expr) -> Expr {
    let mut inner = Attrs::default();
    inner.str(NFTA_EXPR_NAME, expr.name).nested(NFTA_EXPR_DATA, &expr.data);
    let mut a = Attrs::default();
    // NFTA_DYNSET_SET_NAME, _OP (NFT_DYNSET_OP_ADD), _SREG_KEY, _EXPR
    a.str(1, set).u32(3, 0).u32(4, NFT_REG_1).nested(7, &inner);
    Expr { name: "dynset", data: a }
}

/// IP_CT_NEW as a `ct state` bit (NF_CT_STATE_BIT), in host order as the kernel stores it.
const CT_STATE_NEW: u32 = 1 << 3;
const PAYLOAD_NETWORK: u32 = 1;
const PAYLOAD_TRANSPORT: u32 = 2;
const META_IIFNAME: u32 = 6;
const META_OIFNAME: u32 = 7;
const META_L4PROTO: u32 = 16;
const META_NFPROTO: u32 = 15;
const NFPROTO_IPV4: u8 = 2;
/// NF_NAT_RANGE_PROTO_RANDOM_FULLY: avoids the SNAT port race behind 5 s DNS timeouts.
const NAT_RANDOM_FULLY: u32 = 1 << 4;

/// `ip saddr|daddr [!=] NET`. The `meta nfproto ipv4` guard comes first, as `nft` adds it in
/// `inet` tables: without it the same offsets would be read from IPv6 headers.
fn prefix_match(offset: u32, op: CmpOp, net: Ipv4Net) -> Vec<Expr> {
    let mut v = vec![
        meta_load(META_NFPROTO),
        cmp(CmpOp::Eq, &[NFPROTO_IPV4]),
        payload_load(PAYLOAD_NETWORK, offset, 4),
    ];
    if net.prefix_len() < 32 {
        v.push(bitwise(&net.netmask().octets()));
    }
    v.push(cmp(op, &net.network().octets()));
    v
}

fn ifname_bytes(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

impl Match {
    fn exprs(&self) -> Vec<Expr> {
        match self {
            Match::IpSaddr(op, net) => prefix_match(12, *op, *net),
            Match::IpDaddr(op, net) => prefix_match(16, *op, *net),
            Match::Oifname(op, n) => vec![meta_load(META_OIFNAME), cmp(*op, &ifname_bytes(n))],
            Match::Iifname(op, n) => vec![meta_load(META_IIFNAME), cmp(*op, &ifname_bytes(n))],
            Match::Dport(l4, port) => vec![
                meta_load(META_L4PROTO),
                cmp(CmpOp::Eq, &[*l4 as u8]),
                payload_load(PAYLOAD_TRANSPORT, 2, 2),
                cmp(CmpOp::Eq, &port.to_be_bytes()),
            ],
            Match::CtStateNew => vec![
                ct_state_load(),
                bitwise(&CT_STATE_NEW.to_ne_bytes()),
                cmp(CmpOp::Neq, &[0; 4]),
            ],
            Match::ConnCountOver(max) => vec![conn_count_over(*max)],
            Match::SourceConnCountOver { set, max } => vec![
                meta_load(META_NFPROTO),
                cmp(CmpOp::Eq, &[NFPROTO_IPV4]),
                payload_load(PAYLOAD_NETWORK, 12, 4),
                dynset_add(set, conn_count_over(*max)),
            ],
        }
    }
}

impl Action {
    fn exprs(&self) -> Vec<Expr> {
        match self {
            Action::Verdict(v) => vec![verdict(*v)],
            Action::Masquerade => {
                let mut a = Attrs::default();
                a.u32(1, NAT_RANDOM_FULLY);
                vec![Expr { name: "masq", data: a }]
            }
            Action::RejectTcpReset => {
                let mut a = Attrs::default();
                a.u32(1, 1); // NFTA_REJECT_TYPE = NFT_REJECT_TCP_RST
                vec![Expr { name: "reject", data: a }]
            }
        }
    }
}

fn rule_attrs(table: &str, chain: &str, rule: &Rule) -> Attrs {
    let exprs = rule.matches.iter().flat_map(Match::exprs).chain(rule.action.exprs());
    exprs_attrs(table, chain, exprs)
}

/// A rule's table, chain and expression list.
fn exprs_attrs(table: &str, chain: &str, exprs: impl IntoIterator<Item = Expr>) -> Attrs {
    let mut list = Attrs::default();
    for e in exprs {
        let mut elem = Attrs::default();
        elem.str(NFTA_EXPR_NAME, e.name);
        if !e.data.0.is_empty() {
            elem.nested(NFTA_EXPR_DATA, &e.data);
        }
        list.nested(NFTA_LIST_ELEM, &elem);
    }
    let mut a = Attrs::default();
    a.str(NFTA_RULE_TABLE, table).str(NFTA_RULE_CHAIN, chain).nested(NFTA_RULE_EXPRESSIONS, &list);
    a
}

fn chain_attrs(table: &str, chain: &Chain) -> Attrs {
    let mut hook = Attrs::default();
    hook.u32(NFTA_HOOK_HOOKNUM, chain.hook as u32)
        .raw(NFTA_HOOK_PRIORITY, &chain.priority.to_be_bytes());
    let mut a = Attrs::default();
    a.str(NFTA_CHAIN_TABLE, table)
        .str(NFTA_CHAIN_NAME, &chain.name)
        .nested(NFTA_CHAIN_HOOK, &hook)
        .u32(NFTA_CHAIN_POLICY, 1) // NF_ACCEPT: weft's chains never drop by default
        .str(NFTA_CHAIN_TYPE, chain.kind.name());
    a
}

fn set_attrs(table: &str, set: &DynamicSet, id: u32) -> Attrs {
    let mut desc = Attrs::default();
    desc.u32(NFTA_SET_DESC_SIZE, set.size);
    let mut a = Attrs::default();
    a.str(NFTA_SET_TABLE, table)
        .str(NFTA_SET_NAME, &set.name)
        .u32(NFTA_SET_FLAGS, NFT_SET_EVAL)
        .u32(NFTA_SET_KEY_TYPE, NFT_TYPE_IPADDR)
        .u32(NFTA_SET_KEY_LEN, 4)
        .nested(NFTA_SET_DESC, &desc)
        .u32(NFTA_SET_ID, id);
    a
}

fn table_attrs(name: &str) -> Attrs {
    let mut a = Attrs::default();
    a.str(NFTA_TABLE_NAME, name);
    a
}

// ---- rules in iptables-nft's tables ----

/// An accept rule written as `iptables-nft` writes it (the same expressions, including the
/// xtables `conntrack` and `comment` matches and the counter), so that rules weft adds to a
/// chain of another program's `ip filter` table read back with `iptables -S` as
/// `-A CHAIN -i IF -m comment --comment TAG -j ACCEPT`, without "incompatible" warnings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XtRule {
    /// `-i NAME`
    pub iifname: Option<String>,
    /// `-o NAME`
    pub oifname: Option<String>,
    /// `-d NET`
    pub daddr: Option<Ipv4Net>,
    /// `-m conntrack --ctstate RELATED,ESTABLISHED`
    pub established: bool,
    /// `-m comment --comment TEXT`: how weft recognises its own rules.
    pub comment: String,
}

/// xtables' `struct xt_comment_info`: the comment, NUL-padded.
const XT_COMMENT_LEN: usize = 256;
/// `XT_ALIGN(sizeof(struct xt_conntrack_mtinfo3))`.
const XT_CONNTRACK3_LEN: usize = 168;
/// Offsets of `match_flags` and `state_mask` in `xt_conntrack_mtinfo3`.
const XT_CONNTRACK3_FLAGS: usize = 146;
const XT_CONNTRACK3_STATE: usize = 150;
/// `XT_CONNTRACK_STATE`, and the ESTABLISHED | RELATED bits of `XT_CONNTRACK_STATE_BIT`.
const XT_CONNTRACK_STATE: u16 = 1;
const XT_STATE_ESTABLISHED_RELATED: u16 = (1 << 1) | (1 << 2);
const NFTA_MATCH_NAME: u16 = 1;
const NFTA_MATCH_REV: u16 = 2;
const NFTA_MATCH_INFO: u16 = 3;

/// An xtables match run by nft_compat, as iptables-nft emits it.
fn xt_match(name: &'static str, rev: u32, info: &[u8]) -> Expr {
    let mut a = Attrs::default();
    a.str(NFTA_MATCH_NAME, name).u32(NFTA_MATCH_REV, rev).raw(NFTA_MATCH_INFO, info);
    Expr { name: "match", data: a }
}

/// `-d NET` as iptables-nft encodes it: whole bytes are compared directly, other prefixes
/// through a mask.
fn xt_daddr(net: Ipv4Net) -> Vec<Expr> {
    let octets = net.network().octets();
    let len = u32::from(net.prefix_len());
    if len % 8 == 0 {
        let bytes = (len / 8) as usize;
        vec![payload_load(PAYLOAD_NETWORK, 16, len / 8), cmp(CmpOp::Eq, &octets[..bytes])]
    } else {
        vec![
            payload_load(PAYLOAD_NETWORK, 16, 4),
            bitwise(&net.netmask().octets()),
            cmp(CmpOp::Eq, &octets),
        ]
    }
}

impl XtRule {
    fn exprs(&self) -> Vec<Expr> {
        let mut v = Vec::new();
        if let Some(name) = &self.iifname {
            v.extend([meta_load(META_IIFNAME), cmp(CmpOp::Eq, &ifname_bytes(name))]);
        }
        if let Some(name) = &self.oifname {
            v.extend([meta_load(META_OIFNAME), cmp(CmpOp::Eq, &ifname_bytes(name))]);
        }
        if let Some(net) = self.daddr {
            v.extend(xt_daddr(net));
        }
        if self.established {
            let mut info = vec![0u8; XT_CONNTRACK3_LEN];
            info[XT_CONNTRACK3_FLAGS..XT_CONNTRACK3_FLAGS + 2]
                .copy_from_slice(&XT_CONNTRACK_STATE.to_ne_bytes());
            info[XT_CONNTRACK3_STATE..XT_CONNTRACK3_STATE + 2]
                .copy_from_slice(&XT_STATE_ESTABLISHED_RELATED.to_ne_bytes());
            v.push(xt_match("conntrack", 3, &info));
        }
        let mut comment = vec![0u8; XT_COMMENT_LEN];
        let text = self.comment.as_bytes();
        let n = text.len().min(XT_COMMENT_LEN - 1);
        comment[..n].copy_from_slice(&text[..n]);
        v.push(xt_match("comment", 0, &comment));
        let mut counter = Attrs::default();
        // NFTA_COUNTER_BYTES, NFTA_COUNTER_PACKETS
        counter.raw(1, &0u64.to_be_bytes()).raw(2, &0u64.to_be_bytes());
        v.push(Expr { name: "counter", data: counter });
        v.push(verdict(Verdict::Accept));
        v
    }
}

fn xt_rule_attrs(table: &str, chain: &str, rule: &XtRule) -> Attrs {
    // NFTA_RULE_COMPAT_PROTO and _FLAGS: no protocol, as iptables-nft sends for these rules.
    let mut compat = Attrs::default();
    compat.u32(1, 0).u32(2, 0);
    let mut a = exprs_attrs(table, chain, rule.exprs());
    a.nested(NFTA_RULE_COMPAT, &compat);
    a
}

/// A rule read back from the kernel: enough to recognise and delete it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedRule {
    pub handle: u64,
    /// The text of its `-m comment` match, if it has one.
    pub comment: Option<String>,
}

/// Splits an attribute stream into (type without flags, value).
fn attributes(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & !NLA_F_NESTED;
        if len < 4 || off + len > buf.len() {
            break;
        }
        out.push((kind, &buf[off + 4..off + len]));
        off += (len + 3) & !3;
    }
    out
}

fn find(attrs: &[(u16, &[u8])], kind: u16) -> Option<Vec<u8>> {
    attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| v.to_vec())
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl ListedRule {
    /// Parses a rule message's attributes; `None` without a handle.
    fn parse(attrs: &[u8]) -> Option<ListedRule> {
        let top = attributes(attrs);
        let handle: [u8; 8] = find(&top, NFTA_RULE_HANDLE)?.try_into().ok()?;
        let exprs = find(&top, NFTA_RULE_EXPRESSIONS).unwrap_or_default();
        let comment = attributes(&exprs).into_iter().find_map(|(_, elem)| {
            let elem = attributes(elem);
            if find(&elem, NFTA_EXPR_NAME).map(|n| c_string(&n)).as_deref() != Some("match") {
                return None;
            }
            let data = find(&elem, NFTA_EXPR_DATA)?;
            let data = attributes(&data);
            let name = c_string(&find(&data, NFTA_MATCH_NAME)?);
            (name == "comment").then(|| find(&data, NFTA_MATCH_INFO).map(|i| c_string(&i)))?
        });
        Some(ListedRule { handle: u64::from_be_bytes(handle), comment })
    }
}

/// A rule message's chain and its `counter` expression's packets and bytes.
fn rule_counter(attrs: &[u8]) -> Option<(String, u64, u64)> {
    let top = attributes(attrs);
    let chain = c_string(&find(&top, NFTA_RULE_CHAIN)?);
    let exprs = find(&top, NFTA_RULE_EXPRESSIONS)?;
    attributes(&exprs).into_iter().find_map(|(_, elem)| {
        let elem = attributes(elem);
        if find(&elem, NFTA_EXPR_NAME).map(|n| c_string(&n)).as_deref() != Some("counter") {
            return None;
        }
        let data = find(&elem, NFTA_EXPR_DATA)?;
        let data = attributes(&data);
        let number = |kind: u16| -> Option<u64> {
            Some(u64::from_be_bytes(find(&data, kind)?.try_into().ok()?))
        };
        // NFTA_COUNTER_PACKETS 2, NFTA_COUNTER_BYTES 1.
        Some((chain.clone(), number(2)?, number(1)?))
    })
}

// ---- messages and the socket ----

/// Appends one nfnetlink message (header, nfgenmsg, attributes) to `buf`.
fn push_message(
    buf: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let len = 16 + 4 + attrs.len();
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0); // NFNETLINK_V0
    buf.extend_from_slice(&res_id.to_be_bytes());
    buf.extend_from_slice(attrs);
}

fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

/// Failure talking to nf_tables.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("nftables netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("nftables rejected message {index} of the batch: {source}")]
    Rejected { index: usize, source: io::Error },
    #[error("nftables did not answer")]
    NoAnswer,
}

/// A NETLINK_NETFILTER socket in the agent's own namespace.
#[derive(Debug)]
pub struct NftSocket {
    sock: Socket,
    seq: u32,
}

impl NftSocket {
    pub fn open() -> Result<NftSocket, NftError> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        set_recv_timeout(&sock, Duration::from_secs(2))?;
        Ok(NftSocket { sock, seq: 0 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Replaces `table` atomically: create (so the delete cannot fail), delete, create, fill.
    pub fn replace_table(&mut self, table: &Table) -> Result<(), NftError> {
        let fam = table.family as u8;
        let mut inner: Vec<(u16, u16, Attrs)> = vec![
            (NFT_MSG_NEWTABLE, NLM_F_CREATE, table_attrs(&table.name)),
            (NFT_MSG_DELTABLE, 0, table_attrs(&table.name)),
            (NFT_MSG_NEWTABLE, NLM_F_CREATE, table_attrs(&table.name)),
        ];
        for (id, set) in (1..).zip(&table.sets) {
            inner.push((NFT_MSG_NEWSET, NLM_F_CREATE, set_attrs(&table.name, set, id)));
        }
        for chain in &table.chains {
            inner.push((NFT_MSG_NEWCHAIN, NLM_F_CREATE, chain_attrs(&table.name, chain)));
            for rule in &chain.rules {
                inner.push((
                    NFT_MSG_NEWRULE,
                    NLM_F_CREATE | NLM_F_APPEND,
                    rule_attrs(&table.name, &chain.name, rule),
                ));
            }
        }
        self.send_batch(fam, &inner)?;
        if table.family == Family::Inet {
            // Agents before 0.2 kept the same rules in `ip NAME`: an upgrade removes that table
            // once its replacement is in place.
            self.delete_table(Family::Ip, &table.name)?;
        }
        Ok(())
    }

    /// Deletes a table if it exists.
    pub fn delete_table(&mut self, family: Family, name: &str) -> Result<(), NftError> {
        let inner = vec![
            (NFT_MSG_NEWTABLE, NLM_F_CREATE, table_attrs(name)),
            (NFT_MSG_DELTABLE, 0, table_attrs(name)),
        ];
        self.send_batch(family as u8, &inner)
    }

    fn send_batch(&mut self, family: u8, inner: &[(u16, u16, Attrs)]) -> Result<(), NftError> {
        let mut buf = Vec::new();
        let begin = self.next_seq();
        push_message(
            &mut buf,
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            begin,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        let first = self.seq.wrapping_add(1);
        for (kind, flags, attrs) in inner {
            let seq = self.next_seq();
            push_message(
                &mut buf,
                nft_type(*kind),
                NLM_F_REQUEST | NLM_F_ACK | flags,
                seq,
                family,
                0,
                &attrs.0,
            );
        }
        let end = self.next_seq();
        push_message(
            &mut buf,
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            end,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        fit_buffers(&self.sock, buf.len(), inner.len())?;
        self.sock.send(&buf, 0)?;
        // Every message asked for an acknowledgement: wait for all of them, so that no stale
        // answer is left on the socket, and report the first rejection.
        let mut pending = inner.len();
        let mut first_error = None;
        let mut rbuf = vec![0u8; 64 * 1024];
        while pending > 0 {
            let n = match self.sock.recv(&mut &mut rbuf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(NftError::NoAnswer),
                Err(e) => return Err(e.into()),
            };
            for (kind, seq, payload) in messages(&rbuf[..n]) {
                if kind != NLMSG_ERROR || payload.len() < 4 {
                    continue;
                }
                pending = pending.saturating_sub(1);
                let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if code != 0 && first_error.is_none() {
                    first_error = Some(NftError::Rejected {
                        index: seq.wrapping_sub(first) as usize,
                        source: io::Error::from_raw_os_error(-code),
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Whether a table exists.
    pub fn table_exists(&mut self, family: Family, name: &str) -> Result<bool, NftError> {
        self.exists(NFT_MSG_GETTABLE, NFT_MSG_NEWTABLE, family, &table_attrs(name))
    }

    /// Whether a chain exists.
    pub fn chain_exists(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
    ) -> Result<bool, NftError> {
        let mut attrs = Attrs::default();
        attrs.str(NFTA_CHAIN_TABLE, table).str(NFTA_CHAIN_NAME, chain);
        self.exists(NFT_MSG_GETCHAIN, NFT_MSG_NEWCHAIN, family, &attrs)
    }

    /// Sends a GET for one object; whether the kernel answered with it (not ENOENT).
    fn exists(
        &mut self,
        get: u16,
        answer: u16,
        family: Family,
        attrs: &Attrs,
    ) -> Result<bool, NftError> {
        let seq = self.next_seq();
        let mut buf = Vec::new();
        push_message(
            &mut buf,
            nft_type(get),
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            family as u8,
            0,
            &attrs.0,
        );
        self.sock.send(&buf, 0)?;
        let mut found = false;
        let mut rbuf = vec![0u8; 16 * 1024];
        loop {
            let n = self.sock.recv(&mut &mut rbuf[..], 0)?;
            for (kind, s, payload) in messages(&rbuf[..n]) {
                if s != seq {
                    continue;
                }
                if kind == NLMSG_ERROR && payload.len() >= 4 {
                    let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                    return match code {
                        0 => Ok(found),
                        c if -c == libc::ENOENT => Ok(false),
                        c => Err(io::Error::from_raw_os_error(-c).into()),
                    };
                }
                if kind == nft_type(answer) {
                    found = true;
                }
            }
        }
    }

    /// The rules of one chain, in order, with their handles and `-m comment` texts.
    pub fn list_rules(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
    ) -> Result<Vec<ListedRule>, NftError> {
        let mut out = Vec::new();
        self.dump_rules(family, table, Some(chain), |payload| {
            if let Some(rule) = ListedRule::parse(payload) {
                out.push(rule);
            }
        })?;
        Ok(out)
    }

    /// In one atomic batch: deletes the rules `delete` (handles) from `chain` and puts `rules`
    /// at its head, in the given order.
    pub fn replace_at_head(
        &mut self,
        family: Family,
        table: &str,
        chain: &str,
        delete: &[u64],
        rules: &[XtRule],
    ) -> Result<(), NftError> {
        let mut inner: Vec<(u16, u16, Attrs)> = Vec::new();
        for handle in delete {
            let mut a = Attrs::default();
            a.str(NFTA_RULE_TABLE, table)
                .str(NFTA_RULE_CHAIN, chain)
                .raw(NFTA_RULE_HANDLE, &handle.to_be_bytes());
            inner.push((NFT_MSG_DELRULE, 0, a));
        }
        // Without NLM_F_APPEND a rule goes first in the chain: add the last one first.
        for rule in rules.iter().rev() {
            inner.push((NFT_MSG_NEWRULE, NLM_F_CREATE, xt_rule_attrs(table, chain, rule)));
        }
        if inner.is_empty() {
            return Ok(());
        }
        self.send_batch(family as u8, &inner)
    }

    /// The counters of a table's rules that have one: (chain, packets, bytes), in the order
    /// the kernel lists them.
    pub fn counters(
        &mut self,
        family: Family,
        table: &str,
    ) -> Result<Vec<(String, u64, u64)>, NftError> {
        let mut out = Vec::new();
        self.dump_rules(family, table, None, |payload| out.extend(rule_counter(payload)))?;
        Ok(out)
    }

    /// Number of rules in a table (all chains).
    pub fn rule_count(&mut self, family: Family, table: &str) -> Result<usize, NftError> {
        let mut count = 0;
        self.dump_rules(family, table, None, |_| count += 1)?;
        Ok(count)
    }

    /// Dumps the rules of a table (or of one of its chains), calling `each` with every rule
    /// message's attributes. A missing table or chain has no rules.
    fn dump_rules(
        &mut self,
        family: Family,
        table: &str,
        chain: Option<&str>,
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), NftError> {
        let seq = self.next_seq();
        let mut attrs = Attrs::default();
        attrs.str(NFTA_RULE_TABLE, table);
        if let Some(chain) = chain {
            attrs.str(NFTA_RULE_CHAIN, chain);
        }
        let mut buf = Vec::new();
        push_message(
            &mut buf,
            nft_type(NFT_MSG_GETRULE),
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            family as u8,
            0,
            &attrs.0,
        );
        self.sock.send(&buf, 0)?;
        let mut rbuf = vec![0u8; 64 * 1024];
        loop {
            let n = self.sock.recv(&mut &mut rbuf[..], 0)?;
            for (kind, s, payload) in messages(&rbuf[..n]) {
                if s != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR if payload.len() >= 4 => {
                        let code =
                            i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                        if -code == libc::ENOENT {
                            return Ok(());
                        }
                        return Err(io::Error::from_raw_os_error(-code).into());
                    }
                    // After the 4-byte nfgenmsg come the rule's attributes.
                    k if k == nft_type(NFT_MSG_NEWRULE) && payload.len() >= 4 => {
                        each(&payload[4..]);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Splits a datagram into (type, sequence, payload) of each netlink message.
fn messages(buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        if len < 16 || off + len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let seq = u32::from_ne_bytes([buf[off + 8], buf[off + 9], buf[off + 10], buf[off + 11]]);
        out.push((kind, seq, &buf[off + 16..off + len]));
        off += (len + 3) & !3;
    }
    out
}

/// The default socket buffers (net.core.wmem_default and rmem_default) hold a batch of a
/// couple of hundred KiB and its acknowledgements; larger ones need larger buffers.
const DEFAULT_BUFFER: usize = 208 * 1024;
/// What one acknowledgement costs in the receive buffer (its skb), as libnftables reckons.
const ACK_COST: usize = 1024;

/// Sizes the buffers for a batch of `len` bytes and `messages` acknowledgements, as `nft`
/// does: forced, so that net.core.wmem_max and rmem_max do not cap them (CAP_NET_ADMIN).
fn fit_buffers(sock: &Socket, len: usize, messages: usize) -> io::Result<()> {
    if len > DEFAULT_BUFFER {
        set_buffer(sock, libc::SO_SNDBUFFORCE, len + 4096)?;
    }
    let acks = messages * ACK_COST;
    if acks > DEFAULT_BUFFER {
        set_buffer(sock, libc::SO_RCVBUFFORCE, acks + 64 * 1024)?;
    }
    Ok(())
}

fn set_buffer(sock: &Socket, option: libc::c_int, size: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket descriptor and a correctly sized int.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&size as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn set_recv_timeout(sock: &Socket, t: Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval { tv_sec: t.as_secs() as libc::time_t, tv_usec: 0 };
    // SAFETY: a valid socket descriptor and a correctly sized timeval.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// The NAT table weft installs for the overlay, `inet weft` (one table for IPv4 and IPv6, and
/// later the policy chains; see docs/nftables.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayFirewall {
    pub table: String,
    pub bridge: String,
    /// The allocation range: traffic from it to elsewhere is masqueraded.
    pub range: Ipv4Net,
    /// Exposed subnets: traffic into them from outside is masqueraded (so replies return here).
    pub exposed: Vec<Ipv4Net>,
    /// The agent's own ports (mesh TCP, sleeve UDP, fastdp UDP) that pods must not reach:
    /// dropped on input from the bridge, whatever address they are sent to.
    pub guarded: Vec<(L4, u16)>,
    /// The ports DNS answers TCP on: pods get at most [`DNS_TCP_PER_SOURCE`] connections
    /// each and [`DNS_TCP_TOTAL`] together, so they cannot use up the agent's descriptors.
    pub dns_tcp: Vec<u16>,
}

/// Concurrent DNS-over-TCP connections one pod address may hold to the agent (resolvers use
/// one or two; the rest are refused with a TCP reset).
pub const DNS_TCP_PER_SOURCE: u32 = 16;
/// Concurrent DNS-over-TCP connections all pods may hold to the agent together.
pub const DNS_TCP_TOTAL: u32 = 512;
/// The dynamic set counting DNS-over-TCP connections per pod address.
const DNS_TCP_SET: &str = "dns-tcp";

const MULTICAST: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(224, 0, 0, 0), 4) {
    Ok(n) => n,
    Err(_) => panic!("constant network"),
};

impl OverlayFirewall {
    pub fn table(&self) -> Table {
        let mut post = vec![
            Rule {
                matches: vec![
                    Match::IpSaddr(CmpOp::Eq, self.range),
                    Match::IpDaddr(CmpOp::Eq, MULTICAST),
                ],
                action: Action::Verdict(Verdict::Return),
            },
            Rule {
                matches: vec![
                    Match::IpSaddr(CmpOp::Eq, self.range),
                    Match::IpDaddr(CmpOp::Neq, self.range),
                ],
                action: Action::Masquerade,
            },
        ];
        for net in &self.exposed {
            post.push(Rule {
                matches: vec![Match::IpSaddr(CmpOp::Neq, *net), Match::IpDaddr(CmpOp::Eq, *net)],
                action: Action::Masquerade,
            });
        }
        let mut chains = vec![Chain {
            name: "postrouting".into(),
            kind: ChainType::Nat,
            hook: Hook::Postrouting,
            priority: 100,
            rules: post,
        }];
        let mut sets = Vec::new();
        if !self.guarded.is_empty() || !self.dns_tcp.is_empty() {
            let mut input: Vec<Rule> = self
                .guarded
                .iter()
                .map(|&(l4, port)| Rule {
                    matches: vec![
                        Match::Iifname(CmpOp::Eq, self.bridge.clone()),
                        Match::Dport(l4, port),
                    ],
                    action: Action::Verdict(Verdict::Drop),
                })
                .collect();
            for &port in &self.dns_tcp {
                input.extend(self.dns_tcp_limits(port));
            }
            if !self.dns_tcp.is_empty() {
                sets.push(DynamicSet { name: DNS_TCP_SET.into(), size: 65_536 });
            }
            chains.push(Chain {
                name: "input".into(),
                kind: ChainType::Filter,
                hook: Hook::Input,
                priority: 0,
                rules: input,
            });
        }
        // Subnets are isolated from each other (Weave's model): the host, which has an
        // address in each exposed subnet, must not route between them on the bridge.
        if self.exposed.len() > 1 {
            let forward = self
                .exposed
                .iter()
                .map(|net| Rule {
                    matches: vec![
                        Match::Iifname(CmpOp::Eq, self.bridge.clone()),
                        Match::Oifname(CmpOp::Eq, self.bridge.clone()),
                        Match::IpSaddr(CmpOp::Eq, *net),
                        Match::IpDaddr(CmpOp::Neq, *net),
                    ],
                    action: Action::Verdict(Verdict::Drop),
                })
                .collect();
            chains.push(Chain {
                name: "subnets".into(),
                kind: ChainType::Filter,
                hook: Hook::Forward,
                priority: 0,
                rules: forward,
            });
        }
        Table { family: Family::Inet, name: self.table.clone(), sets, chains }
    }

    /// New DNS-over-TCP connections from the bridge beyond the per-source or total cap are
    /// reset.
    fn dns_tcp_limits(&self, port: u16) -> [Rule; 2] {
        let new_dns = || {
            vec![
                Match::Iifname(CmpOp::Eq, self.bridge.clone()),
                Match::Dport(L4::Tcp, port),
                Match::CtStateNew,
            ]
        };
        let mut per_source = new_dns();
        per_source
            .push(Match::SourceConnCountOver { set: DNS_TCP_SET.into(), max: DNS_TCP_PER_SOURCE });
        let mut total = new_dns();
        total.push(Match::ConnCountOver(DNS_TCP_TOTAL));
        [
            Rule { matches: per_source, action: Action::RejectTcpReset },
            Rule { matches: total, action: Action::RejectTcpReset },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_big_endian() {
        let mut a = Attrs::default();
        a.str(1, "weft").u32(2, 1);
        // "weft\0" = 5 bytes + 4 header = 9, padded to 12; then 8 for the u32.
        assert_eq!(a.0.len(), 20);
        assert_eq!(&a.0[16..20], &[0, 0, 0, 1]);
        assert_eq!(u16::from_ne_bytes([a.0[0], a.0[1]]), 9);
    }

    #[test]
    fn prefix_matches_skip_the_mask_for_host_addresses() {
        let host: Ipv4Net = "10.0.0.1/32".parse().unwrap();
        assert_eq!(prefix_match(12, CmpOp::Eq, host).len(), 4);
        let net: Ipv4Net = "10.32.0.0/12".parse().unwrap();
        let e = prefix_match(16, CmpOp::Neq, net);
        let names: Vec<&str> = e.iter().map(|e| e.name).collect();
        assert_eq!(names, ["meta", "cmp", "payload", "bitwise", "cmp"], "guarded by nfproto");
    }

    #[test]
    fn message_splitting_stops_at_truncation() {
        let mut buf = Vec::new();
        push_message(&mut buf, 2, 0, 7, 0, 0, &[0, 0, 0, 0]);
        push_message(&mut buf, 3, 0, 8, 0, 0, &[]);
        let m = messages(&buf);
        assert_eq!(m.iter().map(|(k, s, _)| (*k, *s)).collect::<Vec<_>>(), [(2, 7), (3, 8)]);
        assert_eq!(messages(&buf[..buf.len() - 1]).len(), 1);
    }

    #[test]
    fn overlay_table_has_the_expected_rules() {
        let fw = OverlayFirewall {
            table: "weft".into(),
            bridge: "weft".into(),
            range: "10.32.0.0/12".parse().unwrap(),
            exposed: vec!["10.2.2.0/24".parse().unwrap()],
            guarded: vec![(L4::Tcp, 6783), (L4::Udp, 6783), (L4::Udp, 6784)],
            dns_tcp: vec![],
        };
        let t = fw.table();
        assert_eq!(t.family, Family::Inet);
        assert_eq!(t.rule_count(), 6);
        assert_eq!(t.chains[0].rules[1].action, Action::Masquerade);
        let input = &t.chains[1];
        assert_eq!((input.hook, input.kind), (Hook::Input, ChainType::Filter));
        assert_eq!(
            input.rules[0].matches,
            [Match::Iifname(CmpOp::Eq, "weft".into()), Match::Dport(L4::Tcp, 6783)]
        );
        assert!(input.rules.iter().all(|r| r.action == Action::Verdict(Verdict::Drop)));
        assert_eq!(t.chains.len(), 2, "one exposed subnet: nothing to isolate");
        let two = OverlayFirewall {
            exposed: vec!["10.2.2.0/24".parse().unwrap(), "10.2.3.0/24".parse().unwrap()],
            ..fw
        };
        let t = two.table();
        let fwd = &t.chains[2];
        assert_eq!((fwd.hook, fwd.rules.len()), (Hook::Forward, 2));
        assert_eq!(
            fwd.rules[1].matches[2],
            Match::IpSaddr(CmpOp::Eq, "10.2.3.0/24".parse().unwrap())
        );
    }

    #[test]
    fn pods_dns_tcp_connections_are_capped_per_source_and_in_total() {
        let fw = OverlayFirewall {
            table: "weft".into(),
            bridge: "weft".into(),
            range: "10.32.0.0/12".parse().unwrap(),
            exposed: vec![],
            guarded: vec![],
            dns_tcp: vec![53],
        };
        let t = fw.table();
        assert_eq!(t.sets, [DynamicSet { name: DNS_TCP_SET.into(), size: 65_536 }]);
        let input = &t.chains[1].rules;
        assert_eq!(input.len(), 2);
        assert!(input.iter().all(|r| r.action == Action::RejectTcpReset));
        assert!(input.iter().all(|r| r.matches[..3]
            == [
                Match::Iifname(CmpOp::Eq, "weft".into()),
                Match::Dport(L4::Tcp, 53),
                Match::CtStateNew
            ]));
        assert_eq!(
            input[0].matches[3],
            Match::SourceConnCountOver { set: DNS_TCP_SET.into(), max: DNS_TCP_PER_SOURCE }
        );
        assert_eq!(input[1].matches[3], Match::ConnCountOver(DNS_TCP_TOTAL));
        // The per-source count keys on the IPv4 source, behind the family guard.
        let names: Vec<&str> = input[0].matches[3].exprs().iter().map(|e| e.name).collect();
        assert_eq!(names, ["meta", "cmp", "payload", "dynset"]);
        let without_dns = OverlayFirewall { dns_tcp: vec![], ..fw };
        assert!(without_dns.table().sets.is_empty());
    }

    #[test]
    fn dport_matches_are_guarded_by_the_protocol() {
        let e = Match::Dport(L4::Udp, 6784).exprs();
        let names: Vec<&str> = e.iter().map(|e| e.name).collect();
        assert_eq!(names, ["meta", "cmp", "payload", "cmp"]);
    }

    #[test]
    fn xt_rules_read_back_with_their_handle_and_comment() {
        let rule = XtRule {
            iifname: None,
            oifname: Some("weft".into()),
            daddr: Some("10.2.1.0/24".parse().unwrap()),
            established: true,
            comment: "weft:weft".into(),
        };
        let names: Vec<&str> = rule.exprs().iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            ["meta", "cmp", "payload", "cmp", "match", "match", "counter", "immediate"],
            "as iptables-nft writes it: whole bytes of the prefix compared without a mask"
        );
        let mut attrs = xt_rule_attrs("filter", "DOCKER-USER", &rule);
        attrs.raw(NFTA_RULE_HANDLE, &42u64.to_be_bytes());
        let listed = ListedRule::parse(&attrs.0);
        assert_eq!(listed, Some(ListedRule { handle: 42, comment: Some("weft:weft".into()) }));
        let odd = XtRule { daddr: Some("10.2.0.0/23".parse().unwrap()), ..rule };
        assert_eq!(odd.exprs()[3].name, "bitwise");
        let without_handle = xt_rule_attrs("filter", "DOCKER-USER", &odd);
        assert_eq!(ListedRule::parse(&without_handle.0), None);
    }
}
