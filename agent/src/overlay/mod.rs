//! The cross-host data plane: one owner that decides, per peer, which overlay carries the
//! traffic (fastdp, sleeve, or relayed through others), and programs the kernel (VXLAN and
//! bridge forwarding entries, ARP answers) and the sleeve's forwarding table accordingly. It
//! learns where remote MACs live from the `macs` gossip channel, publishes this host's own
//! MACs there, and probes every directly connected peer with heartbeats on both overlays
//! (sleeve's heartbeats also find the path MTU, which sizes its datagrams to that peer).
//! With a password it lets VXLAN in only from the peers fastdp is allowed for ([`filter`]).

pub mod filter;
pub mod health;
pub mod kernel;
pub mod macs;
pub mod pmtu;
pub mod traffic;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::filter::VxlanFilter;
use self::health::{HEARTBEAT, Link, Mode, Overlay};
use self::kernel::OverlayKernel;
use self::macs::MacTable;
use self::pmtu::PathMtu;
use crate::dataplane::fastdp::{FdbSpec, FrameSocket, HEARTBEAT_ETHERTYPE, Port, VxlanSpec};
use crate::dataplane::sleeve::codec::Cipher;
use crate::dataplane::sleeve::{Hop, MIN_DATAGRAM, Sleeve, SleeveEvent, StatsReport, Table};
use crate::dataplane::{Mac, Traffic, VXLAN_OVERHEAD, on_blocking_thread};
use crate::endpoints::record::EndpointFeed;
use crate::identity::PeerName;
use crate::mesh::gossip::{GossipChannel, GossipEvent};
use crate::mesh::router::{LinkEvent, LinkInfo};
use crate::mesh::{Links, Mesh, proto};
use crate::subsystem::{Hub, Tasks};

/// The VXLAN network identifier weft uses.
pub const VNI: u32 = 0x77_6674;
/// Default UDP port of fastdp.
pub const FASTDP_PORT: u16 = 6784;
/// Forwarding entries that nobody wants any more are removed only after this long, so that a
/// restarted agent does not disturb traffic before it has heard from its peers again.
pub const PRUNE_AFTER: Duration = Duration::from_secs(30);
/// How often the VXLAN device and the TAP port are checked.
const REPAIR: Duration = Duration::from_secs(10);
/// Received heartbeats (sleeve and fastdp) queued for the owner; beyond, they are dropped.
const HEARTBEAT_QUEUE: usize = 1024;
/// The TAP port's MTU: large, so that oversize frames from pods reach sleeve, which answers
/// them with ICMP "fragmentation needed" instead of the bridge dropping them silently.
/// (A TAP's largest MTU: 65535 minus its Ethernet header.)
pub const TAP_MTU: u32 = 65_521;
/// Full MAC table gossip interval.
const MACS_ANTI_ENTROPY: Duration = Duration::from_secs(30);
/// The smallest underlay packet every IPv4 path carries (RFC 791): path-MTU discovery's floor.
const MIN_PATH_MTU_V4: usize = 576;
/// The smallest underlay packet every IPv6 path carries (RFC 8200).
const MIN_PATH_MTU_V6: usize = 1280;

/// Outer IP and UDP header bytes in front of a sleeve datagram to `remote`.
fn ip_udp_overhead(remote: IpAddr) -> usize {
    if remote.is_ipv4() { 20 + 8 } else { 40 + 8 }
}

/// Settings of the data plane.
#[derive(Clone, Debug)]
pub struct OverlayConfig {
    pub me: PeerName,
    pub bridge: String,
    pub bridge_mac: Mac,
    pub vxlan: String,
    pub tap: String,
    pub fastdp_port: u16,
    pub sleeve_port: u16,
    /// Address the sleeve socket binds (`--mesh-bind`).
    pub bind: IpAddr,
    /// Name of the nftables table (family inet) that limits who may send VXLAN.
    pub filter_table: String,
    /// Name of the nftables table (family inet) counting each peer's fastdp traffic.
    pub traffic_table: String,
    /// Endpoint (and bridge) MTU.
    pub mtu: u32,
    /// MTU of the underlay interface (the largest sleeve datagrams; path-MTU discovery may
    /// find a smaller size per peer).
    pub underlay_mtu: u32,
    /// Never use fastdp (`--no-fastdp`).
    pub no_fastdp: bool,
    /// A password is set. fastdp (unencrypted) then carries only unicast frames for MACs known
    /// to be behind a trusted peer; broadcast, multicast and unknown unicast, which may be for
    /// an untrusted peer's endpoint, go through sleeve, encrypted on every hop.
    pub password: bool,
}

impl OverlayConfig {
    /// The fastdp VXLAN device this configuration asks for.
    fn vxlan_spec(&self) -> VxlanSpec {
        VxlanSpec {
            name: self.vxlan.clone(),
            vni: VNI,
            port: self.fastdp_port,
            mtu: self.mtu,
            bridge: self.bridge.clone(),
            flood: !self.password,
        }
    }
}

/// One peer link, as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkReport {
    pub peer: String,
    pub mode: Mode,
    pub fastdp: String,
    pub sleeve: String,
    pub encrypted: bool,
    /// Why the link is not at its best (empty when it is): why fastdp is not in use, or why
    /// neither overlay is.
    #[serde(default)]
    pub degraded: String,
    /// The largest underlay packet (outer IP header included) that sleeve's path-MTU probes
    /// got through to the peer recently; 0 while none did.
    #[serde(default)]
    pub path_mtu: u32,
    /// Sleeve data datagrams exchanged with this peer on this link (relayed ones included);
    /// starts from 0 with each new connection.
    #[serde(default)]
    pub sleeve_traffic: Traffic,
    /// VXLAN datagrams (outer headers included) exchanged with this peer, counted by the
    /// kernel per peer address; kept across rewrites of the counting table while the link
    /// lives.
    #[serde(default)]
    pub fastdp_traffic: Traffic,
}

/// Another peer's endpoints as its `macs` origin announces them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteEndpoints {
    pub peer: String,
    pub endpoints: Vec<RemoteEndpoint>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteEndpoint {
    pub mac: String,
    pub addresses: Vec<IpAddr>,
}

/// The data plane's part of the status report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayReport {
    pub mtu: u32,
    pub fastdp: String,
    pub sleeve_port: u16,
    pub fastdp_port: u16,
    pub links: Vec<LinkReport>,
    /// Peers reached through others, with the next hop.
    pub relayed: Vec<(String, String)>,
    pub remote_macs: usize,
    pub sleeve: StatsReport,
    /// Forwarding entries (VXLAN, bridge, neighbour) the kernel refused at the last sync, and
    /// why the first was refused; retried every second while any are.
    #[serde(default)]
    pub fdb_refused: usize,
    #[serde(default)]
    pub fdb_error: String,
    /// The endpoints of every other peer (MACs with addresses), from the `macs` channel.
    #[serde(default)]
    pub remote: Vec<RemoteEndpoints>,
}

/// Logs a sync's outcome (a refusal only when it changes, as it is retried every second) and
/// keeps it for the status report.
fn record_fdb_outcome(
    outcome: &std::sync::Mutex<FdbOutcome>,
    result: Result<crate::dataplane::fastdp::FdbChanges, crate::dataplane::KernelError>,
) {
    let (refused, error) = match result {
        Ok(c) => {
            if c.added + c.removed > 0 {
                debug!(added = c.added, removed = c.removed, "forwarding entries updated");
            }
            (c.failed, c.first_error.unwrap_or_default())
        }
        Err(e) => (1, format!("cannot program forwarding entries: {e}")),
    };
    let Ok(mut o) = outcome.lock() else { return };
    if refused > 0 && (refused, &error) != (o.refused, &o.error) {
        warn!(refused, first = %error, "the kernel refused forwarding entries; will retry");
    }
    *o = FdbOutcome { refused, error };
}

/// Entries the kernel refused at the last forwarding-entry sync.
#[derive(Debug, Default)]
struct FdbOutcome {
    refused: usize,
    error: String,
}

struct PeerLink {
    info: LinkInfo,
    link: Link,
    /// Sleeve's path-MTU discovery towards this peer, in datagram sizes.
    pmtu: PathMtu,
    hop: Arc<Hop>,
    peer_mac: Mac,
    /// What the mesh was last told about this link.
    established: bool,
}

impl PeerLink {
    /// The largest underlay packet known to reach the peer (sleeve's probes), if any.
    fn path_mtu(&self, now: Instant) -> Option<u32> {
        let size = self.pmtu.verified(now)? + ip_udp_overhead(self.info.remote);
        u32::try_from(size).ok()
    }
}

/// The data plane's owner.
pub struct DataPlane {
    cfg: OverlayConfig,
    kernel: Arc<dyn OverlayKernel>,
    mesh: Mesh,
    endpoints: EndpointFeed,
    macs: MacTable,
    /// Origins of the MAC table not (yet) in the mesh, and since when.
    departed: crate::mesh::departed::Unknown,
    channel: GossipChannel,
    links: BTreeMap<PeerName, PeerLink>,
    routes: watch::Receiver<BTreeMap<PeerName, PeerName>>,
    sleeve: Sleeve,
    fastdp: Option<Arc<FrameSocket>>,
    fastdp_error: Option<String>,
    started: Instant,
    heartbeat_id: u32,
    report: watch::Sender<OverlayReport>,
    last_programmed: Option<(FdbSpec, Vec<(PeerName, Mode)>)>,
    /// The outcome of the last forwarding-entry sync (it runs on a blocking thread).
    fdb: Arc<std::sync::Mutex<FdbOutcome>>,
    /// With a password and fastdp: the VXLAN senders to allow, as last asked of the kernel
    /// (applied by blocking tasks, each of which installs the latest).
    vxlan_filter: Option<Arc<std::sync::Mutex<VxlanFilter>>>,
    /// With fastdp: each peer's fastdp traffic.
    traffic: Option<traffic::FastdpTraffic>,
}

impl std::fmt::Debug for DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlane").field("links", &self.links.len()).finish_non_exhaustive()
    }
}

/// Heartbeat frames on the VXLAN device: `WFHB`, full flag, id, sender.
fn heartbeat_frame(to: Mac, from: Mac, me: PeerName, id: u32, full: bool, mtu: u32) -> Vec<u8> {
    let len = if full { mtu as usize + 14 } else { 64 };
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&to.0);
    f[6..12].copy_from_slice(&from.0);
    f[12..14].copy_from_slice(&HEARTBEAT_ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(b"WFHB");
    f[18] = u8::from(full);
    f[19..23].copy_from_slice(&id.to_be_bytes());
    f[23..29].copy_from_slice(&me.mac().0);
    f
}

fn parse_heartbeat(f: &[u8]) -> Option<(PeerName, u32, bool)> {
    if f.len() < 29 || &f[14..18] != b"WFHB" {
        return None;
    }
    let id = u32::from_be_bytes(f[19..23].try_into().ok()?);
    let mut n = [0u8; 8];
    n[2..].copy_from_slice(&f[23..29]);
    Some((PeerName::new(u64::from_be_bytes(n))?, id, f[18] == 1))
}

fn ack_seq(id: u32, full: bool) -> u64 {
    u64::from(id) | (u64::from(full) << 63)
}

/// What the helper threads report.
#[derive(Debug)]
enum Input {
    FastdpHeartbeat { from: PeerName, id: u32, full: bool },
    Sleeve(SleeveEvent),
}

impl DataPlane {
    /// Sets up the VXLAN device, the TAP and the sleeve socket; returns the report feed and
    /// the owner task, for the caller to spawn.
    pub async fn start(
        cfg: OverlayConfig,
        kernel: Arc<dyn OverlayKernel>,
        mesh: Mesh,
        links: Links,
        endpoints: EndpointFeed,
        shutdown: CancellationToken,
    ) -> Result<
        (watch::Receiver<OverlayReport>, impl Future<Output = ()> + Send + 'static),
        StartError,
    > {
        // Heartbeats come from the network: bounded queues, dropped when full (they repeat).
        let (inputs_tx, inputs_rx) = mpsc::channel(HEARTBEAT_QUEUE);
        let (sleeve_tx, mut sleeve_rx) = mpsc::channel(HEARTBEAT_QUEUE);
        // A specific mesh address is the sleeve's too (peers accept datagrams only from it);
        // an unspecified one keeps the IPv4 socket sleeve always had.
        let bind = if cfg.bind.is_unspecified() { IpAddr::from([0, 0, 0, 0]) } else { cfg.bind };
        let sleeve = Sleeve::start(&cfg.tap, SocketAddr::new(bind, cfg.sleeve_port), sleeve_tx)
            .map_err(|source| StartError { tap: cfg.tap.clone(), port: cfg.sleeve_port, source })?;
        let fwd = inputs_tx.clone();
        tokio::spawn(async move {
            while let Some(e) = sleeve_rx.recv().await {
                if fwd.send(Input::Sleeve(e)).await.is_err() {
                    return;
                }
            }
        });
        let (fastdp, fastdp_error) = match Self::start_fastdp(&cfg, kernel.clone(), inputs_tx).await
        {
            Ok(sock) => (Some(sock), None),
            Err(e) if cfg.no_fastdp => {
                info!("fastdp {e}; all traffic goes through sleeve");
                (None, Some(e))
            }
            Err(e) => {
                warn!(error = %e, "fastdp unavailable; all traffic goes through sleeve");
                (None, Some(e))
            }
        };
        let (report_tx, report_rx) = watch::channel(OverlayReport::default());
        let channel = mesh.channel("macs");
        let vxlan_filter = (fastdp.is_some() && cfg.password).then(|| {
            Arc::new(std::sync::Mutex::new(VxlanFilter {
                table: cfg.filter_table.clone(),
                port: cfg.fastdp_port,
                allowed: BTreeSet::new(),
            }))
        });
        let traffic = match &fastdp {
            Some(_) => Some(traffic::FastdpTraffic::new(
                cfg.traffic_table.clone(),
                cfg.fastdp_port,
                kernel.clone(),
            )),
            None => {
                // A table an earlier run with fastdp left would count nothing: remove it.
                let (k, name) = (kernel.clone(), cfg.traffic_table.clone());
                tokio::task::spawn_blocking(move || {
                    on_blocking_thread(|| {
                        k.remove_table(crate::dataplane::nft::Family::Inet, &name)
                    })
                });
                None
            }
        };
        let dp = DataPlane {
            traffic,
            macs: MacTable::new(cfg.me),
            departed: crate::mesh::departed::Unknown::default(),
            routes: mesh.data_routes(),
            cfg,
            kernel,
            mesh,
            endpoints,
            channel,
            links: BTreeMap::new(),
            sleeve,
            fastdp,
            fastdp_error,
            started: Instant::now(),
            heartbeat_id: 0,
            report: report_tx,
            last_programmed: None,
            fdb: Arc::default(),
            vxlan_filter,
        };
        Ok((report_rx, dp.run(links, inputs_rx, shutdown)))
    }

    async fn start_fastdp(
        cfg: &OverlayConfig,
        kernel: Arc<dyn OverlayKernel>,
        inputs: mpsc::Sender<Input>,
    ) -> Result<Arc<FrameSocket>, String> {
        if cfg.no_fastdp {
            let name = cfg.vxlan.clone();
            let removed = tokio::task::spawn_blocking(move || {
                on_blocking_thread(|| kernel.remove_vxlan(&name))
            })
            .await;
            match removed {
                Ok(Ok(true)) => {
                    info!(device = %cfg.vxlan, "removed the VXLAN device a run with fastdp left")
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    warn!(device = %cfg.vxlan, error = %e, "cannot remove the VXLAN device a run with fastdp left")
                }
                Err(e) => warn!(error = %e, "removing the VXLAN device"),
            }
            return Err("disabled by --no-fastdp".into());
        }
        Self::start_vxlan_filter(cfg, kernel.clone()).await?;
        let spec = cfg.vxlan_spec();
        let (_, repairs) =
            tokio::task::spawn_blocking(move || on_blocking_thread(|| kernel.ensure_vxlan(&spec)))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        if !repairs.is_empty() {
            info!(device = %cfg.vxlan, ?repairs, "VXLAN device set up");
        }
        let sock = Arc::new(
            FrameSocket::open(&cfg.vxlan, 0).map_err(|e| format!("heartbeat socket: {e}"))?,
        );
        // Heartbeats are addressed to our bridge MAC, so the bridge delivers them to itself.
        let reader = FrameSocket::open(&cfg.bridge, HEARTBEAT_ETHERTYPE)
            .map_err(|e| format!("heartbeat socket: {e}"))?;
        std::thread::Builder::new()
            .name("fastdp-heartbeats".into())
            .spawn(move || {
                let mut buf = vec![0u8; 65_536];
                loop {
                    match reader.recv(&mut buf) {
                        Ok(Some(n)) => {
                            if let Some((from, id, full)) = parse_heartbeat(&buf[..n]) {
                                let hb = Input::FastdpHeartbeat { from, id, full };
                                if let Err(mpsc::error::TrySendError::Closed(_)) =
                                    inputs.try_send(hb)
                                {
                                    return;
                                }
                            }
                        }
                        Ok(None) => {
                            if inputs.is_closed() {
                                return;
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "fastdp heartbeat socket failed");
                            return;
                        }
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(sock)
    }

    /// With a password, lets nobody send VXLAN until peers that may are known (before the
    /// device exists, so it never takes a frame unfiltered); without, removes the filter a
    /// previous run with a password left. fastdp does not start if the filter cannot be set.
    async fn start_vxlan_filter(
        cfg: &OverlayConfig,
        kernel: Arc<dyn OverlayKernel>,
    ) -> Result<(), String> {
        let (password, name) = (cfg.password, cfg.filter_table.clone());
        let table =
            VxlanFilter { table: name.clone(), port: cfg.fastdp_port, ..Default::default() }
                .table();
        let result = tokio::task::spawn_blocking(move || {
            on_blocking_thread(|| match password {
                true => kernel.ensure_table(&table, true),
                false => kernel.remove_table(table.family, &name),
            })
        })
        .await
        .map_err(|e| e.to_string())?;
        match result {
            Err(e) if password => Err(format!("cannot filter VXLAN senders: {e}")),
            Err(e) => {
                warn!(error = %e, table = %cfg.filter_table, "cannot remove the VXLAN filter");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    async fn run(
        mut self,
        mut links: Links,
        mut inputs: mpsc::Receiver<Input>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        let mut last_gossip = Instant::now();
        self.endpoints.mark_changed();
        let mut last_repair = Instant::now() - REPAIR;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(ev) = links.changes.recv() => self.on_link(ev),
                Some(ev) = links.control.recv() => self.on_link(ev),
                Some(i) = inputs.recv() => self.on_input(i),
                Some(ev) = self.channel.recv() => self.on_gossip(ev),
                Ok(()) = self.routes.changed() => self.program(),
                Ok(()) = self.endpoints.changed() => self.scan_local(),
                _ = tick.tick() => {
                    let now = Instant::now();
                    if now.duration_since(last_repair) >= REPAIR {
                        last_repair = now;
                        self.repair_devices().await;
                    }
                    self.send_heartbeats();
                    if now.duration_since(last_gossip) >= MACS_ANTI_ENTROPY {
                        last_gossip = now;
                        for m in crate::mesh::gossip::GossipData::encode_all(&self.macs) {
                            self.channel.gossip(m);
                        }
                    }
                    self.evaluate(now);
                    let view = self.mesh.view().borrow().clone();
                    self.macs.forget_departed(&mut self.departed, &view, now);
                    self.program();
                }
            }
        }
    }

    fn fastdp_disabled(&self, info: &LinkInfo) -> Option<String> {
        if let Some(e) = &self.fastdp_error {
            return Some(e.clone());
        }
        if info.encrypt {
            return Some("traffic to this peer is encrypted (sleeve only)".into());
        }
        if !info.overlays.iter().any(|o| Overlay::parse(o) == Some(Overlay::Fastdp)) {
            return Some("the peer does not offer fastdp".into());
        }
        if !info.remote.is_ipv4() {
            return Some("IPv6 underlay".into());
        }
        None
    }

    fn on_link(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Up(info) => {
                let now = Instant::now();
                let disabled = self.fastdp_disabled(&info);
                let pmtu = self.new_path_mtu(info.remote);
                let Some(hop) = new_hop(&info, self.cfg.password, pmtu.size(now)) else {
                    warn!(peer = %info.peer, "encryption required but the sleeve keys are missing or invalid; no data-plane link to this peer");
                    if self.links.remove(&info.peer).is_some() {
                        self.program();
                    }
                    return;
                };
                let hop = Arc::new(hop);
                info!(peer = %info.peer, remote = %info.remote, fastdp = disabled.is_none(), encrypted = info.encrypt, "data-plane link up");
                let peer = info.peer;
                let link = PeerLink {
                    link: Link::new(now, disabled),
                    pmtu,
                    hop,
                    peer_mac: peer.mac(),
                    info,
                    established: false,
                };
                self.links.insert(peer, link);
                // Everything we know about MACs, to the new neighbour.
                for m in crate::mesh::gossip::GossipData::encode_all(&self.macs) {
                    self.channel.unicast(peer, m);
                }
                self.program();
            }
            LinkEvent::Down(peer) => {
                if self.links.remove(&peer).is_some() {
                    info!(%peer, "data-plane link down");
                    self.program();
                }
            }
            LinkEvent::Control { peer, msg } => {
                let Some(l) = self.links.get_mut(&peer) else { return };
                let Some(proto::overlay_control::Kind::Ack(ack)) = msg.kind else { return };
                let (full, now) = (ack.seq >> 63 == 1, Instant::now());
                match Overlay::parse(&msg.overlay) {
                    Some(Overlay::Fastdp) => l.link.fastdp.ack(now, full),
                    Some(Overlay::Sleeve) if full => {
                        // An agent without path-MTU discovery acknowledges without a size:
                        // its full heartbeats are the size in use.
                        let size = match ack.size {
                            0 => l.pmtu.size(now),
                            n => n as usize,
                        };
                        l.pmtu.ack(size, now);
                        l.link.sleeve.ack(now, size >= l.pmtu.size(now));
                    }
                    Some(Overlay::Sleeve) => l.link.sleeve.ack(now, false),
                    None => {}
                }
            }
        }
    }

    fn on_input(&mut self, i: Input) {
        let (from, id, full, size, overlay) = match i {
            Input::FastdpHeartbeat { from, id, full } => (from, id, full, 0, Overlay::Fastdp),
            Input::Sleeve(SleeveEvent::Heartbeat { from, id, full, size }) => {
                (from, id, full, u32::try_from(size).unwrap_or(u32::MAX), Overlay::Sleeve)
            }
        };
        if self.links.contains_key(&from) {
            let msg = proto::OverlayControl {
                overlay: overlay.name().into(),
                kind: Some(proto::overlay_control::Kind::Ack(proto::HeartbeatAck {
                    seq: ack_seq(id, full),
                    size,
                })),
            };
            self.mesh.send_overlay(from, msg);
        }
    }

    fn on_gossip(&mut self, ev: GossipEvent) {
        match self.channel.handle(&mut self.macs, ev) {
            Ok(true) => self.program(),
            Ok(false) => {}
            Err(GossipEvent::PeersGone(peers)) => {
                if self.macs.forget(&peers) {
                    self.program();
                }
            }
            Err(GossipEvent::Unicast { src, payload }) => {
                let ev = GossipEvent::Gossip { src, payload };
                if let Ok(true) = self.channel.handle(&mut self.macs, ev) {
                    self.program();
                }
            }
            Err(_) => {}
        }
    }

    /// This host's endpoints and bridge addresses, from the endpoint feed; gossiped if they
    /// changed.
    fn scan_local(&mut self) {
        let bridge_mac = self.cfg.bridge_mac;
        let endpoints = self.endpoints.borrow_and_update().clone();
        let mut local: BTreeMap<Mac, BTreeSet<IpAddr>> = BTreeMap::new();
        local.entry(bridge_mac).or_default();
        for e in endpoints.iter() {
            let mac = if e.is_exposed() { Some(bridge_mac) } else { e.mac };
            if let Some(m) = mac {
                local.entry(m).or_default().extend(e.addrs.iter().copied());
            }
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if let Some(update) = self.macs.set_local(local, now_ms) {
            self.channel.broadcast(update);
            self.program();
        }
    }

    /// Path-MTU discovery for a new link to `remote`: from the smallest packet every path
    /// carries up to the underlay interface's MTU.
    fn new_path_mtu(&self, remote: IpAddr) -> PathMtu {
        let overhead = ip_udp_overhead(remote);
        let floor = if remote.is_ipv4() { MIN_PATH_MTU_V4 } else { MIN_PATH_MTU_V6 };
        let ceiling = (self.cfg.underlay_mtu as usize).saturating_sub(overhead);
        PathMtu::new(floor - overhead, ceiling.max(MIN_DATAGRAM))
    }

    fn send_heartbeats(&mut self) {
        self.heartbeat_id = self.heartbeat_id.wrapping_add(1);
        let id = self.heartbeat_id;
        let now = Instant::now();
        for (peer, l) in self.links.iter_mut() {
            if let Some(sock) = self.fastdp.as_ref().filter(|_| l.link.fastdp.disabled.is_none()) {
                for full in [false, true] {
                    let f = heartbeat_frame(
                        l.peer_mac,
                        self.cfg.bridge_mac,
                        self.cfg.me,
                        id,
                        full,
                        self.cfg.mtu,
                    );
                    if let Err(e) = sock.send(&f) {
                        debug!(%peer, error = %e, "fastdp heartbeat not sent");
                    }
                }
            }
            self.sleeve.heartbeat(*peer, id, None);
            for size in l.pmtu.tick(now) {
                self.sleeve.heartbeat(*peer, id, Some(size));
            }
            let size = l.pmtu.size(now);
            if l.hop.datagram.swap(size, Ordering::Relaxed) != size {
                let path_mtu = size + ip_udp_overhead(l.info.remote);
                info!(%peer, path_mtu, datagram = size, "sleeve datagram size changed");
            }
        }
    }

    fn evaluate(&mut self, now: Instant) {
        for (peer, l) in self.links.iter_mut() {
            // Sleeve is confirmed by datagrams of the size in use, which may have just changed.
            if let Some(t) = l.pmtu.confirmed_at(now) {
                l.link.sleeve.ack(t, true);
            }
            if let Some(mode) = l.link.evaluate(now) {
                let path_mtu = l.path_mtu(now);
                let fastdp = l.link.fastdp.describe(
                    "fastdp",
                    now,
                    self.cfg.mtu,
                    self.cfg.fastdp_port,
                    path_mtu,
                );
                info!(%peer, ?mode, %fastdp, "overlay switched");
            }
            let established = l.link.established(now);
            if established != l.established {
                l.established = established;
                self.mesh.set_established(*peer, established);
            }
        }
    }

    /// Puts back the VXLAN device, the TAP port and the VXLAN filter if they were changed or
    /// removed.
    async fn repair_devices(&self) {
        let cfg = self.cfg.clone();
        let fastdp_on = self.fastdp.is_some();
        let kernel = self.kernel.clone();
        let filter = self.vxlan_filter.clone();
        let result = tokio::task::spawn_blocking(move || {
            on_blocking_thread(|| {
                if let Some(f) = &filter {
                    let f = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    kernel.ensure_table(&f.table(), false)?;
                }
                if fastdp_on {
                    let (_, repairs) = kernel.ensure_vxlan(&cfg.vxlan_spec())?;
                    if !repairs.is_empty() {
                        info!(device = %cfg.vxlan, ?repairs, "VXLAN device repaired");
                    }
                }
                kernel.attach_port(&cfg.tap, &cfg.bridge, TAP_MTU)
            })
        })
        .await;
        if let Ok(Err(e)) = result {
            warn!(error = %e, "cannot repair the overlay devices; will retry");
        }
    }

    /// Makes the kernel and the sleeve table match what is known; logs changes.
    fn program(&mut self) {
        let now = Instant::now();
        let remote = self.macs.remote();
        let mode_of = |p: &PeerName| self.links.get(p).map_or(Mode::Relayed, |l| l.link.mode());
        let mut spec = FdbSpec {
            bridge: self.cfg.bridge.clone(),
            vxlan: self.cfg.vxlan.clone(),
            tap: self.cfg.tap.clone(),
            prune: now.duration_since(self.started) >= PRUNE_AFTER,
            ..FdbSpec::default()
        };
        for (peer, l) in &self.links {
            if l.link.fastdp.disabled.is_some() {
                continue;
            }
            spec.vxlan_entries.insert((l.peer_mac, l.info.remote));
            if l.link.mode() == Mode::Fastdp {
                if !self.cfg.password {
                    spec.vxlan_entries.insert((Mac([0; 6]), l.info.remote));
                }
                for (mac, owner) in &remote {
                    if owner == peer {
                        spec.vxlan_entries.insert((*mac, l.info.remote));
                    }
                }
            }
        }
        for (mac, owner) in &remote {
            spec.bridge_entries
                .insert(*mac, if mode_of(owner) == Mode::Fastdp { Port::Vxlan } else { Port::Tap });
        }
        spec.arp = self.macs.remote_ips();
        let modes: Vec<(PeerName, Mode)> =
            self.links.iter().map(|(p, l)| (*p, l.link.mode())).collect();
        self.program_sleeve(&remote, &mode_of);
        self.program_vxlan_filter();
        if let Some(t) = &self.traffic {
            t.refresh(self.fastdp_peers());
        }
        let refused = self.fdb.lock().map_or(0, |o| o.refused);
        let unchanged = refused == 0
            && self.last_programmed.as_ref().is_some_and(|(s, m)| *s == spec && *m == modes);
        if !unchanged && self.fastdp.is_some() {
            let (s, kernel, outcome) = (spec.clone(), self.kernel.clone(), self.fdb.clone());
            tokio::task::spawn_blocking(move || {
                let result = on_blocking_thread(|| kernel.sync_fdb(&s));
                record_fdb_outcome(&outcome, result);
            });
        }
        if !unchanged {
            self.last_programmed = Some((spec, modes));
        }
        self.publish(now);
    }

    /// The underlay addresses of the linked peers fastdp may be used with (IPv4 only).
    fn fastdp_peers(&self) -> BTreeSet<std::net::Ipv4Addr> {
        self.links
            .values()
            .filter(|l| l.link.fastdp.disabled.is_none())
            .filter_map(|l| ipv4(l.info.remote))
            .collect()
    }

    /// Lets VXLAN in from the linked peers fastdp may be used with (IPv4 underlay only).
    fn program_vxlan_filter(&self) {
        let Some(filter) = &self.vxlan_filter else { return };
        let allowed = self.fastdp_peers();
        {
            let mut f = filter.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if f.allowed == allowed {
                return;
            }
            f.allowed = allowed;
        }
        let (filter, kernel) = (filter.clone(), self.kernel.clone());
        tokio::task::spawn_blocking(move || {
            // Applied under the lock, so whichever task runs last installs the latest set.
            let f = filter.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match on_blocking_thread(|| kernel.ensure_table(&f.table(), true)) {
                Ok(()) => debug!(allowed = ?f.allowed, "VXLAN senders updated"),
                Err(e) => warn!(error = %e, "cannot update the VXLAN filter; will retry"),
            }
        });
    }

    fn program_sleeve(
        &self,
        remote: &BTreeMap<Mac, PeerName>,
        mode_of: &dyn Fn(&PeerName) -> Mode,
    ) {
        let routes = self.routes.borrow().clone();
        let mut next_hop: HashMap<PeerName, PeerName> = routes.into_iter().collect();
        for (p, l) in &self.links {
            if l.link.mode() == Mode::Sleeve {
                next_hop.insert(*p, *p);
            }
        }
        let flood = sleeve_flood(next_hop.keys().copied(), self.cfg.password, mode_of);
        self.sleeve.set_table(Table {
            me: Some(self.cfg.me),
            macs: remote.iter().map(|(m, p)| (*m, *p)).collect(),
            flood,
            next_hop,
            hops: self.links.iter().map(|(p, l)| (*p, l.hop.clone())).collect(),
            max_frame: self.cfg.mtu as usize + 14,
            encrypted: self.cfg.password,
        });
    }

    fn publish(&self, now: Instant) {
        let routes = self.routes.borrow();
        let links = self
            .links
            .iter()
            .map(|(p, l)| {
                let (mtu, link, path_mtu) = (self.cfg.mtu, &l.link, l.path_mtu(now));
                let fastdp =
                    link.fastdp.describe("fastdp", now, mtu, self.cfg.fastdp_port, path_mtu);
                // Sleeve adapts its datagrams to the path: the path MTU explains nothing there.
                let sleeve = link.sleeve.describe("sleeve", now, mtu, self.cfg.sleeve_port, None);
                LinkReport {
                    peer: p.to_string(),
                    mode: link.mode(),
                    degraded: link.degraded(now, &fastdp, &sleeve).unwrap_or_default(),
                    fastdp,
                    sleeve,
                    encrypted: l.info.encrypt,
                    path_mtu: path_mtu.unwrap_or(0),
                    sleeve_traffic: l.hop.traffic.report(),
                    fastdp_traffic: match (&self.traffic, ipv4(l.info.remote)) {
                        (Some(t), Some(a)) => t.of(a),
                        _ => Traffic::default(),
                    },
                }
            })
            .collect();
        let relayed = routes
            .iter()
            .filter(|(d, h)| {
                d != h && !self.links.get(d).is_some_and(|l| l.link.mode() != Mode::Relayed)
            })
            .map(|(d, h)| (d.to_string(), h.to_string()))
            .collect();
        let _ = self.report.send(OverlayReport {
            mtu: self.cfg.mtu,
            fastdp: self.fastdp_error.clone().map_or_else(
                || format!("{} (VXLAN VNI {VNI:#x})", self.cfg.vxlan),
                |e| format!("unavailable: {e}"),
            ),
            sleeve_port: self.cfg.sleeve_port,
            fastdp_port: self.cfg.fastdp_port,
            links,
            relayed,
            remote_macs: self.macs.remote().len(),
            sleeve: self.sleeve.stats(),
            fdb_refused: self.fdb.lock().map_or(0, |o| o.refused),
            fdb_error: self.fdb.lock().map(|o| o.error.clone()).unwrap_or_default(),
            remote: self.remote_endpoints(),
        });
    }

    /// Other peers' MACs that carry addresses (a bridge MAC without exposed addresses is
    /// not an endpoint).
    fn remote_endpoints(&self) -> Vec<RemoteEndpoints> {
        self.macs
            .origins()
            .iter()
            .filter(|(p, _)| **p != self.cfg.me)
            .map(|(p, o)| RemoteEndpoints {
                peer: p.to_string(),
                endpoints: o
                    .macs
                    .iter()
                    .filter(|(_, ips)| !ips.is_empty())
                    .map(|(m, ips)| RemoteEndpoint {
                        mac: m.to_string(),
                        addresses: ips.iter().copied().collect(),
                    })
                    .collect(),
            })
            .filter(|r| !r.endpoints.is_empty())
            .collect()
    }
}

/// The sleeve hop for a new link, sending datagrams of `datagram` bytes at first. With a
/// password every hop is encrypted, trusted ones too (sleeve carries floods and relayed
/// frames, which may be for an untrusted peer's endpoint): without both keys there is no hop,
/// never one that would send or accept plaintext.
fn new_hop(info: &LinkInfo, password: bool, datagram: usize) -> Option<Hop> {
    let key = |k: &[u8]| (!k.is_empty()).then(|| Cipher::new(k)).flatten();
    let (send, recv) = (key(&info.our_key), key(&info.their_key));
    if (password || info.encrypt) && (send.is_none() || recv.is_none()) {
        return None;
    }
    Some(Hop {
        addr: SocketAddr::new(info.remote, info.sleeve_port),
        send,
        recv,
        seq: AtomicU64::new(1),
        datagram: AtomicUsize::new(datagram),
        traffic: Default::default(),
    })
}

/// The peers that sleeve sends broadcast, multicast and unknown-unicast frames to, in order:
/// those the VXLAN port does not flood to. With a password it floods to no one (such a frame
/// may be for an untrusted peer's endpoint, and fastdp is unencrypted), so sleeve sends to every
/// reachable peer, encrypted.
fn sleeve_flood(
    reachable: impl Iterator<Item = PeerName>,
    password: bool,
    mode_of: &dyn Fn(&PeerName) -> Mode,
) -> Vec<PeerName> {
    let mut flood: Vec<PeerName> =
        reachable.filter(|p| password || mode_of(p) != Mode::Fastdp).collect();
    flood.sort();
    flood.dedup();
    flood
}

/// Starts the data plane as a subsystem: fed by the mesh's link events, its `macs` channel
/// and data routes, and the endpoint feed. Returns its report feed.
pub async fn start(
    cfg: OverlayConfig,
    hub: &Hub,
    links: Links,
    tasks: &mut Tasks,
) -> Result<watch::Receiver<OverlayReport>, StartError> {
    let kernel = Arc::new(kernel::LinuxOverlay);
    let shutdown = tasks.shutdown().clone();
    let (report, task) =
        DataPlane::start(cfg, kernel, hub.mesh.clone(), links, hub.endpoints.feed(), shutdown)
            .await?;
    tasks.spawn("overlay", task);
    Ok(report)
}

/// The data plane could not start.
#[derive(Debug, thiserror::Error)]
#[error("starting sleeve (TAP {tap}, UDP port {port})")]
pub struct StartError {
    tap: String,
    port: u16,
    #[source]
    source: std::io::Error,
}

/// The endpoint MTU for an underlay MTU: fastdp's encapsulation is the largest fixed cost
/// (sleeve splits frames into datagrams of any size, so it imposes no limit of its own).
pub fn derived_mtu(underlay: u32) -> u32 {
    underlay.saturating_sub(VXLAN_OVERHEAD).max(576)
}

/// An underlay address as IPv4, if it is one (IPv4-mapped IPv6 included).
fn ipv4(a: IpAddr) -> Option<std::net::Ipv4Addr> {
    match a {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    }
}

/// The nftables table (family inet) counting fastdp traffic per peer, next to weft's `table`.
pub fn traffic_table(table: &str) -> String {
    format!("{table}-traffic")
}

/// The nftables table (family inet) of the VXLAN filter, next to weft's own `table`.
pub fn filter_table(table: &str) -> String {
    format!("{table}-overlay")
}

/// The interface names the data plane uses for a bridge (at most 15 characters).
pub fn device_names(bridge: &str) -> (String, String) {
    let short: String = bridge.chars().take(12).collect();
    (format!("{short}-vx"), format!("{short}-sl"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_forwarding_entries_are_kept_for_the_report_until_a_clean_sync() {
        use crate::dataplane::fastdp::FdbChanges;
        let outcome = std::sync::Mutex::new(FdbOutcome::default());
        let refused = FdbChanges {
            added: 7,
            removed: 0,
            failed: 2,
            first_error: Some("adding bridge entry 02:00:00:00:00:01: Invalid argument".into()),
        };
        record_fdb_outcome(&outcome, Ok(refused));
        let o = outcome.lock().unwrap();
        assert_eq!(
            (o.refused, o.error.as_str()),
            (2, "adding bridge entry 02:00:00:00:00:01: Invalid argument")
        );
        drop(o);
        record_fdb_outcome(&outcome, Ok(FdbChanges { added: 2, ..FdbChanges::default() }));
        assert_eq!(outcome.lock().unwrap().refused, 0, "a clean sync clears it");
        record_fdb_outcome(&outcome, Err(crate::dataplane::KernelError::NoBridge("weft".into())));
        assert_eq!(outcome.lock().unwrap().refused, 1, "a failed sync counts as refused");
    }

    #[test]
    fn heartbeats_round_trip() {
        let me = PeerName::new(0x0a0b0c0d0e0f).unwrap();
        let f = heartbeat_frame(Mac([2; 6]), Mac([4; 6]), me, 77, true, 1450);
        assert_eq!(f.len(), 1464);
        assert_eq!(parse_heartbeat(&f), Some((me, 77, true)));
        assert_eq!(parse_heartbeat(&f[..20]), None);
        assert_eq!(ack_seq(5, true) >> 63, 1);
        assert_eq!(ack_seq(5, false), 5);
    }

    #[test]
    fn with_a_password_floods_go_through_sleeve_to_every_peer() {
        let peer = |n| PeerName::new(n).expect("peer name");
        let (fast, slow, relayed) = (peer(3), peer(1), peer(2));
        let mode_of = |p: &PeerName| if *p == fast { Mode::Fastdp } else { Mode::Sleeve };
        let reachable = || [fast, relayed, slow].into_iter();
        assert_eq!(sleeve_flood(reachable(), false, &mode_of), vec![slow, relayed]);
        assert_eq!(sleeve_flood(reachable(), true, &mode_of), vec![slow, relayed, fast]);
    }

    #[test]
    fn encrypted_links_without_valid_keys_get_no_hop() {
        let info = |encrypt, our: &[u8], their: &[u8]| LinkInfo {
            peer: PeerName::new(7).expect("peer name"),
            conn_uid: 1,
            remote: IpAddr::from([10, 0, 0, 2]),
            overlays: vec![],
            fastdp_port: FASTDP_PORT,
            sleeve_port: 6783,
            encrypt,
            our_key: our.to_vec(),
            their_key: their.to_vec(),
        };
        let key = [7u8; 32];
        assert!(new_hop(&info(true, &key, &[]), true, 1400).is_none(), "their key missing");
        assert!(new_hop(&info(true, &[], &key), true, 1400).is_none(), "our key missing");
        assert!(new_hop(&info(true, &key, &[1, 2, 3]), true, 1400).is_none(), "malformed key");
        assert!(new_hop(&info(false, &key, &[]), true, 1400).is_none(), "trusted, password set");
        assert!(new_hop(&info(true, &key, &[]), false, 1400).is_none(), "encrypt without keys");
        let hop = new_hop(&info(true, &key, &key), true, 1400).expect("both keys");
        assert!(hop.send.is_some() && hop.recv.is_some());
        let plain = new_hop(&info(false, &[], &[]), false, 1400).expect("no password");
        assert!(plain.send.is_none() && plain.recv.is_none());
    }

    #[test]
    fn device_names_fit() {
        let (vx, sl) = device_names("a-very-long-bridge-name");
        assert!(vx.len() <= 15 && sl.len() <= 15);
        assert_eq!(device_names("weft"), ("weft-vx".to_owned(), "weft-sl".to_owned()));
        assert_eq!(derived_mtu(1500), 1450);
    }
}
