//! The mesh as other subsystems see it: a typed snapshot published on a `watch` after every
//! change that matters to them (peers joining or leaving, reachability, connections). IPAM,
//! DNS, `rmpeer` and every later subsystem read this, never the status report.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use crate::identity::PeerName;

/// How a direct connection protects what it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Encryption {
    /// No password: nothing is encrypted.
    None,
    /// The control channel is encrypted; data-plane traffic is not (both peers trust each
    /// other's subnet, `--trusted-subnets`).
    ControlOnly,
    /// The control channel and the data-plane traffic are encrypted.
    Full,
}

/// One direct connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnView {
    pub remote: SocketAddr,
    pub outbound: bool,
    pub encryption: Encryption,
}

/// The mesh, typed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshView {
    /// Peers this one has a route to now (itself excluded).
    pub reachable: BTreeSet<PeerName>,
    /// Every peer in the topology, itself included, with its nickname.
    pub peers: BTreeMap<PeerName, String>,
    /// Established direct connections.
    pub connections: BTreeMap<PeerName, ConnView>,
}

impl MeshView {
    /// Whether `peer` can be reached now.
    pub fn is_reachable(&self, peer: PeerName) -> bool {
        self.reachable.contains(&peer)
    }

    /// The nickname of a peer in the topology.
    pub fn nickname(&self, peer: PeerName) -> Option<&str> {
        self.peers.get(&peer).map(String::as_str)
    }
}
