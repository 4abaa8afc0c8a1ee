//! The table of `weave.local` entries every peer holds in full, and its merge. An entry is
//! (name, address, endpoint) registered by one peer, its *origin*; only the origin changes
//! it, by bumping its version, and deletion leaves a tombstone (kept 30 minutes) so that the
//! deletion wins over older copies still travelling. Per entry the higher version wins, then
//! the later tombstone. An origin that hears about one of its own entries it does not hold
//! (left by an earlier run of the same peer) restates it as deleted, with a higher version;
//! that is how a restarted peer's stale names disappear everywhere. Names are compared
//! without regard to case; the registered spelling is kept. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::identity::PeerName;
use crate::mesh::gossip::version_ok;

/// The endpoint of names registered without one (`weft dns-add IP -h NAME`).
pub const EXTERN_ENDPOINT: &str = "weft:extern";

/// How long a tombstone is kept (seconds): long enough for every copy of the entry to have
/// been overtaken.
pub const TOMBSTONE_LIFETIME: u64 = 30 * 60;
/// Entries held in all; entries for new keys beyond it are refused (those already held still
/// update). A mesh of 1000 hosts with 250 named endpoints each fits.
pub const MAX_TABLE: usize = 1 << 18;
/// Entries (tombstones included) held per other origin; entries of an origin for new keys
/// beyond it are refused. A host with 250 endpoints of a few names each, churning for the 30
/// minutes tombstones are kept, stays far below; one peer (or a made-up one) cannot take more
/// than 1/32 of [`MAX_TABLE`].
pub const MAX_PER_ORIGIN: usize = 1 << 13;

/// One entry as held and gossiped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Absolute name in its registered spelling.
    pub name: String,
    pub addr: IpAddr,
    pub endpoint: String,
    pub origin: PeerName,
    pub version: u64,
    /// 0 while live; the origin's unix time (s) of deletion for a tombstone.
    pub tombstone: u64,
}

/// What identifies an entry: the same name (in any case), origin, endpoint and address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub lname: String,
    pub origin: PeerName,
    pub endpoint: String,
    pub addr: IpAddr,
}

impl Entry {
    pub fn live(&self) -> bool {
        self.tombstone == 0
    }

    pub fn key(&self) -> Key {
        Key {
            lname: self.name.to_ascii_lowercase(),
            origin: self.origin,
            endpoint: self.endpoint.clone(),
            addr: self.addr,
        }
    }

    /// The order in which copies of one entry supersede each other.
    fn rank(&self) -> (u64, u64, &str) {
        (self.version, self.tombstone, &self.name)
    }
}

/// A name this peer wants registered.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Local {
    /// Absolute name.
    pub name: String,
    pub addr: IpAddr,
    pub endpoint: String,
}

/// The outcome of merging received entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// Entries that were new here: to pass on.
    pub news: Vec<Entry>,
    /// Our own entries restated because the sender had them wrong: to broadcast.
    pub corrections: Vec<Entry>,
}

/// The whole table, as one peer holds it.
#[derive(Clone, Debug)]
pub struct Table {
    me: PeerName,
    entries: BTreeMap<Key, Entry>,
    /// Entries held per origin other than us (for [`MAX_PER_ORIGIN`]).
    per_origin: BTreeMap<PeerName, usize>,
}

impl Table {
    pub fn new(me: PeerName) -> Table {
        Table { me, entries: BTreeMap::new(), per_origin: BTreeMap::new() }
    }

    /// Recounts [`Self::per_origin`] after entries were dropped in bulk.
    fn recount(&mut self) {
        self.per_origin.clear();
        for k in self.entries.keys().filter(|k| k.origin != self.me) {
            *self.per_origin.entry(k.origin).or_insert(0) += 1;
        }
    }

    pub fn me(&self) -> PeerName {
        self.me
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn live(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values().filter(|e| e.live())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Makes this peer's live entries exactly `want`; returns the entries that changed, to
    /// broadcast.
    pub fn set_local(&mut self, want: &BTreeSet<Local>, now: u64) -> Vec<Entry> {
        let me = self.me;
        let wanted: BTreeMap<Key, &Local> = want
            .iter()
            .map(|l| {
                let key = Key {
                    lname: l.name.to_ascii_lowercase(),
                    origin: me,
                    endpoint: l.endpoint.clone(),
                    addr: l.addr,
                };
                (key, l)
            })
            .collect();
        let mut changed = Vec::new();
        for (key, e) in self.entries.iter_mut() {
            if key.origin == me && e.live() && !wanted.contains_key(key) {
                e.version = e.version.saturating_add(1);
                e.tombstone = now.max(1);
                changed.push(e.clone());
            }
        }
        for (key, l) in wanted {
            match self.entries.get_mut(&key) {
                Some(e) if e.live() && e.name == l.name => {}
                Some(e) => {
                    e.version = e.version.saturating_add(1);
                    e.tombstone = 0;
                    e.name = l.name.clone();
                    changed.push(e.clone());
                }
                None => {
                    let e = Entry {
                        name: l.name.clone(),
                        addr: l.addr,
                        endpoint: l.endpoint.clone(),
                        origin: me,
                        version: 1,
                        tombstone: 0,
                    };
                    changed.push(e.clone());
                    self.entries.insert(key, e);
                }
            }
        }
        changed
    }

    /// Merges entries received from another peer.
    pub fn merge(&mut self, received: impl IntoIterator<Item = Entry>, now: u64) -> Merged {
        let mut out = Merged::default();
        for e in received {
            if !version_ok(e.version) {
                continue;
            }
            if e.origin == self.me {
                self.merge_own(e, now, &mut out.corrections);
                continue;
            }
            let key = e.key();
            match self.entries.get(&key) {
                Some(ours) if ours.rank() >= e.rank() => {}
                Some(_) => {
                    out.news.push(e.clone());
                    self.entries.insert(key, e);
                }
                None => {
                    let held = self.per_origin.get(&e.origin).copied().unwrap_or(0);
                    if self.entries.len() >= MAX_TABLE || held >= MAX_PER_ORIGIN {
                        continue;
                    }
                    self.per_origin.insert(e.origin, held + 1);
                    out.news.push(e.clone());
                    self.entries.insert(key, e);
                }
            }
        }
        out
    }

    /// Someone's copy of one of our own entries.
    fn merge_own(&mut self, theirs: Entry, now: u64, corrections: &mut Vec<Entry>) {
        let key = theirs.key();
        let Some(ours) = self.entries.get_mut(&key) else {
            // Left by an earlier run of this peer: whatever it was, it is gone now.
            let restated = if theirs.live() {
                let tomb = Entry { version: theirs.version + 1, tombstone: now.max(1), ..theirs };
                corrections.push(tomb.clone());
                tomb
            } else {
                theirs
            };
            // Past the cap the correction still goes out; the tombstone is not held.
            if self.entries.len() < MAX_TABLE {
                self.entries.insert(key, restated);
            }
            return;
        };
        if ours.rank() == theirs.rank() {
            return;
        }
        if ours.version > theirs.version {
            corrections.push(ours.clone());
        } else if ours.live() == theirs.live() && ours.name == theirs.name {
            // The same statement under an earlier run's version: adopt the version.
            ours.version = theirs.version;
            ours.tombstone = theirs.tombstone;
        } else {
            ours.version = theirs.version + 1;
            corrections.push(ours.clone());
        }
    }

    /// The origins of the entries held, ourselves excluded.
    pub fn origins(&self) -> BTreeSet<PeerName> {
        self.entries.keys().map(|k| k.origin).filter(|o| *o != self.me).collect()
    }

    /// Drops every entry of peers for which `keep` is false (peers that left the mesh).
    pub fn retain_origins(&mut self, keep: impl Fn(PeerName) -> bool) -> bool {
        let before = self.entries.len();
        let me = self.me;
        self.entries.retain(|k, _| k.origin == me || keep(k.origin));
        self.per_origin.retain(|p, _| keep(*p));
        before != self.entries.len()
    }

    /// Drops tombstones older than [`TOMBSTONE_LIFETIME`].
    pub fn expire_tombstones(&mut self, now: u64) -> bool {
        let before = self.entries.len();
        self.entries
            .retain(|_, e| e.live() || e.tombstone.saturating_add(TOMBSTONE_LIFETIME) > now);
        if before == self.entries.len() {
            return false;
        }
        self.recount();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer(n: u64) -> PeerName {
        PeerName::new(n).unwrap()
    }

    fn local(name: &str, addr: &str) -> Local {
        Local { name: name.into(), addr: addr.parse().unwrap(), endpoint: "c1".into() }
    }

    fn want(items: &[Local]) -> BTreeSet<Local> {
        items.iter().cloned().collect()
    }

    fn names(t: &Table) -> Vec<(String, String)> {
        t.live().map(|e| (e.name.clone(), e.addr.to_string())).collect()
    }

    #[test]
    fn merging_stops_at_the_table_cap() {
        let mut t = Table::new(peer(1));
        let e = |i: u32| Entry {
            name: format!("n{i}.weave.local."),
            addr: IpAddr::from(i.to_be_bytes()),
            endpoint: "e".into(),
            origin: peer(2 + u64::from(i) % 64),
            version: 1,
            tombstone: 0,
        };
        let m = t.merge((0..MAX_TABLE as u32 + 100).map(e), 1);
        assert_eq!(m.news.len(), MAX_TABLE);
        assert_eq!(t.len(), MAX_TABLE);
        let newer = Entry { version: 2, ..e(0) };
        assert_eq!(t.merge([newer], 1).news.len(), 1, "held entries still update");
    }

    #[test]
    fn each_origin_is_capped_and_its_share_comes_back_when_it_goes() {
        let mut t = Table::new(peer(1));
        let e = |origin: u64, i: u32| Entry {
            name: format!("n{i}.weave.local."),
            addr: IpAddr::from(i.to_be_bytes()),
            endpoint: "e".into(),
            origin: peer(origin),
            version: 1,
            tombstone: 0,
        };
        let m = t.merge((0..100_000).map(|i| e(2, i)), 1);
        assert_eq!(m.news.len(), MAX_PER_ORIGIN, "one origin gets at most its share");
        assert_eq!(t.merge([e(3, 1)], 1).news.len(), 1, "another origin still gets in");
        let newer = Entry { version: 2, ..e(2, 0) };
        assert_eq!(t.merge([newer], 1).news.len(), 1, "held entries still update");
        assert!(t.merge([e(2, 200_000)], 1).news.is_empty());
        // Our own entries are not capped.
        let ours: Vec<Local> = (0..MAX_PER_ORIGIN as u32 + 10)
            .map(|i| {
                local(&format!("o{i}.weave.local."), &IpAddr::from(i.to_be_bytes()).to_string())
            })
            .collect();
        assert_eq!(t.set_local(&want(&ours), 1).len(), MAX_PER_ORIGIN + 10);
        // The origin leaves the mesh: its entries go, and with them its count.
        assert!(t.retain_origins(|p| p != peer(2)));
        assert_eq!(t.merge([e(2, 200_000)], 1).news.len(), 1);
        // Expired tombstones free their share too.
        let dead = |i: u32| Entry { tombstone: 10, version: 5, ..e(4, i) };
        assert_eq!(t.merge((0..MAX_PER_ORIGIN as u32).map(dead), 10).news.len(), MAX_PER_ORIGIN);
        assert!(t.merge([e(4, 99_999)], 10).news.is_empty());
        assert!(t.expire_tombstones(10 + TOMBSTONE_LIFETIME));
        assert_eq!(t.merge([e(4, 99_999)], 10).news.len(), 1);
    }

    #[test]
    fn versions_beyond_the_limit_are_refused_and_tombstones_never_overflow() {
        let mut t = Table::new(peer(1));
        let sent = t.set_local(&want(&[local("a.weave.local.", "10.32.0.1")]), 100);
        let mut forged = sent[0].clone();
        forged.version = u64::MAX;
        forged.tombstone = 5;
        let m = t.merge([forged.clone()], 200);
        assert!(m.news.is_empty() && m.corrections.is_empty());
        assert_eq!(names(&t).len(), 1, "our own entry still stands");
        let other = Entry { origin: peer(2), ..forged };
        assert!(t.merge([other], 200).news.is_empty());
        // A tombstone at u64::MAX (from an older decoder) expires without a panic.
        let dead = Entry { origin: peer(3), version: 3, tombstone: u64::MAX, ..sent[0].clone() };
        t.merge([dead], 200);
        t.expire_tombstones(u64::MAX);
    }

    #[test]
    fn local_changes_bump_versions_and_leave_tombstones() {
        let mut t = Table::new(peer(1));
        let a = local("a.weave.local.", "10.32.0.1");
        let sent = t.set_local(&want(std::slice::from_ref(&a)), 100);
        assert_eq!((sent.len(), sent[0].version, sent[0].live()), (1, 1, true));
        assert!(
            t.set_local(&want(std::slice::from_ref(&a)), 101).is_empty(),
            "no change, nothing sent"
        );
        let sent = t.set_local(&want(&[]), 102);
        assert_eq!((sent[0].version, sent[0].tombstone), (2, 102));
        let sent = t.set_local(&want(&[a]), 103);
        assert_eq!((sent[0].version, sent[0].live()), (3, true));
        // A new spelling of the same name restates the entry.
        let sent = t.set_local(&want(&[local("A.Weave.Local.", "10.32.0.1")]), 104);
        assert_eq!((sent.len(), sent[0].name.as_str(), sent[0].version), (1, "A.Weave.Local.", 4));
    }

    #[test]
    fn tombstone_wins_over_older_versions_and_versions_are_per_origin() {
        let mut origin = Table::new(peer(1));
        let live = origin.set_local(&want(&[local("a.weave.local.", "10.32.0.1")]), 1);
        let dead = origin.set_local(&want(&[]), 2);
        let mut other = Table::new(peer(2));
        assert_eq!(other.merge(dead.clone(), 3).news, dead);
        assert!(other.merge(live.clone(), 4).news.is_empty(), "older live copy loses");
        assert!(names(&other).is_empty());
        // Another origin's entry for the same name and address is a separate entry.
        let mut third = Table::new(peer(3));
        let theirs = third.set_local(&want(&[local("a.weave.local.", "10.32.0.1")]), 5);
        assert_eq!(other.merge(theirs, 6).news.len(), 1);
        assert_eq!(names(&other), vec![("a.weave.local.".into(), "10.32.0.1".into())]);
    }

    #[test]
    fn stale_entries_of_an_earlier_run_are_restated_as_deleted() {
        let mut before = Table::new(peer(1));
        let old = before.set_local(
            &want(&[
                local("gone.weave.local.", "10.32.0.1"),
                local("kept.weave.local.", "10.32.0.2"),
            ]),
            1,
        );
        for _ in 0..3 {
            before.set_local(&want(&[]), 2);
            before.set_local(
                &want(&[
                    local("gone.weave.local.", "10.32.0.1"),
                    local("kept.weave.local.", "10.32.0.2"),
                ]),
                3,
            );
        }
        let held: Vec<Entry> = before.entries().cloned().collect();
        assert!(held.iter().all(|e| e.version == 7));
        let mut other = Table::new(peer(2));
        other.merge(old, 4);
        other.merge(held.clone(), 4);
        // The peer restarts with only one of its names.
        let mut after = Table::new(peer(1));
        after.set_local(&want(&[local("kept.weave.local.", "10.32.0.2")]), 10);
        let m = after.merge(held, 11);
        assert_eq!(m.corrections.len(), 1, "{m:?}");
        let c = &m.corrections[0];
        assert_eq!((c.name.as_str(), c.version, c.live()), ("gone.weave.local.", 8, false));
        let kept = after.entries().find(|e| e.name.starts_with("kept")).unwrap();
        assert_eq!((kept.version, kept.live()), (7, true), "same statement: version adopted");
        other.merge(m.corrections, 12);
        assert_eq!(names(&other), vec![("kept.weave.local.".into(), "10.32.0.2".into())]);
        // Our copy being newer than theirs: they are told.
        let stale = Entry { version: 1, ..kept.clone() };
        assert_eq!(after.merge([stale], 13).corrections.len(), 1);
    }

    #[test]
    fn a_revived_name_beats_the_earlier_runs_tombstone() {
        let mut before = Table::new(peer(1));
        before.set_local(&want(&[local("a.weave.local.", "10.32.0.1")]), 1);
        let tomb = before.set_local(&want(&[]), 2);
        let mut after = Table::new(peer(1));
        after.set_local(&want(&[local("a.weave.local.", "10.32.0.1")]), 3);
        let m = after.merge(tomb, 4);
        assert_eq!((m.corrections.len(), m.corrections[0].version), (1, 3));
        assert!(m.corrections[0].live());
    }

    #[test]
    fn departed_origins_and_old_tombstones_are_dropped() {
        let mut t = Table::new(peer(1));
        t.set_local(&want(&[local("mine.weave.local.", "10.32.0.1")]), 1);
        let mut other = Table::new(peer(2));
        let e = other.set_local(&want(&[local("x.weave.local.", "10.32.0.2")]), 1);
        t.merge(e, 1);
        let dead = other.set_local(&want(&[]), 5);
        t.merge(dead, 5);
        assert!(!t.expire_tombstones(5 + TOMBSTONE_LIFETIME - 1));
        assert!(t.expire_tombstones(5 + TOMBSTONE_LIFETIME));
        let e = other.set_local(&want(&[local("y.weave.local.", "10.32.0.3")]), 6);
        t.merge(e, 6);
        assert!(t.retain_origins(|p| p != peer(2)));
        assert_eq!(names(&t), vec![("mine.weave.local.".into(), "10.32.0.1".into())]);
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (0u64..3, 0u8..3, 0u8..2, 1u64..4, prop::bool::ANY, 1u64..3).prop_map(
            |(origin, name, addr, version, dead, when)| Entry {
                name: format!("N{name}.weave.local."),
                addr: IpAddr::from([10, 32, 0, addr]),
                endpoint: "c".into(),
                origin: peer(origin + 2),
                version,
                tombstone: if dead { when } else { 0 },
            },
        )
    }

    fn state(t: &Table) -> Vec<Entry> {
        t.entries().cloned().collect()
    }

    proptest! {
        /// Merging is order-insensitive and idempotent: any two peers that received the same
        /// entries, in any order and any number of times, hold the same table.
        #[test]
        fn merge_is_order_insensitive(entries in prop::collection::vec(arb_entry(), 0..30), seed in any::<u64>()) {
            let mut a = Table::new(peer(1));
            a.merge(entries.clone(), 0);
            let mut shuffled = entries.clone();
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            let mut b = Table::new(peer(1));
            b.merge(shuffled.clone(), 0);
            b.merge(shuffled, 0);
            prop_assert_eq!(state(&a), state(&b));
            // Passing on only the news is enough for a third peer to catch up.
            let mut c = Table::new(peer(1));
            let mut d = Table::new(peer(1));
            for e in entries {
                let news = c.merge([e], 0).news;
                d.merge(news, 0);
            }
            prop_assert_eq!(state(&c), state(&d));
        }
    }
}
