//! An in-memory API server for the tests of the Kubernetes logic: Nodes, ConfigMaps and
//! Leases with resourceVersions that change on every write, so compare-and-swap loses the
//! way the real one does.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::api::{ApiError, KubeApi, LeaseRecord, NodeInfo, Stored, Write};

#[derive(Debug, Default)]
struct State {
    nodes: BTreeMap<String, NodeInfo>,
    config_maps: BTreeMap<String, Stored>,
    leases: BTreeMap<String, LeaseRecord>,
    next_version: u64,
    /// Direct Node GETs fail (an unreachable API server, say).
    node_get_fails: bool,
    /// Calls are refused as RBAC would.
    forbidden: bool,
}

#[derive(Debug, Default)]
pub struct FakeApi {
    state: Mutex<State>,
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().expect("test address")
}

impl FakeApi {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn add_node(&self, name: &str, ips: &[&str]) {
        let info =
            NodeInfo { name: name.into(), internal_ips: ips.iter().map(|s| ip(s)).collect() };
        self.lock().nodes.insert(name.into(), info);
    }

    pub fn delete_node(&self, name: &str) {
        self.lock().nodes.remove(name);
    }

    pub fn set_node_get_fails(&self, fails: bool) {
        self.lock().node_get_fails = fails;
    }

    pub fn set_forbidden(&self, forbidden: bool) {
        self.lock().forbidden = forbidden;
    }

    pub fn config_map(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.lock().config_maps.get(name).map(|s| s.data.clone())
    }

    pub fn delete_config_map(&self, name: &str) {
        self.lock().config_maps.remove(name);
    }

    pub fn lease(&self, name: &str) -> Option<LeaseRecord> {
        self.lock().leases.get(name).cloned()
    }

    /// Yields first, so that concurrent callers interleave between their read and write
    /// as they would against a real server.
    async fn check(&self, verb: &'static str, resource: &str) -> Result<(), ApiError> {
        tokio::task::yield_now().await;
        if self.lock().forbidden {
            return Err(ApiError::Forbidden {
                verb,
                resource: resource.into(),
                message: "fake RBAC".into(),
            });
        }
        Ok(())
    }
}

impl State {
    fn bump(&mut self) -> String {
        self.next_version += 1;
        self.next_version.to_string()
    }
}

#[async_trait::async_trait]
impl KubeApi for FakeApi {
    async fn list_nodes(&self) -> Result<Vec<NodeInfo>, ApiError> {
        self.check("list", "nodes").await?;
        Ok(self.lock().nodes.values().cloned().collect())
    }

    async fn node_exists(&self, name: &str) -> Result<bool, ApiError> {
        self.check("get", "nodes").await?;
        let s = self.lock();
        if s.node_get_fails {
            return Err(ApiError::Failed {
                verb: "get",
                resource: format!("nodes/{name}"),
                message: "connection refused".into(),
            });
        }
        Ok(s.nodes.contains_key(name))
    }

    async fn get_config_map(&self, name: &str) -> Result<Option<Stored>, ApiError> {
        self.check("get", "configmaps").await?;
        Ok(self.lock().config_maps.get(name).cloned())
    }

    async fn create_config_map(
        &self,
        name: &str,
        data: &BTreeMap<String, String>,
    ) -> Result<Write, ApiError> {
        self.check("create", "configmaps").await?;
        let mut s = self.lock();
        if s.config_maps.contains_key(name) {
            return Ok(Write::Lost);
        }
        let version = s.bump();
        s.config_maps.insert(name.into(), Stored { data: data.clone(), version });
        Ok(Write::Done)
    }

    async fn replace_config_map(
        &self,
        name: &str,
        data: &BTreeMap<String, String>,
        version: &str,
    ) -> Result<Write, ApiError> {
        self.check("update", "configmaps").await?;
        let mut s = self.lock();
        match s.config_maps.get(name) {
            Some(cur) if cur.version == version => {}
            _ => return Ok(Write::Lost),
        }
        let version = s.bump();
        s.config_maps.insert(name.into(), Stored { data: data.clone(), version });
        Ok(Write::Done)
    }

    async fn get_lease(&self, name: &str) -> Result<Option<LeaseRecord>, ApiError> {
        self.check("get", "leases").await?;
        Ok(self.lock().leases.get(name).cloned())
    }

    async fn create_lease(&self, name: &str, lease: &LeaseRecord) -> Result<Write, ApiError> {
        self.check("create", "leases").await?;
        let mut s = self.lock();
        if s.leases.contains_key(name) {
            return Ok(Write::Lost);
        }
        let version = s.bump();
        s.leases.insert(name.into(), LeaseRecord { version, ..lease.clone() });
        Ok(Write::Done)
    }

    async fn replace_lease(&self, name: &str, lease: &LeaseRecord) -> Result<Write, ApiError> {
        self.check("update", "leases").await?;
        let mut s = self.lock();
        match s.leases.get(name) {
            Some(cur) if cur.version == lease.version => {}
            _ => return Ok(Write::Lost),
        }
        let version = s.bump();
        s.leases.insert(name.into(), LeaseRecord { version, ..lease.clone() });
        Ok(Write::Done)
    }
}
