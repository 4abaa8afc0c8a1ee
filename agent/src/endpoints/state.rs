//! The owner of the endpoint records, the IP allocation state and the bridge's own addresses.
//! It runs on one dedicated thread and is reached only through [`StateHandle::call`] (private
//! to `endpoints/`: the rest of the agent uses `Endpoints` and `IpamHandle`), so every change
//! is serialized, and every change is persisted before the caller hears about it. The
//! bridge and the firewall table are derived from this state, so they are (re)programmed from
//! here too: nobody can apply an older picture over a newer one. After every call the IPAM's
//! ring is persisted if it changed and only then are its messages sent to other peers, so a
//! peer never tells others about space it could forget in a crash.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::error::EndpointError;
use super::record::{
    DOCKER_PREFIX, EXPOSE_ID, EndpointRecord, EndpointSummary, Kind, PodRef, Route, docker_id,
};
use super::report::{BridgeReport, EndpointCounts, EndpointEntry, IpamReport, PodAddresses};
use crate::addr::AddrRequest;
use crate::dataplane::coexist::{DOCKER_USER, DockerUser, ForwardAccept};
use crate::dataplane::nft::{L4, OverlayFirewall, Table as NftTable};
use crate::dataplane::{BridgeSpec, Dataplane, Mac, host_ifname_for};
use crate::identity::PeerName;
use crate::ipam::manager::{PersistedRing, Send as IpamSend};
use crate::ipam::{Allocator, Ipam, IpamError, Wait};
use crate::mesh::gossip::{GossipSender, SendKind};
use crate::store::{Op, Store, Table};

/// Fixed settings of the state owner.
#[derive(Clone, Debug)]
pub struct StateConfig {
    pub bridge: String,
    pub bridge_mac: Mac,
    pub mtu: u32,
    pub firewall_table: String,
    /// The agent's ports pods must not reach (see [`OverlayFirewall::guarded`]).
    pub guarded_ports: Vec<(L4, u16)>,
    /// The ports DNS answers TCP on, where pods' connections are capped
    /// (see [`OverlayFirewall::dns_tcp`]).
    pub dns_tcp_ports: Vec<u16>,
}

/// A CNI ADD as the state needs it.
#[derive(Clone, Debug)]
pub struct CniReserve {
    pub container_id: String,
    pub ifname: String,
    pub netns: PathBuf,
    pub network: String,
    pub mtu: Option<u32>,
    pub hairpin: bool,
    pub pod: Option<PodRef>,
    pub requests: Vec<AddrRequest>,
}

/// A `weft attach`.
#[derive(Clone, Debug)]
pub struct AttachReserve {
    pub id: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub requests: Vec<AddrRequest>,
    pub hostname: Option<String>,
    /// Route 224.0.0.0/4 over the interface (Weave's default for attached containers).
    pub multicast_route: bool,
}

/// The state owner.
pub struct State {
    store: Arc<Store>,
    dp: Arc<dyn Dataplane>,
    cfg: StateConfig,
    records: BTreeMap<String, EndpointRecord>,
    ipam: Ipam,
    /// The mesh channel IPAM messages go out on (none until the mesh runs).
    ipam_out: Option<GossipSender>,
    /// Bumped whenever waiting allocations may now succeed.
    ipam_changes: watch::Sender<u64>,
    /// The origin of the IPAM's clock.
    epoch: std::time::Instant,
    /// Endpoints as other subsystems see them, and whether that is behind the records.
    summaries: watch::Sender<Arc<Vec<EndpointSummary>>>,
    summaries_stale: bool,
    last_bridge_repairs: Vec<String>,
    /// What weft last wrote to Docker's `DOCKER-USER` (none since start: written again once).
    forward_written: Option<ForwardAccept>,
    /// Why weft's forwarded traffic is being dropped by rules weft cannot change, if it is.
    forward_warning: Option<String>,
    /// Keys of endpoint records that did not decode at start (moved aside, see
    /// [`Store::all_or_quarantine`]).
    quarantined: Vec<String>,
    /// Addresses `docker::reconcile` released, until when (IPAM clock) they are not handed out
    /// by `RequestAddress` without `--ip`: a `ReleaseAddress` dockerd is still retrying for
    /// them must not release a new container's address.
    docker_cooling: BTreeMap<IpAddr, u64>,
}

/// How long a reconciled Docker address is not handed out again (dockerd retries a call for
/// ≈15 s), in milliseconds.
const DOCKER_COOLING_MS: u64 = 30_000;

/// The key of the persisted ring in [`Table::Ipam`].
const RING_KEY: &str = "ring";

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State").field("records", &self.records.len()).finish_non_exhaustive()
    }
}

/// 224.0.0.0/4: multicast groups, routed on-link over the weft interface.
fn multicast_net() -> IpNet {
    IpNet::V4(ipnet::Ipv4Net::new_assert(std::net::Ipv4Addr::new(224, 0, 0, 0), 4))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl State {
    /// Loads the records and the ring, and rebuilds the allocation state from them.
    pub fn load(
        store: Arc<Store>,
        dp: Arc<dyn Dataplane>,
        cfg: StateConfig,
        ipam_cfg: crate::ipam::IpamConfig,
    ) -> Result<State, EndpointError> {
        let persisted: Option<PersistedRing> = match store.get(Table::Ipam, RING_KEY) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "the persisted ring is unreadable; starting without it");
                None
            }
        };
        let (mut ipam, note) = Ipam::new(ipam_cfg, persisted);
        if let Some(note) = note {
            warn!("{note}");
        }
        let (loaded, quarantined): (Vec<(String, EndpointRecord)>, _) =
            store.all_or_quarantine(Table::Endpoints)?;
        for key in &quarantined {
            warn!(
                endpoint = %key,
                "an endpoint record does not decode; moved to the store's quarantine table \
                 (its addresses are not reserved, its interface is left alone)"
            );
        }
        let mut records = BTreeMap::new();
        for (id, rec) in loaded {
            for a in &rec.addresses {
                ipam.restore(&id, *a, 0);
            }
            records.insert(id, rec);
        }
        info!(
            endpoints = records.len(),
            used = ipam.allocator().used_count(),
            ring = ipam.ready(),
            "loaded persisted endpoints and allocations"
        );
        Ok(State {
            store,
            dp,
            cfg,
            records,
            ipam,
            ipam_out: None,
            ipam_changes: watch::channel(0).0,
            epoch: std::time::Instant::now(),
            summaries: watch::channel(Arc::new(Vec::new())).0,
            summaries_stale: true,
            last_bridge_repairs: Vec::new(),
            forward_written: None,
            forward_warning: None,
            quarantined,
            docker_cooling: BTreeMap::new(),
        })
    }

    /// Milliseconds on the IPAM's clock.
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Where IPAM messages go from now on.
    pub fn connect_ipam(&mut self, out: GossipSender) {
        self.ipam_out = Some(out);
    }

    /// Bumped whenever a waiting allocation may now succeed.
    pub fn ipam_changes(&self) -> watch::Receiver<u64> {
        self.ipam_changes.subscribe()
    }

    /// The endpoint feed.
    pub fn endpoint_summaries(&mut self) -> watch::Receiver<Arc<Vec<EndpointSummary>>> {
        self.publish_summaries();
        self.summaries.subscribe()
    }

    /// After every call that changed records: a new summary for subscribers.
    fn publish_summaries(&mut self) {
        if !std::mem::take(&mut self.summaries_stale) {
            return;
        }
        let now: Vec<EndpointSummary> = self
            .records
            .values()
            .filter(|r| r.kind != Kind::Reservation)
            .map(EndpointSummary::of)
            .collect();
        self.summaries.send_if_modified(|held| {
            if **held == now {
                return false;
            }
            *held = Arc::new(now);
            true
        });
    }

    /// Sets or clears the DNS name of an endpoint; returns whether the endpoint exists.
    pub fn set_hostname(
        &mut self,
        id: &str,
        hostname: Option<String>,
    ) -> Result<bool, EndpointError> {
        let Some(rec) = self.records.get(id) else { return Ok(false) };
        if rec.hostname == hostname {
            return Ok(true);
        }
        let rec = EndpointRecord { hostname, ..rec.clone() };
        self.persist(&[&rec], &[])?;
        self.records.insert(id.to_owned(), rec);
        Ok(true)
    }

    /// Sets the DNS name and the further names of endpoint `id`; false if there is none.
    pub fn set_names(
        &mut self,
        id: &str,
        hostname: Option<String>,
        aliases: Vec<String>,
    ) -> Result<bool, EndpointError> {
        let Some(rec) = self.records.get(id) else { return Ok(false) };
        if rec.hostname == hostname && rec.aliases == aliases {
            return Ok(true);
        }
        let rec = EndpointRecord { hostname, aliases, ..rec.clone() };
        self.persist(&[&rec], &[])?;
        self.records.insert(id.to_owned(), rec);
        Ok(true)
    }

    /// After every call: persist the ring if it changed, then send what the IPAM has to say,
    /// then wake waiting allocations.
    fn flush_ipam(&mut self) {
        let outbox = self.ipam.take_outbox();
        if let Some(ring) = self.ipam.take_ring_dirty() {
            let written = Op::put(Table::Ipam, RING_KEY.to_owned(), &ring)
                .and_then(|op| self.store.write(&[op]));
            if let Err(e) = written {
                // Nothing may leave that a crash could make us forget; the periodic tick
                // tries again and the protocol repeats what was dropped.
                warn!(error = %e, "cannot persist the IP allocation ring; holding back its messages");
                self.ipam.mark_ring_dirty();
                return;
            }
        }
        if let Some(out) = &self.ipam_out {
            for msg in outbox {
                let (kind, payload) = match msg {
                    IpamSend::Gossip { except, payload } => {
                        (SendKind::Gossip { exclude: except }, payload)
                    }
                    IpamSend::Broadcast(payload) => (SendKind::Broadcast, payload),
                    IpamSend::Unicast(peer, payload) => (SendKind::Unicast(peer), payload),
                };
                out.send(kind, payload);
            }
        }
        if self.ipam.take_changed() {
            self.ipam_changes.send_modify(|g| *g = g.wrapping_add(1));
        }
    }

    /// A message from another peer on the `ipam` channel.
    pub fn ipam_message(&mut self, src: PeerName, payload: &[u8], gossiped: bool) {
        let now = self.now();
        if let Err(e) = self.ipam.handle(src, payload, gossiped, now) {
            warn!(from = %src, error = %e, "IP allocation message refused");
        }
    }

    /// A new neighbour on the `ipam` channel.
    pub fn ipam_peer_up(&mut self, peer: PeerName) {
        self.ipam.peer_up(peer);
    }

    /// The peers reachable now, and the nicknames of the peers known.
    pub fn ipam_peers(
        &mut self,
        alive: std::collections::BTreeSet<PeerName>,
        nicknames: Vec<(PeerName, String)>,
    ) {
        let now = self.now();
        self.ipam.note_nicknames(nicknames);
        self.ipam.set_alive(alive, now);
    }

    /// The peer a name or nickname stands for (also peers that are gone).
    pub fn ipam_resolve(&self, name_or_nick: &str) -> Result<PeerName, String> {
        self.ipam.resolve(name_or_nick)
    }

    /// Periodic IPAM work (repeats, hints, anti-entropy).
    pub fn ipam_tick(&mut self) {
        let now = self.now();
        self.ipam.tick(now);
    }

    /// `weft prime`: starts forming the ring; `Err` while it is not there.
    pub fn ipam_prime(&mut self) -> Result<(), Wait> {
        let now = self.now();
        self.ipam.prime(now)
    }

    /// `weft rmpeer`: takes over a dead peer's ranges.
    pub fn ipam_rmpeer(&mut self, peer: PeerName) -> Result<u128, IpamError> {
        let moved = self.ipam.rmpeer(peer)?;
        info!(peer = %peer, addresses = moved, "took over the ranges of a removed peer");
        Ok(moved)
    }

    /// `weft reset`: hands this peer's ranges to another; the heir, if there is one.
    pub fn ipam_leave(&mut self) -> Option<PeerName> {
        self.ipam.leave()
    }

    pub fn ipam_handed_over(&self) -> bool {
        self.ipam.handed_over()
    }

    pub fn record(&self, id: &str) -> Option<EndpointRecord> {
        self.records.get(id).cloned()
    }

    pub fn records(&self) -> Vec<EndpointRecord> {
        self.records.values().cloned().collect()
    }

    fn persist(&mut self, recs: &[&EndpointRecord], deleted: &[&str]) -> Result<(), EndpointError> {
        self.summaries_stale = true;
        let mut ops = Vec::new();
        // A ring that changed with these records (space received) is written with them.
        let ring = self.ipam.take_ring_dirty();
        if let Some(ring) = &ring {
            ops.push(Op::put(Table::Ipam, RING_KEY.to_owned(), ring)?);
        }
        for r in recs {
            ops.push(Op::put(Table::Endpoints, r.id.clone(), *r)?);
        }
        for id in deleted {
            ops.push(Op::Delete(Table::Endpoints, (*id).to_owned()));
        }
        let written = self.store.write(&ops);
        if written.is_err() && ring.is_some() {
            self.ipam.mark_ring_dirty();
        }
        Ok(written?)
    }

    /// Resolves a static address without prefix to the prefix of its subnet.
    fn with_prefix(&self, net: IpNet) -> IpNet {
        if net.prefix_len() != 0 {
            return net;
        }
        let ip = net.addr();
        let len = if self.ipam.default_subnet().contains(&ip) {
            self.ipam.default_subnet().prefix_len()
        } else if self.ipam.range().contains(&ip) {
            self.ipam.range().prefix_len()
        } else {
            IpNet::from(ip).prefix_len()
        };
        IpNet::new(ip, len).unwrap_or_else(|_| IpNet::from(ip))
    }

    /// Gives `id` an address for `req`, reusing one it already has in the same subnet.
    fn assign(
        &mut self,
        id: &str,
        have: &[IpNet],
        req: AddrRequest,
    ) -> Result<(IpNet, bool), EndpointError> {
        let subnet = match req {
            AddrRequest::Default => self.ipam.default_subnet(),
            AddrRequest::Subnet(n) => n,
            AddrRequest::Static(n) => {
                let n = self.with_prefix(n);
                if have.iter().any(|h| h.addr() == n.addr()) {
                    return Ok((n, false));
                }
                let now = self.now();
                self.ipam.claim(id, n, now)?;
                return Ok((n, true));
            }
        };
        if let Some(h) = have
            .iter()
            .find(|h| subnet.contains(&h.addr()) && h.prefix_len() == subnet.prefix_len())
        {
            return Ok((*h, false));
        }
        let now = self.now();
        Ok((self.ipam.allocate(id, subnet, now)?, true))
    }

    /// Assigns all requests or none.
    fn assign_all(
        &mut self,
        id: &str,
        have: &[IpNet],
        reqs: &[AddrRequest],
    ) -> Result<Vec<(IpNet, bool)>, EndpointError> {
        let mut out: Vec<(IpNet, bool)> = Vec::new();
        for r in reqs {
            let mut known: Vec<IpNet> = have.to_vec();
            known.extend(out.iter().map(|(n, _)| *n));
            match self.assign(id, &known, *r) {
                Ok(a) => out.push(a),
                Err(e) => {
                    for (n, new) in &out {
                        if *new {
                            self.ipam.release(n.addr());
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    /// The subnet an address request allocates in.
    fn subnet_of(&self, req: AddrRequest) -> Option<IpNet> {
        match req {
            AddrRequest::Default => Some(self.ipam.default_subnet()),
            AddrRequest::Subnet(n) => Some(n),
            AddrRequest::Static(n) => Some(self.with_prefix(n).trunc()),
        }
    }

    /// The bridge address that serves as gateway in `subnet`, exposing one if needed.
    fn gateway_for(&mut self, subnet: IpNet) -> Result<Option<IpAddr>, EndpointError> {
        let exposed = self.records.get(EXPOSE_ID).map(|r| r.addresses.clone()).unwrap_or_default();
        if let Some(gw) = exposed.iter().find(|e| e.trunc() == subnet) {
            return Ok(Some(gw.addr()));
        }
        if self.ipam.validate_subnet(subnet).is_err() {
            return Ok(None); // outside the range: weft cannot pick a gateway there
        }
        let (added, _) = self.expose(&[AddrRequest::Subnet(subnet)], None)?;
        Ok(added.first().map(IpNet::addr))
    }

    /// CNI ADD, allocation half: the record to set up (existing one if the ADD is repeated).
    pub fn reserve_cni(&mut self, req: CniReserve) -> Result<EndpointRecord, EndpointError> {
        let id = super::record::cni_id(&req.container_id, &req.ifname);
        if let Some(existing) = self.records.get(&id) {
            if existing.netns.as_ref() == Some(&req.netns) {
                return Ok(existing.clone());
            }
            // Same attachment, new namespace (the runtime re-created the sandbox): keep the
            // addresses, move the interface.
            let mut moved = existing.clone();
            moved.netns = Some(req.netns);
            self.persist(&[&moved], &[])?;
            self.records.insert(id, moved.clone());
            return Ok(moved);
        }
        let reqs =
            if req.requests.is_empty() { vec![AddrRequest::Default] } else { req.requests.clone() };
        // The gateway first, so that the bridge gets the first address of a fresh subnet.
        let gateway = match self.subnet_of(reqs[0]) {
            Some(subnet) if subnet.addr().is_ipv4() => self.gateway_for(subnet)?,
            _ => None,
        };
        let assigned = self.assign_all(&id, &[], &reqs)?;
        let addresses: Vec<IpNet> = assigned.iter().map(|(n, _)| *n).collect();
        let first_v4 = addresses.iter().find(|a| a.addr().is_ipv4()).copied();
        let routes = gateway
            .map(|gw| {
                vec![Route {
                    destination: IpNet::new(IpAddr::from([0u8; 4]), 0).unwrap_or_default(),
                    gateway: Some(gw),
                }]
            })
            .unwrap_or_default();
        let rec = EndpointRecord {
            id: id.clone(),
            kind: Kind::Cni,
            netns: Some(req.netns),
            ifname: req.ifname,
            host_ifname: host_ifname_for(&id),
            addresses,
            routes,
            mtu: req.mtu.unwrap_or(self.cfg.mtu),
            hairpin: req.hairpin,
            network: Some(req.network),
            container_id: Some(req.container_id),
            pod: req.pod,
            hostname: None,
            aliases: Vec::new(),
            mac: first_v4.and_then(|a| match a.addr() {
                IpAddr::V4(v4) => Some(Mac::for_ipv4(v4)),
                IpAddr::V6(_) => None,
            }),
            host_mac: None,
            created: now_secs(),
        };
        if let Err(e) = self.persist(&[&rec], &[]) {
            self.ipam.release_owner(&id);
            return Err(e);
        }
        self.records.insert(id, rec.clone());
        Ok(rec)
    }

    // ---- Docker's remote IPAM and network driver (docs/docker.md) ----

    /// `RequestPool`: the subnet a Docker network allocates in (`None`: the default subnet).
    pub fn docker_pool(&self, subnet: Option<IpNet>) -> Result<IpNet, EndpointError> {
        let subnet = subnet.unwrap_or_else(|| self.ipam.default_subnet());
        self.ipam.validate_subnet(subnet)?;
        Ok(subnet)
    }

    /// The gateway of a Docker network: the bridge's address in `subnet`, exposed if needed.
    pub fn docker_gateway(&mut self, subnet: IpNet) -> Result<IpNet, EndpointError> {
        match self.gateway_for(subnet)? {
            Some(gw) => Ok(IpNet::new(gw, subnet.prefix_len()).unwrap_or(subnet)),
            None => Err(EndpointError::invalid(
                "subnet",
                format!("weft cannot choose a gateway in {subnet}"),
            )),
        }
    }

    /// `RequestAddress`: `addr` (Docker's `--ip`) or the lowest free address of `subnet`,
    /// held by the reservation [`docker_id`] until Docker's Join.
    pub fn docker_request(
        &mut self,
        subnet: IpNet,
        addr: Option<IpAddr>,
    ) -> Result<IpNet, EndpointError> {
        let now = self.now();
        let net = match addr {
            Some(a) => {
                if !subnet.contains(&a) {
                    return Err(EndpointError::invalid(
                        "address",
                        format!("{a} is outside the network's subnet {subnet}"),
                    ));
                }
                let net = IpNet::new(a, subnet.prefix_len()).unwrap_or(subnet);
                // Docker does not replay its requests (RequiresRequestReplay is off), so a
                // second request for a held address is another container's.
                if self.records.contains_key(&docker_id(a)) {
                    return Err(IpamError::Conflict { addr: a, owner: docker_id(a) }.into());
                }
                self.ipam.claim(&docker_id(a), net, now)?;
                net
            }
            None => {
                let net = self.docker_allocate(subnet, now)?;
                self.ipam.rename(net.addr(), &docker_id(net.addr()));
                net
            }
        };
        let id = docker_id(net.addr());
        let rec =
            EndpointRecord { addresses: vec![net], ..self.blank_record(&id, Kind::Reservation) };
        if let Err(e) = self.persist(&[&rec], &[]) {
            self.ipam.release(net.addr());
            return Err(e);
        }
        self.records.insert(id, rec);
        Ok(net)
    }

    /// The lowest free address of `subnet` that is not cooling, held by a pending owner; a
    /// cooling one only if nothing else is free.
    fn docker_allocate(&mut self, subnet: IpNet, now: u64) -> Result<IpNet, EndpointError> {
        const PENDING: &str = "docker:pending";
        self.docker_cooling.retain(|_, until| *until > now);
        let mut cooling = Vec::new();
        let got = loop {
            match self.ipam.allocate(PENDING, subnet, now) {
                Ok(n) if self.docker_cooling.contains_key(&n.addr()) => cooling.push(n),
                Ok(n) => break Ok(n),
                Err(e) => break cooling.first().copied().ok_or(e),
            }
        };
        for n in cooling.iter().filter(|n| got.as_ref().ok() != Some(*n)) {
            self.ipam.release(n.addr());
        }
        Ok(got?)
    }

    /// Forgets a `docker:` record Docker no longer has (the caller removed its interface);
    /// its address cools before `RequestAddress` hands it out again.
    pub fn docker_forget(&mut self, id: &str) -> Result<Option<EndpointRecord>, EndpointError> {
        let removed = self.remove(id)?;
        let until = self.now() + DOCKER_COOLING_MS;
        for a in removed.iter().flat_map(|r| r.addresses.iter()) {
            self.docker_cooling.insert(a.addr(), until);
        }
        Ok(removed)
    }

    /// `CreateEndpoint`: ties the address Docker's IPAM gave out to Docker's endpoint. An
    /// address from another IPAM driver is claimed here.
    pub fn docker_bind(
        &mut self,
        addr: IpNet,
        endpoint: &str,
        network: &str,
    ) -> Result<EndpointRecord, EndpointError> {
        let id = docker_id(addr.addr());
        let mut rec = match self.records.get(&id) {
            Some(r) => r.clone(),
            None => {
                let now = self.now();
                self.ipam.claim(&id, addr, now)?;
                EndpointRecord {
                    addresses: vec![addr],
                    ..self.blank_record(&id, Kind::Reservation)
                }
            }
        };
        if rec.container_id.as_deref().is_some_and(|e| e != endpoint) {
            return Err(EndpointError::invalid(
                "address",
                format!("{} is already used by another Docker endpoint", addr.addr()),
            ));
        }
        rec.container_id = Some(endpoint.to_owned());
        rec.network = Some(network.to_owned());
        // Docker stores the endpoint only after this answer: `docker::reconcile` leaves the
        // record alone for a while from now.
        rec.created = now_secs();
        self.persist(&[&rec], &[])?;
        self.records.insert(id, rec.clone());
        Ok(rec)
    }

    /// The record Docker's endpoint `endpoint` uses.
    pub fn docker_endpoint(&self, endpoint: &str) -> Option<EndpointRecord> {
        self.records
            .values()
            .find(|r| {
                r.id.starts_with(DOCKER_PREFIX) && r.container_id.as_deref() == Some(endpoint)
            })
            .cloned()
    }

    /// `Join`, allocation half: the endpoint to set up in the sandbox `netns`.
    pub fn docker_join(
        &mut self,
        endpoint: &str,
        netns: PathBuf,
    ) -> Result<EndpointRecord, EndpointError> {
        let rec = self
            .docker_endpoint(endpoint)
            .ok_or_else(|| EndpointError::Unknown(format!("Docker endpoint {endpoint}")))?;
        if rec.kind == Kind::Docker && rec.netns.as_ref() == Some(&netns) {
            return Ok(rec);
        }
        let addr = rec
            .addresses
            .first()
            .copied()
            .ok_or_else(|| EndpointError::Unknown(format!("Docker endpoint {endpoint}")))?;
        let gateway = match addr.addr() {
            IpAddr::V4(_) => self.gateway_for(addr.trunc())?,
            IpAddr::V6(_) => None,
        };
        // Docker numbers its own interfaces eth0, eth1...; ours are ethwe0, ethwe1... so that
        // a container on several networks gets no clash.
        let taken = self
            .records
            .values()
            .filter(|r| r.kind == Kind::Docker && r.netns.as_ref() == Some(&netns))
            .count();
        let joined = EndpointRecord {
            kind: Kind::Docker,
            netns: Some(netns),
            ifname: format!("ethwe{taken}"),
            host_ifname: host_ifname_for(&rec.id),
            routes: gateway
                .map(|gw| {
                    vec![Route {
                        destination: IpNet::new(IpAddr::from([0u8; 4]), 0).unwrap_or_default(),
                        gateway: Some(gw),
                    }]
                })
                .unwrap_or_default(),
            mtu: self.cfg.mtu,
            mac: match addr.addr() {
                IpAddr::V4(v4) => Some(Mac::for_ipv4(v4)),
                IpAddr::V6(_) => None,
            },
            // The time of the Join: reconciliation leaves the sandbox alone for a while, as
            // it appears only after Join (see `Endpoints::reconcile`).
            created: now_secs(),
            hostname: None,
            aliases: Vec::new(),
            ..rec
        };
        self.persist(&[&joined], &[])?;
        self.records.insert(joined.id.clone(), joined.clone());
        Ok(joined)
    }

    /// `Leave`, after the interface is gone: the endpoint is a reservation again until
    /// Docker releases its address.
    pub fn docker_unjoin(&mut self, id: &str) -> Result<(), EndpointError> {
        let Some(rec) = self.records.get(id) else { return Ok(()) };
        let left = EndpointRecord {
            kind: Kind::Reservation,
            netns: None,
            ifname: String::new(),
            host_ifname: String::new(),
            routes: Vec::new(),
            host_mac: None,
            hostname: None,
            aliases: Vec::new(),
            // Docker's ReleaseAddress follows; `docker::reconcile` waits for it from now.
            created: now_secs(),
            ..rec.clone()
        };
        self.persist(&[&left], &[])?;
        self.records.insert(id.to_owned(), left);
        Ok(())
    }

    /// Remembers the MACs the kernel reported (shown by `weft ps`; not needed for recovery,
    /// so written without forcing an extra sync ordering on anyone).
    pub fn note_macs(&mut self, id: &str, host_mac: Mac, mac: Mac) {
        if let Some(r) = self.records.get_mut(id) {
            if r.host_mac != Some(host_mac) || r.mac != Some(mac) {
                r.host_mac = Some(host_mac);
                r.mac = Some(mac);
                let r = r.clone();
                if let Err(e) = self.persist(&[&r], &[]) {
                    warn!(endpoint = %id, error = %e, "could not persist MAC addresses");
                }
            }
        }
    }

    /// Forgets an endpoint and releases its addresses. The caller has removed its interface.
    pub fn remove(&mut self, id: &str) -> Result<Option<EndpointRecord>, EndpointError> {
        if !self.records.contains_key(id) {
            return Ok(None);
        }
        self.persist(&[], &[id])?;
        self.ipam.release_owner(id);
        Ok(self.records.remove(id))
    }

    /// `weft attach`, allocation half: the record with every requested address, and which
    /// of them are new.
    pub fn reserve_attach(
        &mut self,
        req: AttachReserve,
    ) -> Result<(EndpointRecord, Vec<IpNet>), EndpointError> {
        let have = self.records.get(&req.id).map(|r| r.addresses.clone()).unwrap_or_default();
        let reqs =
            if req.requests.is_empty() { vec![AddrRequest::Default] } else { req.requests.clone() };
        let assigned = self.assign_all(&req.id, &have, &reqs)?;
        let added: Vec<IpNet> =
            assigned.iter().filter(|(n, _)| !have.contains(n)).map(|(n, _)| *n).collect();
        let mut rec = self.records.get(&req.id).cloned().unwrap_or_else(|| EndpointRecord {
            netns: Some(req.netns.clone()),
            ifname: req.ifname.clone(),
            host_ifname: host_ifname_for(&req.id),
            ..self.blank_record(&req.id, Kind::Attach)
        });
        rec.addresses.extend(added.iter().copied());
        if rec.mac.is_none() {
            rec.mac = rec.addresses.iter().find_map(|a| match a.addr() {
                IpAddr::V4(v4) => Some(Mac::for_ipv4(v4)),
                IpAddr::V6(_) => None,
            });
        }
        if req.hostname.is_some() {
            rec.hostname = req.hostname;
        }
        let multicast = Route { destination: multicast_net(), gateway: None };
        if req.multicast_route && !rec.routes.contains(&multicast) {
            rec.routes.push(multicast);
        }
        if let Err(e) = self.persist(&[&rec], &[]) {
            for a in &added {
                self.ipam.release(a.addr());
            }
            return Err(e);
        }
        self.records.insert(req.id, rec.clone());
        Ok((rec, added))
    }

    /// A record of `kind` for `id` with no addresses, interface or routes yet.
    fn blank_record(&self, id: &str, kind: Kind) -> EndpointRecord {
        EndpointRecord {
            id: id.to_owned(),
            kind,
            netns: None,
            ifname: String::new(),
            host_ifname: String::new(),
            addresses: Vec::new(),
            routes: Vec::new(),
            mtu: self.cfg.mtu,
            hairpin: false,
            network: None,
            container_id: None,
            pod: None,
            hostname: None,
            aliases: Vec::new(),
            mac: None,
            host_mac: None,
            created: now_secs(),
        }
    }

    /// `Reserve`: addresses for `id` without an interface; idempotent.
    pub fn reserve(&mut self, id: &str, reqs: &[AddrRequest]) -> Result<Vec<IpNet>, EndpointError> {
        let have = match self.records.get(id) {
            Some(r) if r.kind != Kind::Reservation => {
                return Err(EndpointError::invalid(
                    "id",
                    format!("{id} is an endpoint, not a reservation"),
                ));
            }
            Some(r) => r.addresses.clone(),
            None => Vec::new(),
        };
        let reqs = if reqs.is_empty() { vec![AddrRequest::Default] } else { reqs.to_vec() };
        let assigned = self.assign_all(id, &have, &reqs)?;
        let named: Vec<IpNet> = assigned.iter().map(|(n, _)| *n).collect();
        let mut rec = self
            .records
            .get(id)
            .cloned()
            .unwrap_or_else(|| self.blank_record(id, Kind::Reservation));
        let added: Vec<IpNet> = named.iter().filter(|n| !have.contains(n)).copied().collect();
        if added.is_empty() {
            return Ok(named);
        }
        rec.addresses.extend(added.iter().copied());
        if let Err(e) = self.persist(&[&rec], &[]) {
            for a in &added {
                self.ipam.release(a.addr());
            }
            return Err(e);
        }
        self.records.insert(id.to_owned(), rec);
        Ok(named)
    }

    /// Which of `id`'s addresses `reqs` name (all when empty). No IPAM interaction: detaching
    /// must work even when allocation is impossible.
    fn select(&self, rec: &EndpointRecord, reqs: &[AddrRequest]) -> Vec<IpNet> {
        if reqs.is_empty() {
            return rec.addresses.clone();
        }
        rec.addresses
            .iter()
            .filter(|a| {
                reqs.iter().any(|r| match r {
                    AddrRequest::Default => self.ipam.default_subnet().contains(&a.addr()),
                    AddrRequest::Subnet(n) => n.contains(&a.addr()),
                    AddrRequest::Static(n) => n.addr() == a.addr(),
                })
            })
            .copied()
            .collect()
    }

    /// Addresses of `id` that a detach of `reqs` would remove.
    pub fn detach_selection(
        &self,
        id: &str,
        reqs: &[AddrRequest],
    ) -> Option<(EndpointRecord, Vec<IpNet>)> {
        let rec = self.records.get(id)?;
        Some((rec.clone(), self.select(rec, reqs)))
    }

    /// Drops `addrs` from `id` (the caller removed them from the interface).
    pub fn drop_addresses(&mut self, id: &str, addrs: &[IpNet]) -> Result<(), EndpointError> {
        let Some(mut rec) = self.records.get(id).cloned() else { return Ok(()) };
        rec.addresses.retain(|a| !addrs.contains(a));
        self.persist(&[&rec], &[])?;
        for a in addrs {
            self.ipam.release(a.addr());
        }
        self.records.insert(id.to_owned(), rec);
        Ok(())
    }

    /// Puts addresses on the bridge (`weft expose`); idempotent. Returns the addresses the
    /// request names and the full exposed list.
    pub fn expose(
        &mut self,
        reqs: &[AddrRequest],
        hostname: Option<String>,
    ) -> Result<(Vec<IpNet>, Vec<IpNet>), EndpointError> {
        let have = self.records.get(EXPOSE_ID).map(|r| r.addresses.clone()).unwrap_or_default();
        let reqs = if reqs.is_empty() { vec![AddrRequest::Default] } else { reqs.to_vec() };
        let assigned = self.assign_all(EXPOSE_ID, &have, &reqs)?;
        let named: Vec<IpNet> = assigned.iter().map(|(n, _)| *n).collect();
        let mut rec = self.records.get(EXPOSE_ID).cloned().unwrap_or_else(|| EndpointRecord {
            ifname: self.cfg.bridge.clone(),
            mac: Some(self.cfg.bridge_mac),
            ..self.blank_record(EXPOSE_ID, Kind::Expose)
        });
        let before = (rec.addresses.len(), rec.hostname.clone());
        for n in &named {
            if !rec.addresses.contains(n) {
                rec.addresses.push(*n);
            }
        }
        if hostname.is_some() {
            rec.hostname = hostname;
        }
        if (rec.addresses.len(), rec.hostname.clone()) != before {
            if let Err(e) = self.persist(&[&rec], &[]) {
                for (n, new) in &assigned {
                    if *new {
                        self.ipam.release(n.addr());
                    }
                }
                return Err(e);
            }
            self.records.insert(EXPOSE_ID.to_owned(), rec.clone());
            self.reprogram_bridge();
        }
        Ok((named, rec.addresses))
    }

    /// Removes addresses from the bridge (`weft hide`); all when `reqs` is empty.
    pub fn hide(&mut self, reqs: &[AddrRequest]) -> Result<Vec<IpNet>, EndpointError> {
        let Some(rec) = self.records.get(EXPOSE_ID) else { return Ok(Vec::new()) };
        let removed = self.select(rec, reqs);
        if removed.is_empty() {
            return Ok(removed);
        }
        let mut rec = rec.clone();
        rec.addresses.retain(|a| !removed.contains(a));
        if rec.addresses.is_empty() {
            self.persist(&[], &[EXPOSE_ID])?;
            self.records.remove(EXPOSE_ID);
        } else {
            self.persist(&[&rec], &[])?;
            self.records.insert(EXPOSE_ID.to_owned(), rec);
        }
        for a in &removed {
            self.ipam.release(a.addr());
        }
        self.reprogram_bridge();
        Ok(removed)
    }

    pub fn exposed(&self) -> Vec<IpNet> {
        self.records.get(EXPOSE_ID).map(|r| r.addresses.clone()).unwrap_or_default()
    }

    pub fn bridge_spec(&self) -> BridgeSpec {
        BridgeSpec {
            name: self.cfg.bridge.clone(),
            mtu: self.cfg.mtu,
            mac: self.cfg.bridge_mac,
            addresses: self.exposed(),
        }
    }

    /// weft's nftables table for the current range and exposed subnets (IPv4).
    pub fn firewall(&self) -> Option<NftTable> {
        let IpNet::V4(range) = self.ipam.range() else { return None };
        let exposed = self
            .exposed()
            .into_iter()
            .filter_map(|n| match n.trunc() {
                IpNet::V4(v4) => Some(v4),
                IpNet::V6(_) => None,
            })
            .collect();
        Some(
            OverlayFirewall {
                table: self.cfg.firewall_table.clone(),
                bridge: self.cfg.bridge.clone(),
                range,
                exposed,
                guarded: self.cfg.guarded_ports.clone(),
                dns_tcp: self.cfg.dns_tcp_ports.clone(),
            }
            .table(),
        )
    }

    /// Makes the bridge and the firewall match the state; logs what had to be repaired.
    /// `force` rewrites the firewall table even when it looks intact (its content changed).
    pub fn program_bridge(&mut self, force: bool) -> Result<(), EndpointError> {
        let report = self.dp.ensure_bridge(&self.bridge_spec())?;
        if !report.repairs.is_empty() {
            info!(bridge = %self.cfg.bridge, repairs = ?report.repairs, "bridge reconciled");
            self.last_bridge_repairs = report.repairs;
        }
        if let Some(table) = self.firewall() {
            if force || !self.dp.firewall_intact(&table)? {
                self.dp.apply_firewall(&table)?;
                info!(table = %table.name, rules = table.rule_count(), "nftables table programmed");
            }
        }
        self.program_forward_accept();
        Ok(())
    }

    /// Keeps weft's accept rules at the head of Docker's `DOCKER-USER` (dockerd may have
    /// been started or restarted since the last pass) and notes a legacy DROP policy. Never
    /// fatal: the rest of the bridge works without it, and the next pass retries.
    fn program_forward_accept(&mut self) {
        let want = ForwardAccept {
            bridge: self.cfg.bridge.clone(),
            exposed: self
                .exposed()
                .into_iter()
                .filter_map(|n| match n.trunc() {
                    IpNet::V4(v4) => Some(v4),
                    IpNet::V6(_) => None,
                })
                .collect(),
        };
        let rewrite = self.forward_written.as_ref() != Some(&want);
        match self.dp.sync_forward_accept(&want, rewrite) {
            Ok(c) => {
                if c.docker_user != DockerUser::Absent {
                    if c.docker_user == DockerUser::Written {
                        info!(
                            chain = DOCKER_USER,
                            rules = want.rules().len(),
                            "accept rules for weft's traffic put at the head of Docker's chain"
                        );
                    }
                    self.forward_written = Some(want);
                }
                let warning = c.warning(&self.cfg.bridge);
                if warning.is_some() && warning != self.forward_warning {
                    warn!(
                        problem = warning.as_deref().unwrap_or_default(),
                        "weft's forwarded traffic is dropped"
                    );
                }
                self.forward_warning = warning;
            }
            Err(e) => warn!(error = %e, "cannot check Docker's FORWARD rules; will retry"),
        }
    }

    /// [`Self::program_bridge`] after a change of exposed addresses; failures are retried by
    /// the periodic reconciliation, so they are only logged here.
    fn reprogram_bridge(&mut self) {
        if let Err(e) = self.program_bridge(true) {
            warn!(error = %e, "cannot program the bridge or firewall; will retry");
        }
    }

    fn ipam_report(&self) -> IpamReport {
        let alloc = self.ipam.allocator();
        let (used, free) = self.ipam.counts();
        IpamReport {
            range: self.ipam.range(),
            default_subnet: self.ipam.default_subnet(),
            used,
            free,
            owned: alloc
                .owned()
                .iter()
                .map(|r| {
                    format!(
                        "{}-{}",
                        crate::ipam::space::addr(r.start),
                        crate::ipam::space::addr(r.end - 1)
                    )
                })
                .collect(),
            ring: self.ipam.status(),
        }
    }

    /// The state's part of the status report.
    pub fn report(&self) -> (BridgeReport, IpamReport, EndpointCounts) {
        let count = |k: Kind| self.records.values().filter(|r| r.kind == k).count() as u32;
        let counts = EndpointCounts {
            cni: count(Kind::Cni),
            attached: count(Kind::Attach),
            reserved: count(Kind::Reservation),
            quarantined: self.quarantined.clone(),
            docker: count(Kind::Docker),
            pods: self
                .records
                .values()
                .filter(|r| r.kind == Kind::Cni)
                .filter_map(|r| {
                    r.pod.as_ref().map(|p| PodAddresses {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        addresses: r.addresses.clone(),
                    })
                })
                .collect(),
            list: self.records.values().map(EndpointEntry::from).collect(),
        };
        (self.bridge_report(), self.ipam_report(), counts)
    }

    fn bridge_report(&self) -> BridgeReport {
        BridgeReport {
            name: self.cfg.bridge.clone(),
            mtu: self.cfg.mtu,
            mac: self.cfg.bridge_mac.to_string(),
            addresses: self.exposed(),
            last_repairs: self.last_bridge_repairs.clone(),
            forward_warning: self.forward_warning.clone(),
        }
    }

    pub fn allocator(&self) -> &Allocator {
        self.ipam.allocator()
    }
}

type Job = Box<dyn FnOnce(&mut State) + Send>;

enum Msg {
    Run(Job),
    Stop,
}

/// The way to the state owner's thread.
#[derive(Clone, Debug)]
pub struct StateHandle {
    tx: mpsc::UnboundedSender<Msg>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Run(_) => "Run",
            Msg::Stop => "Stop",
        })
    }
}

impl StateHandle {
    /// Starts the owner thread.
    pub fn spawn(mut state: State) -> std::io::Result<(StateHandle, std::thread::JoinHandle<()>)> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
        let thread = std::thread::Builder::new().name("weft-state".into()).spawn(move || {
            // The owner's own thread: kernel work it does (bridge, firewall) runs right here.
            crate::dataplane::on_blocking_thread(|| {
                while let Some(Msg::Run(job)) = rx.blocking_recv() {
                    job(&mut state);
                    state.flush_ipam();
                    state.publish_summaries();
                }
            })
        })?;
        Ok((StateHandle { tx }, thread))
    }

    /// Ends the owner thread once the calls queued so far are done, even while handles
    /// remain (later calls fail with [`EndpointError::Stopped`]).
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
    }

    /// Runs `f` on the state and returns its result. Only `endpoints/` sends closures: the
    /// rest of the agent uses [`super::Endpoints`] and [`super::IpamHandle`].
    pub(in crate::endpoints) async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State) -> R + Send + 'static,
    ) -> Result<R, EndpointError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Run(Box::new(move |s| {
                let _ = tx.send(f(s));
            })))
            .map_err(|_| EndpointError::Stopped)?;
        rx.await.map_err(|_| EndpointError::Stopped)
    }
}
