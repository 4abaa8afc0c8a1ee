//! The mesh router: the one owner of the topology, the live connections, the routes, the
//! connection maker and the registered gossip channels. Connections, the listener, dial
//! tasks, subsystems and the API reach it through channels; it publishes a [`MeshReport`]
//! snapshot after every change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use rand::Rng;
use rand::seq::IteratorRandom;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::connection::{self, CloseReason, ConnError, ConnEvent, Established, Handle, Setup};
use super::frame::{MAX_FRAME, STATE_MESSAGE, frame_of};
use super::gossip::{GossipEvent, Outgoing, SendKind, split_by_size};
use super::limits::{
    AcceptGate, Buckets, OTHER_LABEL, SURROGATE_BURST, SURROGATE_MAX_PAYLOAD, SURROGATE_RATE,
    valid_channel,
};
use super::maker::{DialOutcome, DiscoveryScope, Maker, Source, TargetKey, discovery_candidates};
use super::proto;
use super::report::{ConnState, ConnectionReport, MeshReport, PeerEntryReport, TargetReport};
use super::routes::{self, Graph, Routes};
use super::topology::{ConnInfo, Entries, PeerInfo, Topology};
use super::view::{ConnView, Encryption, MeshView};
use crate::identity::PeerName;
use crate::metrics::Metrics;
use crate::store::{Op, Store, Table};

/// The topology's own channel name.
pub const TOPOLOGY: &str = "topology";
const TARGETS_KEY: &str = "targets";
/// Full-state gossip to a few neighbours at this interval.
pub const ANTI_ENTROPY: Duration = Duration::from_secs(30);
/// Topology changes are passed on, and routes recomputed, at most once per tick.
pub const TICK: Duration = Duration::from_millis(100);
/// Events queued for a subsystem before further ones are dropped.
pub const CHANNEL_QUEUE: usize = 1024;
const RECENT_FAILURES: usize = 32;

/// Requests from the API and from subsystems.
#[derive(Debug)]
pub enum Command {
    Connect {
        peers: Vec<String>,
        replace: bool,
        reply: oneshot::Sender<Vec<String>>,
    },
    Forget {
        peers: Vec<String>,
        reply: oneshot::Sender<Vec<String>>,
    },
    /// A peer source (e.g. the Kubernetes Node list) states all the targets it wants.
    SetTargets {
        source: Source,
        targets: std::collections::BTreeSet<String>,
    },
    Register {
        name: String,
        events: mpsc::Sender<GossipEvent>,
    },
    /// The data plane reports whether data flows over the link to `peer`.
    SetEstablished {
        peer: PeerName,
        established: bool,
    },
    /// A data-plane control message for a directly connected peer.
    SendOverlay {
        peer: PeerName,
        msg: proto::OverlayControl,
    },
    /// Every subsystem has registered its channel: start accepting and dialling.
    Open,
}

/// What the data plane learns from the mesh about directly connected peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    Up(LinkInfo),
    Down(PeerName),
    Control { peer: PeerName, msg: proto::OverlayControl },
}

/// A direct connection, as the data plane needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub peer: PeerName,
    pub conn_uid: u64,
    pub remote: std::net::IpAddr,
    pub overlays: Vec<String>,
    pub fastdp_port: u16,
    pub sleeve_port: u16,
    /// Data-plane traffic to this peer must be encrypted.
    pub encrypt: bool,
    /// Our sleeve key towards the peer, and the peer's towards us (empty without a password).
    pub our_key: Vec<u8>,
    pub their_key: Vec<u8>,
}

/// Results of dialling and accepting.
#[derive(Debug)]
pub enum SetupEvent {
    Ready { est: Box<Established>, target: Option<TargetKey> },
    DialFailed { target: TargetKey, address: String, error: ConnError },
    InboundFailed { remote: SocketAddr, error: ConnError },
}

struct Conn {
    handle: Handle,
    peer_uid: u64,
    conn_uid: u64,
    remote: SocketAddr,
    outbound: bool,
    encrypted: bool,
    data_encrypted: bool,
    nickname: String,
    since: Instant,
}

/// Where the router publishes what it knows.
#[derive(Debug)]
pub struct Outputs {
    pub report: watch::Sender<MeshReport>,
    pub view: watch::Sender<MeshView>,
    pub setup: mpsc::UnboundedSender<SetupEvent>,
    pub conns: connection::ToRouter,
    pub links: mpsc::UnboundedSender<LinkEvent>,
    /// Bounded: control messages are dropped when the data plane is behind.
    pub link_control: mpsc::Sender<LinkEvent>,
    pub data_routes: watch::Sender<BTreeMap<PeerName, PeerName>>,
}

/// Router settings.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    pub setup: Setup,
    pub port: u16,
    pub discovery: bool,
    pub conn_limit: usize,
    /// Where discovered peers may be dialled (besides the networks of direct targets given as
    /// addresses): `--discovery-subnets`, or this host's underlay networks.
    pub discovery_subnets: Vec<ipnet::IpNet>,
    /// Targets given on the command line; `None` resumes the persisted ones.
    pub initial_targets: Option<Vec<String>>,
}

pub struct Router {
    cfg: RouterConfig,
    topology: Topology,
    routes: Routes,
    conns: BTreeMap<PeerName, Conn>,
    channels: HashMap<String, mpsc::Sender<GossipEvent>>,
    surrogate_seen: HashMap<u64, Instant>,
    /// Surrogate gossip passed on, per neighbour it came from.
    surrogate_rate: Buckets<PeerName>,
    maker: Maker,
    failures: Vec<ConnectionReport>,
    next_id: u64,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    out: Outputs,
    last_anti_entropy: Instant,
    /// Entries learnt or changed since the last tick, to pass on (coalesced per tick).
    pending: std::collections::BTreeSet<PeerName>,
    /// The topology changed since routes were computed.
    dirty: bool,
    /// Broadcast children per source, valid until the routes are recomputed.
    trees: HashMap<PeerName, Vec<PeerName>>,
    /// Which inbound connections get a handshake.
    accepts: SharedGate,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("me", &self.topology.me())
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

/// The channels the router listens on.
#[derive(Debug)]
pub struct Inputs {
    pub commands: mpsc::UnboundedReceiver<Command>,
    pub outgoing: mpsc::UnboundedReceiver<Outgoing>,
    pub setup: mpsc::UnboundedReceiver<SetupEvent>,
    pub conns: connection::FromConns,
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
}

impl Router {
    pub fn new(
        cfg: RouterConfig,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        out: Outputs,
    ) -> Router {
        let s = &cfg.setup;
        // Starting at the clock keeps our versions above those of earlier incarnations.
        let topology = Topology::new(s.me, s.nickname.clone(), s.uid, now_millis());
        let mut maker = Maker::new(cfg.discovery);
        let persisted: Vec<String> =
            store.get(Table::Mesh, TARGETS_KEY).ok().flatten().unwrap_or_default();
        let targets = cfg.initial_targets.clone().unwrap_or(persisted);
        maker.add_direct(&targets, true, Instant::now());
        let routes = Routes::compute(&topology);
        let r = Router {
            cfg,
            topology,
            routes,
            conns: BTreeMap::new(),
            channels: HashMap::new(),
            surrogate_seen: HashMap::new(),
            surrogate_rate: Buckets::new(SURROGATE_RATE, SURROGATE_BURST),
            maker,
            failures: Vec::new(),
            next_id: 1,
            store,
            metrics,
            out,
            last_anti_entropy: Instant::now(),
            pending: std::collections::BTreeSet::new(),
            dirty: false,
            trees: HashMap::new(),
            accepts: SharedGate::default(),
        };
        r.persist_targets();
        r.publish();
        r
    }

    /// Runs until `shutdown`.
    pub async fn run(
        mut self,
        mut inputs: Inputs,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) {
        if !self.wait_until_open(&mut inputs.commands, &shutdown).await {
            return;
        }
        tokio::spawn(accept_loop(
            listener,
            self.cfg.setup.clone(),
            self.accepts.clone(),
            self.out.setup.clone(),
            shutdown.clone(),
        ));
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(c) = inputs.commands.recv() => self.on_command(c),
                Some(o) = inputs.outgoing.recv() => self.on_outgoing(o),
                Some(s) = inputs.setup.recv() => self.on_setup(s),
                Some(e) = inputs.conns.recv() => self.on_conn_event(e),
                _ = tick.tick() => self.on_tick(),
            }
        }
        for c in self.conns.values() {
            c.handle.cancel.cancel();
        }
    }

    /// Answers commands, but neither accepts nor dials, until [`Command::Open`]: peers send
    /// their state on every channel as soon as a connection is up, and a channel registered
    /// after that would miss it until the next periodic gossip. `false` on shutdown.
    async fn wait_until_open(
        &mut self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        shutdown: &CancellationToken,
    ) -> bool {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                c = commands.recv() => match c {
                    Some(Command::Open) => return true,
                    Some(c) => self.on_command(c),
                    None => return false,
                },
            }
        }
    }

    /// The accept gate (its counters go into the status report).
    pub fn accept_gate(&self) -> SharedGate {
        self.accepts.clone()
    }

    // ---- commands ----

    fn on_command(&mut self, c: Command) {
        match c {
            Command::Connect { peers, replace, reply } => {
                self.maker.add_direct(&peers, replace, Instant::now());
                self.persist_targets();
                self.publish();
                let _ = reply.send(self.maker.direct());
            }
            Command::Forget { peers, reply } => {
                self.maker.forget(&peers);
                self.persist_targets();
                self.publish();
                let _ = reply.send(self.maker.direct());
            }
            Command::SetTargets { source, targets } => {
                self.maker.set_source(source, &targets, Instant::now());
                self.publish();
            }
            // Only meaningful before the run loop starts (see `wait_until_open`).
            Command::Open => {}
            Command::Register { name, events } => {
                self.channels.insert(name, events);
            }
            Command::SetEstablished { peer, established } => {
                let info = self
                    .topology
                    .get(self.topology.me())
                    .and_then(|e| e.connections.get(&peer))
                    .cloned();
                if let Some(mut info) = info {
                    if info.established != established {
                        info.established = established;
                        self.topology.set_connection(peer, info);
                        self.on_local_change();
                        self.publish();
                    }
                }
            }
            Command::SendOverlay { peer, msg } => {
                let frame = proto::Frame { kind: Some(proto::frame::Kind::Overlay(msg)) };
                self.send_frame(peer, "overlay", &frame);
            }
        }
    }

    fn persist_targets(&self) {
        let targets = self.maker.direct();
        let store = self.store.clone();
        // A blocking write: rare, and must not stall the router's event loop.
        tokio::task::spawn_blocking(move || {
            if let Err(e) =
                Op::put(Table::Mesh, TARGETS_KEY, &targets).and_then(|op| store.write(&[op]))
            {
                warn!(error = %e, "cannot persist mesh targets");
            }
        });
    }

    // ---- dialling and accepting ----

    fn on_tick(&mut self) {
        let now = Instant::now();
        if !self.pending.is_empty() {
            let names: Vec<PeerName> = std::mem::take(&mut self.pending).into_iter().collect();
            let delta = self.topology.entries().subset(&names);
            self.send_topology(&delta);
        }
        if std::mem::take(&mut self.dirty) {
            self.recompute();
        }
        let connected: Vec<PeerName> = self.conns.keys().copied().collect();
        for (key, address) in self.maker.due(now, &connected, self.conns.len(), self.cfg.conn_limit)
        {
            let (setup, tx, port) = (self.cfg.setup.clone(), self.out.setup.clone(), self.cfg.port);
            debug!(target = %key, %address, "dialling");
            tokio::spawn(async move {
                let ev = match connection::dial(&address, port, &setup).await {
                    Ok(est) => SetupEvent::Ready { est: Box::new(est), target: Some(key) },
                    Err(error) => SetupEvent::DialFailed { target: key, address, error },
                };
                let _ = tx.send(ev);
            });
        }
        if now.duration_since(self.last_anti_entropy) >= ANTI_ENTROPY {
            self.last_anti_entropy = now;
            let full = self.topology.entries().clone();
            self.send_topology(&full);
            self.surrogate_seen.retain(|_, t| now.duration_since(*t) < ANTI_ENTROPY);
            self.surrogate_rate.prune(now);
        }
    }

    fn on_setup(&mut self, ev: SetupEvent) {
        match ev {
            SetupEvent::Ready { est, target } => self.register(*est, target),
            SetupEvent::DialFailed { target, address, error } => {
                let give_up = error.is_permanent();
                if give_up {
                    info!(target = %target, "not retrying: {error}");
                } else {
                    debug!(target = %target, error = %error, "dial failed");
                }
                self.note_failure(address, None, true, error.to_string());
                self.maker.on_result(
                    &target,
                    DialOutcome::Failed { error: error.to_string(), give_up },
                    Instant::now(),
                    rand::random(),
                );
                self.publish();
            }
            SetupEvent::InboundFailed { remote, error } => {
                // Keyed by IP: a peer retrying from new ports is one failing peer, logged once.
                let address = remote.ip().to_string();
                let reason = error.to_string();
                if self.failures.iter().any(|f| f.address == address && f.info == reason) {
                    debug!(%remote, "refused inbound mesh connection again: {reason}");
                } else {
                    warn!(%remote, "refused inbound mesh connection: {reason}");
                }
                self.note_failure(address, None, false, reason);
                self.publish();
            }
        }
    }

    fn note_failure(
        &mut self,
        address: String,
        peer: Option<PeerName>,
        outbound: bool,
        reason: String,
    ) {
        self.failures.retain(|f| f.address != address);
        self.failures.push(ConnectionReport {
            peer: peer.map(|p| p.to_string()).unwrap_or_default(),
            nickname: String::new(),
            address,
            outbound,
            state: ConnState::Failed,
            info: reason,
            encrypted: false,
            data_encrypted: false,
        });
        if self.failures.len() > RECENT_FAILURES {
            self.failures.remove(0);
        }
    }

    /// The addresses of targets known to lead to `peer`.
    fn target_addresses(&self, peer: PeerName) -> Vec<&str> {
        self.maker
            .targets
            .iter()
            .filter(|(k, t)| k.peer(t) == Some(peer))
            .map(|(_, t)| t.address.as_str())
            .collect()
    }

    /// Whether an established connection supersedes failure `f` (see
    /// [`ConnectionReport::superseded_by`]).
    fn superseded(&self, f: &ConnectionReport) -> bool {
        self.conns
            .iter()
            .any(|(p, c)| f.superseded_by(&p.to_string(), c.remote, &self.target_addresses(*p)))
    }

    /// A connection to `peer` is up: its earlier failures are history, in whichever direction
    /// they happened.
    fn forget_superseded_failures(&mut self, peer: PeerName) {
        let Some(remote) = self.conns.get(&peer).map(|c| c.remote) else { return };
        let name = peer.to_string();
        let targets: Vec<String> =
            self.target_addresses(peer).into_iter().map(str::to_owned).collect();
        let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
        self.failures.retain(|f| !f.superseded_by(&name, remote, &targets));
    }

    fn register(&mut self, est: Established, target: Option<TargetKey>) {
        let Some(peer) = est.peer() else { return };
        let now = Instant::now();
        if let Some(existing) = self.conns.get(&peer) {
            let keep_existing =
                existing.peer_uid == est.hello.uid && existing.conn_uid <= est.conn_uid;
            if keep_existing {
                // Both sides dialled at once: both keep the connection with the lower id.
                debug!(%peer, "dropping a duplicate connection");
                if let Some(t) = target {
                    self.maker.on_result(&t, DialOutcome::Connected(peer), now, 0.0);
                }
                return;
            }
            let reason = if existing.peer_uid == est.hello.uid {
                CloseReason::Replaced
            } else {
                CloseReason::PeerRestarted
            };
            // Routes are refreshed below, once the new connection is in: refreshing now would
            // collect the peer (and whoever is behind it) and tell subsystems it left.
            self.close_conn(peer, reason);
        }
        if !est.outbound && self.conns.len() >= self.cfg.conn_limit {
            warn!(%peer, remote = %est.remote, limit = self.cfg.conn_limit, "refusing connection: --conn-limit reached");
            self.refresh_routes();
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let data_encrypted = est.encrypted && !(est.we_trust && est.hello.trusts_you);
        let link = LinkInfo {
            peer,
            conn_uid: est.conn_uid,
            remote: est.remote.ip(),
            overlays: est.hello.overlays.clone(),
            fastdp_port: u16::try_from(est.hello.fastdp_port).unwrap_or(0),
            sleeve_port: u16::try_from(est.hello.sleeve_port).unwrap_or(0),
            encrypt: data_encrypted,
            our_key: est.our_sleeve_key.clone(),
            their_key: est.hello.sleeve_key.clone(),
        };
        let conn = Conn {
            peer_uid: est.hello.uid,
            conn_uid: est.conn_uid,
            remote: est.remote,
            outbound: est.outbound,
            encrypted: est.encrypted,
            data_encrypted,
            nickname: est.hello.nickname.clone(),
            since: now,
            handle: connection::start(est, id, self.out.conns.clone()),
        };
        info!(%peer, nickname = %conn.nickname, remote = %conn.remote, outbound = conn.outbound, encrypted = conn.encrypted, "connection established");
        let info = ConnInfo {
            address: conn.remote.to_string(),
            outbound: conn.outbound,
            established: true,
        };
        self.conns.insert(peer, conn);
        if let Some(t) = target {
            self.maker.on_result(&t, DialOutcome::Connected(peer), now, 0.0);
        }
        self.forget_superseded_failures(peer);
        self.topology.set_connection(peer, info);
        self.on_local_change();
        // Subsystems answer `PeerUp` and `LinkEvent::Up` with a unicast of their whole state:
        // the route to the new neighbour must exist before they are told, not at the next tick.
        self.refresh_routes();
        // Everything we know, to the new neighbour at once.
        for payload in topology_messages(&self.topology, self.topology.entries()) {
            let msg = proto::GossipMessage {
                channel: TOPOLOGY.into(),
                src: self.topology.me().get(),
                dst: peer.get(),
                payload,
            };
            let frame = proto::Frame { kind: Some(proto::frame::Kind::Unicast(msg)) };
            self.send_frame(peer, TOPOLOGY, &frame);
        }
        for ch in self.channels.values() {
            let _ = ch.try_send(GossipEvent::PeerUp(peer));
        }
        let _ = self.out.links.send(LinkEvent::Up(link));
    }

    /// A connection ended: routes stop using it at once (messages sent meanwhile would go to
    /// a connection that is gone, or not around it).
    fn drop_conn(&mut self, peer: PeerName, reason: CloseReason) {
        if self.close_conn(peer, reason) {
            self.refresh_routes();
        }
    }

    /// Closes and forgets a connection, without refreshing routes; returns whether it existed.
    fn close_conn(&mut self, peer: PeerName, reason: CloseReason) -> bool {
        let Some(c) = self.conns.remove(&peer) else { return false };
        c.handle.cancel.cancel();
        info!(%peer, remote = %c.remote, %reason, "connection closed");
        if c.since.elapsed() < Duration::from_secs(5) || reason != CloseReason::Closed {
            self.note_failure(c.remote.to_string(), Some(peer), c.outbound, reason.to_string());
        }
        self.maker.on_disconnect(peer, Instant::now(), rand::random());
        self.topology.remove_connection(peer);
        self.on_local_change();
        let _ = self.out.links.send(LinkEvent::Down(peer));
        true
    }

    // ---- frames ----

    fn peer_of(&self, id: u64) -> Option<PeerName> {
        self.conns.iter().find(|(_, c)| c.handle.id == id).map(|(p, _)| *p)
    }

    fn on_conn_event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Closed { id, reason } => {
                if let Some(peer) = self.peer_of(id) {
                    self.drop_conn(peer, reason);
                }
            }
            // The frame's bytes stay counted against the queue's budget until it is handled.
            ConnEvent::Frame { id, frame, bytes, .. } => {
                let Some(from) = self.peer_of(id) else { return };
                self.on_frame(from, frame, bytes);
            }
        }
    }

    /// Counts bytes under the channel's label: only channels this agent runs (and the
    /// topology) get their own, so peers cannot add label sets (nor inject text) to /metrics.
    fn count(&self, channel: &str, direction: &str, bytes: usize) {
        let label = if channel == TOPOLOGY || self.channels.contains_key(channel) {
            channel
        } else {
            OTHER_LABEL
        };
        self.metrics.gossip_bytes(label, direction, bytes as u64);
    }

    fn on_frame(&mut self, from: PeerName, frame: proto::Frame, bytes: usize) {
        use proto::frame::Kind;
        if let Some(Kind::Gossip(m) | Kind::Broadcast(m) | Kind::Unicast(m)) = &frame.kind {
            if !valid_channel(&m.channel) {
                warn!(%from, "invalid channel name; closing the connection");
                self.drop_conn(from, CloseReason::Failed("invalid gossip channel name".into()));
                return;
            }
        }
        match frame.kind {
            Some(Kind::Gossip(m)) => {
                self.count(&m.channel, "received", bytes);
                if m.channel == TOPOLOGY {
                    self.on_topology(from, &m.payload);
                } else if !self.deliver(
                    &m.channel,
                    GossipEvent::Gossip { src: from, payload: m.payload.clone() },
                ) {
                    self.surrogate(from, m);
                }
            }
            Some(Kind::Broadcast(m)) => {
                self.count(&m.channel, "received", bytes);
                let Some(src) = PeerName::new(m.src) else { return };
                let fwd = frame_of(&proto::Frame { kind: Some(Kind::Broadcast(m.clone())) });
                for child in self.children(src) {
                    if child != from {
                        self.send_bytes(child, &m.channel, fwd.clone());
                    }
                }
                if m.channel == TOPOLOGY {
                    self.on_topology(from, &m.payload);
                } else {
                    self.deliver(&m.channel, GossipEvent::Broadcast { src, payload: m.payload });
                }
            }
            Some(Kind::Unicast(m)) => {
                self.count(&m.channel, "received", bytes);
                let (Some(src), Some(dst)) = (PeerName::new(m.src), PeerName::new(m.dst)) else {
                    return;
                };
                if dst == self.topology.me() {
                    if m.channel == TOPOLOGY {
                        self.on_topology(from, &m.payload);
                    } else {
                        self.deliver(&m.channel, GossipEvent::Unicast { src, payload: m.payload });
                    }
                } else if let Some(hop) = self.routes.next_hop(dst, Graph::Control) {
                    let channel = m.channel.clone();
                    self.send_frame(hop, &channel, &proto::Frame { kind: Some(Kind::Unicast(m)) });
                }
            }
            Some(Kind::Overlay(msg)) => {
                if self.out.link_control.try_send(LinkEvent::Control { peer: from, msg }).is_err() {
                    debug!(%from, "data plane behind; dropping a control message");
                }
            }
            Some(Kind::Heartbeat(_)) | None => {}
        }
    }

    /// Hands an event to a registered channel; false if nobody registered it.
    fn deliver(&mut self, channel: &str, ev: GossipEvent) -> bool {
        match self.channels.get(channel) {
            Some(tx) => {
                if tx.try_send(ev).is_err() {
                    warn!(
                        channel,
                        "subsystem is not keeping up; dropping gossip (anti-entropy will repair)"
                    );
                }
                true
            }
            None => false,
        }
    }

    /// Gossip for a channel this peer does not run: pass it on once, so subsystems still reach
    /// peers behind us.
    fn surrogate(&mut self, from: PeerName, m: proto::GossipMessage) {
        use std::hash::{Hash, Hasher};
        if m.payload.len() > SURROGATE_MAX_PAYLOAD {
            debug!(%from, bytes = m.payload.len(), "surrogate gossip too large; not passed on");
            return;
        }
        if !self.surrogate_rate.take(&from, Instant::now()) {
            debug!(%from, "surrogate gossip rate exceeded; not passed on");
            return;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        m.channel.hash(&mut h);
        m.payload.hash(&mut h);
        let key = h.finish();
        if self.surrogate_seen.insert(key, Instant::now()).is_some() {
            return;
        }
        let channel = m.channel.clone();
        let bytes = frame_of(&proto::Frame { kind: Some(proto::frame::Kind::Gossip(m)) });
        for n in self.gossip_targets(Some(from)) {
            self.send_bytes(n, &channel, bytes.clone());
        }
    }

    fn on_topology(&mut self, from: PeerName, payload: &[u8]) {
        let Ok(t) = proto::Topology::decode(payload) else {
            warn!(%from, "undecodable topology gossip");
            return;
        };
        let changed = self.topology.merge_wire(&t);
        if !changed.is_empty() {
            // What is new here is passed on at the next tick, with whatever else arrives
            // meanwhile; a raised entry of ours is among it when someone held a stale one.
            self.pending.extend(changed);
            self.dirty = true;
        }
    }

    /// Our own entry changed.
    fn on_local_change(&mut self) {
        self.pending.insert(self.topology.me());
        self.dirty = true;
    }

    /// Recomputes routes now (a connection came or went) instead of at the next tick.
    fn refresh_routes(&mut self) {
        self.dirty = false;
        self.recompute();
    }

    fn recompute(&mut self) {
        let gone = self.topology.garbage_collect();
        self.routes = Routes::compute(&self.topology);
        self.trees.clear();
        let data = self.routes.table(Graph::Data).clone();
        self.out.data_routes.send_if_modified(|cur| {
            let changed = *cur != data;
            *cur = data;
            changed
        });
        if !gone.is_empty() {
            info!(peers = ?gone.iter().map(|p| p.to_string()).collect::<Vec<_>>(), "peers left the mesh");
            for ch in self.channels.values() {
                let _ = ch.try_send(GossipEvent::PeersGone(gone.clone()));
            }
        }
        self.maker.set_discovered(&self.discovery_candidates(), Instant::now());
        self.publish();
    }

    /// Our children in `src`'s broadcast tree (cached until the routes change).
    /// A source not in the topology has no tree here (nothing is forwarded, nothing cached),
    /// so forged sources cannot grow the cache.
    fn children(&mut self, src: PeerName) -> Vec<PeerName> {
        if let Some(c) = self.trees.get(&src) {
            return c.clone();
        }
        if self.topology.get(src).is_none() {
            return Vec::new();
        }
        let c = routes::broadcast_children(&self.topology, src, Graph::Control);
        self.trees.insert(src, c.clone());
        c
    }

    /// Peers of our peers worth dialling (see [`discovery_candidates`]): within the
    /// configured networks and those of our direct targets, at most `--conn-limit`.
    fn discovery_candidates(&self) -> BTreeMap<PeerName, SocketAddr> {
        let scope = DiscoveryScope::with_targets(&self.cfg.discovery_subnets, &self.maker.direct());
        discovery_candidates(&self.topology, self.cfg.port, &scope, self.cfg.conn_limit)
    }

    // ---- sending ----

    fn gossip_targets(&self, exclude: Option<PeerName>) -> Vec<PeerName> {
        let fanout = gossip_fanout(self.topology.peers().count());
        let mut rng = rand::rng();
        self.conns.keys().copied().filter(|p| Some(*p) != exclude).choose_multiple(&mut rng, fanout)
    }

    fn send_frame(&self, to: PeerName, channel: &str, frame: &proto::Frame) {
        self.send_bytes(to, channel, frame_of(frame));
    }

    /// Sends an encoded frame (encode once, send to many).
    fn send_bytes(&self, to: PeerName, channel: &str, bytes: Vec<u8>) {
        let Some(c) = self.conns.get(&to) else { return };
        if bytes.len() > 4 + MAX_FRAME {
            // The receiver would close the connection; only a relayed oversized item can
            // make such a frame, since whole states are split.
            warn!(peer = %to, channel, bytes = bytes.len(), "frame over the limit; not sent");
            return;
        }
        self.count(channel, "sent", bytes.len());
        if let Err(mpsc::error::TrySendError::Full(_)) = c.handle.tx.try_send(bytes) {
            warn!(peer = %to, "send queue full; closing the connection");
            c.handle.cancel.cancel();
        }
    }

    /// Gossips `entries` in messages of at most [`STATE_MESSAGE`] bytes, all to the same
    /// neighbours (each message builds on the ones before it, see [`topology_messages`]).
    fn send_topology(&mut self, entries: &Entries) {
        let me = self.topology.me().get();
        let targets = self.gossip_targets(None);
        for payload in topology_messages(&self.topology, entries) {
            let msg = proto::GossipMessage { channel: TOPOLOGY.into(), src: me, dst: 0, payload };
            let bytes = frame_of(&proto::Frame { kind: Some(proto::frame::Kind::Gossip(msg)) });
            for n in &targets {
                self.send_bytes(*n, TOPOLOGY, bytes.clone());
            }
        }
    }

    fn on_outgoing(&mut self, o: Outgoing) {
        use proto::frame::Kind;
        let me = self.topology.me();
        let msg = proto::GossipMessage {
            channel: o.channel.to_string(),
            src: me.get(),
            dst: 0,
            payload: o.payload,
        };
        match o.kind {
            SendKind::Gossip { exclude } => {
                let bytes = frame_of(&proto::Frame { kind: Some(Kind::Gossip(msg)) });
                for n in self.gossip_targets(exclude) {
                    self.send_bytes(n, &o.channel, bytes.clone());
                }
            }
            SendKind::Broadcast => {
                let bytes = frame_of(&proto::Frame { kind: Some(Kind::Broadcast(msg)) });
                for child in self.children(me) {
                    self.send_bytes(child, &o.channel, bytes.clone());
                }
            }
            SendKind::Unicast(dst) => {
                let frame = proto::Frame {
                    kind: Some(Kind::Unicast(proto::GossipMessage { dst: dst.get(), ..msg })),
                };
                if let Some(hop) = self.routes.next_hop(dst, Graph::Control) {
                    self.send_frame(hop, &o.channel, &frame);
                }
            }
        }
    }

    // ---- reporting ----

    fn publish(&self) {
        let me = self.topology.me();
        let mut connections: Vec<ConnectionReport> = self
            .conns
            .iter()
            .map(|(p, c)| ConnectionReport {
                peer: p.to_string(),
                nickname: c.nickname.clone(),
                address: c.remote.to_string(),
                outbound: c.outbound,
                state: ConnState::Established,
                info: String::new(),
                encrypted: c.encrypted,
                data_encrypted: c.data_encrypted,
            })
            .collect();
        for (key, t) in self.maker.targets.iter().filter(|(_, t)| t.dialing) {
            connections.push(ConnectionReport {
                peer: match key {
                    TargetKey::Discovered(p) => p.to_string(),
                    TargetKey::Direct(_) => String::new(),
                },
                nickname: String::new(),
                address: t.address.clone(),
                outbound: true,
                state: ConnState::Connecting,
                info: String::new(),
                encrypted: false,
                data_encrypted: false,
            });
        }
        // A failure is shown while nothing newer covers it: a dial of the same address in
        // progress, or a connection to the same peer or host (a failure that arrives after
        // the connection, e.g. of a dial that was in flight, is hidden here).
        let live: HashSet<String> = connections.iter().map(|c| c.address.clone()).collect();
        connections.extend(
            self.failures
                .iter()
                .filter(|f| !live.contains(&f.address) && !self.superseded(f))
                .cloned(),
        );
        let peers = self
            .topology
            .peers()
            .map(|(name, e)| PeerEntryReport {
                name: name.to_string(),
                nickname: e.nickname.clone(),
                uid: e.uid,
                version: e.version,
                connections: e
                    .connections
                    .iter()
                    .map(|(p, c)| super::report::PeerConnectionReport {
                        peer: p.to_string(),
                        address: c.address.clone(),
                        outbound: c.outbound,
                        established: c.established,
                    })
                    .collect(),
            })
            .collect();
        let targets = self
            .maker
            .targets
            .iter()
            .map(|(k, t)| TargetReport {
                target: match k {
                    TargetKey::Direct(s) => s.clone(),
                    TargetKey::Discovered(_) => t.address.clone(),
                },
                discovered: matches!(k, TargetKey::Discovered(_)),
                peer: k.peer(t).map(|p| p.to_string()).unwrap_or_default(),
                connected: k.peer(t).is_some_and(|p| self.conns.contains_key(&p)),
                last_error: t.last_error.clone().unwrap_or_default(),
                sources: t.sources.iter().copied().collect(),
            })
            .collect();
        self.publish_view();
        let _ = self.out.report.send(MeshReport {
            name: me.to_string(),
            nickname: self.cfg.setup.nickname.clone(),
            port: self.cfg.port,
            encryption: self.cfg.setup.psk.is_some(),
            discovery: self.cfg.discovery,
            conn_limit: self.cfg.conn_limit as u32,
            trusted_subnets: self.cfg.setup.trusted.clone(),
            peers,
            connections,
            targets,
            unicast: self
                .routes
                .table(Graph::Control)
                .iter()
                .map(|(d, h)| (d.to_string(), h.to_string()))
                .collect(),
            accepts: lock_gate(&self.accepts).report(),
        });
    }
}

impl Router {
    /// The typed view, sent only when it changed (subscribers wake on real changes only).
    fn publish_view(&self) {
        let view = MeshView {
            reachable: self.routes.table(Graph::Control).keys().copied().collect(),
            peers: self.topology.peers().map(|(p, e)| (*p, e.nickname.clone())).collect(),
            connections: self
                .conns
                .iter()
                .map(|(p, c)| {
                    let encryption = match (c.encrypted, c.data_encrypted) {
                        (false, _) => Encryption::None,
                        (true, false) => Encryption::ControlOnly,
                        (true, true) => Encryption::Full,
                    };
                    let v = ConnView { remote: c.remote, outbound: c.outbound, encryption };
                    (*p, v)
                })
                .collect(),
        };
        self.out.view.send_if_modified(|held| {
            let changed = *held != view;
            if changed {
                *held = view;
            }
            changed
        });
    }
}

/// The accept gate, shared by the accept loop, the handshakes it admits and the status report.
pub type SharedGate = Arc<std::sync::Mutex<AcceptGate>>;

/// Locks the gate; its state stays consistent even if a holder panicked.
pub fn lock_gate(g: &SharedGate) -> std::sync::MutexGuard<'_, AcceptGate> {
    g.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A handshake slot of the accept gate, given back when the handshake ends.
struct Admitted {
    gate: SharedGate,
    ip: std::net::IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        lock_gate(&self.gate).release(self.ip);
    }
}

async fn accept_loop(
    listener: TcpListener,
    setup: Setup,
    gate: SharedGate,
    tx: mpsc::UnboundedSender<SetupEvent>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Per source, so a flood from one address cannot starve real peers (see AcceptGate).
        if let Err(why) = lock_gate(&gate).admit(remote.ip(), Instant::now()) {
            debug!(%remote, ?why, "inbound mesh connection refused before its handshake");
            continue;
        }
        let slot = Admitted { gate: gate.clone(), ip: remote.ip() };
        let (setup, tx) = (setup.clone(), tx.clone());
        tokio::spawn(async move {
            let ev = match connection::handshake(stream, false, &setup).await {
                Ok(est) => SetupEvent::Ready { est: Box::new(est), target: None },
                Err(error) => SetupEvent::InboundFailed { remote, error },
            };
            drop(slot);
            let _ = tx.send(ev);
        });
    }
}

pub fn entries_to_wire(e: &Entries) -> proto::Topology {
    proto::Topology {
        peers: e
            .0
            .iter()
            .map(|(name, p)| proto::PeerEntry {
                name: name.get(),
                nickname: p.nickname.clone(),
                uid: p.uid,
                version: p.version,
                connections: p
                    .connections
                    .iter()
                    .map(|(peer, c)| proto::ConnectionEntry {
                        peer: peer.get(),
                        address: c.address.clone(),
                        outbound: c.outbound,
                        established: c.established,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// `entries` as topology messages of at most [`STATE_MESSAGE`] bytes each (an entry larger
/// than that alone), ordered by [`Topology::breadth_first`] of the sender's `topology`.
pub fn topology_messages(topology: &Topology, entries: &Entries) -> Vec<Vec<u8>> {
    let rank: HashMap<u64, usize> =
        topology.breadth_first().iter().enumerate().map(|(i, p)| (p.get(), i)).collect();
    let mut peers = entries_to_wire(entries).peers;
    peers.sort_by_key(|p| rank.get(&p.name).copied().unwrap_or(usize::MAX));
    split_by_size(peers, STATE_MESSAGE)
        .into_iter()
        .map(|peers| proto::Topology { peers }.encode_to_vec())
        .collect()
}

/// Decodes entries; names longer than 48 bits are dropped.
pub fn entries_from_wire(t: &proto::Topology) -> Entries {
    let mut out = Entries::default();
    for p in &t.peers {
        let Some(name) = PeerName::new(p.name) else { continue };
        let info = PeerInfo::from_wire(p);
        // Duplicates in one message: keep the greatest, as a merge would.
        out.merge(&Entries(BTreeMap::from([(name, info)])));
    }
    out
}

/// How many neighbours gossip goes to in a mesh of `peers`: 2·log2(n), at least 1 — enough for
/// an epidemic to reach everyone in a few rounds without flooding every link.
pub fn gossip_fanout(peers: usize) -> usize {
    ((2.0 * (peers.max(2) as f64).log2()).ceil() as usize).max(1)
}

/// A random, non-zero incarnation id.
pub fn new_uid() -> u64 {
    rand::rng().random_range(1..=u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::Mesh;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    async fn mesh(nick: &str, port: u16, targets: Vec<String>, dir: &std::path::Path) -> Mesh {
        let setup = Setup {
            me: PeerName::random(),
            uid: new_uid(),
            nickname: nick.into(),
            listen_port: port,
            psk: None,
            trusted: Vec::new(),
            overlays: Vec::new(),
            fastdp_port: 0,
            sleeve_port: 0,
        };
        let cfg = RouterConfig {
            setup,
            port,
            discovery: false,
            conn_limit: 10,
            discovery_subnets: Vec::new(),
            initial_targets: Some(targets),
        };
        let store = Arc::new(Store::open(dir).expect("store"));
        let bind = SocketAddr::from(([127, 0, 0, 1], port));
        let (m, _links, task) =
            Mesh::start(cfg, bind, store, Arc::new(Metrics::new()), CancellationToken::new())
                .await
                .expect("mesh starts");
        tokio::spawn(task);
        m
    }

    /// The first unicast a subsystem sends in answer to `PeerUp`, to the new neighbour.
    async fn greeting(mut ch: crate::mesh::gossip::GossipChannel) -> Option<Vec<u8>> {
        loop {
            match ch.recv().await? {
                GossipEvent::PeerUp(peer) => ch.unicast(peer, ch.me().to_string().into_bytes()),
                GossipEvent::Unicast { payload, .. } => return Some(payload),
                _ => {}
            }
        }
    }

    /// A topology of 2000 peers (near the 2048 cap) with 20 connections each (about 1.5 MB in
    /// one message) goes as several messages of at most 1 MiB; a receiver connected to the sender that merges
    /// them one by one, collecting unreachable peers after each, ends with the whole topology.
    #[test]
    fn a_large_topology_is_split_into_messages_that_merge_to_the_whole() {
        let n = |i: u64| PeerName::new(i + 1).expect("name");
        let mut entries = BTreeMap::new();
        for i in 0..2000u64 {
            let connections = (20 * i + 1..=20 * i + 20)
                .map(|c| {
                    let info = ConnInfo {
                        address: format!("10.{}.{}.{}:6783", c >> 16, (c >> 8) & 255, c & 255),
                        outbound: true,
                        established: true,
                    };
                    (n(c % 2000), info)
                })
                .collect();
            let info = PeerInfo { version: 5, uid: 7, nickname: "x".repeat(200), connections };
            entries.insert(n(i), info);
        }
        let sender = Topology::from_entries(n(0), Entries(entries));
        let messages = topology_messages(&sender, sender.entries());
        assert!(messages.len() > 1);
        assert!(messages.iter().all(|m| m.len() <= STATE_MESSAGE));
        let mut receiver = Topology::new(n(5000), "r".into(), 1, 1);
        let to_sender =
            ConnInfo { address: "10.0.0.1:6783".into(), outbound: true, established: true };
        receiver.set_connection(n(0), to_sender);
        for m in &messages {
            receiver.merge_wire(&proto::Topology::decode(m.as_slice()).expect("decodes"));
            assert!(receiver.garbage_collect().is_empty(), "a merged peer was collected");
        }
        for (p, e) in sender.peers() {
            assert_eq!(receiver.get(*p), Some(e));
        }
    }

    /// Both greetings arrive within 2 s, each with the other's name.
    async fn each_hears_the_other(
        a: &Mesh,
        ga: impl Future<Output = Option<Vec<u8>>>,
        b: &Mesh,
        gb: impl Future<Output = Option<Vec<u8>>>,
    ) {
        let within = Duration::from_secs(2);
        let (got_a, got_b) =
            tokio::join!(tokio::time::timeout(within, ga), tokio::time::timeout(within, gb));
        assert_eq!(got_a.ok().flatten(), Some(b.me().to_string().into_bytes()), "a hears b");
        assert_eq!(got_b.ok().flatten(), Some(a.me().to_string().into_bytes()), "b hears a");
    }

    /// A subsystem's whole state, unicast on `PeerUp` (as DNS, MACs and IPAM do), arrives at
    /// once on both ends of a new connection, not with the anti-entropy 30 s later.
    #[tokio::test]
    async fn state_unicast_on_peer_up_arrives_at_once() {
        let (da, db) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
        let (pa, pb) = (free_port(), free_port());
        let a = mesh("a", pa, Vec::new(), da.path()).await;
        let b = mesh("b", pb, vec![format!("127.0.0.1:{pa}")], db.path()).await;
        let (ga, gb) = (greeting(a.channel("test")), greeting(b.channel("test")));
        a.open();
        b.open();
        each_hears_the_other(&a, ga, &b, gb).await;
    }

    /// Until `open`, a mesh neither dials nor accepts, so a subsystem that takes its channel
    /// during start-up (after the mesh was created) still hears what its peers send on connect.
    #[tokio::test]
    async fn a_mesh_connects_only_once_opened_so_late_channels_miss_nothing() {
        let (da, db) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
        let (pa, pb) = (free_port(), free_port());
        let a = mesh("a", pa, Vec::new(), da.path()).await;
        let ga = greeting(a.channel("test"));
        a.open();
        let b = mesh("b", pb, vec![format!("127.0.0.1:{pa}")], db.path()).await;
        // b's subsystems are still starting: nothing may connect meanwhile.
        let mut view = a.view();
        let early = tokio::time::timeout(
            Duration::from_millis(500),
            view.wait_for(|v| !v.connections.is_empty()),
        )
        .await;
        assert!(early.is_err(), "b connected before it was opened");
        let gb = greeting(b.channel("test"));
        b.open();
        each_hears_the_other(&a, ga, &b, gb).await;
    }
}
