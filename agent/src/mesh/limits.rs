//! Bounds on what a mesh peer may make this agent hold or do: which channel names are
//! acceptable, which of them get their own metric label, and per-source token buckets for
//! gossip passed on for channels this agent does not run. Pure.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

/// The longest channel name accepted.
pub const MAX_CHANNEL_LEN: usize = 32;

/// The metric label of every channel this agent neither runs nor owns (`topology`).
pub const OTHER_LABEL: &str = "other";

/// The largest payload passed on for a channel this agent does not run. Subsystem gossip
/// (the only traffic that relies on such surrogates) is small deltas; whole states travel
/// by unicast and broadcast, which are forwarded regardless.
pub const SURROGATE_MAX_PAYLOAD: usize = 64 * 1024;

/// Surrogate gossip passed on per neighbour: this many per second, in bursts of
/// [`SURROGATE_BURST`].
pub const SURROGATE_RATE: f64 = 20.0;
pub const SURROGATE_BURST: f64 = 100.0;

/// Whether a peer may use `name` as a channel: 1 to 32 of `a-z 0-9 _ -`. Anything else
/// ends the connection; the limit keeps names safe to log and to use as a metric label.
pub fn valid_channel(name: &str) -> bool {
    (1..=MAX_CHANNEL_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Token buckets, one per key (a neighbour). Keys idle long enough to be full again are
/// forgotten by [`Buckets::prune`], so the map holds only recently active sources.
#[derive(Debug)]
pub struct Buckets<K> {
    rate: f64,
    burst: f64,
    buckets: HashMap<K, (f64, Instant)>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub fn new(rate: f64, burst: f64) -> Buckets<K> {
        Buckets { rate, burst, buckets: HashMap::new() }
    }

    /// Takes one token for `key` at `now`; false when its bucket is empty.
    pub fn take(&mut self, key: &K, now: Instant) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        let (tokens, last) = self.buckets.entry(key.clone()).or_insert((burst, now));
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * rate).min(burst);
        *last = now;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }

    /// Forgets buckets that would be full by now.
    pub fn prune(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|_, (tokens, last)| {
            *tokens + now.saturating_duration_since(*last).as_secs_f64() * rate < burst
        });
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn channel_names_are_short_and_label_safe() {
        for ok in ["topology", "ipam", "dns", "macs", "a", "x_1-y", &"a".repeat(32)] {
            assert!(valid_channel(ok), "{ok}");
        }
        for bad in ["", "Dns", "a b", "a\"}", "a\nb", "é", "a.b", &"a".repeat(33)] {
            assert!(!valid_channel(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = Buckets::new(10.0, 5.0);
        assert_eq!((0..100).filter(|_| b.take(&1, t0)).count(), 5);
        assert!(b.take(&2, t0), "other sources have their own bucket");
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..100).filter(|_| b.take(&1, t1)).count(), 5);
        b.prune(t1 + Duration::from_secs(1));
        assert!(b.is_empty(), "full buckets are forgotten");
    }
}
