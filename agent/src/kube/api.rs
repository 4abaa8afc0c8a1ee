//! The Kubernetes API as weft uses it, in weft's own types: the Node list, a direct GET of
//! one Node, ConfigMaps and Leases with resourceVersion compare-and-swap. The kube-rs
//! implementation is in `client`; the logic (`ring`, `registry`, `lease`, `reclaim`) is
//! tested over the in-memory fake in `fake`.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// A Node as weft needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// The Node's `InternalIP` addresses, in the order the API lists them.
    pub internal_ips: Vec<IpAddr>,
}

/// A ConfigMap's data with the resourceVersion it was read at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    pub data: BTreeMap<String, String>,
    pub version: String,
}

/// The parts of a `coordination.k8s.io/v1` Lease weft uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// `spec.holderIdentity`; `None` when released.
    pub holder: Option<String>,
    /// `spec.renewTime`, seconds since the Unix epoch.
    pub renewed: i64,
    /// `spec.leaseDurationSeconds`.
    pub duration_secs: i64,
    /// `metadata.resourceVersion` (empty for a Lease not yet created).
    pub version: String,
}

/// The outcome of a create or a compare-and-swap replace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    Done,
    /// Someone else was first: the object exists (create) or changed since it was read
    /// (replace). Re-read and decide again.
    Lost,
}

/// A failed API call, saying what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "{verb} {resource}: forbidden; the weft ServiceAccount needs RBAC permission to {verb} \
         {resource} (see docs/kubernetes-agent.md): {message}"
    )]
    Forbidden { verb: &'static str, resource: String, message: String },
    #[error("{verb} {resource}: HTTP {code}: {message}")]
    Status { verb: &'static str, resource: String, code: u16, message: String },
    #[error("{verb} {resource}: {message}")]
    Failed { verb: &'static str, resource: String, message: String },
    #[error("no usable Kubernetes configuration (in-cluster ServiceAccount or KUBECONFIG): {0}")]
    Config(String),
}

/// The calls weft makes. Every "get" goes to the API server (no cache): decisions that
/// remove state (node reclaim) must see the truth, not a watch that may lag.
#[async_trait::async_trait]
pub trait KubeApi: Send + Sync + std::fmt::Debug {
    async fn list_nodes(&self) -> Result<Vec<NodeInfo>, ApiError>;
    /// A direct GET of one Node: `Ok(false)` only on NotFound. Every other failure is an
    /// error, which callers treat as "the Node exists".
    async fn node_exists(&self, name: &str) -> Result<bool, ApiError>;
    async fn get_config_map(&self, name: &str) -> Result<Option<Stored>, ApiError>;
    async fn create_config_map(
        &self,
        name: &str,
        data: &BTreeMap<String, String>,
    ) -> Result<Write, ApiError>;
    /// Replaces the data if the ConfigMap is still at `version`.
    async fn replace_config_map(
        &self,
        name: &str,
        data: &BTreeMap<String, String>,
        version: &str,
    ) -> Result<Write, ApiError>;
    async fn get_lease(&self, name: &str) -> Result<Option<LeaseRecord>, ApiError>;
    async fn create_lease(&self, name: &str, lease: &LeaseRecord) -> Result<Write, ApiError>;
    /// Replaces the Lease if it is still at `lease.version`.
    async fn replace_lease(&self, name: &str, lease: &LeaseRecord) -> Result<Write, ApiError>;
}
