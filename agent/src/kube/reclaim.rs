//! Node reclaim: the address space of a peer whose Node is gone for good is taken over by
//! exactly one surviving agent. The rules (docs/kubernetes-agent.md):
//!
//! 1. The only trigger is a Node that is absent: a direct GET answering NotFound. Any other
//!    answer or failure means "present". Readiness, mesh reachability and heartbeats are never
//!    consulted, so a partitioned node keeps its space.
//! 2. Two passes: a candidate seen in one pass is acted on in the next, after a fresh GET.
//! 3. One actor: only the holder of the Lease `weft-reclaim` acts, and it re-reads the
//!    registry right before each takeover; an entry already removed was done by someone else.
//! 4. A peer name its own Node's agent retired (state wiped, new identity) is reclaimed
//!    without a Node check: that agent has said the name is dead.
//! 5. A peer that the mesh still reaches is never taken over (the IPAM handle refuses).
//!
//! Level-triggered: every pass reads the whole registry, so a Node deleted while every agent
//! was down is still reclaimed.

use std::collections::{BTreeMap, BTreeSet};

use tracing::{info, warn};

use super::api::{ApiError, KubeApi, Write};
use super::lease;
use super::registry::{self, Registry};
use crate::endpoints::ipam::ReclaimError;
use crate::identity::PeerName;

/// How this agent takes over a peer's space: the IPAM handle with the mesh view in the
/// agent, a recorder in tests.
#[async_trait::async_trait]
pub trait Takeover: Send + Sync {
    async fn rmpeer(&self, peer: PeerName) -> Result<u128, ReclaimError>;
}

/// Why a peer's space is to be taken over.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Why {
    /// Its Node was deleted.
    NodeDeleted(String),
    /// Its Node's agent came back under a new name.
    Retired(String),
}

/// What a pass did about one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Seen for the first time; acted on in the next pass if still a candidate.
    Candidate(PeerName, Why),
    /// Taken over (addresses taken over; 0 when the ring knew no space of it).
    Reclaimed(PeerName, Why, u128),
    /// Another agent holds the Lease.
    Busy,
    /// The mesh still reaches it, or the takeover failed; tried again later.
    Deferred(PeerName, String),
}

/// The reclaim state of one agent.
#[derive(Debug)]
pub struct Reclaimer {
    node: String,
    me: PeerName,
    /// Candidates of the previous pass.
    pending: BTreeSet<(PeerName, Why)>,
}

impl Reclaimer {
    pub fn new(node: String, me: PeerName) -> Reclaimer {
        Reclaimer { node, me, pending: BTreeSet::new() }
    }

    /// One pass. `listed` is the Node list as the watch last saw it: Nodes in it are not
    /// even asked about (a cheap filter; the decision is the direct GET). `now` is Unix
    /// seconds, for the Lease.
    pub async fn pass(
        &mut self,
        api: &dyn KubeApi,
        takeover: &dyn Takeover,
        listed: &BTreeSet<String>,
        now: i64,
    ) -> Result<Vec<Outcome>, ApiError> {
        let reg = registry::read(api).await?;
        let found = self.candidates(api, &reg, listed).await;
        let mut out = Vec::new();
        let mut ready = Vec::new();
        for c in &found {
            let retired = matches!(c.1, Why::Retired(_));
            if retired || self.pending.contains(c) {
                ready.push(c.clone());
            } else {
                out.push(Outcome::Candidate(c.0, c.1.clone()));
            }
        }
        self.pending = found;
        if ready.is_empty() {
            return Ok(out);
        }
        let Some(held) = lease::acquire(api, &self.node, now).await? else {
            out.push(Outcome::Busy);
            return Ok(out);
        };
        for (peer, why) in ready {
            match self.take_over(api, takeover, peer, &why).await {
                Ok(Some(o)) => out.push(o),
                Ok(None) => {}
                Err(e) => out.push(Outcome::Deferred(peer, e.to_string())),
            }
            self.pending.remove(&(peer, why));
        }
        if let Err(e) = lease::release(api, &held).await {
            warn!(error = %e, "cannot release the reclaim Lease; it expires on its own");
        }
        Ok(out)
    }

    async fn candidates(
        &self,
        api: &dyn KubeApi,
        reg: &Registry,
        listed: &BTreeSet<String>,
    ) -> BTreeSet<(PeerName, Why)> {
        let mut out = BTreeSet::new();
        for (node, peer) in &reg.peers {
            if *node == self.node || *peer == self.me || listed.contains(node) {
                continue;
            }
            if self.node_gone(api, node).await {
                out.insert((*peer, Why::NodeDeleted(node.clone())));
            }
        }
        for (peer, node) in &reg.retired {
            if *peer != self.me && !reg.is_current(*peer) {
                out.insert((*peer, Why::Retired(node.clone())));
            }
        }
        out
    }

    async fn node_gone(&self, api: &dyn KubeApi, node: &str) -> bool {
        match api.node_exists(node).await {
            Ok(exists) => !exists,
            Err(e) => {
                warn!(node, error = %e, "cannot confirm that Node is gone; assuming it exists");
                false
            }
        }
    }

    /// Under the Lease: re-checks, takes over, removes the registry entry.
    async fn take_over(
        &self,
        api: &dyn KubeApi,
        takeover: &dyn Takeover,
        peer: PeerName,
        why: &Why,
    ) -> Result<Option<Outcome>, ApiError> {
        let reg = registry::read(api).await?;
        let still = match why {
            Why::NodeDeleted(node) => {
                reg.peers.get(node) == Some(&peer) && self.node_gone(api, node).await
            }
            Why::Retired(_) => reg.retired.contains_key(&peer) && !reg.is_current(peer),
        };
        if !still {
            return Ok(None); // done by another agent, or the Node is back
        }
        let taken = match takeover.rmpeer(peer).await {
            Ok(n) => n,
            // Nothing of it in the ring: only the registry entry is left to remove.
            Err(ReclaimError::UnknownPeer(_)) => 0,
            Err(e) => return Ok(Some(Outcome::Deferred(peer, e.to_string()))),
        };
        forget(api, peer, why).await?;
        Ok(Some(Outcome::Reclaimed(peer, why.clone(), taken)))
    }
}

/// Removes a reclaimed peer's entry (compare-and-swap, retried on conflicts).
async fn forget(api: &dyn KubeApi, peer: PeerName, why: &Why) -> Result<(), ApiError> {
    loop {
        let mut reg = registry::read(api).await?;
        match why {
            Why::NodeDeleted(node) if reg.peers.get(node) == Some(&peer) => {
                reg.peers.remove(node);
            }
            Why::Retired(_) if reg.retired.contains_key(&peer) => {
                reg.retired.remove(&peer);
            }
            _ => return Ok(()),
        }
        if registry::write(api, &reg).await? == Write::Done {
            return Ok(());
        }
    }
}

/// Logs a pass's outcomes.
pub fn log(outcomes: &[Outcome]) {
    for o in outcomes {
        match o {
            Outcome::Candidate(p, why) => info!(peer = %p, ?why, "reclaim candidate; confirming"),
            Outcome::Reclaimed(p, why, n) => {
                info!(peer = %p, ?why, addresses = %n, "took over the address space of a gone peer")
            }
            Outcome::Busy => info!("another agent holds the reclaim Lease"),
            Outcome::Deferred(p, why) => warn!(peer = %p, reason = %why, "reclaim deferred"),
        }
    }
}

/// The candidates' counts by kind (for tests and status).
pub fn summary(outcomes: &[Outcome]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for o in outcomes {
        let k = match o {
            Outcome::Candidate(..) => "candidate",
            Outcome::Reclaimed(..) => "reclaimed",
            Outcome::Busy => "busy",
            Outcome::Deferred(..) => "deferred",
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::kube::fake::FakeApi;
    use crate::kube::registry::register;

    fn p(n: u8) -> PeerName {
        format!("00:00:00:00:00:{n:02x}").parse().expect("peer name")
    }

    /// Records takeovers; refuses peers it is told are reachable.
    #[derive(Default)]
    struct Recorder {
        taken: Mutex<Vec<PeerName>>,
        reachable: Mutex<BTreeSet<PeerName>>,
    }

    #[async_trait::async_trait]
    impl Takeover for Recorder {
        async fn rmpeer(&self, peer: PeerName) -> Result<u128, ReclaimError> {
            if self.reachable.lock().expect("lock").contains(&peer) {
                return Err(ReclaimError::Reachable(peer.to_string()));
            }
            self.taken.lock().expect("lock").push(peer);
            Ok(256)
        }
    }

    impl Recorder {
        fn taken(&self) -> Vec<PeerName> {
            self.taken.lock().expect("lock").clone()
        }
    }

    async fn cluster(n: u8) -> FakeApi {
        let api = FakeApi::default();
        for i in 1..=n {
            api.add_node(&format!("n{i}"), &["192.168.0.1"]);
            register(&api, &format!("n{i}"), p(i)).await.expect("register");
        }
        api
    }

    fn nothing() -> BTreeSet<String> {
        BTreeSet::new()
    }

    #[tokio::test]
    async fn a_deleted_node_is_reclaimed_on_the_second_pass() {
        let api = cluster(3).await;
        let rec = Recorder::default();
        let mut r = Reclaimer::new("n1".into(), p(1));
        assert!(r.pass(&api, &rec, &nothing(), 0).await.expect("pass").is_empty());
        api.delete_node("n3");
        let out = r.pass(&api, &rec, &nothing(), 5).await.expect("pass");
        assert_eq!(out, vec![Outcome::Candidate(p(3), Why::NodeDeleted("n3".into()))]);
        assert!(rec.taken().is_empty(), "never on the first sighting");
        let out = r.pass(&api, &rec, &nothing(), 10).await.expect("pass");
        assert_eq!(out, vec![Outcome::Reclaimed(p(3), Why::NodeDeleted("n3".into()), 256)]);
        assert_eq!(rec.taken(), vec![p(3)]);
        assert!(!registry::read(&api).await.expect("read").peers.contains_key("n3"));
        assert!(r.pass(&api, &rec, &nothing(), 15).await.expect("pass").is_empty());
        assert_eq!(rec.taken().len(), 1);
    }

    #[tokio::test]
    async fn only_not_found_counts() {
        let api = cluster(2).await;
        let rec = Recorder::default();
        let mut r = Reclaimer::new("n1".into(), p(1));
        // A Node that is NotReady or unreachable is still listed: never a candidate.
        for t in 0..3 {
            assert!(r.pass(&api, &rec, &nothing(), t).await.expect("pass").is_empty());
        }
        // The GET failing is not NotFound.
        api.delete_node("n2");
        api.set_node_get_fails(true);
        for t in 0..3 {
            assert!(r.pass(&api, &rec, &nothing(), t).await.expect("pass").is_empty());
        }
        assert!(rec.taken().is_empty());
        // A Node that comes back between the passes is left alone.
        api.set_node_get_fails(false);
        r.pass(&api, &rec, &nothing(), 10).await.expect("pass");
        api.add_node("n2", &["192.168.0.2"]);
        assert!(r.pass(&api, &rec, &nothing(), 15).await.expect("pass").is_empty());
        assert!(rec.taken().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_agents_one_takeover() {
        let api = Arc::new(cluster(6).await);
        let recs: Vec<Arc<Recorder>> = (0..5).map(|_| Arc::new(Recorder::default())).collect();
        let mut rs: Vec<Reclaimer> =
            (1..=5).map(|i| Reclaimer::new(format!("n{i}"), p(i))).collect();
        api.delete_node("n6");
        for t in 0..4i64 {
            let mut joins = Vec::new();
            for (r, rec) in rs.drain(..).zip(recs.iter().cloned()) {
                let api = api.clone();
                joins.push(tokio::spawn(async move {
                    let mut r = r;
                    let out = r.pass(api.as_ref(), rec.as_ref(), &nothing(), t * 100).await;
                    (r, out)
                }));
            }
            for j in joins {
                let (r, out) = j.await.expect("task");
                out.expect("pass");
                rs.push(r);
            }
        }
        let total: usize = recs.iter().map(|r| r.taken().len()).sum();
        assert_eq!(total, 1, "exactly one agent takes the space over");
        assert_eq!(api.lease(lease::RECLAIM_LEASE).and_then(|l| l.holder), None);
    }

    #[tokio::test]
    async fn a_new_identity_retires_the_old_name() {
        let api = cluster(2).await;
        let rec = Recorder::default();
        // n2's agent comes back with a new name.
        assert_eq!(
            register(&api, "n2", p(9)).await.expect("register"),
            registry::Registered::Replaced(p(2))
        );
        let mut r = Reclaimer::new("n1".into(), p(1));
        let out = r.pass(&api, &rec, &nothing(), 0).await.expect("pass");
        assert_eq!(out, vec![Outcome::Reclaimed(p(2), Why::Retired("n2".into()), 256)]);
        assert!(registry::read(&api).await.expect("read").retired.is_empty());
        assert_eq!(registry::read(&api).await.expect("read").peers.get("n2"), Some(&p(9)));
    }

    #[tokio::test]
    async fn a_reachable_peer_is_deferred_and_kept() {
        let api = cluster(2).await;
        let rec = Recorder::default();
        rec.reachable.lock().expect("lock").insert(p(2));
        let mut r = Reclaimer::new("n1".into(), p(1));
        api.delete_node("n2");
        r.pass(&api, &rec, &nothing(), 0).await.expect("pass");
        let out = r.pass(&api, &rec, &nothing(), 5).await.expect("pass");
        assert!(matches!(out.as_slice(), [Outcome::Deferred(p2, _)] if *p2 == p(2)), "{out:?}");
        assert!(registry::read(&api).await.expect("read").peers.contains_key("n2"));
        assert_eq!(summary(&out).get("deferred"), Some(&1));
    }

    #[tokio::test]
    async fn a_held_lease_makes_others_wait() {
        let api = cluster(3).await;
        let rec = Recorder::default();
        assert!(lease::acquire(&api, "n3", 0).await.expect("take").is_some());
        api.delete_node("n2");
        let mut r = Reclaimer::new("n1".into(), p(1));
        r.pass(&api, &rec, &nothing(), 1).await.expect("pass");
        let out = r.pass(&api, &rec, &nothing(), 2).await.expect("pass");
        assert_eq!(out, vec![Outcome::Busy]);
        let out = r.pass(&api, &rec, &nothing(), 1 + lease::LEASE_SECONDS).await.expect("pass");
        assert_eq!(out, vec![Outcome::Reclaimed(p(2), Why::NodeDeleted("n2".into()), 256)]);
    }
}
