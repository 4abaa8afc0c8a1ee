//! The IP allocation of one peer: the ring, consensus while there is none, the allocator over
//! this peer's share, and the conversations with other peers — asking for space, answering
//! such requests, claiming addresses another peer owns, handing everything over on leave.
//!
//! Every call returns at once. An allocation that cannot be served yet returns
//! [`AllocError::Wait`] with the reason, and the caller retries when [`Ipam::take_changed`]
//! says something moved (or after a while). Messages to send collect in an outbox
//! ([`Ipam::take_outbox`]); a ring that must be persisted is flagged ([`Ipam::take_ring_dirty`]).
//! Time is passed in as milliseconds. Pure: no I/O, no clock, no randomness.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::Range;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::allocator::{Allocator, IpamError};
use super::paxos::{Claims, Paxos};
use super::ring::{Ring, RingError};
use super::space::{self, addr, host_range, key};
use super::wire::{self, IpamMsg, WireError};
use crate::identity::PeerName;

/// How the ring gets its first owners (`--ipalloc-init`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InitMode {
    /// Agreement among the first `n` peers (a quorum of n/2+1 must take part).
    Consensus(usize),
    /// The ring is divided among exactly these peers, without communication.
    Seed(Vec<PeerName>),
    /// Never takes part in the first division; asks the others for space.
    Observer,
}

impl std::fmt::Display for InitMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InitMode::Consensus(n) => write!(f, "consensus={n}"),
            InitMode::Seed(p) => {
                let names: Vec<String> = p.iter().map(PeerName::to_string).collect();
                write!(f, "seed={}", names.join(","))
            }
            InitMode::Observer => f.write_str("observer"),
        }
    }
}

impl std::str::FromStr for InitMode {
    type Err = String;
    fn from_str(s: &str) -> Result<InitMode, String> {
        let usage = "expected consensus=N, seed=NAME,NAME... or observer";
        match s.split_once('=') {
            None if s == "observer" => Ok(InitMode::Observer),
            Some(("consensus", n)) => match n.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(InitMode::Consensus(n)),
                _ => Err(format!("consensus={n}: the peer count must be a number >= 1")),
            },
            Some(("seed", names)) => {
                let peers = names
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(str::parse)
                    .collect::<Result<Vec<PeerName>, String>>()?;
                if peers.is_empty() {
                    return Err(format!("seed=: no peer names ({usage})"));
                }
                Ok(InitMode::Seed(peers))
            }
            _ => Err(format!("{s:?}: {usage}")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct IpamConfig {
    pub me: PeerName,
    /// Distinguishes this start of the agent from earlier ones (e.g. start time in ms).
    pub incarnation: u64,
    pub range: IpNet,
    pub default_subnet: IpNet,
    pub mode: InitMode,
}

/// A message for the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Send {
    /// To a few neighbours, except `except`.
    Gossip {
        except: Option<PeerName>,
        payload: Vec<u8>,
    },
    Broadcast(Vec<u8>),
    Unicast(PeerName, Vec<u8>),
}

/// Why an allocation must wait.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Wait {
    #[error("the IP allocation ring is not ready: {0}")]
    Ring(String),
    #[error("asking other peers for free addresses in {0}")]
    Space(IpNet),
    #[error(
        "the free addresses in {0} belong to peers that are unreachable ({1}); `weft rmpeer` reclaims a dead peer's space"
    )]
    SpaceUnreachable(IpNet, String),
    #[error("{addr} belongs to peer {owner}, asked to hand it over")]
    Owner { addr: IpAddr, owner: PeerName },
    #[error("{addr} belongs to peer {owner}, which is unreachable")]
    OwnerUnreachable { addr: IpAddr, owner: PeerName },
    #[error(
        "the free addresses in {0} were just taken over with rmpeer; they are used once the other peers confirm"
    )]
    TakenOver(IpNet),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error(transparent)]
    Failed(#[from] IpamError),
    #[error(transparent)]
    Wait(#[from] Wait),
}

/// How long a peer asked for space gets to answer before the next one is asked.
const ASK_TIMEOUT_MS: u64 = 2_000;
/// How often an elector without progress proposes again.
const PROPOSE_EVERY_MS: u64 = 3_000;
/// How often consensus state and observers' requests are repeated while there is no ring.
const REPEAT_MS: u64 = 1_000;
/// Free-address hints are gossiped at most this often.
const FREE_REPORT_MS: u64 = 1_000;
/// Full ring to a few neighbours this often, whatever happened.
const ANTI_ENTROPY_MS: u64 = 30_000;
/// A space request nobody has asked about for this long is dropped.
const ASK_EXPIRY_MS: u64 = 60_000;
/// What a donor answers when it has no free address in the range asked for: the only denial
/// that says the asker should not wait for this donor.
const NOTHING_TO_GIVE: &str = "no free space to give";

#[derive(Clone, Debug)]
struct SpaceAsk {
    subnet: IpNet,
    asked: Option<(PeerName, u64)>,
    /// Asked in this round without a grant (denied, timed out or gone).
    denied: BTreeSet<PeerName>,
    /// Answered that they have no free address in the subnet.
    refused: BTreeSet<PeerName>,
    /// After every donor said no, nobody is asked again before this time.
    pause_until: Option<u64>,
    /// When every reachable owner of space in the subnet had refused: the allocation fails
    /// as exhausted (if it comes back soon enough for the answers to still be true).
    exhausted_at: Option<u64>,
    touched: u64,
}

/// Space taken over with `rmpeer`, kept from the allocator until every peer that was
/// reachable then has shown it has the takeover: one of them may have got part of that space
/// from the dead peer without our hearing of it, and keeps what it uses there (§1, keeping
/// what is in use), which we only learn from its ring.
/// Persisted with the ring: a restart must not release it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    from: PeerName,
    /// The tokens taken over, with the version the takeover gave them.
    tokens: Vec<(u128, u64)>,
    waiting: BTreeSet<PeerName>,
    #[serde(skip)]
    last_sent: Option<u64>,
}

impl Hold {
    /// Whether `theirs` has what `ours` (merged with it) has at every token taken over: then
    /// they have seen the takeover, or something that beats it (their own use of the space,
    /// kept), and both sides agree on who owns it. A competing takeover of the same space by
    /// them does not count until one of the two has won on both sides.
    fn agreed(&self, ours: &Ring, theirs: &Ring) -> bool {
        self.tokens.iter().all(|(t, v)| {
            let mine = ours.entry_at(*t);
            mine.is_some_and(|e| e.version >= *v) && mine == theirs.entry_at(*t)
        })
    }
}

#[derive(Clone, Debug)]
struct ClaimAsk {
    asked: Option<u64>,
    /// Kept while the address is in use here (restored at start), else expires.
    in_use: bool,
    touched: u64,
    refused: Option<String>,
}

/// The persisted form of the ring.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PersistedRing {
    pub peer: PeerName,
    pub range: IpNet,
    /// The ring as an encoded `IpamMessage`.
    #[serde(with = "hex_bytes")]
    pub ring: Vec<u8>,
    /// This elector's consensus claims while there is no ring: an acceptor must not forget
    /// its promise or what it accepted across a restart (state files without it load).
    #[serde(default)]
    pub consensus: Option<Claims>,
    /// Space taken over with `rmpeer` and not confirmed yet.
    #[serde(default)]
    pub holds: Vec<Hold>,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&b.iter().map(|x| format!("{x:02x}")).collect::<String>())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }

    /// Decodes over bytes, never slicing the string: a non-ASCII character in a damaged file
    /// is an error, not a panic on a char boundary.
    pub fn decode(s: &[u8]) -> Result<Vec<u8>, &'static str> {
        if s.len() % 2 != 0 {
            return Err("odd hex length");
        }
        s.chunks_exact(2).map(|pair| Ok(nibble(pair[0])? << 4 | nibble(pair[1])?)).collect()
    }

    fn nibble(c: u8) -> Result<u8, &'static str> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err("not a hex digit"),
        }
    }
}

/// One peer's part of the status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerShare {
    pub peer: String,
    /// Its nickname, if this peer ever heard it.
    pub nickname: String,
    /// Addresses of the range this peer owns.
    pub owned: u64,
    /// Free addresses it last reported.
    pub free: u64,
    pub reachable: bool,
    /// Owned ranges as "first-last".
    pub ranges: Vec<String>,
}

/// Where the ring stands, as `weft status` shows it (serialised as the same sentence).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum RingState {
    /// No ring, and nobody asked for an address yet.
    #[default]
    Idle,
    /// Asked for, not there yet: why.
    Waiting(String),
    Ready,
    HandingOver(String),
    HandedOver(String),
}

const IDLE: &str = "idle: the ring is created on the first allocation";

impl std::fmt::Display for RingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RingState::Idle => f.write_str(IDLE),
            RingState::Waiting(why) => f.write_str(why),
            RingState::Ready => f.write_str("ready"),
            RingState::HandingOver(heir) => write!(f, "handing over to {heir}"),
            RingState::HandedOver(heir) => write!(f, "handed over to {heir}"),
        }
    }
}

impl From<RingState> for String {
    fn from(s: RingState) -> String {
        s.to_string()
    }
}

impl From<String> for RingState {
    fn from(s: String) -> RingState {
        if s == "ready" {
            RingState::Ready
        } else if s.starts_with("idle") {
            RingState::Idle
        } else if let Some(h) = s.strip_prefix("handing over to ") {
            RingState::HandingOver(h.to_owned())
        } else if let Some(h) = s.strip_prefix("handed over to ") {
            RingState::HandedOver(h.to_owned())
        } else {
            RingState::Waiting(s)
        }
    }
}

/// The allocation state for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IpamStatus {
    pub mode: String,
    pub state: RingState,
    pub ring_seeds: Vec<String>,
    pub peers: Vec<PeerShare>,
    /// Addresses owned by unreachable peers.
    pub unreachable: u64,
    /// Peers whose rings cannot be merged with ours, with the reason.
    pub mismatches: Vec<(String, String)>,
    /// Ranges a peer's ring gave away while we had addresses in use there (kept).
    pub conflicts: Vec<String>,
    /// Open requests for space and for addresses owned by others.
    pub pending_space: Vec<String>,
    pub pending_claims: Vec<String>,
    /// Space taken over with `rmpeer` and not used yet: "RANGE from PEER, waiting for PEER...".
    pub holding: Vec<String>,
}

/// The allocation state of one peer.
#[derive(Debug)]
pub struct Ipam {
    cfg: IpamConfig,
    ring: Ring,
    paxos: Option<Paxos>,
    alloc: Allocator,
    alive: BTreeSet<PeerName>,
    /// Nicknames of every peer seen (kept after they go: `rmpeer` names dead peers).
    nicknames: BTreeMap<PeerName, String>,
    want_ring: bool,
    last_propose: Option<u64>,
    last_repeat: Option<u64>,
    space: BTreeMap<(u128, u128), SpaceAsk>,
    claims: BTreeMap<u128, ClaimAsk>,
    free_dirty: bool,
    last_free_report: u64,
    last_anti_entropy: u64,
    mismatches: BTreeMap<PeerName, String>,
    conflicts: Vec<String>,
    outbox: Vec<Send>,
    ring_dirty: bool,
    changed: bool,
    leaving: Option<(PeerName, bool)>,
    holds: Vec<Hold>,
}

fn fmt_range(r: &Range<u128>) -> String {
    format!("{}-{}", addr(r.start), addr(r.end.saturating_sub(1)))
}

fn sat(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

impl Ipam {
    /// A peer's allocation state, from the persisted ring if it is still valid.
    pub fn new(cfg: IpamConfig, persisted: Option<PersistedRing>) -> (Ipam, Option<String>) {
        let range = space::net_range(cfg.range);
        let mut note = None;
        let (ring, claims, holds) = match persisted.map(|p| Self::restore_ring(&cfg, p)) {
            Some(Ok(r)) => r,
            Some(Err(why)) => {
                note = Some(why);
                (Ring::new(range), None, Vec::new())
            }
            None => (Ring::new(range), None, Vec::new()),
        };
        let paxos = match &cfg.mode {
            InitMode::Consensus(n) => {
                let mut px = Paxos::new(cfg.me, cfg.incarnation, n / 2 + 1);
                if let Some(c) = claims {
                    px.restore(c);
                }
                Some(px)
            }
            _ => None,
        };
        let mut ipam = Ipam {
            alloc: Allocator::new(cfg.range, cfg.default_subnet),
            cfg,
            ring,
            paxos,
            alive: BTreeSet::new(),
            nicknames: BTreeMap::new(),
            want_ring: false,
            last_propose: None,
            last_repeat: None,
            space: BTreeMap::new(),
            claims: BTreeMap::new(),
            free_dirty: true,
            last_free_report: 0,
            last_anti_entropy: 0,
            mismatches: BTreeMap::new(),
            conflicts: Vec::new(),
            outbox: Vec::new(),
            ring_dirty: false,
            changed: false,
            leaving: None,
            holds,
        };
        if !ipam.ring.is_empty() {
            ipam.paxos = None;
        } else if let InitMode::Seed(peers) = ipam.cfg.mode.clone() {
            ipam.create_ring(&peers);
        }
        ipam.sync_owned();
        (ipam, note)
    }

    fn restore_ring(
        cfg: &IpamConfig,
        p: PersistedRing,
    ) -> Result<(Ring, Option<Claims>, Vec<Hold>), String> {
        if p.peer != cfg.me {
            return Err(format!(
                "the persisted ring belongs to peer {} (this peer is {}): discarded",
                p.peer, cfg.me
            ));
        }
        if p.range != cfg.range {
            return Err(format!(
                "the allocation range changed from {} to {}: persisted ring discarded",
                p.range, cfg.range
            ));
        }
        match wire::decode(&p.ring) {
            Ok(IpamMsg::Ring { ring, .. }) if ring.range() == space::net_range(cfg.range) => {
                Ok((ring, p.consensus, p.holds))
            }
            Ok(_) => Err("the persisted ring does not match the range: discarded".into()),
            Err(e) => Err(format!("the persisted ring is unreadable ({e}): discarded")),
        }
    }

    pub fn me(&self) -> PeerName {
        self.cfg.me
    }

    pub fn range(&self) -> IpNet {
        self.alloc.range()
    }

    pub fn default_subnet(&self) -> IpNet {
        self.alloc.default_subnet()
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn allocator(&self) -> &Allocator {
        &self.alloc
    }

    pub fn ready(&self) -> bool {
        !self.ring.is_empty()
    }

    pub fn validate_subnet(&self, subnet: IpNet) -> Result<(), IpamError> {
        self.alloc.validate_subnet(subnet)
    }

    /// Messages to send, oldest first.
    pub fn take_outbox(&mut self) -> Vec<Send> {
        std::mem::take(&mut self.outbox)
    }

    /// The ring to persist, if it changed since the last call.
    pub fn take_ring_dirty(&mut self) -> Option<PersistedRing> {
        if !std::mem::take(&mut self.ring_dirty) {
            return None;
        }
        Some(PersistedRing {
            peer: self.cfg.me,
            range: self.cfg.range,
            ring: wire::encode(&IpamMsg::Ring { ring: self.ring.clone(), reply: false }),
            consensus: self.paxos.as_ref().map(|px| px.mine().clone()),
            holds: self.holds.clone(),
        })
    }

    /// The ring must be persisted again (the last write failed).
    pub fn mark_ring_dirty(&mut self) {
        self.ring_dirty = true;
    }

    /// Whether anything that waiting allocations depend on changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    fn ring_msg(&self, reply: bool) -> Vec<u8> {
        wire::encode(&IpamMsg::Ring { ring: self.ring.clone(), reply })
    }

    fn sync_owned(&mut self) {
        let owned = self.allocatable();
        if owned != self.alloc.owned() {
            self.alloc.set_owned(owned);
            self.free_dirty = true;
            self.changed = true;
        }
    }

    /// This peer's share of the ring without the space it holds back after `rmpeer`.
    pub fn allocatable(&self) -> Vec<Range<u128>> {
        let me = self.cfg.me;
        let held = self.held_tokens();
        let mut out: Vec<Range<u128>> = Vec::new();
        for (r, _) in self.ring.entries().filter(|(r, e)| e.peer == me && !held.contains(&r.start))
        {
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
        out
    }

    /// Whether part of `within` is held back after `rmpeer`.
    fn holds_any_in(&self, within: Range<u128>) -> bool {
        let me = self.cfg.me;
        self.holds.iter().flat_map(|h| &h.tokens).any(|(t, _)| {
            self.ring.entries().any(|(r, e)| {
                r.start == *t && e.peer == me && r.start < within.end && within.start < r.end
            })
        })
    }

    /// Whether `k` lies in space held back after `rmpeer`.
    fn is_held(&self, k: u128) -> bool {
        self.ring.owner(k) == Some(self.cfg.me)
            && !self.alloc.owned().iter().any(|r| r.contains(&k))
    }

    /// The peers whose confirmation of a takeover this peer waits for (see `rmpeer`).
    pub fn awaiting(&self) -> BTreeSet<PeerName> {
        self.holds.iter().flat_map(|h| h.waiting.iter().copied()).collect()
    }

    fn ring_changed(&mut self) {
        self.ring_dirty = true;
        self.changed = true;
        self.sync_owned();
    }

    fn create_ring(&mut self, peers: &[PeerName]) {
        if self.ring.seed(peers) {
            self.paxos = None;
            self.ring_changed();
            let msg = self.ring_msg(false);
            self.outbox.push(Send::Broadcast(msg));
        }
    }

    // ---- local requests ----

    /// Allocates the lowest free address of `subnet` for `owner`.
    pub fn allocate(&mut self, owner: &str, subnet: IpNet, now: u64) -> Result<IpNet, AllocError> {
        self.alloc.validate_subnet(subnet)?;
        self.ensure_ring(now)?;
        match self.alloc.allocate(owner, subnet) {
            Ok(n) => {
                self.free_dirty = true;
                Ok(n)
            }
            Err(IpamError::Exhausted(_)) => Err(self.ask_space(subnet, now)),
            Err(e) => Err(e.into()),
        }
    }

    /// Our space in `subnet` is full: ask the other owners of space there. The allocation
    /// fails as exhausted only when no peer can have a free address there: nobody else owns
    /// space in it, or every reachable owner just said it has none (and the unreachable ones
    /// last reported none).
    fn ask_space(&mut self, subnet: IpNet, now: u64) -> AllocError {
        if self.leaving.is_some() {
            return IpamError::Exhausted(subnet).into();
        }
        let within = host_range(subnet);
        if self.holds_any_in(within.clone()) {
            return Wait::TakenOver(subnet).into();
        }
        let donors = self.ring.donors(within.clone(), self.cfg.me);
        if !donors.iter().any(|(p, _)| self.alive.contains(p)) {
            let dead: Vec<String> =
                donors.iter().filter(|(_, free)| *free > 0).map(|(p, _)| p.to_string()).collect();
            return if dead.is_empty() {
                IpamError::Exhausted(subnet).into()
            } else {
                Wait::SpaceUnreachable(subnet, dead.join(", ")).into()
            };
        }
        let id = (within.start, within.end);
        let ask = self.space.entry(id).or_insert(SpaceAsk {
            subnet,
            asked: None,
            denied: BTreeSet::new(),
            refused: BTreeSet::new(),
            pause_until: None,
            exhausted_at: None,
            touched: now,
        });
        ask.touched = now;
        match ask.exhausted_at {
            Some(t) if now < t + ASK_TIMEOUT_MS => {
                self.space.remove(&id);
                return IpamError::Exhausted(subnet).into();
            }
            // Answers that old may no longer hold: ask again.
            Some(_) => {
                ask.exhausted_at = None;
                ask.refused.clear();
                ask.denied.clear();
            }
            None => {}
        }
        self.pump_space(now);
        Wait::Space(subnet).into()
    }

    /// Claims exactly `net.addr()` for `owner` (a static address, or one in use at start).
    pub fn claim(&mut self, owner: &str, net: IpNet, now: u64) -> Result<(), AllocError> {
        let k = key(net.addr());
        if !self.alloc.range().contains(&net.addr()) {
            return Ok(self.alloc.claim(owner, net)?);
        }
        if let Some(current) = self.alloc.owner_of(net.addr()) {
            if current != owner {
                return Err(
                    IpamError::Conflict { addr: net.addr(), owner: current.to_owned() }.into()
                );
            }
        }
        self.ensure_ring(now)?;
        match self.ring.owner(k) {
            Some(p) if p == self.cfg.me && self.is_held(k) => Err(Wait::TakenOver(net).into()),
            Some(p) if p == self.cfg.me => {
                self.claims.remove(&k);
                Ok(self.alloc.claim(owner, net)?)
            }
            Some(_) if self.leaving.is_some() => Err(IpamError::NotOwned(net.addr()).into()),
            Some(p) => {
                let ask = self.claims.entry(k).or_insert(ClaimAsk {
                    asked: None,
                    in_use: false,
                    touched: now,
                    refused: None,
                });
                ask.touched = now;
                if let Some(why) = ask.refused.take() {
                    self.claims.remove(&k);
                    return Err(IpamError::Conflict { addr: net.addr(), owner: why }.into());
                }
                self.pump_claims(now);
                if self.alive.contains(&p) {
                    Err(Wait::Owner { addr: net.addr(), owner: p }.into())
                } else {
                    Err(Wait::OwnerUnreachable { addr: net.addr(), owner: p }.into())
                }
            }
            None => Ok(self.alloc.claim(owner, net)?),
        }
    }

    /// Records an address found in use at start, whoever owns its range now; if another peer
    /// does, asks for it in the background.
    pub fn restore(&mut self, owner: &str, net: IpNet, now: u64) {
        self.alloc.restore(owner, net);
        let k = key(net.addr());
        if self.alloc.range().contains(&net.addr())
            && self.ring.owner(k).is_none_or(|p| p != self.cfg.me)
        {
            self.claims
                .insert(k, ClaimAsk { asked: None, in_use: true, touched: now, refused: None });
            if self.ring.is_empty() {
                self.want_ring = true;
            }
        }
        self.free_dirty = true;
    }

    /// Releases one address.
    pub fn release(&mut self, ip: IpAddr) -> Option<String> {
        self.claims.remove(&key(ip));
        let owner = self.alloc.release(ip)?;
        self.free_dirty = true;
        Some(owner)
    }

    /// Gives an address in use to another owner (an allocation named after its result).
    pub fn rename(&mut self, ip: IpAddr, owner: &str) -> bool {
        self.alloc.rename(ip, owner)
    }

    /// Releases every address of `owner`.
    pub fn release_owner(&mut self, owner: &str) -> Vec<IpAddr> {
        let ips = self.alloc.release_owner(owner);
        for ip in &ips {
            self.claims.remove(&key(*ip));
        }
        if !ips.is_empty() {
            self.free_dirty = true;
        }
        ips
    }

    /// Makes sure a ring will exist: `weft prime`.
    pub fn prime(&mut self, now: u64) -> Result<(), Wait> {
        self.ensure_ring(now)
    }

    /// Starts forming the ring if there is none; a single elector forms it at once.
    fn ensure_ring(&mut self, now: u64) -> Result<(), Wait> {
        if self.ring.is_empty() {
            self.need_ring(now);
        }
        if self.ring.is_empty() {
            return Err(Wait::Ring(self.ring_wait_reason()));
        }
        Ok(())
    }

    /// Takes over every range of `peer` (which must be gone for good): `weft rmpeer`.
    /// Returns the number of addresses taken over. The space is not allocated from until
    /// every peer reachable now has shown, in its ring, that it has the takeover (see
    /// [`Hold`]); the ring goes to each of them with a request to answer.
    pub fn rmpeer(&mut self, peer: PeerName) -> Result<u128, IpamError> {
        let me = self.cfg.me;
        if peer == me {
            return Err(IpamError::Invalid("a peer cannot remove itself; use `weft reset`".into()));
        }
        // It will not answer any more: no takeover waits for it.
        for h in &mut self.holds {
            h.waiting.remove(&peer);
        }
        let taken: Vec<u128> =
            self.ring.entries().filter(|(_, e)| e.peer == peer).map(|(r, _)| r.start).collect();
        let moved = self.ring.transfer(peer, me);
        let waiting: BTreeSet<PeerName> =
            self.alive.iter().copied().filter(|p| *p != me && *p != peer).collect();
        if moved > 0 && !waiting.is_empty() {
            let tokens = taken
                .into_iter()
                .filter_map(|t| self.ring.entry_at(t).map(|e| (t, e.version)))
                .collect();
            self.holds.push(Hold { from: peer, tokens, waiting, last_sent: None });
        }
        self.release_confirmed_holds();
        if moved > 0 {
            self.ring_changed();
            self.send_takeover();
        }
        Ok(moved)
    }

    /// Our ring to every peer a takeover waits for, asking for theirs.
    fn send_takeover(&mut self) {
        let msg = self.ring_msg(true);
        for p in self.awaiting() {
            self.outbox.push(Send::Unicast(p, msg.clone()));
        }
        let others = self.ring_msg(false);
        self.outbox.push(Send::Broadcast(others));
    }

    /// Notes that `src`'s ring has our takeovers; holds nobody waits for any more end.
    fn confirm_holds(&mut self, src: PeerName, theirs: &Ring) {
        let ours = &self.ring;
        for h in &mut self.holds {
            if h.waiting.contains(&src) && h.agreed(ours, theirs) {
                h.waiting.remove(&src);
            }
        }
        self.release_confirmed_holds();
    }

    fn release_confirmed_holds(&mut self) {
        let before = self.holds.len();
        self.holds.retain(|h| !h.waiting.is_empty());
        if self.holds.len() != before {
            self.sync_owned();
            self.changed = true;
            self.ring_dirty = true;
        }
    }

    /// Repeats the takeover to peers that have not confirmed it (messages get lost).
    fn resend_takeover(&mut self, now: u64) {
        let due = self.holds.iter().any(|h| h.last_sent.is_some_and(|t| now >= t + ASK_TIMEOUT_MS));
        for h in &mut self.holds {
            if due || h.last_sent.is_none() {
                h.last_sent = Some(now);
            }
        }
        if due {
            self.send_takeover();
        }
    }

    /// Hands this peer's ranges to another (leaving the network: `weft reset`). Returns the
    /// heir, `None` if there is nobody to hand over to.
    pub fn leave(&mut self) -> Option<PeerName> {
        if self.ring.owned_by(self.cfg.me).is_empty() {
            return None;
        }
        let shares = self.ring.shares();
        let heir = self
            .alive
            .iter()
            .filter(|p| **p != self.cfg.me)
            .max_by_key(|p| (shares.get(p).map_or(0, |s| s.0), std::cmp::Reverse(**p)))
            .copied()?;
        // Nothing more is asked for: space granted later would stay with a peer that is gone.
        self.space.clear();
        self.claims.clear();
        self.ring.transfer(self.cfg.me, heir);
        self.ring_changed();
        self.leaving = Some((heir, false));
        self.resend_leave();
        Some(heir)
    }

    /// While leaving, space that still reaches this peer (a grant already in flight) goes on
    /// to the heir.
    fn pass_on_to_heir(&mut self) {
        if let Some((heir, _)) = self.leaving {
            if self.ring.transfer(self.cfg.me, heir) > 0 {
                self.leaving = Some((heir, false));
                self.ring_changed();
                self.resend_leave();
            }
        }
    }

    fn resend_leave(&mut self) {
        if let Some((heir, false)) = self.leaving {
            let (bcast, direct) = (self.ring_msg(false), self.ring_msg(true));
            self.outbox.push(Send::Broadcast(bcast));
            self.outbox.push(Send::Unicast(heir, direct));
        }
    }

    /// After [`Ipam::leave`]: whether the heir confirmed it has the ranges.
    pub fn handed_over(&self) -> bool {
        matches!(self.leaving, Some((_, true)))
    }

    // ---- the mesh ----

    /// The peers reachable now.
    pub fn set_alive(&mut self, alive: BTreeSet<PeerName>, now: u64) {
        if alive != self.alive {
            self.mismatches.retain(|p, _| alive.contains(p));
            self.alive = alive;
            self.changed = true;
            self.pump_space(now);
            self.pump_claims(now);
        }
    }

    /// Remembers peers' nicknames (for status and `rmpeer NICKNAME`).
    pub fn note_nicknames(&mut self, names: impl IntoIterator<Item = (PeerName, String)>) {
        for (p, n) in names {
            if !n.is_empty() {
                self.nicknames.insert(p, n);
            }
        }
    }

    /// The peer a name or nickname stands for.
    pub fn resolve(&self, name_or_nick: &str) -> Result<PeerName, String> {
        if let Ok(p) = name_or_nick.parse() {
            return Ok(p);
        }
        let matching: Vec<PeerName> = self
            .nicknames
            .iter()
            .filter(|(_, n)| n.as_str() == name_or_nick)
            .map(|(p, _)| *p)
            .collect();
        match matching.as_slice() {
            [one] => Ok(*one),
            [] => Err(format!("no peer is named or nicknamed {name_or_nick:?}")),
            _ => Err(format!("several peers are nicknamed {name_or_nick:?}; give the peer name")),
        }
    }

    /// A new neighbour: it gets what we have.
    pub fn peer_up(&mut self, peer: PeerName) {
        if !self.ring.is_empty() {
            let msg = self.ring_msg(false);
            self.outbox.push(Send::Unicast(peer, msg));
        } else if let Some(px) = &self.paxos {
            if self.want_ring || px.electors() > 1 {
                let msg = wire::encode(&IpamMsg::Paxos(px.nodes().clone()));
                self.outbox.push(Send::Unicast(peer, msg));
            }
        } else if self.want_ring {
            self.outbox.push(Send::Unicast(peer, wire::encode(&IpamMsg::RingRequest)));
        }
    }

    /// A message on the `ipam` channel. `gossiped` when it came as gossip (to be passed on
    /// if it was news). Errors describe messages that were refused.
    pub fn handle(
        &mut self,
        src: PeerName,
        bytes: &[u8],
        gossiped: bool,
        now: u64,
    ) -> Result<(), String> {
        let msg = match wire::decode(bytes) {
            Ok(msg) => msg,
            // An older peer repeats its consensus state every second: say it once.
            Err(e @ WireError::OldConsensus) => {
                let text = e.to_string();
                let new = self.mismatches.insert(src, text.clone()).as_ref() != Some(&text);
                return if new { Err(text) } else { Ok(()) };
            }
            Err(e) => return Err(e.to_string()),
        };
        match msg {
            IpamMsg::Ring { ring, reply } => self.on_ring(src, ring, reply, gossiped, now),
            IpamMsg::Paxos(nodes) => {
                self.on_paxos(src, &nodes);
                Ok(())
            }
            IpamMsg::SpaceRequest { range, exact } => {
                self.on_space_request(src, range, exact);
                Ok(())
            }
            IpamMsg::SpaceDenied { range, reason } => {
                self.on_denied(src, range, reason, now);
                Ok(())
            }
            IpamMsg::RingRequest => {
                self.on_ring_request(src, now);
                Ok(())
            }
        }
    }

    fn on_ring(
        &mut self,
        src: PeerName,
        theirs: Ring,
        reply: bool,
        gossiped: bool,
        now: u64,
    ) -> Result<(), String> {
        let me = self.cfg.me;
        let alloc = &self.alloc;
        let merged = self.ring.merge(&theirs, me, |r| alloc.has_used_in(r));
        let out = match merged {
            Ok(out) => out,
            Err(e @ (RingError::DifferentSeeds { .. } | RingError::DifferentRange { .. })) => {
                let text = e.to_string();
                let new = self.mismatches.insert(src, text.clone()).as_ref() != Some(&text);
                return if new { Err(text) } else { Ok(()) };
            }
            Err(e) => return Err(e.to_string()),
        };
        self.mismatches.remove(&src);
        if out.changed {
            self.paxos = None;
            self.ring_changed();
        }
        self.confirm_holds(src, &theirs);
        if let Some((heir, done)) = &mut self.leaving {
            if *heir == src && !theirs.is_empty() && theirs.owned_by(me).is_empty() {
                *done = true;
            }
        }
        if out.changed {
            self.pass_on_to_heir();
            for r in &out.retained {
                self.note_conflict(format!(
                    "peer {src}'s ring gave {} (where addresses are in use here) to another peer; kept it",
                    fmt_range(r)
                ));
            }
            if !out.retained.is_empty() {
                let msg = self.ring_msg(false);
                self.outbox.push(Send::Broadcast(msg));
            } else if gossiped {
                let msg = self.ring_msg(false);
                self.outbox.push(Send::Gossip { except: Some(src), payload: msg });
            }
        }
        if reply {
            let msg = self.ring_msg(false);
            self.outbox.push(Send::Unicast(src, msg));
        }
        self.settle(now);
        Ok(())
    }

    fn note_conflict(&mut self, text: String) {
        if self.conflicts.len() >= 20 {
            self.conflicts.remove(0);
        }
        self.conflicts.push(text);
    }

    fn on_paxos(&mut self, src: PeerName, nodes: &BTreeMap<PeerName, Claims>) {
        if !self.ring.is_empty() {
            let msg = self.ring_msg(false);
            self.outbox.push(Send::Unicast(src, msg));
            return;
        }
        let Some(px) = &mut self.paxos else { return };
        let merged = px.merge(nodes);
        let thought = px.think();
        // Our claims changed: they are persisted before the message that carries them.
        self.ring_dirty |= thought;
        if let Some(value) = px.consensus() {
            self.create_ring(&value);
            return;
        }
        if merged || thought {
            let msg = wire::encode(&IpamMsg::Paxos(px.nodes().clone()));
            self.outbox.push(Send::Gossip { except: None, payload: msg });
        }
    }

    fn on_ring_request(&mut self, src: PeerName, now: u64) {
        if !self.ring.is_empty() {
            let msg = self.ring_msg(false);
            self.outbox.push(Send::Unicast(src, msg));
        } else if self.paxos.is_some() {
            self.need_ring(now);
        }
    }

    fn on_space_request(&mut self, src: PeerName, range: Range<u128>, exact: bool) {
        let me = self.cfg.me;
        let grant = if self.ring.is_empty() || range.is_empty() {
            Err("no ring yet".to_owned())
        } else if exact {
            let k = range.start;
            if range.end != k + 1 {
                Err("malformed request".to_owned())
            } else if self.ring.owner(k) != Some(me) {
                Err(format!("{} is not mine", addr(k)))
            } else if let Some(user) = self.alloc.owner_of(addr(k)) {
                Err(format!("{user} on peer {me}"))
            } else if self.is_held(k) {
                // Giving it away would be using it: another peer may still have it.
                Err(format!("{} was taken over recently; the takeover is not confirmed", addr(k)))
            } else {
                Ok(k..k + 1)
            }
        } else {
            self.alloc.donation(range.clone()).ok_or_else(|| NOTHING_TO_GIVE.to_owned())
        };
        match grant.and_then(|g| self.ring.grant(me, g, src).map_err(|e| e.to_string())) {
            Ok(()) => {
                self.ring_changed();
                // The asker (and everyone) should see what we have left at once, not after
                // our next periodic report.
                self.report_free_now();
                let msg = self.ring_msg(false);
                self.outbox.push(Send::Broadcast(msg));
            }
            Err(reason) => {
                let denied = wire::encode(&IpamMsg::SpaceDenied { range, reason });
                self.outbox.push(Send::Unicast(src, denied));
                if !self.ring.is_empty() {
                    self.report_free_now();
                    let msg = self.ring_msg(false);
                    self.outbox.push(Send::Unicast(src, msg));
                }
            }
        }
    }

    /// Puts this peer's current free counts into the ring.
    fn report_free_now(&mut self) {
        if self.report_free() {
            self.ring_dirty = true;
        }
    }

    /// Puts this peer's free counts into its entries, except those held after `rmpeer`: a
    /// held entry must not change while others confirm it (see [`Ipam::confirm_holds`]).
    fn report_free(&mut self) -> bool {
        let held = self.held_tokens();
        let alloc = &self.alloc;
        self.ring.report_free(self.cfg.me, |r| {
            (!held.contains(&r.start)).then(|| alloc.free_in_range(r))
        })
    }

    fn held_tokens(&self) -> BTreeSet<u128> {
        self.holds.iter().flat_map(|h| h.tokens.iter().map(|(t, _)| *t)).collect()
    }

    fn on_denied(&mut self, src: PeerName, range: Range<u128>, reason: String, now: u64) {
        if range.end == range.start + 1 {
            if let Some(ask) = self.claims.get_mut(&range.start) {
                // The owner still owns it and it is in use there: nothing to wait for.
                if reason.contains(" on peer ") {
                    ask.refused = Some(reason.clone());
                    self.changed = true;
                } else {
                    ask.asked = None;
                }
            }
        }
        // Only the request that was denied moves on to the next donor.
        if let Some(ask) = self.space.get_mut(&(range.start, range.end)) {
            if ask.asked.is_some_and(|(p, _)| p == src) {
                ask.asked = None;
                ask.denied.insert(src);
                if reason == NOTHING_TO_GIVE {
                    ask.refused.insert(src);
                }
            }
        }
        self.pump_space(now);
    }

    /// After the ring changed: requests that are satisfied go, the rest are re-sent where needed.
    fn settle(&mut self, now: u64) {
        let alloc = &self.alloc;
        let before = self.space.len();
        self.space.retain(|_, ask| alloc.free_in(ask.subnet) == 0);
        if self.space.len() != before {
            self.changed = true;
        }
        let me = self.cfg.me;
        let ring = &self.ring;
        let mine: Vec<u128> =
            self.claims.keys().copied().filter(|k| ring.owner(*k) == Some(me)).collect();
        for k in mine {
            self.claims.remove(&k);
            self.changed = true;
        }
        self.pump_space(now);
        self.pump_claims(now);
    }

    fn need_ring(&mut self, now: u64) {
        self.want_ring = true;
        match &mut self.paxos {
            Some(px) => {
                if !px.proposing() {
                    px.propose();
                    self.last_propose = Some(now);
                    self.advance_paxos();
                }
            }
            None => {
                if matches!(self.cfg.mode, InitMode::Observer)
                    && self.last_repeat.is_none_or(|t| now >= t + REPEAT_MS)
                {
                    self.last_repeat = Some(now);
                    self.outbox.push(Send::Broadcast(wire::encode(&IpamMsg::RingRequest)));
                }
            }
        }
    }

    fn advance_paxos(&mut self) {
        let Some(px) = &mut self.paxos else { return };
        px.think();
        // Called after a proposal: our claims changed.
        self.ring_dirty = true;
        if let Some(value) = px.consensus() {
            self.create_ring(&value);
            return;
        }
        let msg = wire::encode(&IpamMsg::Paxos(px.nodes().clone()));
        self.outbox.push(Send::Gossip { except: None, payload: msg });
    }

    fn ring_wait_reason(&self) -> String {
        match (&self.cfg.mode, &self.paxos) {
            (InitMode::Observer, _) => {
                "this peer is an observer; waiting for a peer that has a ring".into()
            }
            (_, Some(px)) => format!(
                "awaiting consensus: {} of {} electors needed are in contact (--ipalloc-init consensus={})",
                px.electors(),
                px.quorum(),
                match &self.cfg.mode {
                    InitMode::Consensus(n) => *n,
                    _ => 0,
                }
            ),
            _ => "waiting for the ring".into(),
        }
    }

    fn pump_space(&mut self, now: u64) {
        let me = self.cfg.me;
        let mut sends = Vec::new();
        let mut concluded = false;
        for (&(s, e), ask) in &mut self.space {
            if ask.exhausted_at.is_some() {
                continue;
            }
            if let Some((p, at)) = ask.asked {
                if now < at + ASK_TIMEOUT_MS && self.alive.contains(&p) {
                    continue;
                }
                ask.denied.insert(p);
                ask.asked = None;
            }
            if ask.pause_until.is_some_and(|t| now < t) {
                continue;
            }
            let donors: Vec<PeerName> = self
                .ring
                .donors(s..e, me)
                .into_iter()
                .map(|(p, _)| p)
                .filter(|p| self.alive.contains(p))
                .collect();
            let next = donors.iter().find(|p| !ask.denied.contains(p)).copied();
            if next.is_none()
                && !donors.is_empty()
                && donors.iter().all(|p| ask.refused.contains(p))
            {
                // Every owner said it has nothing: the waiting allocation fails now.
                ask.exhausted_at = Some(now);
                concluded = true;
                continue;
            }
            if next.is_none() && !donors.is_empty() {
                // Everyone said no; their space may change: start over, after a pause, so
                // that peers without space do not answer each other in a loop.
                ask.denied.clear();
                ask.refused.clear();
                ask.pause_until = Some(now + ASK_TIMEOUT_MS);
            }
            if let Some(p) = next {
                ask.asked = Some((p, now));
                sends.push(Send::Unicast(
                    p,
                    wire::encode(&IpamMsg::SpaceRequest { range: s..e, exact: false }),
                ));
            }
        }
        self.outbox.extend(sends);
        if concluded {
            self.changed = true;
        }
    }

    fn pump_claims(&mut self, now: u64) {
        if self.ring.is_empty() {
            return;
        }
        let mut sends = Vec::new();
        for (k, ask) in &mut self.claims {
            let Some(owner) = self.ring.owner(*k) else { continue };
            if owner == self.cfg.me || !self.alive.contains(&owner) {
                continue;
            }
            if ask.asked.is_some_and(|t| now < t + ASK_TIMEOUT_MS) {
                continue;
            }
            ask.asked = Some(now);
            sends.push(Send::Unicast(
                owner,
                wire::encode(&IpamMsg::SpaceRequest { range: *k..*k + 1, exact: true }),
            ));
        }
        self.outbox.extend(sends);
    }

    /// Periodic work: repeats what may have been lost, reports free space, anti-entropy.
    pub fn tick(&mut self, now: u64) {
        if self.ring.is_empty() && self.want_ring {
            let stale = self.last_propose.is_none_or(|t| {
                // Electors re-propose at staggered times so that duels end.
                now >= t + PROPOSE_EVERY_MS + self.cfg.me.get() % 1000
            });
            if self.paxos.is_some() && stale {
                if let Some(px) = &mut self.paxos {
                    px.propose();
                }
                self.last_propose = Some(now);
                self.advance_paxos();
            } else if self.last_repeat.is_none_or(|t| now >= t + REPEAT_MS) {
                self.last_repeat = Some(now);
                match &self.paxos {
                    Some(px) => {
                        let msg = wire::encode(&IpamMsg::Paxos(px.nodes().clone()));
                        self.outbox.push(Send::Gossip { except: None, payload: msg });
                    }
                    None if matches!(self.cfg.mode, InitMode::Observer) => {
                        self.outbox.push(Send::Broadcast(wire::encode(&IpamMsg::RingRequest)));
                    }
                    None => {}
                }
            }
        }
        if !self.ring.is_empty() && self.free_dirty && now >= self.last_free_report + FREE_REPORT_MS
        {
            self.free_dirty = false;
            self.last_free_report = now;
            if self.report_free() {
                self.ring_dirty = true;
                let msg = self.ring_msg(false);
                self.outbox.push(Send::Gossip { except: None, payload: msg });
            }
        }
        if !self.ring.is_empty() && now >= self.last_anti_entropy + ANTI_ENTROPY_MS {
            self.last_anti_entropy = now;
            let msg = self.ring_msg(false);
            self.outbox.push(Send::Gossip { except: None, payload: msg });
        }
        self.space.retain(|_, a| now < a.touched + ASK_EXPIRY_MS);
        self.claims.retain(|_, a| a.in_use || now < a.touched + ASK_EXPIRY_MS);
        if self.leaving.is_some_and(|(_, done)| !done) {
            self.resend_leave();
        }
        self.resend_takeover(now);
        self.pump_space(now);
        self.pump_claims(now);
    }

    // ---- reporting ----

    pub fn status(&self) -> IpamStatus {
        let state = if let Some((heir, done)) = self.leaving {
            if done {
                RingState::HandedOver(heir.to_string())
            } else {
                RingState::HandingOver(heir.to_string())
            }
        } else if !self.ring.is_empty() {
            RingState::Ready
        } else if self.want_ring {
            RingState::Waiting(self.ring_wait_reason())
        } else {
            RingState::Idle
        };
        let mut peers: Vec<PeerShare> = self
            .ring
            .shares()
            .into_iter()
            .map(|(p, (owned, free))| PeerShare {
                peer: p.to_string(),
                nickname: self.nicknames.get(&p).cloned().unwrap_or_default(),
                owned: sat(owned),
                // Our own count is known exactly; the ring has the last hint we sent.
                free: if p == self.cfg.me { sat(self.alloc.free_count()) } else { sat(free) },
                reachable: p == self.cfg.me || self.alive.contains(&p),
                ranges: self.ring.owned_by(p).iter().map(fmt_range).collect(),
            })
            .collect();
        peers.sort_by(|a, b| b.owned.cmp(&a.owned).then(a.peer.cmp(&b.peer)));
        IpamStatus {
            mode: self.cfg.mode.to_string(),
            state,
            ring_seeds: self.ring.seeds().iter().map(PeerName::to_string).collect(),
            unreachable: peers.iter().filter(|p| !p.reachable).map(|p| p.owned).sum(),
            peers,
            mismatches: self.mismatches.iter().map(|(p, m)| (p.to_string(), m.clone())).collect(),
            conflicts: self.conflicts.clone(),
            pending_space: self.space.values().map(|a| a.subnet.to_string()).collect(),
            pending_claims: self.claims.keys().map(|k| addr(*k).to_string()).collect(),
            holding: self.holds.iter().map(|h| self.describe_hold(h)).collect(),
        }
    }

    fn describe_hold(&self, h: &Hold) -> String {
        let held: u128 = self
            .ring
            .entries()
            .filter(|(r, e)| e.peer == self.cfg.me && h.tokens.iter().any(|(t, _)| *t == r.start))
            .map(|(r, _)| r.end - r.start)
            .sum();
        let waiting: Vec<String> = h.waiting.iter().map(PeerName::to_string).collect();
        format!(
            "{held} addresses taken over from {}, unused until {} confirm",
            h.from,
            waiting.join(", ")
        )
    }

    /// Addresses in use by this peer and free in its share.
    pub fn counts(&self) -> (u64, u64) {
        (self.alloc.used_count() as u64, sat(self.alloc.free_count()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u64) -> PeerName {
        PeerName::new(n).unwrap()
    }

    fn cfg(me: u64, mode: InitMode) -> IpamConfig {
        IpamConfig {
            me: p(me),
            incarnation: 1,
            range: "10.32.0.0/12".parse().unwrap(),
            default_subnet: "10.32.0.0/12".parse().unwrap(),
            mode,
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn init_modes_parse() {
        assert_eq!("consensus=3".parse::<InitMode>(), Ok(InitMode::Consensus(3)));
        assert_eq!("observer".parse::<InitMode>(), Ok(InitMode::Observer));
        assert_eq!("seed=::1,::2".parse::<InitMode>(), Ok(InitMode::Seed(vec![p(1), p(2)])));
        assert!("consensus=0".parse::<InitMode>().is_err());
        assert!("seed=".parse::<InitMode>().is_err());
        assert!("vote".parse::<InitMode>().is_err());
    }

    #[test]
    fn a_single_peer_forms_its_ring_on_first_allocation() {
        let (mut a, _) = Ipam::new(cfg(1, InitMode::Consensus(1)), None);
        assert!(!a.ready());
        assert_eq!(a.status().state, RingState::Idle);
        let got = a.allocate("c1", net("10.32.0.0/12"), 0).unwrap();
        assert_eq!(got, net("10.32.0.1/12"));
        assert!(a.take_ring_dirty().is_some());
    }

    #[test]
    fn seeded_peers_allocate_at_once_and_disjointly() {
        let mode = InitMode::Seed(vec![p(1), p(2)]);
        let (mut a, _) = Ipam::new(cfg(1, mode.clone()), None);
        let (mut b, _) = Ipam::new(cfg(2, mode), None);
        let x = a.allocate("c", net("10.32.0.0/12"), 0).unwrap();
        let y = b.allocate("c", net("10.32.0.0/12"), 0).unwrap();
        assert_ne!(x, y);
        assert_eq!(y, net("10.40.0.1/12"), "10.40.0.0 looks like a network address: skipped");
    }

    fn lab_cfg(me: u64, mode: InitMode) -> IpamConfig {
        IpamConfig {
            range: net("10.2.0.0/16"),
            default_subnet: net("10.2.2.0/24"),
            ..cfg(me, mode)
        }
    }

    /// Delivers every message in flight among `peers` (peer `i` is `p(i + 1)`), in order,
    /// until none is left; messages to a peer outside `up` are dropped.
    fn deliver(peers: &mut [Ipam], up: &[bool], now: u64) {
        for _ in 0..100 {
            let mut any = false;
            for i in 0..peers.len() {
                for out in peers[i].take_outbox() {
                    let (targets, bytes, gossiped): (Vec<usize>, Vec<u8>, bool) = match out {
                        Send::Gossip { payload, .. } => ((0..peers.len()).collect(), payload, true),
                        Send::Broadcast(b) => ((0..peers.len()).collect(), b, false),
                        Send::Unicast(to, b) => (vec![to.get() as usize - 1], b, false),
                    };
                    for j in targets.into_iter().filter(|j| *j != i && up[*j] && up[i]) {
                        any = true;
                        let src = peers[i].me();
                        peers[j].handle(src, &bytes, gossiped, now).expect("message accepted");
                    }
                }
            }
            if !any {
                return;
            }
        }
        panic!("messages without end");
    }

    /// Connects the peers: each is told the others are reachable.
    fn connect(peers: &mut [Ipam], now: u64) {
        let names: Vec<PeerName> = peers.iter().map(Ipam::me).collect();
        for x in peers.iter_mut() {
            let others: BTreeSet<PeerName> =
                names.iter().copied().filter(|n| *n != x.me()).collect();
            x.set_alive(others.clone(), now);
            for o in others {
                x.peer_up(o);
            }
        }
    }

    /// An allocation as the agent makes it: retried while the IPAM says wait, messages
    /// delivered at once, no tick (so no periodic free report helps).
    fn allocate_waiting(
        peers: &mut [Ipam],
        i: usize,
        owner: &str,
        subnet: IpNet,
        now: u64,
    ) -> Result<IpNet, AllocError> {
        let up = vec![true; peers.len()];
        let mut last = None;
        for _ in 0..20 {
            match peers[i].allocate(owner, subnet, now) {
                Err(AllocError::Wait(w)) => last = Some(w),
                done => return done,
            }
            deliver(peers, &up, now);
        }
        Err(AllocError::Wait(last.expect("waited")))
    }

    #[test]
    fn allocation_right_after_the_ring_forms_asks_the_owner() {
        let mode = InitMode::Consensus(2);
        let mut peers =
            [Ipam::new(lab_cfg(1, mode.clone()), None).0, Ipam::new(lab_cfg(2, mode), None).0];
        let now = 5_000;
        connect(&mut peers, now);
        // p1 owns 10.2.0.0/17, so p2 has to ask for everything: the gateway and the pod in
        // the default subnet, then both in another /24 right after the first grant.
        for subnet in [net("10.2.2.0/24"), net("10.2.3.0/24")] {
            for owner in ["gateway", "pod"] {
                let got =
                    allocate_waiting(&mut peers, 1, &format!("{owner}-{subnet}"), subnet, now)
                        .unwrap_or_else(|e| panic!("{owner} in {subnet}: {e}"));
                assert!(subnet.contains(&got.addr()), "{got} in {subnet}");
            }
        }
    }

    #[test]
    fn the_last_free_address_is_given_and_then_exhaustion_is_reported() {
        let mode = InitMode::Seed(vec![p(1), p(2)]);
        let mut peers =
            [Ipam::new(lab_cfg(1, mode.clone()), None).0, Ipam::new(lab_cfg(2, mode), None).0];
        let now = 5_000;
        connect(&mut peers, now);
        deliver(&mut peers, &[true, true], now);
        let tiny = net("10.2.9.0/30"); // two host addresses, both p1's
        assert_eq!(peers[0].allocate("a", tiny, now).unwrap(), net("10.2.9.1/30"));
        let got = allocate_waiting(&mut peers, 1, "b", tiny, now).expect("the one left is given");
        assert_eq!(got, net("10.2.9.2/30"));
        let err = allocate_waiting(&mut peers, 1, "c", tiny, now).unwrap_err();
        assert_eq!(err, AllocError::Failed(IpamError::Exhausted(tiny)), "nobody has one");
    }

    #[test]
    fn space_taken_over_is_not_used_until_the_others_confirm() {
        let mode = InitMode::Seed(vec![p(1), p(2), p(3)]);
        let mut peers: Vec<Ipam> =
            (1..=3).map(|i| Ipam::new(cfg(i, mode.clone()), None).0).collect();
        let now = 5_000;
        connect(&mut peers, now);
        deliver(&mut peers, &[true; 3], now);
        // p3 gives a block to p2, takes it back, and gives it again; only p2 hears of the
        // last grant before p3 dies.
        let block = net("10.46.0.0/16");
        let r = space::net_range(block);
        let mut ring = peers[2].ring().clone();
        ring.grant(p(3), r.clone(), p(2)).unwrap();
        ring.grant(p(2), r.clone(), p(3)).unwrap();
        let known = wire::encode(&IpamMsg::Ring { ring: ring.clone(), reply: false });
        ring.grant(p(3), r.clone(), p(2)).unwrap();
        let latest = wire::encode(&IpamMsg::Ring { ring, reply: false });
        peers[0].handle(p(3), &known, false, now).unwrap();
        peers[1].handle(p(3), &latest, false, now).unwrap();
        let used = peers[1].allocate("x", block, now).expect("p2 allocates in its block");
        // p3 dies; p1 runs rmpeer at once.
        let up = [true, true, false];
        for (i, x) in peers.iter_mut().enumerate().take(2) {
            x.set_alive(BTreeSet::from([p(2 - i as u64)]), now);
        }
        assert!(peers[0].rmpeer(p(3)).unwrap() > 0);
        assert!(!peers[0].status().holding.is_empty());
        let saved = peers[0].take_ring_dirty().expect("the takeover is persisted");
        let again = IpamConfig { incarnation: 2, ..cfg(1, mode.clone()) };
        let (restarted, _) = Ipam::new(again, Some(saved));
        assert_eq!(restarted.status().holding, peers[0].status().holding, "kept across a restart");
        match peers[0].allocate("y", block, now) {
            Ok(got) => assert_ne!(got, used, "{got} handed out twice"),
            Err(AllocError::Wait(_)) => {}
            Err(e) => panic!("{e}"),
        }
        deliver(&mut peers, &up, now);
        assert!(peers[0].status().holding.is_empty(), "p2 confirmed");
        assert_eq!(peers[0].ring().owner(key(used.addr())), Some(p(2)), "p2 kept what it uses");
        assert_eq!(peers[0].ring().owned_by(p(3)), vec![], "the rest is p1's");
        assert!(peers[0].allocate("z", net("10.44.0.0/16"), now).is_ok(), "and usable");
    }

    #[test]
    fn the_persisted_ring_decoder_refuses_non_ascii_without_panicking() {
        for bad in ["é0", "0é", "zz", "abc", "0x"] {
            let json =
                format!(r#"{{"peer":"00:00:00:00:00:01","range":"10.32.0.0/12","ring":"{bad}"}}"#);
            assert!(serde_json::from_str::<PersistedRing>(&json).is_err(), "{bad:?}");
        }
        let json = r#"{"peer":"00:00:00:00:00:01","range":"10.32.0.0/12","ring":"0aFF"}"#;
        let old = serde_json::from_str::<PersistedRing>(json).expect("a state file from before");
        assert_eq!(old.ring, vec![0x0a, 0xff]);
        assert!(old.consensus.is_none());
    }

    #[test]
    fn an_electors_claims_survive_a_restart() {
        let (mut a, _) = Ipam::new(cfg(1, InitMode::Consensus(2)), None);
        assert!(matches!(a.allocate("c", net("10.32.0.0/12"), 0), Err(AllocError::Wait(_))));
        let saved = a.take_ring_dirty().expect("the proposal is persisted");
        let promised = saved.consensus.clone().and_then(|c| c.promise).expect("a promise");
        let restarted = IpamConfig { incarnation: 2, ..cfg(1, InitMode::Consensus(2)) };
        let (b, note) = Ipam::new(restarted, Some(saved));
        assert!(note.is_none(), "{note:?}");
        let mine = b.paxos.as_ref().map(|px| px.mine().clone()).expect("an elector");
        assert_eq!(mine.promise, Some(promised));
        assert_eq!(mine.incarnation, 2);
    }

    #[test]
    fn persisted_rings_are_discarded_on_range_or_name_change() {
        let (mut a, _) = Ipam::new(cfg(1, InitMode::Consensus(1)), None);
        a.allocate("c1", net("10.32.0.0/12"), 0).unwrap();
        let saved = a.take_ring_dirty().unwrap();
        let (b, note) = Ipam::new(cfg(1, InitMode::Consensus(1)), Some(saved.clone()));
        assert!(b.ready() && note.is_none());
        let mut other_range = cfg(1, InitMode::Consensus(1));
        other_range.range = net("10.33.0.0/16");
        other_range.default_subnet = other_range.range;
        let (c, note) = Ipam::new(other_range, Some(saved.clone()));
        assert!(!c.ready());
        assert!(note.unwrap().contains("range changed"));
        let (d, note) = Ipam::new(cfg(3, InitMode::Consensus(1)), Some(saved));
        assert!(!d.ready() && note.unwrap().contains("belongs to peer"));
    }
}
