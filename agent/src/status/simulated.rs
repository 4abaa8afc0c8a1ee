//! The status report of a simulated mesh, as one of its peers would serve it: the connection
//! graph of a `mesh::sim` mesh, links from that peer in every overlay mode, endpoints with DNS names on
//! every host, and the range divided among all peers. Feeds the map page at a scale no lab on
//! one machine reaches (the `map-bench` benchmark and the page's large-mesh test). Pure.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ipnet::IpNet;

use super::report::{PeerReport, Report};
use crate::dns::{DnsEntryReport, DnsReport, QueryReport};
use crate::endpoints::report::EndpointEntry;
use crate::ipam::manager::{IpamStatus, PeerShare, RingState};
use crate::mesh::report::{ConnState, ConnectionReport, PeerConnectionReport, PeerEntryReport};
use crate::mesh::sim::{Sim, SimConfig};
use crate::overlay::health::Mode;
use crate::overlay::{LinkReport, RemoteEndpoint, RemoteEndpoints};

/// The allocation range of the simulated mesh (a /8, so 10 000 endpoints fit anywhere).
const RANGE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 0);
const RANGE_SIZE: u64 = 1 << 24;

/// A report as peer 0 of a simulated mesh of `peers` peers (each connected to 3 random others
/// at start) holding `endpoints` endpoints spread evenly over the hosts, serves it.
pub fn simulated_report(peers: usize, endpoints: usize, seed: u64) -> Report {
    let peers = peers.max(1);
    let mut sim = Sim::new(SimConfig { peers, degree: 3, latency: Duration::from_millis(5), seed });
    // The connection graph of the simulation, as every peer holds it once gossip converged
    // (the `mesh-sim` benchmark measures the convergence itself).
    sim.random_mesh();
    let me = Sim::name(0);
    let neighbours: Vec<usize> = sim.neighbours(0).collect();
    let mut r = Report {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        peer: PeerReport { name: me.to_string(), nickname: "p0".into() },
        ready: true,
        ..Report::default()
    };
    r.mesh.name = me.to_string();
    r.mesh.nickname = "p0".into();
    r.mesh.encryption = true;
    r.mesh.peers = (0..peers)
        .map(|i| PeerEntryReport {
            name: Sim::name(i).to_string(),
            nickname: format!("p{i}"),
            uid: i as u64 + 1,
            version: 1,
            connections: sim
                .neighbours(i)
                .map(|j| PeerConnectionReport {
                    peer: Sim::name(j).to_string(),
                    address: underlay(j).to_string() + ":6783",
                    outbound: i < j,
                    established: true,
                })
                .collect(),
        })
        .collect();
    r.mesh.connections = neighbours
        .iter()
        .map(|&i| ConnectionReport {
            peer: Sim::name(i).to_string(),
            nickname: format!("p{i}"),
            address: underlay(i).to_string() + ":6783",
            outbound: true,
            state: ConnState::Established,
            info: String::new(),
            encrypted: true,
            data_encrypted: true,
        })
        .collect();
    r.overlay.links = neighbours.iter().enumerate().map(|(k, &i)| link(k, i)).collect();
    // Peers not linked directly are reached through the first neighbour.
    if let Some(&via) = neighbours.first() {
        r.overlay.relayed = (1..peers)
            .filter(|i| !neighbours.contains(i))
            .map(|i| (Sim::name(i).to_string(), Sim::name(via).to_string()))
            .collect();
    }
    let per_host = endpoints.div_ceil(peers);
    let mut entries = Vec::new();
    for host in 0..peers {
        let eps: Vec<(String, IpAddr)> = (0..per_host)
            .map(|k| host * per_host + k)
            .take_while(|&n| n < endpoints)
            .map(|n| (mac(n), endpoint_address(n)))
            .collect();
        for (n, (_, addr)) in (host * per_host..).zip(&eps) {
            entries.push(DnsEntryReport {
                name: format!("svc-{n}.weave.local."),
                address: *addr,
                endpoint: format!("c{n}/eth0"),
                origin: Sim::name(host).to_string(),
                nickname: format!("p{host}"),
            });
        }
        if host == 0 {
            r.endpoints.cni = eps.len() as u32;
            r.endpoints.list = eps
                .iter()
                .enumerate()
                .map(|(k, (m, a))| EndpointEntry {
                    id: format!("c{k}"),
                    kind: "cni".into(),
                    mac: m.clone(),
                    addresses: IpNet::new(*a, 8).into_iter().collect(),
                    pod: Some(format!("default/web-{k}")),
                    name: None,
                })
                .collect();
        } else if !eps.is_empty() {
            r.overlay.remote.push(RemoteEndpoints {
                peer: Sim::name(host).to_string(),
                endpoints: eps
                    .into_iter()
                    .map(|(mac, a)| RemoteEndpoint { mac, addresses: vec![a] })
                    .collect(),
            });
        }
    }
    r.dns = Some(DnsReport {
        domain: "weave.local.".into(),
        ttl: 1,
        listen: vec!["10.0.0.1:53".into()],
        listen_problem: String::new(),
        upstream: Vec::new(),
        entries,
        tombstones: 0,
        queries: QueryReport::default(),
    });
    r.ipam.range = IpNet::new(IpAddr::V4(RANGE), 8).unwrap_or_default();
    r.ipam.default_subnet = r.ipam.range;
    r.ipam.ring = ring(peers, per_host as u64);
    let mine = r.ipam.ring.peers.first().map_or(0, |p| p.owned);
    r.ipam.used = per_host as u64;
    r.ipam.free = mine.saturating_sub(per_host as u64);
    r
}

fn underlay(i: usize) -> IpAddr {
    let i = i as u32 + 1;
    IpAddr::V4(Ipv4Addr::new(192, 168, (i >> 8) as u8, i as u8))
}

fn endpoint_address(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(RANGE) + 2 + n as u32))
}

fn mac(n: usize) -> String {
    let b = (n as u32).to_be_bytes();
    format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// A link of each kind a real mesh shows: mostly fastdp, some on sleeve with a reason, and one
/// relayed.
fn link(k: usize, i: usize) -> LinkReport {
    let (mode, degraded) = match k % 10 {
        7 | 8 => (
            Mode::Sleeve,
            "fastdp down: last heartbeat acknowledged 6s ago (UDP port 6784 blocked?)".to_owned(),
        ),
        9 => (Mode::Relayed, "fastdp down; sleeve down".to_owned()),
        _ => (Mode::Fastdp, String::new()),
    };
    LinkReport {
        peer: Sim::name(i).to_string(),
        mode,
        fastdp: "fastdp ok".into(),
        sleeve: "sleeve ok".into(),
        encrypted: true,
        degraded,
        path_mtu: 1500,
        sleeve_traffic: Default::default(),
        fastdp_traffic: Default::default(),
    }
}

/// The range divided evenly among the peers in ring order; one peer in 50 unreachable.
fn ring(peers: usize, used_each: u64) -> IpamStatus {
    let share = RANGE_SIZE / peers as u64;
    let first = u32::from(RANGE);
    IpamStatus {
        mode: format!("consensus={peers}"),
        state: RingState::Ready,
        peers: (0..peers)
            .map(|i| {
                let start = first + (i as u64 * share) as u32;
                let end = start + share as u32 - 1;
                PeerShare {
                    peer: Sim::name(i).to_string(),
                    nickname: format!("p{i}"),
                    owned: share,
                    free: share.saturating_sub(used_each),
                    reachable: i % 50 != 49,
                    ranges: vec![format!("{}-{}", Ipv4Addr::from(start), Ipv4Addr::from(end))],
                }
            })
            .collect(),
        unreachable: (0..peers).filter(|i| i % 50 == 49).count() as u64 * share,
        ..IpamStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_simulated_mesh_has_every_peer_endpoint_and_name() {
        let r = simulated_report(40, 400, 1);
        assert_eq!(r.mesh.peers.len(), 40, "the converged topology");
        let remote: usize = r.overlay.remote.iter().map(|o| o.endpoints.len()).sum();
        assert_eq!(r.endpoints.list.len() + remote, 400);
        assert_eq!(r.dns.as_ref().map(|d| d.entries.len()), Some(400));
        assert_eq!(r.ipam.ring.peers.len(), 40);
        assert!(!r.overlay.links.is_empty());
        assert_eq!(
            r.overlay.links.len() + r.overlay.relayed.len(),
            39,
            "every other peer is linked or relayed"
        );
    }
}
