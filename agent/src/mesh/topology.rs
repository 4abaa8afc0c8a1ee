//! The mesh topology: every peer's own entry (nickname, incarnation, and its connections as it
//! sees them). Each peer only ever writes its own entry and raises its version when it does;
//! merging keeps, per peer, the greatest entry. That merge is a join on a semilattice, so it is
//! commutative, associative and idempotent, and every peer that has seen the same entries
//! holds the same topology whatever the order of delivery. Pure: no I/O, no clocks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::identity::PeerName;

/// Peers held in the topology; entries of new peers beyond it are refused until some leave
/// (garbage collection). Far above any mesh weft is meant for, and what bounds the memory a
/// peer can make us spend on made-up peers.
pub const MAX_PEERS: usize = 2048;
/// Connections one entry may list (an entry lists each of its peer's connections once; the
/// default `--conn-limit` is 200). Entries listing more are refused.
pub const MAX_CONNECTIONS_PER_ENTRY: usize = 512;
/// Longest connection address ("[v6 address]:port" is at most 47) and nickname in an entry.
pub const MAX_ADDRESS_LEN: usize = 64;
pub const MAX_NICKNAME_LEN: usize = 255;

/// A connection as listed in its owner's entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnInfo {
    /// The remote address as the owner sees it, "ip:port".
    pub address: String,
    pub outbound: bool,
    pub established: bool,
}

/// One peer's entry. The derived order compares `version` first, then `uid`, then content, so
/// "the greatest entry" is total and deterministic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerInfo {
    pub version: u64,
    pub uid: u64,
    pub nickname: String,
    pub connections: BTreeMap<PeerName, ConnInfo>,
}

impl PeerInfo {
    /// Decodes an entry; connections to names longer than 48 bits are dropped.
    pub fn from_wire(p: &super::proto::PeerEntry) -> PeerInfo {
        let connections = p
            .connections
            .iter()
            .filter_map(|c| {
                let info = ConnInfo {
                    address: c.address.clone(),
                    outbound: c.outbound,
                    established: c.established,
                };
                PeerName::new(c.peer).map(|peer| (peer, info))
            })
            .collect();
        PeerInfo { version: p.version, uid: p.uid, nickname: p.nickname.clone(), connections }
    }

    /// Whether an entry stays within the per-entry limits (the same test on every peer, so
    /// every peer refuses the same entries).
    pub fn within_limits(&self) -> bool {
        super::gossip::version_ok(self.version)
            && self.connections.len() <= MAX_CONNECTIONS_PER_ENTRY
            && self.nickname.len() <= MAX_NICKNAME_LEN
            && self.connections.values().all(|c| c.address.len() <= MAX_ADDRESS_LEN)
    }
}

/// A set of entries with the join merge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entries(pub BTreeMap<PeerName, PeerInfo>);

impl Entries {
    /// Merges `other` in; returns the peers whose entry changed (the delta worth passing on).
    pub fn merge(&mut self, other: &Entries) -> Vec<PeerName> {
        let mut changed = Vec::new();
        for (name, theirs) in &other.0 {
            match self.0.get(name) {
                Some(ours) if ours >= theirs => {}
                _ => {
                    self.0.insert(*name, theirs.clone());
                    changed.push(*name);
                }
            }
        }
        changed
    }

    /// The entries of `names` only.
    pub fn subset(&self, names: &[PeerName]) -> Entries {
        Entries(names.iter().filter_map(|n| self.0.get(n).map(|e| (*n, e.clone()))).collect())
    }
}

/// One peer's view of the mesh.
#[derive(Clone, Debug)]
pub struct Topology {
    me: PeerName,
    entries: Entries,
}

impl Topology {
    /// A topology holding only our own entry. `version` should start above any version a
    /// previous incarnation used (the agent starts it at the current time in milliseconds).
    pub fn new(me: PeerName, nickname: String, uid: u64, version: u64) -> Topology {
        let mut entries = Entries::default();
        entries.0.insert(me, PeerInfo { version, uid, nickname, connections: BTreeMap::new() });
        Topology { me, entries }
    }

    pub fn me(&self) -> PeerName {
        self.me
    }

    /// `me`'s view of a given set of entries (simulations and tests).
    pub fn from_entries(me: PeerName, entries: Entries) -> Topology {
        Topology { me, entries }
    }

    pub fn entries(&self) -> &Entries {
        &self.entries
    }

    pub fn get(&self, name: PeerName) -> Option<&PeerInfo> {
        self.entries.0.get(&name)
    }

    fn mine(&mut self) -> &mut PeerInfo {
        self.entries.0.entry(self.me).or_insert_with(|| PeerInfo {
            version: 1,
            uid: 0,
            nickname: String::new(),
            connections: BTreeMap::new(),
        })
    }

    /// Our own entry.
    pub fn own(&self) -> Entries {
        self.entries.subset(&[self.me])
    }

    /// Records (or updates) our connection to `peer`; returns whether our entry changed.
    pub fn set_connection(&mut self, peer: PeerName, conn: ConnInfo) -> bool {
        let mine = self.mine();
        if mine.connections.get(&peer) == Some(&conn) {
            return false;
        }
        mine.connections.insert(peer, conn);
        mine.version = mine.version.saturating_add(1);
        true
    }

    /// Removes our connection to `peer`; returns whether our entry changed.
    pub fn remove_connection(&mut self, peer: PeerName) -> bool {
        let mine = self.mine();
        if mine.connections.remove(&peer).is_none() {
            return false;
        }
        mine.version = mine.version.saturating_add(1);
        true
    }

    /// Merges received entries. An entry about ourselves that is not ours (a previous
    /// incarnation, or stale gossip) never replaces ours: we raise our version above it, so our
    /// entry wins everywhere. Returns the peers whose entry changed here, ours included when
    /// it was raised (it must then be sent again).
    pub fn merge(&mut self, received: &Entries) -> Vec<PeerName> {
        let mut others = received.clone();
        let mut room = MAX_PEERS.saturating_sub(self.entries.0.len());
        others.0.retain(|name, e| {
            if !e.within_limits() {
                return false;
            }
            if *name == self.me || self.entries.0.contains_key(name) {
                return true;
            }
            // A new peer: only while there is room.
            let fits = room > 0;
            room = room.saturating_sub(1);
            fits
        });
        let mut changed = Vec::new();
        if let Some(about_me) = others.0.remove(&self.me) {
            let mine = self.mine().clone();
            if about_me > mine {
                self.mine().version = about_me.version + 1;
                changed.push(self.me);
            }
        }
        changed.extend(self.entries.merge(&others));
        changed
    }

    /// [`Self::merge`] straight from the wire: entries no newer than ours (by version and
    /// incarnation) are skipped before they are decoded further, which is what most gossip
    /// is once a mesh has converged. A peer never issues two entries with the same version and
    /// incarnation, so equal keys mean equal entries.
    pub fn merge_wire(&mut self, t: &super::proto::Topology) -> Vec<PeerName> {
        let mut fresh = Entries::default();
        for p in &t.peers {
            let Some(name) = PeerName::new(p.name) else { continue };
            if self
                .entries
                .0
                .get(&name)
                .is_some_and(|ours| (ours.version, ours.uid) >= (p.version, p.uid))
            {
                continue;
            }
            let info = PeerInfo::from_wire(p);
            fresh.merge(&Entries(BTreeMap::from([(name, info)])));
        }
        if fresh.0.is_empty() {
            return Vec::new();
        }
        self.merge(&fresh)
    }

    /// Whether `a` lists a connection to `b` that is established.
    fn established(&self, a: PeerName, b: PeerName) -> bool {
        self.entries.0.get(&a).and_then(|e| e.connections.get(&b)).is_some_and(|c| c.established)
    }

    /// Neighbours of `peer` as its own entry lists them; with `symmetric`, only established
    /// connections that the other end lists as established too (usable for data).
    pub fn neighbours(&self, peer: PeerName, symmetric: bool) -> BTreeSet<PeerName> {
        let Some(e) = self.entries.0.get(&peer) else { return BTreeSet::new() };
        e.connections
            .keys()
            .filter(|o| **o != peer)
            .filter(|o| !symmetric || (self.established(peer, **o) && self.established(**o, peer)))
            .copied()
            .collect()
    }

    /// Removes the entries of peers that can no longer be reached from us following the
    /// connections each peer lists itself (a departed peer's own stale entry does not keep it
    /// alive); returns them. Local only: it is what makes departed peers disappear.
    pub fn garbage_collect(&mut self) -> Vec<PeerName> {
        let mut seen = BTreeSet::from([self.me]);
        let mut queue = VecDeque::from([self.me]);
        while let Some(p) = queue.pop_front() {
            for n in self.neighbours(p, false) {
                if seen.insert(n) {
                    queue.push_back(n);
                }
            }
        }
        let gone: Vec<PeerName> =
            self.entries.0.keys().filter(|n| !seen.contains(n)).copied().collect();
        for g in &gone {
            self.entries.0.remove(g);
        }
        gone
    }

    /// Every known peer, those reachable from us first in breadth-first order (following the
    /// connections each lists, as [`Self::garbage_collect`] does), then the rest. Entries sent
    /// in this order reach a receiver connected to us so that every prefix of them is
    /// reachable for it: splitting a topology into messages never makes a receiver collect
    /// a peer whose path arrives in a later message.
    pub fn breadth_first(&self) -> Vec<PeerName> {
        let mut seen = BTreeSet::from([self.me]);
        let mut order = vec![self.me];
        let mut next = 0;
        while let Some(p) = order.get(next).copied() {
            next += 1;
            for n in self.neighbours(p, false) {
                if self.entries.0.contains_key(&n) && seen.insert(n) {
                    order.push(n);
                }
            }
        }
        order.extend(self.entries.0.keys().filter(|n| !seen.contains(n)));
        order
    }

    /// Peers we know of, ourselves included.
    pub fn peers(&self) -> impl Iterator<Item = (&PeerName, &PeerInfo)> {
        self.entries.0.iter()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn name(i: u64) -> PeerName {
        PeerName::new(i + 1).unwrap()
    }

    fn conn(established: bool) -> ConnInfo {
        ConnInfo { address: "10.0.0.1:6783".into(), outbound: true, established }
    }

    fn entry_strategy() -> impl Strategy<Value = (u64, PeerInfo)> {
        (0u64..6, 0u64..5, 0u64..3, proptest::collection::btree_map(0u64..6, any::<bool>(), 0..4))
            .prop_map(|(n, version, uid, conns)| {
                let connections = conns.into_iter().map(|(p, e)| (name(p), conn(e))).collect();
                (n, PeerInfo { version, uid, nickname: format!("p{n}"), connections })
            })
    }

    fn entries_strategy() -> impl Strategy<Value = Entries> {
        proptest::collection::vec(entry_strategy(), 0..8).prop_map(|v| {
            let mut e = Entries::default();
            for (n, info) in v {
                e.merge(&Entries(BTreeMap::from([(name(n), info)])));
            }
            e
        })
    }

    #[test]
    fn a_version_beyond_the_limit_is_refused_about_anyone() {
        let mut t = Topology::new(name(0), "me".into(), 5, 1);
        let huge =
            |v| PeerInfo { version: v, uid: 9, nickname: "x".into(), connections: BTreeMap::new() };
        let about_me = Entries(BTreeMap::from([(name(0), huge(u64::MAX))]));
        assert!(t.merge(&about_me).is_empty(), "an entry about us at u64::MAX is refused");
        let other =
            Entries(BTreeMap::from([(name(1), huge(crate::mesh::gossip::MAX_VERSION + 1))]));
        assert!(t.merge(&other).is_empty());
        assert!(t.get(name(1)).is_none());
        // At the limit it is merged, and ours is raised above it without overflow.
        let at_limit = Entries(BTreeMap::from([(name(0), huge(crate::mesh::gossip::MAX_VERSION))]));
        assert_eq!(t.merge(&at_limit), vec![name(0)]);
        assert_eq!(t.get(name(0)).unwrap().version, crate::mesh::gossip::MAX_VERSION + 1);
    }

    fn joined(a: &Entries, b: &Entries) -> Entries {
        let mut x = a.clone();
        x.merge(b);
        x
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in entries_strategy(), b in entries_strategy()) {
            prop_assert_eq!(joined(&a, &b), joined(&b, &a));
        }

        #[test]
        fn merge_is_associative(a in entries_strategy(), b in entries_strategy(), c in entries_strategy()) {
            prop_assert_eq!(joined(&joined(&a, &b), &c), joined(&a, &joined(&b, &c)));
        }

        #[test]
        fn merge_is_idempotent(a in entries_strategy(), b in entries_strategy()) {
            let once = joined(&a, &b);
            prop_assert_eq!(joined(&once, &b), once.clone());
            prop_assert_eq!(joined(&a, &a), a);
        }

        #[test]
        fn delta_is_exactly_what_changed(a in entries_strategy(), b in entries_strategy()) {
            let mut x = a.clone();
            let changed = x.merge(&b);
            for (n, e) in &x.0 {
                prop_assert_eq!(changed.contains(n), a.0.get(n) != Some(e));
            }
        }
    }

    #[test]
    fn the_topology_and_each_entry_are_bounded() {
        let me = name(0);
        let mut t = Topology::new(me, "me".into(), 1, 1);
        let plain =
            |v| PeerInfo { version: v, uid: 1, nickname: "x".into(), connections: BTreeMap::new() };
        let many: Entries = Entries((1..=5000).map(|i| (name(i), plain(1))).collect());
        let changed = t.merge(&many);
        assert_eq!(changed.len(), MAX_PEERS - 1, "new peers only while there is room");
        assert_eq!(t.peers().count(), MAX_PEERS);
        // Known peers still update.
        assert_eq!(t.merge(&Entries(BTreeMap::from([(name(1), plain(2))]))), vec![name(1)]);
        // An entry listing too many connections, or an overlong address, is refused.
        let mut t = Topology::new(me, "me".into(), 1, 1);
        let wide = PeerInfo {
            connections: (1..=MAX_CONNECTIONS_PER_ENTRY as u64 + 1)
                .map(|i| (name(i), conn(true)))
                .collect(),
            ..plain(1)
        };
        let long = PeerInfo {
            connections: BTreeMap::from([(
                name(3),
                ConnInfo { address: "1".repeat(MAX_ADDRESS_LEN + 1), ..conn(true) },
            )]),
            ..plain(1)
        };
        assert!(t.merge(&Entries(BTreeMap::from([(name(1), wide), (name(2), long)]))).is_empty());
    }

    #[test]
    fn a_stale_entry_about_ourselves_raises_our_version() {
        let me = name(0);
        let mut t = Topology::new(me, "me".into(), 7, 10);
        let old = PeerInfo {
            version: 50,
            uid: 3,
            nickname: "me".into(),
            connections: BTreeMap::from([(name(1), conn(true))]),
        };
        let changed = t.merge(&Entries(BTreeMap::from([(me, old)])));
        assert_eq!(changed, vec![me]);
        let mine = t.get(me).unwrap();
        assert_eq!(mine.version, 51);
        assert_eq!(mine.uid, 7);
        assert!(mine.connections.is_empty(), "our own view is kept");
    }

    #[test]
    fn unreachable_peers_are_collected() {
        let (a, b, c) = (name(0), name(1), name(2));
        let mut t = Topology::new(a, "a".into(), 1, 1);
        t.set_connection(b, conn(true));
        let bc = PeerInfo {
            version: 1,
            uid: 1,
            nickname: "b".into(),
            connections: BTreeMap::from([(c, conn(true))]),
        };
        let ce =
            PeerInfo { version: 1, uid: 1, nickname: "c".into(), connections: BTreeMap::new() };
        t.merge(&Entries(BTreeMap::from([(b, bc), (c, ce)])));
        assert!(t.garbage_collect().is_empty());
        t.remove_connection(b);
        let mut gone = t.garbage_collect();
        gone.sort();
        assert_eq!(gone, vec![b, c]);
    }
}
