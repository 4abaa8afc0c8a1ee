//! `weave.local` DNS: every agent holds the names of the endpoints of all hosts (gossiped on
//! the mesh's `dns` channel) and answers for them, forwarding every other name to the host's
//! resolvers. One task owns the table (`table`), fed by gossip, by this host's endpoints and
//! by `weft dns-add/dns-remove`; after each change it swaps in a new answer snapshot
//! (`zone`), which the hickory-server listeners (`server`) read without waiting. Names
//! registered by hand are persisted. The protocol and behaviour are specified in docs/dns.md.

pub mod domain;
pub mod server;
pub mod table;
pub mod upstream;
pub mod wire;
pub mod zone;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_server::proto::rr::Name;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::domain::{Domain, NameError};
use self::server::{Handler, Listeners, QueryCounts};
use self::table::{EXTERN_ENDPOINT, Entry, Local, Table};
use self::upstream::Upstream;
use self::zone::Zone;
use crate::endpoints::record::{EndpointFeed, EndpointSummary};
use crate::identity::PeerName;
use crate::mesh::gossip::{GossipChannel, GossipEvent};
use crate::mesh::view::MeshView;
use crate::store::{Op, Store, Table as StoreTable};
use crate::subsystem::{Hub, Tasks};

/// How long changes may gather before the answers show them.
const SETTLE: Duration = Duration::from_millis(20);

/// How often the whole table goes to a few neighbours (anti-entropy).
const FULL_GOSSIP: Duration = Duration::from_secs(30);

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// On each address the host has on the bridge (`weft expose`), at this port.
    Exposed(u16),
    /// Exactly these.
    Addrs(Vec<SocketAddr>),
}

impl Listen {
    /// The ports served, each once.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = match self {
            Listen::Exposed(p) => vec![*p],
            Listen::Addrs(addrs) => addrs.iter().map(SocketAddr::port).collect(),
        };
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Listen, String> {
        if s == "exposed" {
            return Ok(Listen::Exposed(53));
        }
        if let Some(port) = s.strip_prefix("exposed:") {
            return port.parse().map(Listen::Exposed).map_err(|_| format!("bad port in {s:?}"));
        }
        s.split(',')
            .map(|a| a.trim().parse().map_err(|_| format!("{a:?} is not HOST:PORT")))
            .collect::<Result<Vec<_>, _>>()
            .map(Listen::Addrs)
    }
}

#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub domain: Domain,
    pub ttl: u32,
    pub listen: Listen,
    pub resolv_conf: PathBuf,
    pub upstream_timeout: Duration,
    /// Addresses that may query (the allocation range); the host is always allowed.
    pub clients: Vec<ipnet::IpNet>,
}

/// A DNS operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("unknown endpoint {0:?} (see weft ps)")]
    UnknownEndpoint(String),
    #[error("give addresses, an endpoint, or both")]
    NothingToAdd,
    #[error("give a name, addresses or an endpoint to remove")]
    NothingToRemove,
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("DNS is disabled on this agent (--no-dns)")]
    Disabled,
    #[error("the DNS service has stopped")]
    Stopped,
}

/// A name registered with `weft dns-add`, persisted.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExternName {
    /// Absolute name.
    pub name: String,
    /// `None`: every address of the endpoint.
    pub addr: Option<IpAddr>,
    /// The endpoint the name goes away with; `None` for names of addresses weft does not manage.
    pub endpoint: Option<String>,
}

impl ExternName {
    fn key(&self) -> String {
        let addr = self.addr.map_or_else(|| "*".to_owned(), |a| a.to_string());
        let ep = self.endpoint.as_deref().unwrap_or(EXTERN_ENDPOINT);
        format!("{} {addr} {ep}", self.name.to_ascii_lowercase())
    }
}

/// The DNS part of the status report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsReport {
    pub domain: String,
    pub ttl: u32,
    /// Addresses served now.
    pub listen: Vec<String>,
    /// Why the server does not listen (where it should), if so.
    #[serde(default)]
    pub listen_problem: String,
    pub upstream: Vec<String>,
    /// Live entries of every peer.
    pub entries: Vec<DnsEntryReport>,
    /// Deleted entries still remembered.
    pub tombstones: u64,
    #[serde(default)]
    pub queries: QueryReport,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsEntryReport {
    pub name: String,
    pub address: IpAddr,
    pub endpoint: String,
    pub origin: String,
    pub nickname: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryReport {
    pub answered: u64,
    pub nxdomain: u64,
    pub forwarded: u64,
    pub failed: u64,
}

/// The filter of a removal; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct Removal {
    pub name: Option<String>,
    pub addrs: Vec<IpAddr>,
    pub endpoint: Option<String>,
}

enum Command {
    Add {
        name: String,
        addrs: Vec<IpAddr>,
        endpoint: Option<String>,
        reply: oneshot::Sender<Result<Vec<Entry>, DnsError>>,
    },
    Remove {
        removal: Removal,
        reply: oneshot::Sender<Result<Removed, DnsError>>,
    },
    Report {
        reply: oneshot::Sender<DnsReport>,
    },
}

/// The handle the API uses.
#[derive(Clone, Debug)]
pub struct Dns {
    domain: Domain,
    commands: mpsc::Sender<Command>,
    zone: Arc<ArcSwap<Zone>>,
    counts: Arc<QueryCounts>,
}

impl Dns {
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// Registers `name` for addresses and/or an endpoint (id or namespace path).
    pub async fn add(
        &self,
        name: String,
        addrs: Vec<IpAddr>,
        endpoint: Option<String>,
    ) -> Result<Vec<Entry>, DnsError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Add { name, addrs, endpoint, reply })
            .await
            .map_err(|_| DnsError::Stopped)?;
        rx.await.map_err(|_| DnsError::Stopped)?
    }

    /// Removes the names matching `removal`. The names of endpoints (`attach --name`,
    /// `expose -h`) stop being served at once; the caller clears them from the endpoints
    /// listed in [`Removed::unnamed`].
    pub async fn remove(&self, removal: Removal) -> Result<Removed, DnsError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Remove { removal, reply })
            .await
            .map_err(|_| DnsError::Stopped)?;
        rx.await.map_err(|_| DnsError::Stopped)?
    }

    /// The addresses of a name (a single label is looked up in the domain).
    pub fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, DnsError> {
        let fqdn = self.domain.qualify(name)?;
        let name = Name::from_ascii(&fqdn).map_err(|_| NameError::Invalid(fqdn.clone()))?;
        Ok(self.zone.load().addresses(&name))
    }

    /// The DNS part of the status report (built on demand: it lists every entry).
    pub async fn report(&self) -> DnsReport {
        let (reply, rx) = oneshot::channel();
        let mut r = match self.commands.send(Command::Report { reply }).await {
            Ok(()) => rx.await.unwrap_or_default(),
            Err(_) => DnsReport::default(),
        };
        let c = &self.counts;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        r.queries = QueryReport {
            answered: get(&c.answered),
            nxdomain: get(&c.nxdomain),
            forwarded: get(&c.forwarded),
            failed: get(&c.failed),
        };
        r
    }
}

/// What `dns-remove` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// (name, address) pairs that went.
    pub pairs: u32,
    /// Endpoints whose own name went: their records should forget it.
    pub unnamed: Vec<String>,
}

/// What the service is fed with.
#[derive(Debug)]
pub struct Inputs {
    pub channel: GossipChannel,
    pub endpoints: EndpointFeed,
    pub mesh: watch::Receiver<MeshView>,
    pub store: Arc<Store>,
}

/// Starts DNS as a subsystem: fed by the `dns` channel, the endpoint feed and the mesh view.
pub fn start(cfg: DnsConfig, hub: &Hub, tasks: &mut Tasks) -> Dns {
    let inputs = Inputs {
        channel: hub.mesh.channel("dns"),
        endpoints: hub.endpoints.feed(),
        mesh: hub.mesh.view(),
        store: hub.store.clone(),
    };
    let (dns, task) = build(cfg, inputs, tasks.shutdown().clone());
    tasks.spawn("dns", task);
    dns
}

/// Builds the DNS service from its inputs: its handle, and the task the caller spawns.
pub fn build(
    cfg: DnsConfig,
    inputs: Inputs,
    shutdown: CancellationToken,
) -> (Dns, impl Future<Output = ()> + Send + 'static) {
    let me = inputs.channel.me();
    let zone = Arc::new(ArcSwap::from_pointee(Zone::build(&cfg.domain, cfg.ttl, [].iter())));
    let counts = Arc::new(QueryCounts::default());
    let handler = Handler {
        zone: zone.clone(),
        upstream: Arc::new(Upstream::new(cfg.resolv_conf.clone(), cfg.upstream_timeout)),
        counts: counts.clone(),
        forwards: Arc::new(tokio::sync::Semaphore::new(server::MAX_FORWARDS)),
        clients: Arc::new(cfg.clients.clone()),
    };
    let (commands, rx) = mpsc::channel(64);
    let externs = match inputs.store.all::<ExternName>(StoreTable::Dns) {
        Ok(rows) => rows.into_iter().map(|(_, x)| (x.key(), x)).collect(),
        Err(e) => {
            warn!(error = %e, "the names registered with dns-add are unreadable; starting without them");
            BTreeMap::new()
        }
    };
    let service = Service {
        table: Table::new(me),
        cfg: cfg.clone(),
        handler,
        listeners: Listeners::default(),
        listen_problem: String::new(),
        externs,
        warned: BTreeSet::new(),
        unknown: crate::mesh::departed::Unknown::default(),
        nicknames: BTreeMap::new(),
        unnamed: BTreeMap::new(),
        dirty: true,
        inputs,
    };
    let task = service.run(rx, shutdown);
    (Dns { domain: cfg.domain, commands, zone, counts }, task)
}

struct Service {
    cfg: DnsConfig,
    table: Table,
    handler: Handler,
    listeners: Listeners,
    listen_problem: String,
    externs: BTreeMap<String, ExternName>,
    /// Names already complained about (not in the domain).
    warned: BTreeSet<String>,
    /// Origins the mesh view does not account for, and since when (their entries go after a
    /// grace period).
    unknown: crate::mesh::departed::Unknown,
    nicknames: BTreeMap<PeerName, String>,
    /// Endpoint names removed by `dns-remove`, by endpoint id, not served while the endpoint
    /// feed still shows that name (its record is being updated).
    unnamed: BTreeMap<String, String>,
    /// The answer snapshot is behind the table.
    dirty: bool,
    inputs: Inputs,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Service {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        info!(domain = %self.cfg.domain, ttl = self.cfg.ttl, "DNS starting");
        self.inputs.mesh.mark_changed();
        self.inputs.endpoints.mark_changed();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut since_full = Duration::ZERO;
        // Changes arriving in a burst (a peer's whole table) make one new snapshot.
        let settle = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(settle);
        let mut settling = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                ev = self.inputs.channel.recv() => match ev {
                    Some(ev) => self.on_gossip(ev),
                    None => break,
                },
                changed = self.inputs.endpoints.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.sync_local();
                    self.sync_listeners().await;
                }
                changed = self.inputs.mesh.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.on_mesh();
                }
                Some(cmd) = commands.recv() => self.on_command(cmd).await,
                () = &mut settle, if settling => {
                    settling = false;
                    self.publish();
                }
                _ = tick.tick() => {
                    since_full += Duration::from_secs(1);
                    if since_full >= FULL_GOSSIP {
                        since_full = Duration::ZERO;
                        for m in wire::messages(self.table.entries()) {
                            self.inputs.channel.gossip(m);
                        }
                    }
                    self.dirty |= self.table.expire_tombstones(now_secs());
                    self.forget_departed();
                    if !self.listen_problem.is_empty() {
                        self.sync_listeners().await;
                    }
                }
            }
            if self.dirty && !settling {
                settling = true;
                settle.as_mut().reset(tokio::time::Instant::now() + SETTLE);
            }
        }
        self.listeners.stop().await;
        info!("DNS stopped");
    }

    fn on_gossip(&mut self, ev: GossipEvent) {
        match ev {
            GossipEvent::Gossip { src, payload }
            | GossipEvent::Broadcast { src, payload }
            | GossipEvent::Unicast { src, payload } => {
                let entries = match wire::decode(&payload) {
                    Ok(e) => e,
                    Err(e) => {
                        warn!(from = %src, error = %e, "ignoring undecodable DNS gossip");
                        return;
                    }
                };
                let merged = self.table.merge(entries, now_secs());
                if !merged.news.is_empty() {
                    self.dirty = true;
                    for m in wire::messages(&merged.news) {
                        self.inputs.channel.gossip_except(src, m);
                    }
                }
                if !merged.corrections.is_empty() {
                    debug!(count = merged.corrections.len(), "restating our own DNS entries");
                    self.dirty = true;
                    for m in wire::messages(&merged.corrections) {
                        self.inputs.channel.broadcast(m);
                    }
                }
            }
            GossipEvent::PeerUp(peer) => {
                for m in wire::messages(self.table.entries()) {
                    self.inputs.channel.unicast(peer, m);
                }
            }
            GossipEvent::PeersGone(peers) => {
                self.dirty |= self.table.retain_origins(|p| !peers.contains(&p));
            }
        }
    }

    fn on_mesh(&mut self) {
        self.nicknames = self.inputs.mesh.borrow_and_update().peers.clone();
        self.forget_departed();
    }

    /// Drops the entries of origins the mesh has not accounted for during a grace period:
    /// entries a lagging neighbour passed on after their peer left. Entries are accepted from
    /// anyone, and kept while their origin is in the topology or reachable, because names can
    /// arrive before the topology has caught up with a new or restarted peer.
    fn forget_departed(&mut self) {
        let origins = self.table.origins();
        // The latest view, even if its change has not been handled yet.
        let view = self.inputs.mesh.borrow().clone();
        let gone = self.unknown.departed(&origins, &view, std::time::Instant::now());
        if !gone.is_empty() {
            debug!(origins = ?gone, "dropping the names of peers that are not in the mesh");
            self.dirty |= self.table.retain_origins(|p| !gone.contains(&p));
        }
    }

    /// The names this host wants registered: its endpoints' names and the dns-add names.
    fn wanted(&mut self) -> BTreeSet<Local> {
        let endpoints = self.inputs.endpoints.borrow().clone();
        // A removed name stays unserved until the feed shows the endpoint without it.
        self.unnamed.retain(|id, name| {
            endpoints.iter().any(|e| &e.id == id && e.hostname.as_ref() == Some(name))
        });
        let mut want = BTreeSet::new();
        for ep in endpoints.iter() {
            // A Docker container's aliases go with its endpoint (dns-remove does not drop them).
            let given = ep.hostname.iter().filter(|h| self.unnamed.get(&ep.id) != Some(*h));
            for host in given.chain(&ep.aliases) {
                match self.cfg.domain.qualify(host) {
                    Ok(name) => want.extend(ep.addrs.iter().map(|a| Local {
                        name: name.clone(),
                        addr: *a,
                        endpoint: ep.id.clone(),
                    })),
                    Err(e) => {
                        if self.warned.insert(host.clone()) {
                            warn!(endpoint = %ep.id, error = %e, "not registering the endpoint's name");
                        }
                    }
                }
            }
        }
        let mut orphans = Vec::new();
        for (key, x) in &self.externs {
            let addrs: Vec<IpAddr> = match (&x.endpoint, x.addr) {
                (None, Some(a)) => vec![a],
                (None, None) => Vec::new(),
                (Some(id), addr) => match endpoints.iter().find(|e| &e.id == id) {
                    Some(ep) => addr.map_or_else(|| ep.addrs.clone(), |a| vec![a]),
                    None => {
                        orphans.push(key.clone());
                        continue;
                    }
                },
            };
            let endpoint = x.endpoint.clone().unwrap_or_else(|| EXTERN_ENDPOINT.to_owned());
            want.extend(addrs.into_iter().map(|addr| Local {
                name: x.name.clone(),
                addr,
                endpoint: endpoint.clone(),
            }));
        }
        if !orphans.is_empty() {
            // Names that were tied to an endpoint go with it.
            let ops: Vec<Op> =
                orphans.iter().map(|k| Op::Delete(StoreTable::Dns, k.clone())).collect();
            match self.inputs.store.write(&ops) {
                Ok(()) => orphans.iter().for_each(|k| {
                    self.externs.remove(k);
                }),
                Err(e) => warn!(error = %e, "cannot forget the names of removed endpoints"),
            }
        }
        want
    }

    fn sync_local(&mut self) {
        let want = self.wanted();
        let changed = self.table.set_local(&want, now_secs());
        if !changed.is_empty() {
            self.dirty = true;
            for m in wire::messages(&changed) {
                self.inputs.channel.broadcast(m);
            }
        }
    }

    /// Listens where the configuration says, once those addresses exist.
    async fn sync_listeners(&mut self) {
        let want: Vec<SocketAddr> = match &self.cfg.listen {
            Listen::Addrs(a) => a.clone(),
            Listen::Exposed(port) => {
                let endpoints = self.inputs.endpoints.borrow().clone();
                endpoints
                    .iter()
                    .filter(|e| e.is_exposed())
                    .flat_map(|e| e.addrs.iter().map(|a| SocketAddr::new(*a, *port)))
                    .collect()
            }
        };
        if want.as_slice() == self.listeners.addrs() && self.listen_problem.is_empty() {
            return;
        }
        let before = (self.listeners.addrs().to_vec(), self.listen_problem.clone());
        let failed = self.listeners.serve(&want, &self.handler).await;
        self.handler.upstream.set_own(self.listeners.addrs().to_vec());
        self.listen_problem = if want.is_empty() {
            "not listening: the host has no address on the bridge (run weft expose, or set --dns-listen)".to_owned()
        } else {
            failed
                .iter()
                .map(|(a, e)| format!("cannot listen on {a}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        for (addr, e) in failed {
            warn!(%addr, error = %e, "DNS cannot listen yet; retrying");
        }
        self.dirty |= before != (self.listeners.addrs().to_vec(), self.listen_problem.clone());
    }

    /// Runs a command; the answer goes out once the snapshot shows its effect.
    async fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Add { name, addrs, endpoint, reply } => {
                let result = self.add(name, addrs, endpoint);
                self.publish();
                let _ = reply.send(result);
            }
            Command::Remove { removal, reply } => {
                let result = self.remove(removal);
                self.publish();
                let _ = reply.send(result);
            }
            Command::Report { reply } => {
                let _ = reply.send(self.report());
            }
        }
    }

    /// Resolves an endpoint given by id or namespace path.
    fn endpoint(&self, given: &str) -> Result<EndpointSummary, DnsError> {
        let endpoints = self.inputs.endpoints.borrow();
        endpoints
            .iter()
            .find(|e| e.id == given || e.netns.as_deref().is_some_and(|p| p.as_os_str() == given))
            .cloned()
            .ok_or_else(|| DnsError::UnknownEndpoint(given.to_owned()))
    }

    fn add(
        &mut self,
        name: String,
        addrs: Vec<IpAddr>,
        endpoint: Option<String>,
    ) -> Result<Vec<Entry>, DnsError> {
        let name = self.cfg.domain.qualify(&name)?;
        let endpoint = endpoint.map(|e| self.endpoint(&e)).transpose()?;
        if addrs.is_empty() && endpoint.is_none() {
            return Err(DnsError::NothingToAdd);
        }
        let id = endpoint.map(|e| e.id);
        let new: Vec<ExternName> = if addrs.is_empty() {
            vec![ExternName { name, addr: None, endpoint: id }]
        } else {
            addrs
                .iter()
                .map(|a| ExternName { name: name.clone(), addr: Some(*a), endpoint: id.clone() })
                .collect()
        };
        let ops = new
            .iter()
            .map(|x| Op::put(StoreTable::Dns, x.key(), x))
            .collect::<Result<Vec<_>, _>>()?;
        self.inputs.store.write(&ops)?;
        let keys: Vec<String> = new.iter().map(ExternName::key).collect();
        self.externs.extend(new.into_iter().map(|x| (x.key(), x)));
        self.sync_local();
        let me = self.table.me();
        let lowered: BTreeSet<String> =
            keys.iter().filter_map(|k| k.split(' ').next().map(str::to_owned)).collect();
        Ok(self
            .table
            .live()
            .filter(|e| e.origin == me && lowered.contains(&e.name.to_ascii_lowercase()))
            .cloned()
            .collect())
    }

    fn remove(&mut self, r: Removal) -> Result<Removed, DnsError> {
        if r.name.is_none() && r.addrs.is_empty() && r.endpoint.is_none() {
            return Err(DnsError::NothingToRemove);
        }
        let lname = match &r.name {
            Some(n) => Some(self.cfg.domain.qualify(n)?.to_ascii_lowercase()),
            None => None,
        };
        let endpoint = match &r.endpoint {
            Some(e) => Some(self.endpoint(e)?.id),
            None => None,
        };
        let before = self.wanted();
        let matches = |l: &Local| {
            lname.as_ref().is_none_or(|n| *n == l.name.to_ascii_lowercase())
                && (r.addrs.is_empty() || r.addrs.contains(&l.addr))
                && endpoint.as_ref().is_none_or(|id| *id == l.endpoint)
        };
        let going: Vec<Local> = before.iter().filter(|l| matches(l)).cloned().collect();
        // Names given with dns-add.
        let gone: Vec<String> = self
            .externs
            .iter()
            .filter(|(_, x)| {
                lname.as_ref().is_none_or(|n| *n == x.name.to_ascii_lowercase())
                    && (r.addrs.is_empty() || x.addr.is_some_and(|a| r.addrs.contains(&a)))
                    && endpoint.as_ref().is_none_or(|id| x.endpoint.as_ref() == Some(id))
            })
            .map(|(k, _)| k.clone())
            .collect();
        if !gone.is_empty() {
            let ops: Vec<Op> =
                gone.iter().map(|k| Op::Delete(StoreTable::Dns, k.clone())).collect();
            self.inputs.store.write(&ops)?;
            for k in &gone {
                self.externs.remove(k);
            }
        }
        // Endpoint names (attach --name, expose -h): the endpoint forgets its name.
        let endpoints = self.inputs.endpoints.borrow().clone();
        let unnamed: Vec<(String, String)> = endpoints
            .iter()
            .filter(|ep| going.iter().any(|l| l.endpoint == ep.id))
            .filter_map(|ep| Some((ep.id.clone(), ep.hostname.clone()?)))
            .filter(|(_, host)| {
                self.cfg.domain.qualify(host).ok().is_some_and(|n| {
                    lname.as_ref().is_none_or(|want| *want == n.to_ascii_lowercase())
                })
            })
            .collect();
        self.unnamed.extend(unnamed.iter().cloned());
        self.sync_local();
        Ok(Removed {
            pairs: u32::try_from(going.len()).unwrap_or(u32::MAX),
            unnamed: unnamed.into_iter().map(|(id, _)| id).collect(),
        })
    }

    /// Swaps in a new answer snapshot after changes.
    fn publish(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        let zone = Zone::build(&self.cfg.domain, self.cfg.ttl, self.table.live());
        self.handler.zone.store(Arc::new(zone));
    }

    fn report(&self) -> DnsReport {
        let entries: Vec<DnsEntryReport> = self
            .table
            .live()
            .map(|e| DnsEntryReport {
                name: e.name.clone(),
                address: e.addr,
                endpoint: e.endpoint.clone(),
                origin: e.origin.to_string(),
                nickname: self.nicknames.get(&e.origin).cloned().unwrap_or_default(),
            })
            .collect();
        DnsReport {
            domain: self.cfg.domain.to_string(),
            ttl: self.cfg.ttl,
            listen: self.listeners.addrs().iter().map(ToString::to_string).collect(),
            listen_problem: self.listen_problem.clone(),
            upstream: self.handler.upstream.servers().iter().map(ToString::to_string).collect(),
            tombstones: (self.table.len() - entries.len()) as u64,
            entries,
            queries: QueryReport::default(),
        }
    }
}
