//! Which MAC addresses live behind which peer, gossiped on the `macs` channel. Each peer owns
//! its origin (the MACs of its endpoints and bridge, with their IP addresses) and stamps it
//! with a strictly increasing version in milliseconds since the epoch; merging keeps the
//! newest origin per peer (a CRDT). A MAC claimed by two origins (a pod that moved) belongs to
//! the origin changed last. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Instant;

use prost::Message;

use crate::dataplane::Mac;
use crate::identity::PeerName;
use crate::mesh::departed::Unknown;
use crate::mesh::frame::STATE_MESSAGE;
use crate::mesh::gossip::{GossipData, split_by_size, version_ok};
use crate::mesh::view::MeshView;
use crate::proto;

/// MACs kept per origin (a host runs at most a few hundred endpoints); beyond, the smallest
/// are kept, the same on every peer.
pub const MAX_MACS_PER_ORIGIN: usize = 4096;
/// Addresses kept per MAC.
pub const MAX_IPS_PER_MAC: usize = 16;
/// Origins held; origins of new peers beyond it are refused until some leave.
pub const MAX_ORIGINS: usize = 4096;

/// One peer's MACs and their addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Origin {
    pub version: u64,
    pub macs: BTreeMap<Mac, BTreeSet<IpAddr>>,
}

/// The table, and where each remote MAC is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MacTable {
    me: Option<PeerName>,
    origins: BTreeMap<PeerName, Origin>,
}

impl MacTable {
    pub fn new(me: PeerName) -> MacTable {
        MacTable { me: Some(me), origins: BTreeMap::new() }
    }

    /// Sets our own MACs; returns the encoded origin to broadcast if anything changed.
    pub fn set_local(
        &mut self,
        macs: BTreeMap<Mac, BTreeSet<IpAddr>>,
        now_ms: u64,
    ) -> Option<Vec<u8>> {
        let me = self.me?;
        let current = self.origins.get(&me);
        if current.is_some_and(|o| o.macs == macs) {
            return None;
        }
        let version = now_ms.max(current.map_or(0, |o| o.version.saturating_add(1)));
        self.origins.insert(me, Origin { version, macs });
        Some(self.encode(&[me]))
    }

    /// Merges origins; returns the peers whose origin changed.
    pub fn merge(&mut self, other: &BTreeMap<PeerName, Origin>) -> Vec<PeerName> {
        let mut changed = Vec::new();
        for (peer, theirs) in other {
            if Some(*peer) == self.me {
                continue; // only we speak for ourselves
            }
            if !version_ok(theirs.version) {
                continue;
            }
            match self.origins.get(peer) {
                Some(ours) if ours >= theirs => {}
                None if self.origins.len() >= MAX_ORIGINS => {}
                _ => {
                    self.origins.insert(*peer, theirs.clone());
                    changed.push(*peer);
                }
            }
        }
        changed
    }

    /// Drops the origins of peers that left.
    pub fn forget(&mut self, peers: &[PeerName]) -> bool {
        let before = self.origins.len();
        self.origins.retain(|p, _| !peers.contains(p));
        before != self.origins.len()
    }

    /// Drops the origins of peers that `view` has not accounted for during the grace period
    /// of [`Unknown`] (origins are accepted from anyone, and travel ahead of the topology; a
    /// departed peer's origin passed on late, or a made-up one, goes within seconds). Returns
    /// whether any went.
    pub fn forget_departed(
        &mut self,
        unknown: &mut Unknown,
        view: &MeshView,
        now: Instant,
    ) -> bool {
        let origins: BTreeSet<PeerName> =
            self.origins.keys().filter(|p| Some(**p) != self.me).copied().collect();
        let gone: Vec<PeerName> = unknown.departed(&origins, view, now).into_iter().collect();
        !gone.is_empty() && self.forget(&gone)
    }

    /// Remote MACs with the peer they are behind (newest claim wins; our own MACs excluded).
    pub fn remote(&self) -> BTreeMap<Mac, PeerName> {
        let mut best: BTreeMap<Mac, (u64, PeerName)> = BTreeMap::new();
        let local: BTreeSet<Mac> = self
            .me
            .and_then(|m| self.origins.get(&m))
            .map(|o| o.macs.keys().copied().collect())
            .unwrap_or_default();
        for (peer, o) in self.origins.iter().filter(|(p, _)| Some(**p) != self.me) {
            for mac in o.macs.keys().filter(|m| !local.contains(m)) {
                let e = best.entry(*mac).or_insert((o.version, *peer));
                if (o.version, *peer) > *e {
                    *e = (o.version, *peer);
                }
            }
        }
        best.into_iter().map(|(m, (_, p))| (m, p)).collect()
    }

    /// IP addresses of remote MACs (for answering ARP on this host).
    pub fn remote_ips(&self) -> BTreeMap<IpAddr, Mac> {
        let remote = self.remote();
        let mut out = BTreeMap::new();
        for (peer, o) in self.origins.iter().filter(|(p, _)| Some(**p) != self.me) {
            for (mac, ips) in &o.macs {
                if remote.get(mac) == Some(peer) {
                    for ip in ips {
                        out.insert(*ip, *mac);
                    }
                }
            }
        }
        out
    }

    pub fn origins(&self) -> &BTreeMap<PeerName, Origin> {
        &self.origins
    }

    pub fn encode(&self, peers: &[PeerName]) -> Vec<u8> {
        proto::MacTable { origins: self.wire_origins(peers) }.encode_to_vec()
    }

    fn wire_origins(&self, peers: &[PeerName]) -> Vec<proto::MacOrigin> {
        peers
            .iter()
            .filter_map(|p| self.origins.get(p).map(|o| (p, o)))
            .map(|(p, o)| proto::MacOrigin {
                peer: p.get(),
                version: o.version,
                macs: o
                    .macs
                    .iter()
                    .map(|(m, ips)| proto::MacEntry {
                        mac: m.0.to_vec(),
                        ips: ips
                            .iter()
                            .map(|ip| weft_api::v1::IpAddress::from(*ip).octets)
                            .collect(),
                    })
                    .collect(),
            })
            .collect()
    }
}

/// Decodes a payload; malformed entries are dropped.
pub fn decode(bytes: &[u8]) -> Result<BTreeMap<PeerName, Origin>, String> {
    let t = proto::MacTable::decode(bytes).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for o in t.origins {
        let Some(peer) = PeerName::new(o.peer) else { continue };
        let mut macs = BTreeMap::new();
        for e in o.macs {
            let Ok(m) = <[u8; 6]>::try_from(e.mac.as_slice()) else { continue };
            if !unicast(m) {
                continue; // never a pod's address; the kernel would refuse it anyway
            }
            let ips = e
                .ips
                .iter()
                .filter_map(|b| {
                    IpAddr::try_from(&weft_api::v1::IpAddress { octets: b.clone() }).ok()
                })
                .take(MAX_IPS_PER_MAC)
                .collect();
            macs.insert(Mac(m), ips);
        }
        while macs.len() > MAX_MACS_PER_ORIGIN {
            macs.pop_last();
        }
        let origin = Origin { version: o.version, macs };
        let keep = out.get(&peer).is_none_or(|cur: &Origin| origin > *cur);
        if keep {
            out.insert(peer, origin);
        }
    }
    Ok(out)
}

/// A unicast address other than all zeroes.
fn unicast(m: [u8; 6]) -> bool {
    m[0] & 1 == 0 && m != [0; 6]
}

impl GossipData for MacTable {
    fn merge_encoded(&mut self, _src: PeerName, bytes: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let changed = self.merge(&decode(bytes)?);
        Ok((!changed.is_empty()).then(|| self.encode(&changed)))
    }

    /// Whole origins per message (an origin replaces the one held, so it is never split).
    fn encode_all(&self) -> Vec<Vec<u8>> {
        let all: Vec<PeerName> = self.origins.keys().copied().collect();
        split_by_size(self.wire_origins(&all), STATE_MESSAGE)
            .into_iter()
            .map(|origins| proto::MacTable { origins }.encode_to_vec())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: u64) -> PeerName {
        PeerName::new(i).unwrap()
    }
    fn m(i: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, i])
    }

    #[test]
    fn decoding_drops_non_unicast_macs_and_caps_each_origin() {
        let mut t = MacTable::new(p(2));
        let many: BTreeMap<Mac, BTreeSet<IpAddr>> = (0..MAX_MACS_PER_ORIGIN as u32 + 10)
            .map(|i| {
                let b = i.to_be_bytes();
                (Mac([2, 0, b[0], b[1], b[2], b[3]]), BTreeSet::new())
            })
            .chain(
                [([0; 6], BTreeSet::new()), ([0xff; 6], BTreeSet::new())].map(|(m, s)| (Mac(m), s)),
            )
            .chain([(Mac([1, 0, 0x5e, 0, 0, 1]), BTreeSet::new())])
            .collect();
        t.set_local(many, 100).unwrap();
        let got = decode(&t.encode(&[p(2)])).unwrap();
        let macs = &got[&p(2)].macs;
        assert_eq!(macs.len(), MAX_MACS_PER_ORIGIN);
        assert!(!macs.contains_key(&Mac([0; 6])) && !macs.contains_key(&Mac([0xff; 6])));
        assert!(!macs.contains_key(&Mac([1, 0, 0x5e, 0, 0, 1])));
    }

    #[test]
    fn origins_of_peers_not_in_the_mesh_go_after_the_grace_period() {
        use crate::mesh::departed::UNKNOWN_GRACE;
        let mut t = MacTable::new(p(1));
        t.set_local(BTreeMap::from([(m(1), BTreeSet::new())]), 10);
        let origin = |i: u8| {
            (
                p(u64::from(i)),
                Origin { version: 5, macs: BTreeMap::from([(m(i), BTreeSet::new())]) },
            )
        };
        // 2 is in the topology, 3 only reachable so far, 4 is unknown (made up, or departed).
        t.merge(&BTreeMap::from([origin(2), origin(3), origin(4)]));
        let view = MeshView {
            reachable: BTreeSet::from([p(2), p(3)]),
            peers: BTreeMap::from([(p(1), "me".into()), (p(2), "h2".into())]),
            connections: BTreeMap::new(),
        };
        let mut unknown = Unknown::default();
        let t0 = Instant::now();
        assert!(!t.forget_departed(&mut unknown, &view, t0), "not before the grace period");
        assert!(t.forget_departed(&mut unknown, &view, t0 + UNKNOWN_GRACE));
        let left: Vec<PeerName> = t.origins().keys().copied().collect();
        assert_eq!(left, vec![p(1), p(2), p(3)]);
        // 2 leaves the mesh: its MACs go too (our own never do).
        let gone = MeshView { reachable: BTreeSet::new(), ..view.clone() };
        let gone = MeshView { peers: BTreeMap::from([(p(1), "me".into())]), ..gone };
        let t1 = t0 + UNKNOWN_GRACE * 2;
        t.forget_departed(&mut unknown, &gone, t1);
        assert!(t.forget_departed(&mut unknown, &gone, t1 + UNKNOWN_GRACE));
        assert_eq!(t.origins().keys().copied().collect::<Vec<_>>(), vec![p(1)]);
        assert!(t.remote().is_empty());
    }

    #[test]
    fn origins_beyond_the_cap_are_refused() {
        let mut t = MacTable::new(p(1));
        let o = Origin { version: 1, macs: BTreeMap::new() };
        let all: BTreeMap<PeerName, Origin> =
            (2..MAX_ORIGINS as u64 + 12).map(|i| (p(i), o.clone())).collect();
        assert_eq!(t.merge(&all).len(), MAX_ORIGINS);
        let newer = Origin { version: 2, macs: BTreeMap::new() };
        assert_eq!(
            t.merge(&BTreeMap::from([(p(2), newer)])),
            vec![p(2)],
            "known origins still update"
        );
    }

    #[test]
    fn an_origin_beyond_the_version_limit_is_refused() {
        let mut t = MacTable::new(p(1));
        let huge = Origin { version: u64::MAX, macs: BTreeMap::from([(m(1), BTreeSet::new())]) };
        assert!(t.merge(&BTreeMap::from([(p(2), huge)])).is_empty());
        assert!(t.remote().is_empty());
        let fine = Origin { version: 5, macs: BTreeMap::from([(m(1), BTreeSet::new())]) };
        assert_eq!(t.merge(&BTreeMap::from([(p(2), fine)])), vec![p(2)]);
    }

    #[test]
    fn merges_round_trip_and_the_newest_claim_wins() {
        let mut a = MacTable::new(p(1));
        let mut b = MacTable::new(p(2));
        let ip: IpAddr = "10.32.0.2".parse().unwrap();
        let pa = a.set_local(BTreeMap::from([(m(1), BTreeSet::from([ip]))]), 100).unwrap();
        assert!(
            a.set_local(BTreeMap::from([(m(1), BTreeSet::from([ip]))]), 200).is_none(),
            "no change, no gossip"
        );
        assert!(b.merge_encoded(p(1), &pa).unwrap().is_some());
        assert_eq!(b.merge_encoded(p(1), &pa).unwrap(), None, "idempotent");
        assert_eq!(b.remote(), BTreeMap::from([(m(1), p(1))]));
        assert_eq!(b.remote_ips(), BTreeMap::from([(ip, m(1))]));
        // The pod moves to a third peer, later.
        let mut c = MacTable::new(p(3));
        let pc = c.set_local(BTreeMap::from([(m(1), BTreeSet::new())]), 300).unwrap();
        b.merge_encoded(p(3), &pc).unwrap();
        assert_eq!(b.remote()[&m(1)], p(3));
        // A's own MACs never point elsewhere for A.
        a.merge_encoded(p(3), &pc).unwrap();
        assert!(a.remote().is_empty());
        assert!(b.forget(&[p(3)]));
        assert_eq!(b.remote()[&m(1)], p(1));
    }

    #[test]
    fn versions_always_increase() {
        let mut a = MacTable::new(p(1));
        a.set_local(BTreeMap::from([(m(1), BTreeSet::new())]), 500);
        a.set_local(BTreeMap::new(), 10); // the clock went back
        assert_eq!(a.origins()[&p(1)].version, 501);
    }

    /// 1024 origins of 256 MACs with 4 addresses each (about 9 MB as one message, over half
    /// the frame limit): several messages of at most 1 MiB, which merged on a fresh table
    /// give the whole table.
    #[test]
    fn a_large_table_is_sent_as_messages_that_merge_to_the_whole() {
        let mut t = MacTable::new(p(1));
        let origin = |i: u64| {
            let macs = (0..256u32)
                .map(|j| {
                    let [_, _, a, b] = j.to_be_bytes();
                    let ips =
                        (0..4u8).map(|k| IpAddr::from([10, (i >> 8) as u8, i as u8, k])).collect();
                    (Mac([2, (i >> 8) as u8, i as u8, a, b, 0]), ips)
                })
                .collect();
            Origin { version: 7, macs }
        };
        let all: BTreeMap<PeerName, Origin> = (2..1026).map(|i| (p(i), origin(i))).collect();
        t.merge(&all);
        let messages = t.encode_all();
        assert!(messages.len() > 1);
        for m in &messages {
            assert!(m.len() <= STATE_MESSAGE, "{} bytes", m.len());
        }
        let mut fresh = MacTable::new(p(9999));
        for m in &messages {
            fresh.merge_encoded(p(2), m).unwrap();
        }
        assert_eq!(fresh.origins(), t.origins());
    }

    #[test]
    fn garbage_decodes_to_an_error_not_a_panic() {
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
    }
}
