//! The mesh's part of the status report (`weft status`, `status peers|connections|targets`).

use std::net::{IpAddr, SocketAddr};

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
    /// Inbound connections refused before their handshake, and handshakes in progress.
    #[serde(default)]
    pub accepts: super::limits::AcceptReport,
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
    pub state: ConnState,
    /// For failures, the reason.
    pub info: String,
    /// The control channel is encrypted (a password is set).
    pub encrypted: bool,
    /// Data-plane traffic to this peer is encrypted (a password is set and the peers do not
    /// both trust each other's subnet).
    #[serde(default)]
    pub data_encrypted: bool,
}

impl ConnectionReport {
    /// Whether this failure is superseded by an established connection to `peer` coming from
    /// `remote`: it is about that peer, about the same host (an inbound connection comes from
    /// another port than the one dialled), or about one of `targets`, the addresses known to
    /// lead to that peer. A target that failed while its peer was down, after which the peer
    /// connected to us, is then no longer reported as failing.
    pub fn superseded_by(&self, peer: &str, remote: SocketAddr, targets: &[&str]) -> bool {
        (!self.peer.is_empty() && self.peer == peer)
            || host_ip(&self.address) == Some(remote.ip())
            || targets.contains(&self.address.as_str())
    }
}

/// The IP address of "ip", "ip:port" or "[ip]:port"; `None` for a host name.
fn host_ip(address: &str) -> Option<IpAddr> {
    address.parse::<SocketAddr>().map(|a| a.ip()).or_else(|_| address.parse::<IpAddr>()).ok()
}

/// The state of one of our connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnState {
    #[default]
    Established,
    Connecting,
    Failed,
}

impl ConnState {
    pub const ALL: [ConnState; 3] =
        [ConnState::Established, ConnState::Connecting, ConnState::Failed];

    pub fn name(self) -> &'static str {
        match self {
            ConnState::Established => "established",
            ConnState::Connecting => "connecting",
            ConnState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for ConnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetReport {
    pub target: String,
    pub discovered: bool,
    /// The peer the target led to, once connected.
    pub peer: String,
    pub last_error: String,
    /// Who wants a direct target: "user" (command line, weft connect), "kubernetes".
    #[serde(default)]
    pub sources: Vec<super::maker::Source>,
    /// We are connected to the peer the target leads to (in either direction).
    #[serde(default)]
    pub connected: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(peer: &str, address: &str) -> ConnectionReport {
        ConnectionReport {
            peer: peer.into(),
            address: address.into(),
            outbound: true,
            state: ConnState::Failed,
            info: "Connection refused (os error 111)".into(),
            ..ConnectionReport::default()
        }
    }

    #[test]
    fn a_connection_supersedes_failures_of_its_peer_host_and_targets() {
        let inbound: SocketAddr = "10.99.0.3:41022".parse().unwrap();
        // A dial of the target 10.99.0.3 failed while h3 was down; then h3 dialled us.
        assert!(failure("", "10.99.0.3").superseded_by("h3", inbound, &[]));
        assert!(failure("", "10.99.0.3:6783").superseded_by("h3", inbound, &[]));
        assert!(failure("h3", "10.99.0.3:52000").superseded_by("h3", inbound, &[]));
        assert!(failure("", "node-3.example").superseded_by("h3", inbound, &["node-3.example"]));
        // Failures of other peers and hosts stay.
        assert!(!failure("", "10.99.0.4").superseded_by("h3", inbound, &[]));
        assert!(!failure("h4", "10.99.0.4:6783").superseded_by("h3", inbound, &["10.99.0.3"]));
        assert!(!failure("", "node-4.example").superseded_by("h3", inbound, &["node-3.example"]));
        let v6: SocketAddr = "[fd00::3]:41022".parse().unwrap();
        assert!(failure("", "[fd00::3]:6783").superseded_by("h3", v6, &[]));
        assert!(failure("", "fd00::3").superseded_by("h3", v6, &[]));
    }
}
