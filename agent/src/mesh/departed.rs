//! Which origins' entries (DNS names, MACs) to drop because their peer is not in the mesh, so
//! subsystem tables hold entries only of peers in the topology. Entries travel
//! ahead of the topology: a restarted or new peer's names can be passed on by a neighbour
//! before this peer has learnt that the origin exists, let alone a route to it. So an origin
//! that is neither in the topology nor reachable is dropped only once it has stayed unknown
//! for [`UNKNOWN_GRACE`], which still removes, within seconds, the entries of a departed peer
//! that a lagging neighbour passed on after it left. Pure: time is passed in.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::view::MeshView;
use crate::identity::PeerName;

/// How long an origin may be unknown to the mesh view before its entries are dropped: well
/// above the time topology gossip takes to cross a mesh (a tick per hop).
pub const UNKNOWN_GRACE: Duration = Duration::from_secs(5);

/// The origins seen unknown, and since when.
#[derive(Clone, Debug, Default)]
pub struct Unknown {
    since: BTreeMap<PeerName, Instant>,
}

/// Whether the mesh accounts for `origin`: in the topology, or with a route to it.
pub fn in_mesh(view: &MeshView, origin: PeerName) -> bool {
    view.peers.contains_key(&origin) || view.is_reachable(origin)
}

impl Unknown {
    /// The origins among `origins` (those the table holds, ourselves excluded) whose entries
    /// should go now: unknown to `view` for at least [`UNKNOWN_GRACE`]. Before the mesh has
    /// published a view (no peers at all), nothing goes.
    pub fn departed(
        &mut self,
        origins: &BTreeSet<PeerName>,
        view: &MeshView,
        now: Instant,
    ) -> BTreeSet<PeerName> {
        self.since.retain(|p, _| origins.contains(p) && !in_mesh(view, *p));
        if view.peers.is_empty() {
            return BTreeSet::new();
        }
        origins
            .iter()
            .filter(|p| !in_mesh(view, **p))
            .filter(|p| now.duration_since(*self.since.entry(**p).or_insert(now)) >= UNKNOWN_GRACE)
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: u64) -> PeerName {
        PeerName::new(i).unwrap()
    }

    fn view(peers: &[u64], reachable: &[u64]) -> MeshView {
        MeshView {
            reachable: reachable.iter().map(|i| p(*i)).collect(),
            peers: peers.iter().map(|i| (p(*i), format!("h{i}"))).collect(),
            connections: BTreeMap::new(),
        }
    }

    #[test]
    fn reachable_origins_are_kept_before_the_topology_lists_them() {
        let t0 = Instant::now();
        let mut u = Unknown::default();
        let origins = BTreeSet::from([p(2), p(3)]);
        // 2 is a new neighbour whose entry has not arrived yet; 3 is in the topology.
        let v = view(&[1, 3], &[2, 3]);
        assert!(u.departed(&origins, &v, t0).is_empty());
        assert!(u.departed(&origins, &v, t0 + UNKNOWN_GRACE * 10).is_empty());
    }

    #[test]
    fn unknown_origins_get_a_grace_period_and_then_go() {
        let t0 = Instant::now();
        let mut u = Unknown::default();
        let origins = BTreeSet::from([p(4)]);
        let v = view(&[1], &[]);
        // Names of 4 came through a neighbour before the topology did.
        assert!(u.departed(&origins, &v, t0).is_empty());
        assert!(u.departed(&origins, &v, t0 + UNKNOWN_GRACE / 2).is_empty());
        // The topology catches up: 4 stays, and a later absence starts a new grace period.
        assert!(u.departed(&origins, &view(&[1, 4], &[4]), t0 + UNKNOWN_GRACE).is_empty());
        let t1 = t0 + UNKNOWN_GRACE * 2;
        assert!(u.departed(&origins, &v, t1).is_empty());
        assert_eq!(u.departed(&origins, &v, t1 + UNKNOWN_GRACE), BTreeSet::from([p(4)]));
    }

    #[test]
    fn nothing_goes_before_the_mesh_has_published_a_view() {
        let t0 = Instant::now();
        let mut u = Unknown::default();
        let origins = BTreeSet::from([p(2)]);
        assert!(u.departed(&origins, &MeshView::default(), t0).is_empty());
        assert!(u.departed(&origins, &MeshView::default(), t0 + UNKNOWN_GRACE * 2).is_empty());
    }
}
