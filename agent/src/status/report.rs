//! The status report: one JSON document describing every subsystem, served on `GET /status`,
//! returned by the `Status` RPC and rendered by `weft status`. Its schema is docs/status.md;
//! fields are only ever added.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub version: String,
    pub peer: PeerReport,
    pub ready: bool,
    #[serde(default)]
    pub not_ready_reason: String,
    pub bridge: BridgeReport,
    pub ipam: IpamReport,
    pub endpoints: EndpointCounts,
    #[serde(default)]
    pub mesh: crate::mesh::report::MeshReport,
    #[serde(default)]
    pub overlay: crate::overlay::OverlayReport,
    /// Absent when the agent runs with --no-dns.
    #[serde(default)]
    pub dns: Option<crate::dns::DnsReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    pub name: String,
    pub nickname: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeReport {
    pub name: String,
    pub mtu: u32,
    pub mac: String,
    /// The host's own addresses on the bridge (exposed subnets).
    pub addresses: Vec<IpNet>,
    /// What the last reconciliation had to repair (empty when nothing was wrong).
    #[serde(default)]
    pub last_repairs: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamReport {
    pub range: IpNet,
    pub default_subnet: IpNet,
    /// Addresses handed out by this peer.
    pub used: u64,
    /// Free addresses in the space this peer owns.
    pub free: u64,
    /// The address ranges this peer owns, as "first-last".
    pub owned: Vec<String>,
    /// The shared ring: mode, state, every peer's share, problems.
    #[serde(flatten)]
    pub ring: crate::ipam::manager::IpamStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointCounts {
    pub cni: u32,
    pub attached: u32,
    /// Holders of addresses without an interface (the `Reserve` API).
    #[serde(default)]
    pub reserved: u32,
}
