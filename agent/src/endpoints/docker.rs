//! Docker's remote IPAM and network driver calls as endpoint operations (docs/docker.md).
//! Docker asks for an address first (IPAM `RequestAddress`, which names no endpoint), then
//! creates the endpoint with it (`CreateEndpoint`), then joins it to the container's sandbox
//! (`Join`, which names the namespace). The address's reservation, `docker:ADDRESS`, becomes
//! the endpoint at Join and is set up by the same code as a CNI ADD (same rollback, records
//! and reconciliation); Leave takes the interface away and leaves the reservation, which
//! Docker's `ReleaseAddress` ends.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use tracing::{info, warn};

use super::error::EndpointError;
use super::record::{EndpointRecord, docker_id};
use super::{Endpoints, blocking};
use crate::dataplane::HOST_IFNAME_PREFIX;

/// The name of the inner end before Docker moves and renames it: the host end's, with
/// another prefix (so both fit IFNAMSIZ and are found from the record).
pub fn handover_ifname(host_ifname: &str) -> String {
    format!("wfc{}", host_ifname.strip_prefix(HOST_IFNAME_PREFIX).unwrap_or(host_ifname))
}

impl Endpoints {
    /// `RequestPool`: the subnet of a new Docker network, checked against the range.
    pub async fn docker_pool(&self, subnet: Option<IpNet>) -> Result<IpNet, EndpointError> {
        self.inner.state.call(move |s| s.docker_pool(subnet)).await?
    }

    /// `RequestAddress` for the gateway: the bridge's address in `subnet`.
    pub async fn docker_gateway(
        &self,
        subnet: IpNet,
        budget: Duration,
    ) -> Result<IpNet, EndpointError> {
        self.wait_ready(budget).await?;
        self.allocating(budget, move |s| s.docker_gateway(subnet)).await
    }

    /// `RequestAddress`: `addr`, or the lowest free address of `subnet`.
    pub async fn docker_request(
        &self,
        subnet: IpNet,
        addr: Option<IpAddr>,
        budget: Duration,
    ) -> Result<IpNet, EndpointError> {
        self.wait_ready(budget).await?;
        let lock = addr.map(docker_id);
        let _guard = match &lock {
            Some(id) => Some(self.inner.locks.lock(id).await),
            None => None,
        };
        self.allocating(budget, move |s| s.docker_request(subnet, addr)).await
    }

    /// `ReleaseAddress`: removes the endpoint or reservation that holds `addr`; false if none.
    pub async fn docker_release(&self, addr: IpAddr) -> Result<bool, EndpointError> {
        let id = docker_id(addr);
        let _guard = self.inner.locks.lock(&id).await;
        let id2 = id.clone();
        let Some(rec) = self.inner.state.call(move |s| s.record(&id2)).await? else {
            return Ok(false);
        };
        if rec.netns.is_some() && !rec.host_ifname.is_empty() {
            let (dp, ifname) = (self.inner.dp.clone(), rec.host_ifname.clone());
            blocking(move || dp.teardown_endpoint(&ifname)).await?;
        }
        let removed = self.inner.state.call(move |s| s.remove(&id)).await??;
        Ok(removed.is_some())
    }

    /// `CreateEndpoint`: ties `addr` to Docker's endpoint id.
    pub async fn docker_bind(
        &self,
        addr: IpNet,
        endpoint: String,
        network: String,
    ) -> Result<EndpointRecord, EndpointError> {
        let id = docker_id(addr.addr());
        let _guard = self.inner.locks.lock(&id).await;
        self.inner.state.call(move |s| s.docker_bind(addr, &endpoint, &network)).await?
    }

    /// The record of Docker's endpoint `endpoint`, if any.
    pub async fn docker_endpoint(
        &self,
        endpoint: &str,
    ) -> Result<Option<EndpointRecord>, EndpointError> {
        let e = endpoint.to_owned();
        self.inner.state.call(move |s| s.docker_endpoint(&e)).await
    }

    /// `Join`: creates the endpoint's veth pair with the inner end, named as returned, left
    /// for Docker to move into the sandbox (which does not exist yet: runc creates it after
    /// Join, and Docker sets the inner end's address and routes then). A failure leaves
    /// nothing behind (the address included: Docker releases it again anyway).
    pub async fn docker_join(
        &self,
        endpoint: &str,
        sandbox: PathBuf,
    ) -> Result<(EndpointRecord, String), EndpointError> {
        let rec = self
            .docker_endpoint(endpoint)
            .await?
            .ok_or_else(|| EndpointError::Unknown(format!("Docker endpoint {endpoint}")))?;
        let _guard = self.inner.locks.lock(&rec.id).await;
        let e = endpoint.to_owned();
        let record = self.inner.state.call(move |s| s.docker_join(&e, sandbox)).await??;
        let spec = record
            .spec(&self.inner.bridge)
            .ok_or_else(|| EndpointError::invalid("netns", "endpoint without namespace"))?;
        let peer = handover_ifname(&record.host_ifname);
        let (dp, p) = (self.inner.dp.clone(), peer.clone());
        match blocking(move || dp.handover_endpoint(&spec, &p)).await {
            Ok(st) => {
                let (id, host_mac, mac) = (record.id.clone(), st.host_mac, st.container_mac);
                self.inner.state.call(move |s| s.note_macs(&id, host_mac, mac)).await?;
            }
            Err(e) => {
                warn!(endpoint = %record.id, error = %e, "Docker endpoint setup failed; rolling back");
                self.discard(&record.id, &record.host_ifname).await;
                return Err(e);
            }
        }
        info!(endpoint = %record.id, docker = %endpoint, "Docker endpoint joined");
        Ok((record, peer))
    }

    /// Releases `rec` (a record from `docker:`, with its interface if any) after Docker said
    /// it no longer has its endpoint (`docker::reconcile`); nothing if the record changed since
    /// it was read, as a call from Docker may have moved it on. Returns whether it was released.
    pub async fn docker_forget(&self, rec: &EndpointRecord) -> Result<bool, EndpointError> {
        let _guard = self.inner.locks.lock(&rec.id).await;
        if !self.still_recorded(rec).await {
            return Ok(false);
        }
        if !rec.host_ifname.is_empty() {
            let (dp, ifname) = (self.inner.dp.clone(), rec.host_ifname.clone());
            blocking(move || dp.teardown_endpoint(&ifname)).await?;
        }
        let id = rec.id.clone();
        let removed = self.inner.state.call(move |s| s.docker_forget(&id)).await??;
        Ok(removed.is_some())
    }

    /// Gives Docker's endpoint `endpoint` the DNS name `name` and the further names
    /// `aliases`, if it is still joined.
    pub async fn docker_name(
        &self,
        endpoint: &str,
        name: String,
        aliases: Vec<String>,
    ) -> Result<(), EndpointError> {
        let Some(rec) = self.docker_endpoint(endpoint).await? else { return Ok(()) };
        let _guard = self.inner.locks.lock(&rec.id).await;
        let e = endpoint.to_owned();
        self.inner
            .state
            .call(move |s| match s.docker_endpoint(&e) {
                Some(r) if r.kind == super::record::Kind::Docker => {
                    s.set_names(&r.id, Some(name), aliases).map(|_| ())
                }
                _ => Ok(()),
            })
            .await?
    }

    /// `Leave`: removes the interface; the address stays reserved until `ReleaseAddress`.
    /// False if the endpoint is unknown.
    pub async fn docker_leave(&self, endpoint: &str) -> Result<bool, EndpointError> {
        let Some(rec) = self.docker_endpoint(endpoint).await? else { return Ok(false) };
        let _guard = self.inner.locks.lock(&rec.id).await;
        // Read again under the lock: a ReleaseAddress may have run meanwhile.
        let Some(rec) = self.docker_endpoint(endpoint).await? else { return Ok(false) };
        if !rec.host_ifname.is_empty() {
            let (dp, ifname) = (self.inner.dp.clone(), rec.host_ifname.clone());
            blocking(move || dp.teardown_endpoint(&ifname)).await?;
        }
        let id = rec.id.clone();
        self.inner.state.call(move |s| s.docker_unjoin(&id)).await??;
        Ok(true)
    }
}
