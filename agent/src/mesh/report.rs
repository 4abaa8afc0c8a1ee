//! The mesh's part of the status report (`weft status`, `status peers|connections|targets`).

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshReport {
    pub name: String,
    pub nickname: String,
    pub port: u16,
    /// A password is set: connections are authenticated and encrypted.
    pub encryption: bool,
    pub discovery: bool,
    pub conn_limit: u32,
    #[serde(default)]
    pub trusted_subnets: Vec<IpNet>,
    /// Every peer we know of, ourselves included, with the connections it reports.
    pub peers: Vec<PeerEntryReport>,
    /// Our connections: established, being set up, and recent failures.
    pub connections: Vec<ConnectionReport>,
    pub targets: Vec<TargetReport>,
    /// Control-plane routes: destination -> next hop.
    #[serde(default)]
    pub unicast: Vec<(String, String)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEntryReport {
    pub name: String,
    pub nickname: String,
    pub uid: u64,
    pub version: u64,
    pub connections: Vec<PeerConnectionReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerConnectionReport {
    pub peer: String,
    pub address: String,
    pub outbound: bool,
    pub established: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionReport {
    pub peer: String,
    pub nickname: String,
    pub address: String,
    pub outbound: bool,
    /// "established", "connecting" or "failed".
    pub state: String,
    /// For failures, the reason.
    pub info: String,
    /// The control channel is encrypted (a password is set).
    pub encrypted: bool,
    /// Data-plane traffic to this peer is encrypted (a password is set and the peers do not
    /// both trust each other's subnet).
    #[serde(default)]
    pub data_encrypted: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetReport {
    pub target: String,
    pub discovered: bool,
    /// The peer the target led to, once connected.
    pub peer: String,
    pub last_error: String,
}

impl MeshReport {
    /// The peers this one can reach now (it has a route to), itself excluded.
    pub fn reachable(&self) -> std::collections::BTreeSet<crate::identity::PeerName> {
        self.unicast.iter().filter_map(|(dst, _)| dst.parse().ok()).collect()
    }

    /// Counts of connections by state.
    pub fn count(&self, state: &str) -> usize {
        self.connections.iter().filter(|c| c.state == state).count()
    }
}
