//! Agreement on the first division of the ring (`--ipalloc-init consensus=N`): single-decree
//! Paxos carried by gossip, as Weave did it. Every elector is proposer, acceptor and learner;
//! the whole state — per node its promise, the ballot it accepted and that ballot's value — is
//! gossiped and merged (each node writes only its own claims, which only move forward). The
//! value agreed on is the set of electors the winning proposer had heard of; each peer then
//! seeds the ring with it. Pure: no I/O, no clock.
//!
//! Restarts: a ballot carries the proposer's incarnation, so a restarted elector never takes
//! a ballot of its earlier life for its own (it cannot know which value that life accepted
//! for it); agreement is counted per (ballot, value); and an elector's own claims are
//! persisted with the ring and restored at start ([`Paxos::restore`]), so an acceptor keeps
//! its promise and what it accepted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::identity::PeerName;

/// A proposal number: rounds are ordered, the proposer's name and then its incarnation break
/// ties, so every start of every elector proposes ballots of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ballot {
    pub round: u64,
    pub proposer: PeerName,
    #[serde(default)]
    pub incarnation: u64,
}

/// What one node has said.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Which start of the node these claims are from (a restarted node forgets its promises,
    /// so its new claims replace the old ones).
    pub incarnation: u64,
    pub promise: Option<Ballot>,
    pub accepted: Option<Ballot>,
    pub value: Vec<PeerName>,
}

impl Claims {
    fn rank(&self) -> (u64, Option<Ballot>, Option<Ballot>) {
        (self.incarnation, self.promise, self.accepted)
    }
}

/// One elector's view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paxos {
    me: PeerName,
    quorum: usize,
    nodes: BTreeMap<PeerName, Claims>,
}

impl Paxos {
    pub fn new(me: PeerName, incarnation: u64, quorum: usize) -> Paxos {
        let mine = Claims { incarnation, ..Claims::default() };
        Paxos { me, quorum: quorum.max(1), nodes: BTreeMap::from([(me, mine)]) }
    }

    pub fn quorum(&self) -> usize {
        self.quorum
    }

    /// Electors heard of, this one included.
    pub fn electors(&self) -> usize {
        self.nodes.len()
    }

    pub fn nodes(&self) -> &BTreeMap<PeerName, Claims> {
        &self.nodes
    }

    /// This elector's own claims (persisted with the ring).
    pub fn mine(&self) -> &Claims {
        // The constructor inserts our own claims and nothing removes them.
        &self.nodes[&self.me]
    }

    fn mine_mut(&mut self) -> &mut Claims {
        self.nodes.entry(self.me).or_default()
    }

    /// Takes back the claims this elector persisted in an earlier life: a promise and an
    /// accepted value must survive a restart. The incarnation stays the new one.
    pub fn restore(&mut self, persisted: Claims) {
        let mine = self.mine_mut();
        mine.promise = persisted.promise;
        mine.accepted = persisted.accepted;
        mine.value = persisted.value;
    }

    fn incarnation(&self) -> u64 {
        self.mine().incarnation
    }

    /// Whether `b` is a ballot of this start of this elector.
    fn is_mine(&self, b: Ballot) -> bool {
        b.proposer == self.me && b.incarnation == self.incarnation()
    }

    /// Merges another elector's view; true if anything was new.
    pub fn merge(&mut self, theirs: &BTreeMap<PeerName, Claims>) -> bool {
        let mut changed = false;
        for (peer, c) in theirs {
            if *peer == self.me {
                continue; // only we speak for ourselves
            }
            match self.nodes.get_mut(peer) {
                Some(ours) if ours.rank() >= c.rank() => {}
                Some(ours) => {
                    *ours = c.clone();
                    changed = true;
                }
                None => {
                    self.nodes.insert(*peer, c.clone());
                    changed = true;
                }
            }
        }
        changed
    }

    /// Starts (or restarts) a proposal with a round above any seen.
    pub fn propose(&mut self) {
        let top = self
            .nodes
            .values()
            .flat_map(|c| [c.promise, c.accepted])
            .flatten()
            .map(|b| b.round)
            .max()
            .unwrap_or(0);
        let (me, incarnation) = (self.me, self.incarnation());
        self.mine_mut().promise = Some(Ballot { round: top + 1, proposer: me, incarnation });
    }

    /// Whether this elector is driving a proposal of its own (of this start).
    pub fn proposing(&self) -> bool {
        self.mine().promise.is_some_and(|b| self.is_mine(b))
    }

    /// Takes every step the current state allows; true if our claims changed.
    pub fn think(&mut self) -> bool {
        let before = self.mine().clone();
        // Promise: follow the highest ballot anyone has put forward.
        let top = self.nodes.values().filter_map(|c| c.promise).max();
        if top > self.mine().promise {
            self.mine_mut().promise = top;
        }
        let Some(ballot) = self.mine().promise else { return false };
        if self.mine().accepted != Some(ballot) {
            // A ballot of an earlier start of ours is somebody else's: we do not know what
            // that start accepted for it, so we never accept it with a value of our own.
            if self.is_mine(ballot) {
                self.accept_own(ballot);
            } else if let Some(value) = self.proposed_value(ballot) {
                let mine = self.mine_mut();
                mine.accepted = Some(ballot);
                mine.value = value;
            }
        }
        *self.mine() != before
    }

    /// As proposer: with a quorum of promises, accept our ballot with the value of the highest
    /// ballot any of the promisers accepted, or else the electors we know of.
    fn accept_own(&mut self, ballot: Ballot) {
        let promisers: Vec<&Claims> =
            self.nodes.values().filter(|c| c.promise == Some(ballot)).collect();
        if promisers.len() < self.quorum {
            return;
        }
        let value = promisers
            .iter()
            .filter(|c| c.accepted.is_some())
            .max_by_key(|c| c.accepted)
            .map(|c| c.value.clone())
            .unwrap_or_else(|| self.nodes.keys().copied().collect());
        let mine = self.mine_mut();
        mine.accepted = Some(ballot);
        mine.value = value;
    }

    /// The value the proposer of `ballot` accepted for it, once it has.
    fn proposed_value(&self, ballot: Ballot) -> Option<Vec<PeerName>> {
        let c = self.nodes.get(&ballot.proposer)?;
        (c.accepted == Some(ballot)).then(|| c.value.clone())
    }

    /// The agreed value, once a quorum accepted the same ballot with the same value (a
    /// ballot's value is unique in Paxos; counting per pair keeps a fault from adding up
    /// votes for different values).
    pub fn consensus(&self) -> Option<Vec<PeerName>> {
        let mut counts: BTreeMap<(Ballot, &Vec<PeerName>), usize> = BTreeMap::new();
        for c in self.nodes.values() {
            if let Some(b) = c.accepted {
                *counts.entry((b, &c.value)).or_insert(0) += 1;
            }
        }
        counts.into_iter().find(|(_, n)| *n >= self.quorum).map(|((_, v), _)| v.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn p(n: u64) -> PeerName {
        PeerName::new(n).unwrap()
    }

    #[test]
    fn a_single_elector_agrees_with_itself() {
        let mut x = Paxos::new(p(1), 1, 1);
        assert_eq!(x.consensus(), None);
        x.propose();
        x.think();
        assert_eq!(x.consensus(), Some(vec![p(1)]));
    }

    #[test]
    fn two_of_three_agree_and_the_third_learns() {
        let mut a = Paxos::new(p(1), 1, 2);
        let mut b = Paxos::new(p(2), 1, 2);
        let mut c = Paxos::new(p(3), 1, 2);
        a.propose();
        a.think();
        b.merge(a.nodes());
        b.think(); // promises
        a.merge(b.nodes());
        a.think(); // accepts with the electors it heard of: 1 and 2
        assert_eq!(a.mine().value, vec![p(1), p(2)]);
        b.merge(a.nodes());
        b.think(); // accepts
        assert_eq!(b.consensus(), Some(vec![p(1), p(2)]));
        c.merge(b.nodes());
        assert_eq!(c.consensus(), Some(vec![p(1), p(2)]));
    }

    /// An elector restarted without its state (its acceptance lost) hears of a stale promise
    /// for the ballot of its earlier life: it must not accept that ballot with a value of
    /// its own, or a second value wins (before ballots carried the incarnation, it did).
    #[test]
    fn a_restarted_elector_does_not_reuse_its_earlier_ballot() {
        let mut a = Paxos::new(p(1), 1, 2);
        let mut b = Paxos::new(p(2), 1, 2);
        let mut c = Paxos::new(p(3), 1, 2);
        a.propose();
        a.think();
        b.merge(a.nodes());
        b.think(); // promises a's ballot
        let stale_b = b.nodes().clone();
        a.merge(b.nodes());
        a.think(); // accepts with {1, 2}
        b.merge(a.nodes());
        b.think(); // accepts: agreed
        let agreed = b.consensus().expect("agreed");
        let mut a = Paxos::new(p(1), 2, 2);
        a.merge(c.nodes());
        a.merge(&stale_b);
        a.think();
        for _ in 0..2 {
            c.merge(a.nodes());
            c.think();
            a.merge(c.nodes());
            a.think();
        }
        for x in [&a, &b, &c] {
            if let Some(v) = x.consensus() {
                assert_eq!(v, agreed, "a second value won");
            }
        }
    }

    /// Restarted electors that restore their persisted claims keep the agreement.
    #[test]
    fn electors_restarting_with_their_persisted_claims_agree_on_one_value() {
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..300 {
            let n = rng.random_range(2..=6usize);
            let quorum = n / 2 + 1;
            let mut nodes: Vec<Paxos> =
                (1..=n as u64).map(|i| Paxos::new(p(i), 1, quorum)).collect();
            let mut incarnations = vec![1u64; n];
            let mut agreed: Option<Vec<PeerName>> = None;
            for _ in 0..1500 {
                let i = rng.random_range(0..n);
                if rng.random_bool(0.03) {
                    // Claims are persisted before they are sent: restore the latest.
                    let saved = nodes[i].mine().clone();
                    incarnations[i] += 1;
                    nodes[i] = Paxos::new(p(i as u64 + 1), incarnations[i], quorum);
                    nodes[i].restore(saved);
                }
                if rng.random_bool(0.05) {
                    nodes[i].propose();
                }
                nodes[i].think();
                let j = rng.random_range(0..n);
                if rng.random_bool(0.7) {
                    let view = nodes[i].nodes().clone();
                    nodes[j].merge(&view);
                    nodes[j].think();
                }
                for x in &nodes {
                    if let Some(v) = x.consensus() {
                        assert_eq!(agreed.get_or_insert(v.clone()), &v, "two values agreed");
                    }
                }
            }
        }
    }

    /// Random gossip among electors with competing, repeated proposals and lost messages:
    /// once a value is agreed anywhere, every later agreement anywhere is the same value, and
    /// with enough delivery everyone learns it.
    #[test]
    fn random_schedules_agree_on_one_value() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut steps = 0u64;
        for _ in 0..300 {
            let n = rng.random_range(1..=7usize);
            let quorum = n / 2 + 1;
            let mut nodes: Vec<Paxos> =
                (1..=n as u64).map(|i| Paxos::new(p(i), 1, quorum)).collect();
            let mut agreed: Option<Vec<PeerName>> = None;
            for step in 0..2000 {
                steps += 1;
                let i = rng.random_range(0..n);
                if rng.random_bool(0.05) || (step == 0) {
                    nodes[i].propose();
                }
                nodes[i].think();
                let j = rng.random_range(0..n);
                if rng.random_bool(0.8) {
                    let view = nodes[i].nodes().clone();
                    nodes[j].merge(&view);
                    nodes[j].think();
                }
                for x in &nodes {
                    if let Some(v) = x.consensus() {
                        match &agreed {
                            None => agreed = Some(v),
                            Some(a) => assert_eq!(a, &v, "two different values agreed"),
                        }
                    }
                }
            }
            // Deliver everything a few times over without new proposals: all learn.
            for _ in 0..3 {
                for i in 0..n {
                    for j in 0..n {
                        let view = nodes[i].nodes().clone();
                        nodes[j].merge(&view);
                        nodes[j].think();
                    }
                }
            }
            if agreed.is_some() {
                for x in &nodes {
                    assert_eq!(x.consensus(), agreed, "every elector learns the value");
                }
            }
        }
        eprintln!("paxos: {steps} random steps checked");
    }
}
