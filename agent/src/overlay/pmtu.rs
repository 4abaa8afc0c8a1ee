//! Path-MTU discovery for one sleeve link: the largest UDP datagram that reaches the peer
//! (docs/sleeve.md, "Path MTU"). Each heartbeat tick the link sends probes — heartbeats
//! padded to chosen sizes, which the peer acknowledges with the size it received over the
//! mesh connection — and the sizes that come back narrow a search between a floor and the
//! interface-derived ceiling. The ceiling is probed every tick and a size found lost is tried
//! again after a while, so the size grows again when the path improves. Pure: time is passed
//! in, and the caller sends the probes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::health::DEAD_AFTER;

/// A probe not acknowledged within this long is taken as lost (acknowledgements come back
/// over the mesh connection within a round trip; probes go out once per heartbeat tick).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// A size in use is suspect, and the search looks below it, once its last acknowledgement
/// is this old.
pub const SUSPECT_AFTER: Duration = Duration::from_millis(2_500);
/// How long a lost size bounds the search; then larger sizes are tried again (paths change).
pub const RESEARCH_AFTER: Duration = Duration::from_secs(30);
/// The search stops once the largest size that arrives and the smallest that is lost are
/// this close.
pub const RESOLUTION: usize = 16;
/// Probes per search round, spread evenly over the open interval: each round that finds its
/// answer cuts the interval by this + 1.
const SPREAD: usize = 7;

/// The path-MTU state of one link, in datagram sizes (UDP payload bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathMtu {
    floor: usize,
    ceiling: usize,
    /// Sizes acknowledged within [`DEAD_AFTER`], with their latest acknowledgement.
    acked: BTreeMap<usize, Instant>,
    /// The smallest size lost since [`RESEARCH_AFTER`] (and since a larger one arrived).
    lost: Option<(usize, Instant)>,
    /// Probes sent and not acknowledged yet.
    pending: BTreeMap<usize, Instant>,
}

impl PathMtu {
    /// A link whose datagrams may be `floor..=ceiling` bytes (the floor is used when nothing
    /// larger is known to arrive; it is raised to the ceiling if above it).
    pub fn new(floor: usize, ceiling: usize) -> PathMtu {
        PathMtu {
            floor: floor.min(ceiling),
            ceiling,
            acked: BTreeMap::new(),
            lost: None,
            pending: BTreeMap::new(),
        }
    }

    pub fn ceiling(&self) -> usize {
        self.ceiling
    }

    fn fresh(&self, now: Instant, within: Duration) -> impl Iterator<Item = usize> + '_ {
        self.acked.iter().filter(move |(_, t)| now.duration_since(**t) < within).map(|(s, _)| *s)
    }

    /// The largest size known to arrive: acknowledged recently, and below the smallest size
    /// lost since if a smaller one was acknowledged too.
    pub fn verified(&self, now: Instant) -> Option<usize> {
        let below_lost =
            self.lost.and_then(|(l, _)| self.fresh(now, DEAD_AFTER).filter(|s| *s < l).max());
        below_lost.or_else(|| self.fresh(now, DEAD_AFTER).max())
    }

    /// The datagram size to send now: the verified one; the ceiling while nothing has been
    /// learnt yet (as on a link whose path carries full-size datagrams); the floor otherwise.
    pub fn size(&self, now: Instant) -> usize {
        match (self.verified(now), self.lost) {
            (Some(s), _) => s,
            (None, None) if self.acked.is_empty() => self.ceiling,
            (None, _) => self.floor,
        }
    }

    /// When a datagram of the size in use (or larger) was last acknowledged: what keeps the
    /// link's sleeve confirmed.
    pub fn confirmed_at(&self, now: Instant) -> Option<Instant> {
        self.acked.range(self.size(now)..).map(|(_, t)| *t).max()
    }

    /// The peer received a probe of `size` bytes.
    pub fn ack(&mut self, size: usize, now: Instant) {
        let size = size.min(self.ceiling);
        self.pending.remove(&size);
        self.acked.insert(size, now);
        if self.lost.is_some_and(|(l, _)| size >= l) {
            self.lost = None;
        }
    }

    fn lose(&mut self, size: usize, now: Instant) {
        if self.lost.is_none_or(|(l, _)| size < l) {
            self.lost = Some((size, now));
        }
    }

    /// Accounts for the time passed and returns the probe sizes to send now (remembered as
    /// pending): the ceiling, the size in use and, while the largest size that arrives is not
    /// pinned down, a spread of sizes between what arrives and what is lost.
    pub fn tick(&mut self, now: Instant) -> Vec<usize> {
        let expired: Vec<usize> = self
            .pending
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= PROBE_TIMEOUT)
            .map(|(s, _)| *s)
            .collect();
        for s in expired {
            self.pending.remove(&s);
            self.lose(s, now);
        }
        self.acked.retain(|_, t| now.duration_since(*t) < DEAD_AFTER);
        if self.lost.is_some_and(|(_, t)| now.duration_since(t) >= RESEARCH_AFTER) {
            self.lost = None;
        }
        let mut sizes = vec![self.ceiling, self.size(now)];
        let recent = self.fresh(now, SUSPECT_AFTER).max();
        let lo = recent.unwrap_or(self.floor);
        if recent.is_none() {
            sizes.push(self.floor);
        }
        let hi = self.lost.map_or(self.ceiling + 1, |(l, _)| l);
        if hi > lo + RESOLUTION {
            let step = hi - lo;
            sizes.extend((1..=SPREAD).map(|i| lo + step * i / (SPREAD + 1)));
        }
        sizes.sort_unstable();
        sizes.dedup();
        sizes.retain(|s| !self.pending.contains_key(s));
        for s in &sizes {
            self.pending.insert(*s, now);
        }
        sizes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::health::HEARTBEAT;

    /// Runs ticks over a path that carries datagrams of at most `limit` bytes (acks arrive at
    /// once); returns the time at which the size in use got within RESOLUTION of it.
    fn settle(p: &mut PathMtu, t: &mut Instant, limit: usize, ticks: usize) -> Option<usize> {
        for i in 0..ticks {
            *t += HEARTBEAT;
            for s in p.tick(*t) {
                if s <= limit {
                    p.ack(s, *t + Duration::from_millis(1));
                }
            }
            let size = p.size(*t + Duration::from_millis(2));
            if size <= limit && size + RESOLUTION >= limit.min(p.ceiling()) {
                return Some(i + 1);
            }
        }
        None
    }

    #[test]
    fn a_full_path_is_used_at_once_and_costs_two_probes_a_tick() {
        let mut t = Instant::now();
        let mut p = PathMtu::new(548, 1472);
        assert_eq!(p.size(t), 1472, "optimistic before anything is known");
        assert_eq!(settle(&mut p, &mut t, 1472, 1), Some(1));
        for _ in 0..10 {
            t += HEARTBEAT;
            let probes = p.tick(t);
            assert_eq!(probes, vec![1472], "steady state: the ceiling only");
            p.ack(1472, t);
            assert_eq!(p.confirmed_at(t), Some(t));
        }
    }

    #[test]
    fn a_small_path_is_found_within_a_few_ticks_and_confirmed() {
        let mut t = Instant::now();
        let mut p = PathMtu::new(548, 1472);
        let ticks = settle(&mut p, &mut t, 672, 10).expect("converges");
        assert!(ticks <= 4, "took {ticks} ticks");
        let size = p.size(t + Duration::from_millis(2));
        assert!((672 - RESOLUTION..=672).contains(&size), "{size}");
        assert!(p.confirmed_at(t + Duration::from_millis(2)).is_some());
        // The search ends within a few more ticks; then a handful of probes per tick.
        let mut settled = None;
        for i in 0..10 {
            t += HEARTBEAT;
            let probes = p.tick(t);
            let searching = probes.len() > 3;
            for s in probes.into_iter().filter(|s| *s <= 672) {
                p.ack(s, t);
            }
            let size = p.size(t);
            assert!((672 - RESOLUTION..=672).contains(&size), "{size}");
            match settled {
                None if !searching => settled = Some((i, size)),
                None => {}
                Some((_, s)) => {
                    assert!(!searching, "searching again at tick {i}");
                    assert_eq!(size, s, "stable");
                }
            }
        }
        assert!(settled.is_some_and(|(i, _)| i <= 3), "{settled:?}");
    }

    #[test]
    fn a_path_that_shrinks_is_followed_and_one_that_grows_again_too() {
        let mut t = Instant::now();
        let mut p = PathMtu::new(548, 1472);
        settle(&mut p, &mut t, 1472, 3).expect("full path");
        let shrunk = t;
        let ticks = settle(&mut p, &mut t, 700, 20).expect("follows the shrink");
        assert!(t - shrunk <= DEAD_AFTER + HEARTBEAT * 2, "took {ticks} ticks");
        // The path grows again: the ceiling, probed every tick, is taken at once.
        assert_eq!(settle(&mut p, &mut t, 1472, 2), Some(1));
        // A path that grows to less than the ceiling is found after the re-search delay.
        settle(&mut p, &mut t, 700, 20).expect("shrinks again");
        let grown = t;
        settle(&mut p, &mut t, 1000, 60).expect("grows to 1000");
        assert!(t - grown <= RESEARCH_AFTER + HEARTBEAT * 4, "{:?}", t - grown);
    }

    #[test]
    fn one_lost_probe_does_not_shrink_a_working_path() {
        let mut t = Instant::now();
        let mut p = PathMtu::new(548, 1472);
        settle(&mut p, &mut t, 1472, 1).expect("full path");
        for _ in 0..5 {
            t += HEARTBEAT;
            p.tick(t);
            p.ack(1472, t);
        }
        t += HEARTBEAT;
        assert_eq!(p.tick(t), vec![1472]); // lost
        t += HEARTBEAT;
        let probes = p.tick(t);
        assert_eq!(p.size(t), 1472, "still in use");
        assert!(probes.contains(&1472));
        p.ack(1472, t);
        assert_eq!(p.size(t), 1472);
        assert_eq!(p.confirmed_at(t), Some(t));
    }

    #[test]
    fn nothing_arriving_means_the_floor_and_no_confirmation() {
        let mut t = Instant::now();
        let mut p = PathMtu::new(548, 1472);
        for _ in 0..10 {
            t += HEARTBEAT;
            p.tick(t);
        }
        assert_eq!(p.size(t), 548);
        assert_eq!(p.verified(t), None);
        assert_eq!(p.confirmed_at(t), None);
        // A floor above the ceiling (a tiny underlay MTU) is capped.
        assert_eq!(PathMtu::new(548, 400).size(t), 400);
    }
}
