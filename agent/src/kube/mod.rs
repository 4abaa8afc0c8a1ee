//! Kubernetes mode of the agent (`weft agent --kube`): peers from the Node list, the first
//! ring division agreed through a ConfigMap, the node's bridge address, kube-proxy's kernel
//! settings, the CNI configuration written once the agent is ready, and node reclaim.
//! The API is reached through [`api::KubeApi`] (weft's own types; kube-rs in `client`, an
//! in-memory fake in tests). docs/kubernetes-agent.md states the rules.

pub mod api;
pub mod client;
pub mod cni;
#[cfg(test)]
mod fake;
pub mod lease;
pub mod peers;
pub mod reclaim;
pub mod registry;
pub mod ring;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use self::api::{ApiError, KubeApi, NodeInfo};
use self::client::KubeClient;
use self::reclaim::{Reclaimer, Takeover};
use crate::dataplane::Dataplane;
use crate::endpoints::Endpoints;
use crate::endpoints::ipam::{IpamHandle, ReclaimError};
use crate::identity::PeerName;
use crate::ipam::InitMode;
use crate::mesh::view::MeshView;
use crate::policy::state::Event;
use crate::subsystem::{Hub, Tasks};

/// Kubernetes-mode settings (from `--kube`, `--node-name`, `--kube-namespace`,
/// `--cni-conf-dir`, `--no-network-policy`).
#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// This Node's name (the downward API's spec.nodeName).
    pub node_name: String,
    /// Where weft's ConfigMaps and Lease live (the agent's own namespace).
    pub namespace: String,
    /// Where `10-weft.conflist` is written.
    pub cni_conf_dir: PathBuf,
    /// The agent's socket, as weft-cni on the host reaches it.
    pub socket: PathBuf,
    /// The mesh port every agent of the cluster listens on.
    pub mesh_port: u16,
    /// Enforce NetworkPolicies on this node (off with `--no-network-policy`).
    pub network_policy: bool,
    /// Log denied connections to the kernel log (`--policy-log`).
    pub policy_log: bool,
    /// Check established connections packet by packet (`--policy-strict`).
    pub policy_strict: bool,
}

/// The namespace the agent runs in: the ServiceAccount's, else kube-system.
pub fn default_namespace() -> String {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "kube-system".to_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Ring(#[from] ring::RingError),
}

/// Connected and, unless `--ipalloc-init` was given, with the ring rule decided: what the
/// daemon needs before IP allocation starts.
#[derive(Debug)]
pub struct Prepared {
    cfg: KubeConfig,
    api: Arc<KubeClient>,
    /// `None` when `--ipalloc-init` was given by hand.
    pub decision: Option<ring::Decision>,
}

/// How long start-up keeps retrying an API server that does not answer.
const START_PATIENCE: Duration = Duration::from_secs(60);

/// Connects to the API server and decides the ring's init mode (unless `init_given`).
/// RBAC refusals fail at once (they need a fix); other failures are retried for a minute.
pub async fn prepare(
    cfg: KubeConfig,
    me: PeerName,
    init_given: bool,
) -> Result<Prepared, KubeError> {
    let api = Arc::new(KubeClient::connect(cfg.namespace.clone()).await?);
    let deadline = tokio::time::Instant::now() + START_PATIENCE;
    let decision = loop {
        if init_given {
            break None;
        }
        match ring::decide(api.as_ref(), me, &cfg.node_name).await {
            Ok(d) => break Some(d),
            Err(ring::RingError::Api(
                e @ ApiError::Failed { .. } | e @ ApiError::Status { .. },
            )) if tokio::time::Instant::now() < deadline => {
                warn!(error = %e, "the Kubernetes API server is not answering yet; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    info!(
        node = %cfg.node_name,
        namespace = %cfg.namespace,
        ring = decision.as_ref().map_or("given by --ipalloc-init", |d| d.reason.as_str()),
        "Kubernetes mode"
    );
    Ok(Prepared { cfg, api, decision })
}

impl Prepared {
    /// The init mode for IP allocation, if this mode decided one.
    pub fn init_mode(&self) -> Option<InitMode> {
        self.decision.as_ref().map(|d| d.mode.clone())
    }

    pub fn node_name(&self) -> &str {
        &self.cfg.node_name
    }

    /// Whether denied connections are logged (`--policy-log`).
    pub fn policy_log(&self) -> bool {
        self.cfg.policy_log
    }

    /// Whether established connections are checked packet by packet (`--policy-strict`).
    pub fn policy_strict(&self) -> bool {
        self.cfg.policy_strict
    }

    /// Starts the NetworkPolicy, Pod and Namespace watches when enforcement is on, and hands
    /// back their events (the daemon passes them to `netpol`, which this module does not
    /// know).
    pub fn policy_events(&self, tasks: &mut Tasks) -> Option<mpsc::Receiver<Event>> {
        if !self.cfg.network_policy {
            return None;
        }
        let (events, task) = self.api.watch_policy_objects(tasks.shutdown().clone());
        tasks.spawn("kube-policy-watch", task);
        Some(events)
    }
}

/// Starts the Kubernetes subsystem: the Node watch, the peer source, and the node task
/// (kernel settings, bridge address, CNI configuration, registration, reclaim).
pub fn start(prepared: Prepared, dp: Arc<dyn Dataplane>, hub: &Hub, tasks: &mut Tasks) {
    let Prepared { cfg, api, .. } = prepared;
    let shutdown = tasks.shutdown().clone();
    let (nodes, watch_task) = api.watch_nodes(shutdown.clone());
    tasks.spawn("kube-nodes", watch_task);
    tasks.spawn(
        "kube-peers",
        peers::run(
            hub.mesh.clone(),
            nodes.clone(),
            cfg.node_name.clone(),
            cfg.mesh_port,
            shutdown.clone(),
        ),
    );
    let node = NodeTask {
        cfg,
        api,
        dp,
        endpoints: hub.endpoints.clone(),
        takeover: HubTakeover { ipam: hub.ipam.clone(), view: hub.mesh.view() },
        me: hub.identity.name,
        nodes,
        shutdown,
    };
    tasks.spawn("kube-node", node.run());
}

/// Takes a peer's space over through the IPAM handle (refused while the mesh reaches it).
struct HubTakeover {
    ipam: IpamHandle,
    view: watch::Receiver<MeshView>,
}

#[async_trait::async_trait]
impl Takeover for HubTakeover {
    async fn rmpeer(&self, peer: PeerName) -> Result<u128, ReclaimError> {
        let view = self.view.borrow().clone();
        self.ipam.rmpeer(&peer.to_string(), &view).await
    }
}

/// How often the reclaim pass (and the check of the CNI file) runs.
const PASS_EVERY: Duration = Duration::from_secs(5);
/// How long a deleted Node's agent waits for the heir of its space to confirm.
const LEAVE_BUDGET: Duration = Duration::from_secs(10);

/// What the agent knows of its own Node.
#[derive(Debug, Default)]
struct OwnNode {
    /// Passes in a row that found it NotFound.
    missing: u8,
    /// Its space was handed over because it was deleted.
    left: bool,
}

/// What to do after a look at the agent's own Node.
#[derive(Debug, PartialEq, Eq)]
enum OwnAction {
    Nothing,
    /// NotFound twice in a row: hand the space over and unregister.
    Leave,
    /// Back after a Leave.
    Register,
}

impl OwnNode {
    /// `exists`: the direct GET's answer, `None` when it failed (which changes nothing).
    fn step(&mut self, exists: Option<bool>) -> OwnAction {
        match exists {
            Some(true) => {
                self.missing = 0;
                if std::mem::take(&mut self.left) {
                    return OwnAction::Register;
                }
            }
            Some(false) => self.missing = self.missing.saturating_add(1),
            None => {}
        }
        if self.missing >= 2 && !self.left {
            self.left = true;
            return OwnAction::Leave;
        }
        OwnAction::Nothing
    }
}

struct NodeTask {
    cfg: KubeConfig,
    api: Arc<KubeClient>,
    dp: Arc<dyn Dataplane>,
    endpoints: Endpoints,
    takeover: HubTakeover,
    me: PeerName,
    nodes: watch::Receiver<Option<Vec<NodeInfo>>>,
    shutdown: CancellationToken,
}

impl NodeTask {
    async fn run(mut self) {
        self.kernel_settings();
        if !self.wait_ready().await || !self.expose().await {
            return;
        }
        self.write_cni();
        self.register().await;
        let mut reclaimer = Reclaimer::new(self.cfg.node_name.clone(), self.me);
        let mut own = OwnNode::default();
        let mut every = tokio::time::interval(PASS_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut listed = self.listed();
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = every.tick() => {}
                changed = self.nodes.changed() => {
                    if changed.is_err() { return }
                    // A Node gone from the list starts a pass at once; others wait.
                    let now = self.listed();
                    let gone = listed.difference(&now).next().is_some();
                    listed = now;
                    if !gone { continue }
                }
            }
            listed = self.listed();
            self.write_cni();
            if self.own_node(&mut own).await {
                continue; // this Node is gone: not a member of the cluster now
            }
            match reclaimer.pass(self.api.as_ref(), &self.takeover, &listed, unix_now()).await {
                Ok(outcomes) => reclaim::log(&outcomes),
                Err(e) => warn!(error = %e, "node reclaim pass failed; retrying"),
            }
        }
    }

    /// Follows this agent's own Node. Deleted (NotFound on two passes in a row) while the
    /// agent still runs (its kubelet stopped, say): the agent hands its address space to a
    /// reachable peer itself, exactly as `weft reset` does, and removes its registry entry;
    /// the others could not take it over while the mesh still reaches it. Back again: it
    /// registers again and asks for space when it needs some. Returns whether the Node is
    /// gone.
    async fn own_node(&self, own: &mut OwnNode) -> bool {
        let exists = self.api.node_exists(&self.cfg.node_name).await.ok();
        match own.step(exists) {
            OwnAction::Nothing => {}
            OwnAction::Register => {
                info!(node = %self.cfg.node_name, "this Node is back; registering again");
                self.register().await;
            }
            OwnAction::Leave => {
                // Under the reclaim Lease, so that no survivor takes the same space over at
                // the same time (it re-reads the registry under the Lease and finds the entry
                // gone).
                let held = match lease::acquire(self.api.as_ref(), &self.cfg.node_name, unix_now())
                    .await
                {
                    Ok(Some(held)) => held,
                    _ => {
                        own.left = false; // tried again on the next pass
                        return true;
                    }
                };
                warn!(
                    node = %self.cfg.node_name,
                    "this Node was deleted while the agent runs; handing its address space over"
                );
                match self.endpoints.leave(LEAVE_BUDGET).await {
                    Ok(heir) => info!(heir = ?heir, "address space handed over"),
                    Err(e) => warn!(error = %e, "handing the address space over failed"),
                }
                if let Err(e) =
                    registry::unregister(self.api.as_ref(), &self.cfg.node_name, self.me).await
                {
                    warn!(error = %e, "cannot remove this Node from the registry");
                }
                if let Err(e) = lease::release(self.api.as_ref(), &held).await {
                    warn!(error = %e, "cannot release the reclaim Lease; it expires on its own");
                }
            }
        }
        own.left
    }

    fn listed(&self) -> BTreeSet<String> {
        self.nodes.borrow().iter().flatten().map(|n| n.name.clone()).collect()
    }

    /// What kube-proxy needs of the kernel: bridged traffic through iptables/nftables.
    /// The sysctls exist once br_netfilter is there (built in, or loaded by us or the host).
    fn kernel_settings(&self) {
        const KEYS: [&str; 2] =
            ["net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables"];
        if self.dp.set_sysctl(KEYS[0], "1").is_err() {
            if let Err(e) = self.dp.load_module("br_netfilter") {
                warn!(
                    error = %e,
                    "cannot load br_netfilter (mount the host's /lib/modules read-only, or run \
                     `modprobe br_netfilter` on the host); Services may not work between pods \
                     of one node"
                );
            }
        }
        for key in KEYS {
            if let Err(e) = self.dp.set_sysctl(key, "1") {
                warn!(error = %e, key, "cannot set this sysctl; kube-proxy's rules miss bridged traffic");
            }
        }
    }

    async fn wait_ready(&mut self) -> bool {
        let mut ready = self.endpoints.readiness();
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            r = ready.wait_for(|r| r.ready) => r.is_ok(),
        }
    }

    /// Gives the bridge an address in the default subnet (kubelet probes and Services reach
    /// pods through it); waits for address space from the ring if needed.
    async fn expose(&self) -> bool {
        let mut said = false;
        loop {
            match self.endpoints.expose(Vec::new(), None).await {
                Ok(addrs) => {
                    info!(addresses = ?addrs, "bridge address for this node");
                    return true;
                }
                Err(e) => {
                    if !said {
                        info!(reason = %e, "waiting for address space before writing the CNI configuration");
                        said = true;
                    }
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Writes the CNI configuration (a no-op when it is in place).
    fn write_cni(&self) {
        match cni::write_conflist(&self.cfg.cni_conf_dir, &self.cfg.socket) {
            Ok(true) => info!(
                path = %self.cfg.cni_conf_dir.join(cni::CONFLIST_NAME).display(),
                "CNI configuration written: pods can be scheduled on this node"
            ),
            Ok(false) => {}
            Err(e) => error!(
                dir = %self.cfg.cni_conf_dir.display(),
                error = %e,
                "cannot write the CNI configuration (is the host's CNI config directory mounted \
                 writable at --cni-conf-dir?)"
            ),
        }
    }

    async fn register(&self) {
        loop {
            match registry::register(self.api.as_ref(), &self.cfg.node_name, self.me).await {
                Ok(registry::Registered::Replaced(old)) => {
                    info!(old = %old, "this node ran peer {old} before; its space will be reclaimed");
                    return;
                }
                Ok(_) => return,
                Err(e) => warn!(error = %e, "cannot record this node's peer name; retrying"),
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(PASS_EVERY) => {}
            }
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_node_leaves_only_after_two_not_found_and_returns() {
        let mut own = OwnNode::default();
        assert_eq!(own.step(Some(true)), OwnAction::Nothing);
        assert_eq!(own.step(Some(false)), OwnAction::Nothing);
        assert_eq!(own.step(None), OwnAction::Nothing, "a failed GET is not NotFound");
        assert_eq!(own.step(Some(true)), OwnAction::Nothing, "back before the second look");
        assert_eq!(own.step(Some(false)), OwnAction::Nothing);
        assert_eq!(own.step(Some(false)), OwnAction::Leave);
        assert!(own.left);
        assert_eq!(own.step(Some(false)), OwnAction::Nothing, "only once");
        assert_eq!(own.step(None), OwnAction::Nothing);
        assert_eq!(own.step(Some(true)), OwnAction::Register);
        assert_eq!(own.step(Some(true)), OwnAction::Nothing);
    }
}
