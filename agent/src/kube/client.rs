//! The real [`KubeApi`] over kube-rs (rustls), the Node watch that feeds the peer
//! source and the reclaim filter, and the watches of NetworkPolicies, Pods and Namespaces,
//! parsed here into the policy state's events. Configuration comes from KUBECONFIG (or ~/.kube/config)
//! when set, else from the in-cluster ServiceAccount.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::api::{ApiError, KubeApi, LeaseRecord, NodeInfo, Stored, Write};
use crate::policy::model::{PodKey, PolicyKey};
use crate::policy::parse::{self, ParseError};
use crate::policy::state::{Change, Event};

/// The API server, as the agent's ServiceAccount (or KUBECONFIG) sees it.
#[derive(Clone)]
pub struct KubeClient {
    client: kube::Client,
    namespace: String,
}

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeClient").field("namespace", &self.namespace).finish()
    }
}

/// Maps a kube-rs error to one that names the verb and resource (and RBAC when refused).
fn api_err(verb: &'static str, resource: impl Into<String>, e: kube::Error) -> ApiError {
    let resource = resource.into();
    match e {
        kube::Error::Api(s) if s.is_forbidden() => {
            ApiError::Forbidden { verb, resource, message: s.message }
        }
        kube::Error::Api(s) => {
            ApiError::Status { verb, resource, code: s.code, message: s.message }
        }
        e => ApiError::Failed { verb, resource, message: e.to_string() },
    }
}

fn node_info(n: &Node) -> Option<NodeInfo> {
    let name = n.metadata.name.clone()?;
    let internal_ips = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(|addrs| {
            addrs
                .iter()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    Some(NodeInfo { name, internal_ips })
}

fn lease_record(l: &Lease) -> LeaseRecord {
    let spec = l.spec.clone().unwrap_or_default();
    LeaseRecord {
        holder: spec.holder_identity.filter(|h| !h.is_empty()),
        renewed: spec.renew_time.map(|t| t.0.as_second()).unwrap_or(0),
        duration_secs: spec.lease_duration_seconds.map(i64::from).unwrap_or(0),
        version: l.metadata.resource_version.clone().unwrap_or_default(),
    }
}

impl KubeClient {
    pub async fn connect(namespace: String) -> Result<KubeClient, ApiError> {
        let client =
            kube::Client::try_default().await.map_err(|e| ApiError::Config(e.to_string()))?;
        Ok(KubeClient { client, namespace })
    }

    fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn leases(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn config_map(
        &self,
        name: &str,
        data: &BTreeMap<String, String>,
        version: Option<&str>,
    ) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                resource_version: version.map(str::to_owned),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "weft".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(data.clone()),
            ..ConfigMap::default()
        }
    }

    fn lease(&self, name: &str, l: &LeaseRecord) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                resource_version: (!l.version.is_empty()).then(|| l.version.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: l.holder.clone(),
                lease_duration_seconds: i32::try_from(l.duration_secs).ok(),
                renew_time: Timestamp::from_second(l.renewed).ok().map(MicroTime),
                ..LeaseSpec::default()
            }),
        }
    }

    /// Watches the Node list until shutdown, publishing the whole list after the first full
    /// listing and after every change. Errors (RBAC, a lost connection) are logged and
    /// retried with backoff by the watcher.
    pub fn watch_nodes(
        &self,
        shutdown: CancellationToken,
    ) -> (watch::Receiver<Option<Vec<NodeInfo>>>, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = watch::channel(None);
        let api: Api<Node> = Api::all(self.client.clone());
        let task = async move {
            let stream = watcher(api, watcher::Config::default()).default_backoff();
            futures_util::pin_mut!(stream);
            let mut nodes: BTreeMap<String, NodeInfo> = BTreeMap::new();
            let mut listing: Option<BTreeMap<String, NodeInfo>> = None;
            let mut last_error = String::new();
            loop {
                let ev = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    ev = stream.next() => match ev { Some(ev) => ev, None => return },
                };
                let changed = match ev {
                    Ok(watcher::Event::Init) => {
                        listing = Some(BTreeMap::new());
                        false
                    }
                    Ok(watcher::Event::InitApply(n)) => {
                        if let (Some(l), Some(info)) = (listing.as_mut(), node_info(&n)) {
                            l.insert(info.name.clone(), info);
                        }
                        false
                    }
                    Ok(watcher::Event::InitDone) => {
                        nodes = listing.take().unwrap_or_default();
                        true
                    }
                    Ok(watcher::Event::Apply(n)) => node_info(&n).is_some_and(|info| {
                        nodes.insert(info.name.clone(), info.clone()) != Some(info)
                    }),
                    Ok(watcher::Event::Delete(n)) => {
                        n.metadata.name.as_ref().is_some_and(|name| nodes.remove(name).is_some())
                    }
                    Err(e) => {
                        let msg = watch_error("nodes", &e);
                        if msg != last_error {
                            warn!("{msg} (retrying)");
                            last_error = msg;
                        }
                        false
                    }
                };
                if changed {
                    last_error.clear();
                    tx.send_replace(Some(nodes.values().cloned().collect()));
                }
            }
        };
        (rx, task)
    }

    /// Watches NetworkPolicies, Pods and Namespaces (all namespaces) until shutdown, each
    /// parsed into [`Event`]s: the whole list after every (re)listing, then each change. An
    /// object that cannot be read is logged with the field that is wrong and left out (an
    /// unreadable update removes the version read before: a policy weft cannot read is not
    /// half enforced). Errors (RBAC, a lost connection) are logged and retried with backoff.
    pub fn watch_policy_objects(
        &self,
        shutdown: CancellationToken,
    ) -> (mpsc::Receiver<Event>, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::channel(256);
        let policies = Watched {
            what: "networkpolicies",
            parse: parse::policy,
            key: |p: &NetworkPolicy| {
                let m = &p.metadata;
                Some(PolicyKey { namespace: m.namespace.clone()?, name: m.name.clone()? })
            },
            wrap: Event::Policy,
        };
        let pods = Watched {
            what: "pods",
            parse: parse::pod,
            key: |p: &Pod| {
                let m = &p.metadata;
                Some(PodKey { namespace: m.namespace.clone()?, name: m.name.clone()? })
            },
            wrap: Event::Pod,
        };
        let namespaces = Watched {
            what: "namespaces",
            parse: parse::namespace,
            key: |n: &Namespace| n.metadata.name.clone(),
            wrap: Event::Namespace,
        };
        let client = &self.client;
        let task = futures_util::future::join3(
            policies.run(Api::all(client.clone()), tx.clone(), shutdown.clone()),
            pods.run(Api::all(client.clone()), tx.clone(), shutdown.clone()),
            namespaces.run(Api::all(client.clone()), tx, shutdown),
        );
        (rx, async move {
            task.await;
        })
    }
}

/// What a watch error means to the person running weft; RBAC refusals say what to grant.
fn watch_error(what: &str, e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            if s.is_forbidden() =>
        {
            format!(
                "list/watch {what}: forbidden; the weft ServiceAccount needs RBAC permission to \
                 list and watch {what}: {}",
                s.message
            )
        }
        e => format!("watching {what}: {e}"),
    }
}

/// One kind of object watched for the policy state: how it is read and keyed.
struct Watched<K, T, Key> {
    what: &'static str,
    parse: fn(&K) -> Result<T, ParseError>,
    key: fn(&K) -> Option<Key>,
    wrap: fn(Change<T, Key>) -> Event,
}

impl<K, T, Key> Watched<K, T, Key>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    async fn run(self, api: Api<K>, tx: mpsc::Sender<Event>, shutdown: CancellationToken) {
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        futures_util::pin_mut!(stream);
        let mut listing: Option<Vec<T>> = None;
        let mut last_error = String::new();
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = stream.next() => match ev { Some(ev) => ev, None => return },
            };
            let change = match ev {
                Ok(watcher::Event::Init) => {
                    listing = Some(Vec::new());
                    None
                }
                Ok(watcher::Event::InitApply(o)) => {
                    if let (Some(l), Some(t)) = (listing.as_mut(), self.read(&o)) {
                        l.push(t);
                    }
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    last_error.clear();
                    Some(Change::Resync(listing.take().unwrap_or_default()))
                }
                Ok(watcher::Event::Apply(o)) => match self.read(&o) {
                    Some(t) => Some(Change::Apply(t)),
                    None => (self.key)(&o).map(Change::Delete),
                },
                Ok(watcher::Event::Delete(o)) => (self.key)(&o).map(Change::Delete),
                Err(e) => {
                    let msg = watch_error(self.what, &e);
                    if msg != last_error {
                        warn!("{msg} (retrying)");
                        last_error = msg;
                    }
                    None
                }
            };
            if let Some(c) = change {
                if tx.send((self.wrap)(c)).await.is_err() {
                    return;
                }
            }
        }
    }

    fn read(&self, o: &K) -> Option<T> {
        match (self.parse)(o) {
            Ok(t) => Some(t),
            Err(e) => {
                let m = o.meta();
                let ns = m.namespace.as_deref().map(|n| format!("{n}/")).unwrap_or_default();
                let name = m.name.as_deref().unwrap_or("?");
                warn!(
                    object = format!("{}/{ns}{name}", self.what),
                    error = %e,
                    "cannot read this object; left out of NetworkPolicy enforcement"
                );
                None
            }
        }
    }
}

/// How long a single API call may take before it counts as failed.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

async fn timed<T>(
    verb: &'static str,
    resource: &str,
    fut: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(r) => r.map_err(|e| api_err(verb, resource, e)),
        Err(_) => Err(ApiError::Failed {
            verb,
            resource: resource.to_owned(),
            message: format!("no answer within {CALL_TIMEOUT:?}"),
        }),
    }
}

/// Creates `obj`; `Lost` when it exists already.
async fn create<K>(api: &Api<K>, obj: &K, kind: &str) -> Result<Write, ApiError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let resource = format!("{kind}/{}", obj.meta().name.clone().unwrap_or_default());
    match timed("create", &resource, api.create(&PostParams::default(), obj)).await {
        Ok(_) => Ok(Write::Done),
        Err(e) => lost_on(e, &[409]),
    }
}

/// Replaces `obj` if it is still at the resourceVersion `obj` carries; `Lost` on a
/// conflict or when it was deleted meanwhile.
async fn replace<K>(api: &Api<K>, obj: &K, kind: &str) -> Result<Write, ApiError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let resource = format!("{kind}/{name}");
    match timed("update", &resource, api.replace(&name, &PostParams::default(), obj)).await {
        Ok(_) => Ok(Write::Done),
        Err(e) => lost_on(e, &[404, 409]),
    }
}

/// The HTTP codes that mean "someone else was first" are `Lost`, not errors.
fn lost_on(e: ApiError, codes: &[u16]) -> Result<Write, ApiError> {
    match &e {
        ApiError::Status { code, .. } if codes.contains(code) => Ok(Write::Lost),
        _ => Err(e),
    }
}

#[async_trait::async_trait]
impl KubeApi for KubeClient {
    async fn list_nodes(&self) -> Result<Vec<NodeInfo>, ApiError> {
        let api: Api<Node> = Api::all(self.client.clone());
        let list = timed("list", "nodes", api.list(&Default::default())).await?;
        Ok(list.items.iter().filter_map(node_info).collect())
    }

    async fn node_exists(&self, name: &str) -> Result<bool, ApiError> {
        let api: Api<Node> = Api::all(self.client.clone());
        // get_opt answers None only for a 404; every other failure is an error.
        Ok(timed("get", &format!("nodes/{name}"), api.get_opt(name)).await?.is_some())
    }

    async fn get_config_map(&self, name: &str) -> Result<Option<Stored>, ApiError> {
        let cm =
            timed("get", &format!("configmaps/{name}"), self.config_maps().get_opt(name)).await?;
        Ok(cm.map(|cm| Stored {
            data: cm.data.unwrap_or_default(),
            version: cm.metadata.resource_version.unwrap_or_default(),
        }))
    }

    async fn create_config_map(
        &self,
        name: &str,
        data: &BTreeMap<String, String>,
    ) -> Result<Write, ApiError> {
        create(&self.config_maps(), &self.config_map(name, data, None), "configmaps").await
    }

    async fn replace_config_map(
        &self,
        name: &str,
        data: &BTreeMap<String, String>,
        version: &str,
    ) -> Result<Write, ApiError> {
        replace(&self.config_maps(), &self.config_map(name, data, Some(version)), "configmaps")
            .await
    }

    async fn get_lease(&self, name: &str) -> Result<Option<LeaseRecord>, ApiError> {
        let l = timed("get", &format!("leases/{name}"), self.leases().get_opt(name)).await?;
        Ok(l.as_ref().map(lease_record))
    }

    async fn create_lease(&self, name: &str, lease: &LeaseRecord) -> Result<Write, ApiError> {
        create(&self.leases(), &self.lease(name, lease), "leases").await
    }

    async fn replace_lease(&self, name: &str, lease: &LeaseRecord) -> Result<Write, ApiError> {
        replace(&self.leases(), &self.lease(name, lease), "leases").await
    }
}
