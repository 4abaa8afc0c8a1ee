//! Endpoints: pods set up through CNI, namespaces attached with `weft attach`, and the host's
//! own bridge addresses. [`Endpoints`] orders the work of one operation: allocate and persist
//! (in the state owner), then do the kernel work (in parallel with other endpoints), and undo
//! the allocation if the kernel work fails, so a failed ADD leaves nothing behind. Operations
//! on the same endpoint are serialized by a per-endpoint lock.

pub mod docker;
pub mod error;
pub mod ipam;
pub mod queue;
pub mod record;
pub mod report;
pub mod state;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::{OwnedMutexGuard, watch};
use tracing::{info, warn};

use self::error::EndpointError;
pub use self::ipam::IpamHandle;
use self::record::{EndpointFeed, EndpointRecord, Kind, cni_id};
use self::report::{BridgeReport, EndpointCounts, IpamReport};
use self::state::{AttachReserve, CniReserve, State, StateConfig, StateHandle};
use crate::addr::AddrRequest;
use crate::dataplane::{
    Dataplane, EndpointState, KernelError, host_ifname_for, on_blocking_thread,
};
use crate::ipam::IpamConfig;
use crate::mesh::gossip::GossipSender;
use crate::store::Store;

/// How long `attach` and `expose` wait for address space before giving up.
const ALLOC_WAIT: Duration = Duration::from_secs(20);
/// How often a waiting allocation is tried again when nothing announced a change.
const ALLOC_RETRY: Duration = Duration::from_millis(500);

/// How long after its Join a Docker endpoint may still be without its sandbox.
const DOCKER_SANDBOX_GRACE_SECS: u64 = 60;

fn docker_settled(rec: &EndpointRecord) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    now.saturating_sub(rec.created) >= DOCKER_SANDBOX_GRACE_SECS
}

/// Whether the agent serves ADD, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: String,
}

impl Readiness {
    pub fn starting(reason: impl Into<String>) -> Readiness {
        Readiness { ready: false, reason: reason.into() }
    }
}

/// One lock per key, removed when nobody holds or waits for it.
#[derive(Debug, Default)]
struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct KeyGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&self.key).is_some_and(|m| Arc::strong_count(m) == 1) {
            map.remove(&self.key);
        }
    }
}

impl KeyedLocks {
    async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.to_owned()).or_default().clone()
        };
        let guard = m.lock_owned().await;
        KeyGuard { locks: self, key: key.to_owned(), guard: Some(guard) }
    }
}

/// A CNI ADD.
#[derive(Clone, Debug)]
pub struct CniAdd {
    pub reserve: CniReserve,
    pub wait_ready: Duration,
}

/// The outcome of an ADD.
#[derive(Clone, Debug)]
pub struct CniAdded {
    pub record: EndpointRecord,
    pub kernel: EndpointState,
}

#[derive(Debug)]
struct Inner {
    state: StateHandle,
    ipam: IpamHandle,
    feed: EndpointFeed,
    dp: Arc<dyn Dataplane>,
    locks: KeyedLocks,
    ready: watch::Receiver<Readiness>,
    /// Bumped by the state owner when waiting allocations may succeed.
    ipam_changes: watch::Receiver<u64>,
    bridge: String,
}

/// The endpoint service (cheap to clone).
#[derive(Clone, Debug)]
pub struct Endpoints {
    inner: Arc<Inner>,
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, KernelError> + Send + 'static,
) -> Result<R, EndpointError> {
    tokio::task::spawn_blocking(move || on_blocking_thread(f))
        .await
        .map_err(|_| EndpointError::Stopped)?
        .map_err(EndpointError::from)
}

fn validate_ifname(name: &str) -> Result<(), EndpointError> {
    if weft_api::is_valid_ifname(name) {
        Ok(())
    } else {
        Err(EndpointError::invalid("ifname", format!("{name:?} is not a valid interface name")))
    }
}

/// The endpoint state, started: the service, the allocation handle, and the owner's thread
/// (joined on shutdown so its last writes land).
#[derive(Debug)]
pub struct Started {
    pub endpoints: Endpoints,
    pub ipam: IpamHandle,
    pub thread: std::thread::JoinHandle<()>,
}

/// Loads the persisted endpoints and allocations and starts the state owner. IPAM messages
/// go out on `ipam_out`.
pub fn start(
    store: Arc<Store>,
    dp: Arc<dyn Dataplane>,
    cfg: StateConfig,
    ipam_cfg: IpamConfig,
    ipam_out: GossipSender,
    ready: watch::Receiver<Readiness>,
) -> Result<Started, EndpointError> {
    let bridge = cfg.bridge.clone();
    let mut state = State::load(store, dp.clone(), cfg, ipam_cfg)?;
    state.connect_ipam(ipam_out);
    let ipam_changes = state.ipam_changes();
    let feed = state.endpoint_summaries();
    let (state, thread) = StateHandle::spawn(state).map_err(|e| EndpointError::Kernel(e.into()))?;
    let ipam = IpamHandle::new(state.clone());
    let inner = Inner {
        state,
        ipam: ipam.clone(),
        feed,
        dp,
        locks: KeyedLocks::default(),
        ready,
        ipam_changes,
        bridge,
    };
    Ok(Started { endpoints: Endpoints { inner: Arc::new(inner) }, ipam, thread })
}

impl Endpoints {
    /// The IP allocation state.
    pub fn ipam(&self) -> &IpamHandle {
        &self.inner.ipam
    }

    /// The endpoint feed (every endpoint, after every change).
    pub fn feed(&self) -> EndpointFeed {
        self.inner.feed.clone()
    }

    /// The state's part of the status report.
    pub async fn report(
        &self,
    ) -> Result<(BridgeReport, IpamReport, EndpointCounts), EndpointError> {
        self.inner.state.call(|s| s.report()).await
    }

    /// Sets or clears the DNS name of an endpoint; false if there is no such endpoint.
    pub async fn set_hostname(
        &self,
        id: &str,
        hostname: Option<String>,
    ) -> Result<bool, EndpointError> {
        let id = id.to_owned();
        self.inner.state.call(move |s| s.set_hostname(&id, hostname)).await?
    }

    /// Whether the agent is ready (the bridge, the firewall and the endpoints are in place).
    pub fn readiness(&self) -> watch::Receiver<Readiness> {
        self.inner.ready.clone()
    }

    /// Ends the state owner once the calls queued so far are done.
    pub fn stop(&self) {
        self.inner.state.stop();
    }

    fn check_netns(&self, path: &Path) -> Result<(), EndpointError> {
        self.inner.dp.check_netns(path).map_err(EndpointError::from)
    }

    /// Waits until the agent is ready, at most `budget`.
    async fn wait_ready(&self, budget: Duration) -> Result<(), EndpointError> {
        let mut rx = self.inner.ready.clone();
        let waited = tokio::time::timeout(budget, rx.wait_for(|r| r.ready)).await;
        match waited {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(EndpointError::Stopped),
            Err(_) => Err(EndpointError::NotReady(self.inner.ready.borrow().reason.clone())),
        }
    }

    /// Runs an allocating call on the state, again each time the IP allocation state moves,
    /// while the IPAM says to wait (no ring yet, space being obtained), for at most `budget`.
    async fn allocating<R: Send + 'static>(
        &self,
        budget: Duration,
        f: impl Fn(&mut State) -> Result<R, EndpointError> + Send + Sync + 'static,
    ) -> Result<R, EndpointError> {
        let deadline = tokio::time::Instant::now() + budget;
        let f = Arc::new(f);
        let mut changes = self.inner.ipam_changes.clone();
        loop {
            changes.borrow_and_update();
            let call = f.clone();
            match self.inner.state.call(move |s| call(s)).await? {
                Err(EndpointError::IpamWait(why)) => {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        return Err(EndpointError::IpamWait(why));
                    }
                    // Woken by a change; the periodic retry covers what no change announces
                    // (a peer that became reachable without the ring moving).
                    let _ = tokio::time::timeout(left.min(ALLOC_RETRY), changes.changed()).await;
                }
                other => return other,
            }
        }
    }

    /// `weft prime`: waits until the ring exists (starting consensus if needed).
    pub async fn prime(&self, budget: Duration) -> Result<(), EndpointError> {
        self.allocating(budget, |s| s.ipam_prime().map_err(EndpointError::from)).await
    }

    /// `weft reset`: hands this peer's ranges to a reachable peer and waits (at most
    /// `budget`) for it to confirm. Returns the heir, `None` if there was nothing to hand over
    /// or nobody to hand it to.
    pub async fn leave(&self, budget: Duration) -> Result<Option<String>, EndpointError> {
        let Some(heir) = self.inner.ipam.leave().await? else {
            return Ok(None);
        };
        let waited = self
            .allocating(budget, |s| {
                if s.ipam_handed_over() {
                    Ok(())
                } else {
                    Err(EndpointError::IpamWait(crate::ipam::Wait::Ring("handing over".into())))
                }
            })
            .await;
        match waited {
            Ok(()) => info!(heir = %heir, "address space handed over"),
            Err(e) => {
                warn!(heir = %heir, error = %e, "the heir did not confirm the handover; it will learn of it by gossip")
            }
        }
        Ok(Some(heir.to_string()))
    }

    /// Sets up the kernel side of `rec`; on failure removes the interface and the record.
    async fn realize(&self, rec: EndpointRecord) -> Result<EndpointState, EndpointError> {
        let spec = rec
            .spec(&self.inner.bridge)
            .ok_or_else(|| EndpointError::invalid("netns", "endpoint without namespace"))?;
        let dp = self.inner.dp.clone();
        match blocking(move || dp.setup_endpoint(&spec)).await {
            Ok(st) => {
                let (id, host_mac, mac) = (rec.id.clone(), st.host_mac, st.container_mac);
                self.inner.state.call(move |s| s.note_macs(&id, host_mac, mac)).await?;
                Ok(st)
            }
            Err(e) => {
                warn!(endpoint = %rec.id, error = %e, "endpoint setup failed; rolling back");
                self.discard(&rec.id, &rec.host_ifname).await;
                Err(e)
            }
        }
    }

    /// Removes an endpoint's interface and record, logging (not returning) failures: used on
    /// paths that already report another error.
    async fn discard(&self, id: &str, host_ifname: &str) {
        let dp = self.inner.dp.clone();
        let ifname = host_ifname.to_owned();
        if let Err(e) = blocking(move || dp.teardown_endpoint(&ifname)).await {
            warn!(endpoint = %id, error = %e, "could not remove the interface");
        }
        let id2 = id.to_owned();
        if let Err(e) = self.inner.state.call(move |s| s.remove(&id2)).await.and_then(|r| r) {
            warn!(endpoint = %id, error = %e, "could not release the endpoint");
        }
    }

    pub async fn cni_add(&self, req: CniAdd) -> Result<CniAdded, EndpointError> {
        validate_ifname(&req.reserve.ifname)?;
        self.check_netns(&req.reserve.netns)?;
        self.wait_ready(req.wait_ready).await?;
        let id = cni_id(&req.reserve.container_id, &req.reserve.ifname);
        let _guard = self.inner.locks.lock(&id).await;
        let reserve = req.reserve;
        let record =
            self.allocating(req.wait_ready, move |s| s.reserve_cni(reserve.clone())).await?;
        let kernel = self.realize(record.clone()).await?;
        Ok(CniAdded { record, kernel })
    }

    /// Removes an attachment; `Ok(false)` when nothing was known about it.
    pub async fn cni_del(&self, container_id: &str, ifname: &str) -> Result<bool, EndpointError> {
        let id = cni_id(container_id, ifname);
        self.remove_endpoint(&id).await
    }

    async fn remove_endpoint(&self, id: &str) -> Result<bool, EndpointError> {
        let _guard = self.inner.locks.lock(id).await;
        let id_owned = id.to_owned();
        let rec = self.inner.state.call(move |s| s.record(&id_owned)).await?;
        let dp = self.inner.dp.clone();
        match &rec {
            Some(r) => {
                let host_ifname = r.host_ifname.clone();
                blocking(move || dp.teardown_endpoint(&host_ifname)).await?;
            }
            // The interface name is derived from the id, so an interface left over by a crash
            // is found even when no record exists. But the name is only a 48-bit hash of a
            // caller-chosen id: remove it only if its alias says it was made for this id.
            None => {
                let (name, owner) = (host_ifname_for(id), id.to_owned());
                let n2 = name.clone();
                if blocking(move || dp.teardown_endpoint_of(&n2, &owner)).await? {
                    info!(endpoint = %id, interface = %name, "removed the interface of an unrecorded endpoint");
                }
            }
        }
        let id_owned = id.to_owned();
        let removed = self.inner.state.call(move |s| s.remove(&id_owned)).await??;
        Ok(removed.is_some())
    }

    pub async fn cni_check(
        &self,
        container_id: &str,
        ifname: &str,
        netns: &Path,
        expected: Vec<IpNet>,
    ) -> Result<(), EndpointError> {
        self.check_netns(netns)?;
        let id = cni_id(container_id, ifname);
        let id2 = id.clone();
        let rec = self
            .inner
            .state
            .call(move |s| s.record(&id2))
            .await?
            .ok_or(EndpointError::Unknown(id))?;
        if rec.netns.as_deref() != Some(netns) {
            return Err(EndpointError::CheckFailed(format!(
                "the attachment lives in {}, not {}",
                rec.netns.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
                netns.display()
            )));
        }
        if let Some(missing) = expected.iter().find(|e| !rec.addresses.contains(e)) {
            return Err(EndpointError::CheckFailed(format!(
                "{missing} from prevResult is not allocated to this attachment"
            )));
        }
        let spec = rec
            .spec(&self.inner.bridge)
            .ok_or_else(|| EndpointError::CheckFailed("no namespace".into()))?;
        let dp = self.inner.dp.clone();
        blocking(move || dp.check_endpoint(&spec)).await
    }

    /// Releases every CNI attachment of `network` not in `valid`.
    pub async fn cni_gc(
        &self,
        network: &str,
        valid: &[(String, String)],
    ) -> Result<u32, EndpointError> {
        let keep: std::collections::HashSet<String> =
            valid.iter().map(|(c, i)| cni_id(c, i)).collect();
        let network = network.to_owned();
        let stale: Vec<String> = self
            .inner
            .state
            .call(move |s| {
                s.records()
                    .into_iter()
                    .filter(|r| {
                        r.kind == Kind::Cni && r.network.as_deref() == Some(network.as_str())
                    })
                    .map(|r| r.id)
                    .collect()
            })
            .await?;
        let mut released = 0;
        for id in stale.into_iter().filter(|id| !keep.contains(id)) {
            info!(endpoint = %id, "GC: releasing an attachment the runtime no longer knows");
            if self.remove_endpoint(&id).await? {
                released += 1;
            }
        }
        Ok(released)
    }

    /// `weft attach`: returns the record and the addresses this call added.
    pub async fn attach(
        &self,
        req: AttachReserve,
    ) -> Result<(EndpointRecord, Vec<IpNet>), EndpointError> {
        validate_ifname(&req.ifname)?;
        self.check_netns(&req.netns)?;
        let _guard = self.inner.locks.lock(&req.id).await;
        let (record, added) =
            self.allocating(ALLOC_WAIT, move |s| s.reserve_attach(req.clone())).await?;
        self.realize(record.clone()).await?;
        Ok((record, added))
    }

    /// `weft detach`: removes the named addresses (all when `reqs` is empty), and the
    /// interface once none is left. Returns the removed addresses, `None` if unknown.
    pub async fn detach(
        &self,
        id: &str,
        reqs: Vec<AddrRequest>,
    ) -> Result<Option<Vec<IpNet>>, EndpointError> {
        let _guard = self.inner.locks.lock(id).await;
        let id_owned = id.to_owned();
        let Some((rec, removed)) =
            self.inner.state.call(move |s| s.detach_selection(&id_owned, &reqs)).await?
        else {
            return Ok(None);
        };
        if removed.len() == rec.addresses.len() {
            drop(_guard);
            self.remove_endpoint(id).await?;
            return Ok(Some(removed));
        }
        if let Some(spec) = rec.spec(&self.inner.bridge) {
            let dp = self.inner.dp.clone();
            let addrs = removed.clone();
            // A namespace that is gone has no addresses left to remove.
            match blocking(move || dp.remove_addresses(&spec, &addrs)).await {
                Ok(()) | Err(EndpointError::Netns(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let (id_owned, addrs) = (id.to_owned(), removed.clone());
        self.inner.state.call(move |s| s.drop_addresses(&id_owned, &addrs)).await??;
        Ok(Some(removed))
    }

    /// `Reserve`: addresses held by `id` without an interface.
    pub async fn reserve(
        &self,
        id: String,
        reqs: Vec<AddrRequest>,
        budget: Option<Duration>,
    ) -> Result<Vec<IpNet>, EndpointError> {
        if id.is_empty() {
            return Err(EndpointError::invalid("id", "is empty"));
        }
        let _guard = self.inner.locks.lock(&id).await;
        self.allocating(budget.unwrap_or(ALLOC_WAIT), move |s| s.reserve(&id, &reqs)).await
    }

    /// `Unreserve`: releases everything `id` holds; false if it held nothing.
    pub async fn unreserve(&self, id: &str) -> Result<bool, EndpointError> {
        let _guard = self.inner.locks.lock(id).await;
        let id_owned = id.to_owned();
        let removed = self
            .inner
            .state
            .call(move |s| match s.record(&id_owned) {
                Some(r) if r.kind == Kind::Reservation => s.remove(&id_owned).map(|r| r.is_some()),
                Some(_) => Err(EndpointError::invalid(
                    "id",
                    format!("{id_owned} is an endpoint, not a reservation"),
                )),
                None => Ok(false),
            })
            .await??;
        Ok(removed)
    }

    /// `weft expose [ADDR...] [-h NAME]`: addresses for the host on the bridge, and a DNS name
    /// for them.
    pub async fn expose(
        &self,
        reqs: Vec<AddrRequest>,
        hostname: Option<String>,
    ) -> Result<Vec<IpNet>, EndpointError> {
        let (named, _) =
            self.allocating(ALLOC_WAIT, move |s| s.expose(&reqs, hostname.clone())).await?;
        Ok(named)
    }

    pub async fn hide(&self, reqs: Vec<AddrRequest>) -> Result<Vec<IpNet>, EndpointError> {
        self.inner.state.call(move |s| s.hide(&reqs)).await?
    }

    pub async fn list(&self) -> Result<Vec<EndpointRecord>, EndpointError> {
        self.inner.state.call(|s| s.records()).await
    }

    /// Start-up and periodic repair: endpoints whose namespace is gone are released, the
    /// others are set up again if anything was lost; host interfaces that belong to no
    /// endpoint are removed.
    pub async fn reconcile(&self, remove_orphans: bool) -> Result<(), EndpointError> {
        let records = self.list().await?;
        for rec in records.iter().filter(|r| r.netns.is_some()) {
            let netns = rec.netns.clone().unwrap_or_default();
            match self.inner.dp.check_netns(&netns) {
                Ok(()) => {}
                // Docker's sandbox appears only after its Join: a young Docker endpoint
                // without one is being started, not gone.
                Err(e) if e.netns_gone() && rec.kind == Kind::Docker && !docker_settled(rec) => {
                    continue;
                }
                Err(e) if e.netns_gone() => {
                    let _guard = self.inner.locks.lock(&rec.id).await;
                    if !self.still_recorded(rec).await {
                        continue;
                    }
                    info!(endpoint = %rec.id, netns = %netns.display(), "namespace is gone; releasing the endpoint");
                    self.discard(&rec.id, &rec.host_ifname).await;
                    continue;
                }
                // Out of file descriptors or memory says nothing about the pod: keep it and
                // look again next time.
                Err(e) => {
                    warn!(endpoint = %rec.id, error = %e, "cannot check the namespace; keeping the endpoint");
                    continue;
                }
            }
            let Some(spec) = rec.spec(&self.inner.bridge) else { continue };
            let dp = self.inner.dp.clone();
            let _guard = self.inner.locks.lock(&rec.id).await;
            // A DEL (and a new ADD of the same id) may have run between the snapshot and the
            // lock: repairing would put back the interface the DEL just removed.
            if !self.still_recorded(rec).await {
                continue;
            }
            let spec2 = spec.clone();
            if blocking(move || dp.check_endpoint(&spec2)).await.is_err() {
                // Docker configures the interface in its sandbox, and removes it itself when
                // it disconnects a container while weft is down (the agent then finds it
                // missing): putting it back would reconnect what Docker disconnected.
                // `docker::reconcile` releases the endpoint once Docker no longer has it.
                if rec.kind == Kind::Docker {
                    warn!(endpoint = %rec.id, "a Docker endpoint's interface is missing; not set up again");
                    continue;
                }
                let dp = self.inner.dp.clone();
                match blocking(move || dp.setup_endpoint(&spec)).await {
                    Ok(_) => info!(endpoint = %rec.id, "endpoint repaired"),
                    Err(e) => {
                        warn!(endpoint = %rec.id, error = %e, "endpoint could not be repaired")
                    }
                }
            }
        }
        if remove_orphans {
            let known: std::collections::HashSet<String> =
                records.iter().map(|r| r.host_ifname.clone()).collect();
            let dp = self.inner.dp.clone();
            let bridge = self.inner.bridge.clone();
            let links = blocking(move || dp.endpoint_links(&bridge)).await?;
            for link in links.into_iter().filter(|l| !known.contains(l)) {
                info!(interface = %link, "removing an interface that belongs to no endpoint");
                let dp = self.inner.dp.clone();
                let l2 = link.clone();
                if let Err(e) = blocking(move || dp.teardown_endpoint(&l2)).await {
                    warn!(interface = %link, error = %e, "could not remove interface");
                }
            }
        }
        Ok(())
    }

    /// Whether `rec` is still the record of its id (call with the id's lock held).
    async fn still_recorded(&self, rec: &EndpointRecord) -> bool {
        let id = rec.id.clone();
        matches!(self.inner.state.call(move |s| s.record(&id)).await, Ok(Some(now)) if now == *rec)
    }

    /// Reprograms the bridge and firewall if they drifted.
    pub async fn reconcile_bridge(&self) -> Result<(), EndpointError> {
        self.inner.state.call(|s| s.program_bridge(false)).await?
    }

    /// Carries out DEL requests that `weft-cni` queued while the agent was down. The queue
    /// is read on the blocking pool (see [`queue`] for what is refused).
    pub async fn drain_del_queue(&self, dir: &Path) -> usize {
        let d = dir.to_owned();
        let read = match tokio::task::spawn_blocking(move || queue::read_all(&d)).await {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => {
                warn!(error = %e, "the DEL queue is not usable");
                return 0;
            }
            Err(_) => return 0,
        };
        let mut done = 0;
        for (path, parsed) in read {
            let req = match parsed {
                Ok(req) => req,
                Err(e) => {
                    warn!(error = %e, "unusable queued DEL; removing it");
                    let _ = tokio::fs::remove_file(&path).await;
                    continue;
                }
            };
            match self.cni_del(&req.container_id, &req.ifname).await {
                Ok(found) => {
                    info!(container = %req.container_id, ifname = %req.ifname, found, "queued DEL carried out");
                    let _ = tokio::fs::remove_file(&path).await;
                    done += 1;
                }
                Err(e) => {
                    warn!(container = %req.container_id, error = %e, "queued DEL failed; will retry")
                }
            }
        }
        done
    }
}
