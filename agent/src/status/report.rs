//! The status report: one JSON document describing every subsystem, served on `GET /status`,
//! returned by the `Status` RPC and rendered by `weft status`. Its schema is docs/status.md;
//! fields are only ever added.

use serde::{Deserialize, Serialize};

use crate::services::Services;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub version: String,
    pub peer: PeerReport,
    pub ready: bool,
    #[serde(default)]
    pub not_ready_reason: String,
    pub bridge: crate::endpoints::report::BridgeReport,
    pub ipam: crate::endpoints::report::IpamReport,
    pub endpoints: crate::endpoints::report::EndpointCounts,
    #[serde(default)]
    pub mesh: crate::mesh::report::MeshReport,
    #[serde(default)]
    pub overlay: crate::overlay::OverlayReport,
    /// Absent when the agent runs with --no-dns.
    #[serde(default)]
    pub dns: Option<crate::dns::DnsReport>,
    /// NetworkPolicy enforcement; absent outside Kubernetes mode and with
    /// --no-network-policy.
    #[serde(default)]
    pub policy: Option<crate::netpol::PolicyReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    pub name: String,
    pub nickname: String,
}

/// The report, collected from every subsystem's own part.
pub async fn collect(svc: &Services) -> Report {
    let readiness = svc.ready.borrow().clone();
    let (bridge, ipam, endpoints) = svc.hub.endpoints.report().await.unwrap_or_default();
    let dns = match &svc.dns {
        Some(d) => Some(d.report().await),
        None => None,
    };
    let policy = match &svc.policy {
        Some(p) => Some(p.report().await),
        None => None,
    };
    Report {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        peer: PeerReport {
            name: svc.hub.identity.name.to_string(),
            nickname: svc.hub.identity.nickname.clone(),
        },
        ready: readiness.ready,
        not_ready_reason: readiness.reason,
        bridge,
        ipam,
        endpoints,
        mesh: svc.hub.mesh.report(),
        overlay: svc.overlay.borrow().clone(),
        dns,
        policy,
    }
}
