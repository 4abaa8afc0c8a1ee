//! The endpoint state's part of the status report: the bridge, the IP allocation and the
//! endpoint counts, as the state owner describes them.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

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
    /// Why forwarded traffic through the bridge is dropped by rules weft cannot change
    /// (Docker's iptables-legacy FORWARD policy), with the fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_warning: Option<String>,
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
    /// Containers joined by Docker's remote network driver.
    #[serde(default)]
    pub docker: u32,
    /// The Kubernetes pods among the CNI endpoints, with their addresses.
    #[serde(default)]
    pub pods: Vec<PodAddresses>,
    /// Endpoint records that did not decode at start: moved to the state file's quarantine
    /// table (`endpoints/KEY`), not loaded.
    #[serde(default)]
    pub quarantined: Vec<String>,
    /// Every endpoint on this host, for the map page (`weft ps` has the same through the API).
    #[serde(default)]
    pub list: Vec<EndpointEntry>,
}

/// One endpoint of this host, as the map page shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointEntry {
    pub id: String,
    /// `cni`, `attach`, `expose`, `reservation` or `docker`.
    pub kind: String,
    /// Empty for the host's own addresses and for reservations.
    pub mac: String,
    pub addresses: Vec<IpNet>,
    /// `namespace/name` of a Kubernetes pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The DNS name registered for it (a Docker container's name, `weft attach --name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A Kubernetes pod on this host and the addresses it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAddresses {
    pub namespace: String,
    pub name: String,
    pub addresses: Vec<IpNet>,
}

impl From<&super::record::EndpointRecord> for EndpointEntry {
    fn from(r: &super::record::EndpointRecord) -> EndpointEntry {
        let kind = serde_json::to_value(r.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        EndpointEntry {
            id: r.id.clone(),
            kind,
            mac: r.mac.map(|m| m.to_string()).unwrap_or_default(),
            addresses: r.addresses.clone(),
            pod: r.pod.as_ref().map(|p| format!("{}/{}", p.namespace, p.name)),
            name: r.hostname.clone(),
        }
    }
}
