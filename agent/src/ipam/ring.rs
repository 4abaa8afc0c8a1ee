//! The ring: who owns which part of the allocation range, shared by all peers as a CRDT.
//!
//! The range `[start, end)` is cut at tokens; the entry at a token says which peer owns the
//! addresses from that token up to the next one (or the end). Tokens are never removed, so a
//! boundary, once drawn, stays. An entry carries a version: the owner bumps it when it gives
//! the range away, an administrator's `rmpeer` bumps it by [`TRANSFER_MARGIN`] so the takeover
//! wins over anything the dead peer did that was not heard of. The free-address count is a
//! hint for choosing donors, versioned separately so that hints never compete with ownership.
//!
//! Merging takes, per token, the entry with the greatest (version, free version, owner,
//! free): a join, hence commutative, associative and idempotent. On top of it one local rule
//! keeps a peer from losing addresses it has handed out: if the merge gives a range of ours
//! that holds allocations to someone else, we take it back with a higher version (and report
//! it). Pure: no I/O.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::identity::PeerName;
use crate::mesh::gossip::version_ok;

/// Added to the version of entries taken over from a peer that is gone.
pub const TRANSFER_MARGIN: u64 = 100;
/// A bound on entries accepted from a peer (a ring is cut into at most this many ranges).
pub const MAX_ENTRIES: usize = 1 << 16;

/// One range of the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub peer: PeerName,
    pub version: u64,
    /// Free addresses in the range, as last reported by its owner (a hint).
    pub free: u128,
    pub free_version: u64,
}

impl Entry {
    fn new(peer: PeerName, version: u64, free: u128) -> Entry {
        Entry { peer, version, free, free_version: 0 }
    }

    /// The order in which concurrent entries for one token win.
    fn rank(&self) -> (u64, u64, PeerName, u128) {
        (self.version, self.free_version, self.peer, self.free)
    }
}

/// Why a ring from a peer was not merged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("the peer allocates from another range ({theirs}; ours is {ours})")]
    DifferentRange { ours: String, theirs: String },
    #[error(
        "IP allocation was seeded by different peers (theirs: {}; ours: {})",
        names(theirs),
        names(ours)
    )]
    DifferentSeeds { ours: Vec<PeerName>, theirs: Vec<PeerName> },
    #[error("malformed ring: {0}")]
    Invalid(String),
}

fn names(peers: &[PeerName]) -> String {
    peers.iter().map(PeerName::to_string).collect::<Vec<_>>().join(", ")
}

/// What a merge did to this peer's share.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeOutcome {
    /// The ring changed.
    pub changed: bool,
    /// Ranges of ours the peer's ring gave to others while we have addresses in use there:
    /// taken back.
    pub retained: Vec<Range<u128>>,
    /// Ranges of ours (without addresses in use) that now belong to others.
    pub lost: Vec<Range<u128>>,
}

/// The ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    start: u128,
    end: u128,
    entries: BTreeMap<u128, Entry>,
    /// The peers the ring was first divided among, sorted (empty until it was).
    seeds: Vec<PeerName>,
}

impl Ring {
    /// An empty ring over `range`.
    pub fn new(range: Range<u128>) -> Ring {
        Ring { start: range.start, end: range.end, entries: BTreeMap::new(), seeds: Vec::new() }
    }

    /// A ring from its parts (as decoded from the wire or the state file), checked.
    pub fn from_parts(
        range: Range<u128>,
        entries: impl IntoIterator<Item = (u128, Entry)>,
        seeds: Vec<PeerName>,
    ) -> Result<Ring, RingError> {
        let mut ring = Ring::new(range);
        for (token, entry) in entries {
            if ring.entries.len() >= MAX_ENTRIES {
                return Err(RingError::Invalid(format!("more than {MAX_ENTRIES} entries")));
            }
            if ring.entries.insert(token, entry).is_some() {
                return Err(RingError::Invalid(format!("token {token} twice")));
            }
        }
        ring.seeds = seeds;
        ring.seeds.sort();
        ring.seeds.dedup();
        ring.check()?;
        ring.clamp_free();
        Ok(ring)
    }

    fn check(&self) -> Result<(), RingError> {
        if self.start >= self.end {
            return Err(RingError::Invalid("empty range".into()));
        }
        if let Some((first, _)) = self.entries.first_key_value() {
            if *first != self.start {
                return Err(RingError::Invalid(
                    "the first token is not the start of the range".into(),
                ));
            }
        }
        if let Some((last, _)) = self.entries.last_key_value() {
            if *last >= self.end {
                return Err(RingError::Invalid("a token lies outside the range".into()));
            }
        }
        if self.entries.values().any(|e| !version_ok(e.version) || !version_ok(e.free_version)) {
            return Err(RingError::Invalid("a version beyond the limit".into()));
        }
        Ok(())
    }

    /// A free count can never exceed its range (a peer may report a stale one).
    fn clamp_free(&mut self) {
        let tokens: Vec<u128> = self.entries.keys().copied().collect();
        for t in tokens {
            let size = self.range_at(t).end - t;
            if let Some(e) = self.entries.get_mut(&t) {
                e.free = e.free.min(size);
            }
        }
    }

    pub fn range(&self) -> Range<u128> {
        self.start..self.end
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn seeds(&self) -> &[PeerName] {
        &self.seeds
    }

    /// Every entry with the range it covers, in order.
    pub fn entries(&self) -> impl Iterator<Item = (Range<u128>, &Entry)> + '_ {
        self.entries.iter().map(|(t, e)| (self.range_at(*t), e))
    }

    /// The range that starts at token `t`.
    fn range_at(&self, t: u128) -> Range<u128> {
        let next = self.entries.range(t + 1..).next().map_or(self.end, |(k, _)| *k);
        t..next
    }

    /// The entry at token `t`, if `t` is a token.
    pub fn entry_at(&self, t: u128) -> Option<&Entry> {
        self.entries.get(&t)
    }

    /// Who owns address key `k`.
    pub fn owner(&self, k: u128) -> Option<PeerName> {
        if !(self.start..self.end).contains(&k) {
            return None;
        }
        self.entries.range(..=k).next_back().map(|(_, e)| e.peer)
    }

    /// The ranges `peer` owns, adjacent ones joined.
    pub fn owned_by(&self, peer: PeerName) -> Vec<Range<u128>> {
        let mut out: Vec<Range<u128>> = Vec::new();
        for (r, _) in self.entries().filter(|(_, e)| e.peer == peer) {
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
        out
    }

    /// Addresses of the range per owner.
    pub fn shares(&self) -> BTreeMap<PeerName, (u128, u128)> {
        let mut out: BTreeMap<PeerName, (u128, u128)> = BTreeMap::new();
        for (r, e) in self.entries() {
            let s = out.entry(e.peer).or_default();
            s.0 += r.end - r.start;
            s.1 += e.free;
        }
        out
    }

    /// Divides an empty ring among `peers` (sorted, deduplicated): halves of the range go to
    /// halves of the list, recursively, so shares are CIDR-aligned when the counts allow.
    /// Every peer that seeds with the same list builds the same ring.
    pub fn seed(&mut self, peers: &[PeerName]) -> bool {
        if !self.entries.is_empty() || peers.is_empty() {
            return false;
        }
        let mut peers = peers.to_vec();
        peers.sort();
        peers.dedup();
        self.split_among(self.start, self.end, &peers);
        self.seeds = peers;
        true
    }

    fn split_among(&mut self, start: u128, end: u128, peers: &[PeerName]) {
        match peers {
            [] => {}
            [p, ..] if peers.len() == 1 || end - start <= 1 => {
                self.entries.insert(start, Entry::new(*p, 1, end - start));
            }
            _ => {
                let mid = start + (end - start) / 2;
                let (a, b) = peers.split_at(peers.len() / 2);
                self.split_among(start, mid, a);
                self.split_among(mid, end, b);
            }
        }
    }

    /// Gives `r`, which `me` owns entirely, to `to`.
    pub fn grant(&mut self, me: PeerName, r: Range<u128>, to: PeerName) -> Result<(), RingError> {
        if r.is_empty() || r.start < self.start || r.end > self.end {
            return Err(RingError::Invalid("grant outside the range".into()));
        }
        let mine = self.owned_by(me);
        if !mine.iter().any(|m| m.start <= r.start && r.end <= m.end) {
            return Err(RingError::Invalid("grant of space we do not own".into()));
        }
        // The remainder after the grant stays ours: it needs a token of its own. Its hint is
        // what the split entry said (clamped to the remainder), not 0: a 0 would tell every
        // other peer there is nothing to ask for here until our next report.
        if r.end < self.end && !self.entries.contains_key(&r.end) {
            let hint = self.entries.range(..r.end).next_back().map_or(0, |(_, e)| e.free);
            self.entries.insert(r.end, Entry::new(me, 1, hint));
        }
        let inside: Vec<u128> = self.entries.range(r.start..r.end).map(|(t, _)| *t).collect();
        for t in inside {
            if let Some(e) = self.entries.get_mut(&t) {
                *e = Entry::new(to, e.version.saturating_add(1), 0);
            }
        }
        self.entries.entry(r.start).or_insert_with(|| Entry::new(to, 1, 0));
        // What was granted was free.
        let tokens: Vec<u128> = self.entries.range(r.start..r.end).map(|(t, _)| *t).collect();
        for t in tokens {
            let size = self.range_at(t).end - t;
            if let Some(e) = self.entries.get_mut(&t) {
                e.free = size;
            }
        }
        // The range we kept before the grant shrank.
        self.clamp_free();
        Ok(())
    }

    /// Hands every range of `from` to `to` (a peer leaving, or `rmpeer` of a dead one);
    /// returns the number of addresses moved.
    pub fn transfer(&mut self, from: PeerName, to: PeerName) -> u128 {
        let tokens: Vec<u128> =
            self.entries.iter().filter(|(_, e)| e.peer == from).map(|(t, _)| *t).collect();
        let mut moved = 0;
        for t in tokens {
            moved += self.range_at(t).end - t;
            if let Some(e) = self.entries.get_mut(&t) {
                *e = Entry { peer: to, version: e.version.saturating_add(TRANSFER_MARGIN), ..*e };
                e.free_version = 0;
            }
        }
        moved
    }

    /// Updates the free-address hints of `me`'s entries (those for which `free_in` has a
    /// count); true if any changed.
    pub fn report_free(
        &mut self,
        me: PeerName,
        free_in: impl Fn(Range<u128>) -> Option<u128>,
    ) -> bool {
        let tokens: Vec<u128> =
            self.entries.iter().filter(|(_, e)| e.peer == me).map(|(t, _)| *t).collect();
        let mut changed = false;
        for t in tokens {
            let Some(free) = free_in(self.range_at(t)) else { continue };
            if let Some(e) = self.entries.get_mut(&t) {
                if e.free != free {
                    e.free = free;
                    e.free_version = e.free_version.saturating_add(1);
                    changed = true;
                }
            }
        }
        changed
    }

    /// Peers other than `me` that own space in `within`, with their free-space hints, most
    /// free space first. Peers whose hint is 0 are listed too (last): a hint can be stale, and
    /// only the owner can say it has nothing to give.
    pub fn donors(&self, within: Range<u128>, me: PeerName) -> Vec<(PeerName, u128)> {
        let mut free: BTreeMap<PeerName, u128> = BTreeMap::new();
        for (r, e) in self.entries().filter(|(_, e)| e.peer != me) {
            let overlap = r.end.min(within.end).saturating_sub(r.start.max(within.start));
            if overlap > 0 {
                *free.entry(e.peer).or_default() += e.free.min(overlap);
            }
        }
        let mut out: Vec<(PeerName, u128)> = free.into_iter().collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }

    /// Merges a peer's ring into ours (see the module documentation). `busy(r)` says whether
    /// this peer has addresses in use in `r`.
    pub fn merge(
        &mut self,
        other: &Ring,
        me: PeerName,
        busy: impl Fn(Range<u128>) -> bool,
    ) -> Result<MergeOutcome, RingError> {
        if other.range() != self.range() {
            return Err(RingError::DifferentRange {
                ours: format!("{:?}", self.range()),
                theirs: format!("{:?}", other.range()),
            });
        }
        other.check()?;
        if !self.seeds.is_empty() && !other.seeds.is_empty() && self.seeds != other.seeds {
            return Err(RingError::DifferentSeeds {
                ours: self.seeds.clone(),
                theirs: other.seeds.clone(),
            });
        }
        let before = self.clone();
        for (t, theirs) in &other.entries {
            match self.entries.get_mut(t) {
                Some(ours) if ours.rank() >= theirs.rank() => {}
                Some(ours) => *ours = *theirs,
                None => {
                    self.entries.insert(*t, *theirs);
                }
            }
        }
        if self.entries.len() > MAX_ENTRIES {
            // Such a ring could not be loaded again at the next start (decoding enforces the
            // bound): keep ours.
            *self = before;
            return Err(RingError::Invalid(format!("merged ring over {MAX_ENTRIES} entries")));
        }
        if self.seeds.is_empty() {
            self.seeds = other.seeds.clone();
        }
        let mut out = MergeOutcome::default();
        for was in before.owned_by(me) {
            let tokens: Vec<u128> = self.entries.range(was.clone()).map(|(t, _)| *t).collect();
            for t in tokens {
                let r = self.range_at(t);
                let Some(e) = self.entries.get_mut(&t) else { continue };
                if e.peer == me {
                    continue;
                }
                if busy(r.clone()) {
                    *e = Entry::new(me, e.version.saturating_add(1), e.free);
                    out.retained.push(r);
                } else {
                    out.lost.push(r);
                }
            }
        }
        self.clamp_free();
        out.changed = *self != before;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(n: u64) -> PeerName {
        PeerName::new(n).unwrap()
    }

    fn never(_: Range<u128>) -> bool {
        false
    }

    #[test]
    fn a_ring_with_a_version_beyond_the_limit_is_refused() {
        let mut ours = Ring::new(0..1024);
        ours.seed(&[p(1), p(2)]);
        let mut theirs = ours.clone();
        if let Some(e) = theirs.entries.get_mut(&512) {
            e.version = u64::MAX;
        }
        assert!(ours.merge(&theirs, p(1), never).is_err());
        assert_eq!(ours.owner(600), Some(p(2)));
    }

    #[test]
    fn a_merge_beyond_max_entries_is_refused_and_keeps_ours() {
        let n = MAX_ENTRIES as u128;
        let entry = |peer| Entry::new(peer, 1, 0);
        // Two rings of MAX_ENTRIES * 5/8 tokens each, interleaved: their union is too big.
        let a = (0..n * 5 / 8).map(|i| (i * 4, entry(p(1))));
        let b = std::iter::once((0, entry(p(1))))
            .chain((0..n * 5 / 8).map(|i| (i * 4 + 2, entry(p(2)))));
        let mut ours = Ring::from_parts(0..n * 4, a, vec![]).unwrap();
        let theirs = Ring::from_parts(0..n * 4, b, vec![]).unwrap();
        let before = ours.clone();
        assert!(ours.merge(&theirs, p(1), never).is_err());
        assert_eq!(ours, before);
    }

    #[test]
    fn seeding_splits_in_aligned_halves() {
        let mut r = Ring::new(0..1024);
        assert!(r.seed(&[p(3), p(1), p(2), p(4), p(1)]));
        assert_eq!(r.owned_by(p(1)), vec![0..256]);
        assert_eq!(r.owned_by(p(4)), vec![768..1024]);
        assert_eq!(r.seeds(), &[p(1), p(2), p(3), p(4)]);
        let mut three = Ring::new(0..1024);
        three.seed(&[p(1), p(2), p(3)]);
        assert_eq!(three.owned_by(p(1)), vec![0..512]);
        assert_eq!(three.owned_by(p(2)), vec![512..768]);
        assert_eq!(three.owned_by(p(3)), vec![768..1024]);
        assert!(!three.seed(&[p(9)]), "a ring is seeded once");
    }

    #[test]
    fn grant_splits_and_keeps_the_remainder() {
        let mut r = Ring::new(0..1024);
        r.seed(&[p(1)]);
        r.grant(p(1), 512..768, p(2)).unwrap();
        assert_eq!(r.owned_by(p(1)), vec![0..512, 768..1024]);
        assert_eq!(r.owned_by(p(2)), vec![512..768]);
        assert_eq!(r.owner(600), Some(p(2)));
        assert_eq!(r.owner(1024), None);
        assert!(r.grant(p(1), 500..600, p(3)).is_err(), "not all of it is ours");
        r.grant(p(2), 512..768, p(1)).unwrap();
        assert_eq!(r.owned_by(p(1)), vec![0..1024]);
    }

    #[test]
    fn newer_versions_win_in_either_order() {
        let mut a = Ring::new(0..1024);
        a.seed(&[p(1), p(2)]);
        let mut b = a.clone();
        b.grant(p(2), 512..1024, p(3)).unwrap();
        let mut a2 = a.clone();
        a2.merge(&b, p(1), never).unwrap();
        let mut b2 = b.clone();
        b2.merge(&a, p(2), never).unwrap();
        assert_eq!(a2, b2);
        assert_eq!(a2.owned_by(p(3)), vec![512..1024]);
    }

    #[test]
    fn different_seeds_and_ranges_do_not_merge() {
        let mut a = Ring::new(0..1024);
        a.seed(&[p(1)]);
        let mut b = Ring::new(0..1024);
        b.seed(&[p(2)]);
        let err = a.clone().merge(&b, p(1), never).unwrap_err();
        assert!(err.to_string().contains("seeded by different peers"), "{err}");
        let c = Ring::new(0..2048);
        assert!(matches!(a.merge(&c, p(1), never), Err(RingError::DifferentRange { .. })));
    }

    #[test]
    fn a_range_with_allocations_is_not_lost() {
        let mut mine = Ring::new(0..1024);
        mine.seed(&[p(1), p(2)]);
        // Someone takes over p1's space (an rmpeer of p1 while it was alive).
        let mut theirs = mine.clone();
        theirs.transfer(p(1), p(2));
        let out = mine.merge(&theirs, p(1), |r| r.contains(&10)).unwrap();
        assert_eq!(out.retained, vec![0..512]);
        assert_eq!(mine.owned_by(p(1)), vec![0..512]);
        // Their side then accepts ours: the version is higher.
        theirs.merge(&mine, p(2), never).unwrap();
        assert_eq!(theirs.owned_by(p(1)), vec![0..512]);
        // Without allocations, the loss is accepted.
        let mut idle = Ring::new(0..1024);
        idle.seed(&[p(1), p(2)]);
        let out = idle.merge(&theirs_after_transfer(), p(1), never).unwrap();
        assert_eq!(out.lost, vec![0..512]);
        assert!(idle.owned_by(p(1)).is_empty());
    }

    fn theirs_after_transfer() -> Ring {
        let mut r = Ring::new(0..1024);
        r.seed(&[p(1), p(2)]);
        r.transfer(p(1), p(2));
        r
    }

    #[test]
    fn malformed_rings_are_refused() {
        let e = Entry::new(p(1), 1, 0);
        assert!(Ring::from_parts(0..1024, [(5, e)], vec![]).is_err(), "first token not at start");
        assert!(Ring::from_parts(0..1024, [(0, e), (2000, e)], vec![]).is_err());
        let clamped = Ring::from_parts(0..16, [(0, Entry::new(p(1), 1, 99))], vec![]).unwrap();
        assert_eq!(clamped.shares()[&p(1)], (16, 16), "free clamped to the range size");
    }

    #[test]
    fn donors_by_free_space() {
        let mut r = Ring::new(0..1024);
        r.seed(&[p(1), p(2), p(3), p(4)]);
        r.report_free(p(1), |_| Some(10));
        // Only the owners' own hints are trusted, but merged rings carry everybody's.
        let mut other = r.clone();
        other.report_free(p(2), |_| Some(200));
        r.merge(&other, p(1), never).unwrap();
        let d = r.donors(0..1024, p(1));
        assert_eq!(d[0], (p(3), 256));
        assert!(d.contains(&(p(2), 200)));
        assert!(!d.iter().any(|(x, _)| *x == p(1)), "never ourselves");
        assert_eq!(r.donors(0..256, p(1)), vec![], "nothing in our own quarter");
        // A peer that reported nothing free is still an owner to ask, after the others.
        let mut full = r.clone();
        full.report_free(p(2), |_| Some(0));
        assert_eq!(full.donors(256..768, p(1)), vec![(p(3), 256), (p(2), 0)]);
    }

    #[test]
    fn the_remainder_of_a_grant_keeps_a_free_hint() {
        let mut r = Ring::new(0..1024);
        r.seed(&[p(1), p(2)]);
        r.grant(p(1), 128..192, p(2)).unwrap();
        // Before p1 reports again, others must still see free space in 192..512.
        assert_eq!(r.donors(256..512, p(2)), vec![(p(1), 256)]);
        assert_eq!(r.donors(192..512, p(2))[0].0, p(1));
    }

    /// A random ring as peers would build it: seeded, then grants and transfers.
    fn arb_ring() -> impl Strategy<Value = Ring> {
        // Rings that can meet share their seeds; what differs is their history.
        proptest::collection::vec((0u64..6, 0u128..1024, 1u128..256, 0u64..6, any::<bool>()), 0..12)
            .prop_map(|ops| {
                let mut r = Ring::new(0..1024);
                r.seed(&[p(1), p(2), p(3), p(4)]);
                for (from, start, len, to, transfer) in ops {
                    let (from, to) = (p(from % 6 + 1), p(to % 6 + 1));
                    if transfer {
                        r.transfer(from, to);
                    } else if let Some(m) =
                        r.owned_by(from).into_iter().find(|m| m.contains(&start))
                    {
                        let _ = r.grant(from, start..(start + len).min(m.end), to);
                    }
                }
                r
            })
    }

    fn merged(a: &Ring, b: &Ring) -> Ring {
        let mut x = a.clone();
        // A peer that owns nothing here never retains: a pure join.
        let _ = x.merge(b, p(63), never);
        x
    }

    proptest! {
        #[test]
        fn merge_is_a_join(a in arb_ring(), b in arb_ring(), c in arb_ring()) {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a), "commutative");
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)), "associative");
            prop_assert_eq!(merged(&a, &a), a.clone(), "idempotent");
        }

        #[test]
        fn every_address_has_one_owner(a in arb_ring(), b in arb_ring()) {
            let m = merged(&a, &b);
            let mut covered = 0u128;
            for (r, _) in m.entries() {
                prop_assert!(r.start < r.end);
                covered += r.end - r.start;
            }
            prop_assert_eq!(covered, 1024);
        }
    }
}
