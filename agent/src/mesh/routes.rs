//! Routes over the topology: unweighted shortest paths by breadth-first search in which every
//! level is visited in peer-name order, so all peers derive the same trees from the same
//! topology. Unicast goes to the next hop towards the destination; a broadcast from a source
//! goes down that source's tree, so with a stable topology every peer receives it exactly once.
//! Pure.

use std::collections::{BTreeMap, VecDeque};

use super::topology::Topology;
use crate::identity::PeerName;

/// Which connections a route may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Graph {
    /// Any connection listed by either end: the control plane (gossip relaying).
    Control,
    /// Established connections listed by both ends: the data plane.
    Data,
}

/// The BFS tree from `root`: each reached peer's parent.
pub fn tree(t: &Topology, root: PeerName, graph: Graph) -> BTreeMap<PeerName, PeerName> {
    let symmetric = graph == Graph::Data;
    let mut parent = BTreeMap::new();
    if t.get(root).is_none() {
        return parent;
    }
    parent.insert(root, root);
    let mut queue = VecDeque::from([root]);
    while let Some(p) = queue.pop_front() {
        for n in t.neighbours(p, symmetric) {
            if let std::collections::btree_map::Entry::Vacant(e) = parent.entry(n) {
                e.insert(p);
                queue.push_back(n);
            }
        }
    }
    parent
}

/// Routes from one peer's point of view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    me: Option<PeerName>,
    control: BTreeMap<PeerName, PeerName>,
    data: BTreeMap<PeerName, PeerName>,
}

fn next_hops(me: PeerName, parents: &BTreeMap<PeerName, PeerName>) -> BTreeMap<PeerName, PeerName> {
    let mut out = BTreeMap::new();
    for dst in parents.keys().filter(|d| **d != me) {
        let mut hop = *dst;
        // Walk up to the child of the root; the tree has no cycles, so this ends.
        for _ in 0..parents.len() {
            match parents.get(&hop) {
                Some(p) if *p == me => break,
                Some(p) => hop = *p,
                None => break,
            }
        }
        out.insert(*dst, hop);
    }
    out
}

impl Routes {
    pub fn compute(t: &Topology) -> Routes {
        let me = t.me();
        Routes {
            me: Some(me),
            control: next_hops(me, &tree(t, me, Graph::Control)),
            data: next_hops(me, &tree(t, me, Graph::Data)),
        }
    }

    /// Next hop towards `dst`.
    pub fn next_hop(&self, dst: PeerName, graph: Graph) -> Option<PeerName> {
        match graph {
            Graph::Control => self.control.get(&dst).copied(),
            Graph::Data => self.data.get(&dst).copied(),
        }
    }

    /// Peers reachable over `graph`, with their next hop.
    pub fn table(&self, graph: Graph) -> &BTreeMap<PeerName, PeerName> {
        match graph {
            Graph::Control => &self.control,
            Graph::Data => &self.data,
        }
    }
}

/// The peers we pass a broadcast from `src` on to: our children in `src`'s tree.
pub fn broadcast_children(t: &Topology, src: PeerName, graph: Graph) -> Vec<PeerName> {
    let me = t.me();
    tree(t, src, graph)
        .into_iter()
        .filter(|(child, parent)| *parent == me && *child != me)
        .map(|(c, _)| c)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::topology::tests::name;
    use crate::mesh::topology::{ConnInfo, Entries, PeerInfo};
    use proptest::prelude::*;

    /// The entries of a topology with the given undirected, established links.
    fn entries(n: u64, links: &[(u64, u64)]) -> Entries {
        let mut e = Entries::default();
        for i in 0..n {
            e.0.insert(
                name(i),
                PeerInfo {
                    version: 1,
                    uid: 1,
                    nickname: format!("p{i}"),
                    connections: BTreeMap::new(),
                },
            );
        }
        for (a, b) in links.iter().filter(|(a, b)| a != b && *a < n && *b < n) {
            let c = ConnInfo { address: String::new(), outbound: true, established: true };
            e.0.get_mut(&name(*a)).map(|x| x.connections.insert(name(*b), c.clone()));
            e.0.get_mut(&name(*b)).map(|x| x.connections.insert(name(*a), c.clone()));
        }
        e
    }

    fn view(me: u64, e: &Entries) -> Topology {
        Topology::from_entries(name(me), e.clone())
    }

    #[test]
    fn chain() {
        let e = entries(3, &[(0, 1), (1, 2)]);
        let t0 = view(0, &e);
        let r = Routes::compute(&t0);
        assert_eq!(r.next_hop(name(2), Graph::Data), Some(name(1)));
        assert_eq!(broadcast_children(&view(1, &e), name(0), Graph::Data), vec![name(2)]);
        assert!(broadcast_children(&view(2, &e), name(0), Graph::Data).is_empty());
    }

    fn links() -> impl Strategy<Value = (u64, Vec<(u64, u64)>)> {
        (2u64..14).prop_flat_map(|n| (Just(n), proptest::collection::vec((0..n, 0..n), 0..40)))
    }

    proptest! {
        /// Every peer derives the same broadcast trees, and a broadcast reaches every peer of
        /// the source's component exactly once.
        #[test]
        fn broadcasts_reach_everyone_once((n, l) in links()) {
            let e = entries(n, &l);
            let views: Vec<Topology> = (0..n).map(|i| view(i, &e)).collect();
            for src in 0..n {
                let reference = tree(&views[0], name(src), Graph::Data);
                for v in &views {
                    prop_assert_eq!(&tree(v, name(src), Graph::Data), &reference);
                }
                // Simulate delivery down the tree.
                let mut received: BTreeMap<PeerName, usize> = BTreeMap::new();
                let mut queue = vec![name(src)];
                while let Some(p) = queue.pop() {
                    let me = &views[(p.get() - 1) as usize];
                    for c in broadcast_children(me, name(src), Graph::Data) {
                        *received.entry(c).or_default() += 1;
                        queue.push(c);
                    }
                }
                for peer in reference.keys().filter(|p| **p != name(src)) {
                    prop_assert_eq!(received.get(peer), Some(&1), "peer {} in the component", peer);
                }
                prop_assert_eq!(received.len(), reference.len() - 1);
            }
        }

        /// Following next hops from any peer reaches the destination without loops.
        #[test]
        fn unicast_paths_arrive((n, l) in links()) {
            let e = entries(n, &l);
            let routes: Vec<Routes> = (0..n).map(|i| Routes::compute(&view(i, &e))).collect();
            for from in 0..n {
                for to in 0..n {
                    let Some(mut hop) = routes[from as usize].next_hop(name(to), Graph::Data) else { continue };
                    let mut steps = 1;
                    while hop != name(to) {
                        hop = routes[(hop.get() - 1) as usize].next_hop(name(to), Graph::Data).expect("route continues");
                        steps += 1;
                        prop_assert!(steps <= n, "loop from {} to {}", from, to);
                    }
                }
            }
        }
    }
}
