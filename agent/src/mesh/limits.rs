//! Bounds on what a mesh peer may make this agent hold or do: which channel names are
//! acceptable, which of them get their own metric label, per-source token buckets for gossip
//! passed on for channels this agent does not run, and which inbound connections are let into
//! a handshake ([`AcceptGate`]). Pure.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::Instant;

use serde::{Deserialize, Serialize};

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

/// Inbound connections let into a handshake per source, per second, in bursts of
/// [`ACCEPT_BURST`]. A peer dials us once per connection and backs off at least 250 ms after
/// a failure, so a real source stays far below this; several agents behind one address
/// (NAT, tests on loopback) fit in the burst.
pub const ACCEPT_RATE: f64 = 5.0;
pub const ACCEPT_BURST: f64 = 20.0;
/// Handshakes in progress at once, in all and per source. A handshake lasts at most 10 s, so
/// one source holding [`MAX_HANDSHAKES_PER_SOURCE`] idle connections leaves the rest for
/// everyone else; filling [`MAX_HANDSHAKES`] takes at least 8 addresses (or /64s).
pub const MAX_HANDSHAKES: usize = 64;
pub const MAX_HANDSHAKES_PER_SOURCE: usize = 8;
/// Sources tracked at once; beyond, the least recently seen one without a handshake in
/// progress is forgotten (its bucket starts full again if it comes back).
pub const MAX_ACCEPT_SOURCES: usize = 1024;

/// Why an inbound connection was closed before its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its source exceeded [`ACCEPT_RATE`].
    Rate,
    /// Too many handshakes in progress, in all or from its source.
    Handshakes,
}

/// Counters of the accept gate, for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptReport {
    /// Inbound connections closed at once because their source exceeded its rate.
    pub refused_rate: u64,
    /// Inbound connections closed at once because too many handshakes were in progress.
    pub refused_handshakes: u64,
    /// Handshakes in progress now.
    pub handshakes: u32,
    /// Sources tracked now.
    pub sources: u32,
}

#[derive(Debug)]
struct Source {
    tokens: f64,
    last: Instant,
    handshakes: usize,
}

/// Decides which inbound connections get a handshake: a token bucket and a handshake count
/// per source address (IPv6 by /64, which one host typically holds whole), a total handshake
/// cap, and a bounded table of sources.
#[derive(Debug, Default)]
pub struct AcceptGate {
    sources: HashMap<IpAddr, Source>,
    handshakes: usize,
    refused_rate: u64,
    refused_handshakes: u64,
}

/// The key an address is limited under: IPv4 (also when IPv4-mapped) as is, IPv6 by /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

impl AcceptGate {
    /// Whether a connection from `ip` may start a handshake at `now`; on `Ok` the caller must
    /// [`release`](Self::release) it when the handshake ends, either way.
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let key = source_key(ip);
        if !self.sources.contains_key(&key) {
            self.make_room(now);
        }
        let src = self.sources.entry(key).or_insert(Source {
            tokens: ACCEPT_BURST,
            last: now,
            handshakes: 0,
        });
        let elapsed = now.saturating_duration_since(src.last).as_secs_f64();
        src.tokens = (src.tokens + elapsed * ACCEPT_RATE).min(ACCEPT_BURST);
        src.last = now;
        if self.handshakes >= MAX_HANDSHAKES || src.handshakes >= MAX_HANDSHAKES_PER_SOURCE {
            self.refused_handshakes += 1;
            return Err(Refusal::Handshakes);
        }
        if src.tokens < 1.0 {
            self.refused_rate += 1;
            return Err(Refusal::Rate);
        }
        src.tokens -= 1.0;
        src.handshakes += 1;
        self.handshakes += 1;
        Ok(())
    }

    /// A handshake admitted for `ip` ended.
    pub fn release(&mut self, ip: IpAddr) {
        if let Some(src) = self.sources.get_mut(&source_key(ip)) {
            if src.handshakes > 0 {
                src.handshakes -= 1;
                self.handshakes = self.handshakes.saturating_sub(1);
            }
        }
    }

    /// Keeps the table below [`MAX_ACCEPT_SOURCES`]: forgets sources whose bucket is full
    /// again, then, if still full, the least recently seen one without a handshake.
    fn make_room(&mut self, now: Instant) {
        if self.sources.len() < MAX_ACCEPT_SOURCES {
            return;
        }
        self.sources.retain(|_, s| {
            s.handshakes > 0
                || s.tokens + now.saturating_duration_since(s.last).as_secs_f64() * ACCEPT_RATE
                    < ACCEPT_BURST
        });
        if self.sources.len() < MAX_ACCEPT_SOURCES {
            return;
        }
        let oldest = self
            .sources
            .iter()
            .filter(|(_, s)| s.handshakes == 0)
            .min_by_key(|(_, s)| s.last)
            .map(|(k, _)| *k);
        if let Some(k) = oldest {
            self.sources.remove(&k);
        }
    }

    pub fn report(&self) -> AcceptReport {
        AcceptReport {
            refused_rate: self.refused_rate,
            refused_handshakes: self.refused_handshakes,
            handshakes: u32::try_from(self.handshakes).unwrap_or(u32::MAX),
            sources: u32::try_from(self.sources.len()).unwrap_or(u32::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_flooding_source_is_limited_and_others_still_get_in() {
        let t0 = Instant::now();
        let mut g = AcceptGate::default();
        let flood = ip("10.0.0.66");
        // 50 connections a second for 10 s, never completing their handshake.
        let mut admitted = 0;
        for i in 0..500u32 {
            let now = t0 + Duration::from_millis(20 * u64::from(i));
            if g.admit(flood, now).is_ok() {
                admitted += 1;
            }
            // Every 20th attempt a real peer from elsewhere dials: always let in.
            if i % 20 == 0 {
                let real = ip("10.0.0.2");
                assert_eq!(g.admit(real, now), Ok(()), "the real peer at {i}");
                g.release(real);
            }
        }
        assert_eq!(admitted, MAX_HANDSHAKES_PER_SOURCE, "idle handshakes pin the source's slots");
        let r = g.report();
        assert_eq!(r.refused_rate + r.refused_handshakes, 500 - admitted as u64);
        assert_eq!(r.handshakes as usize, MAX_HANDSHAKES_PER_SOURCE);
        // Handshakes that end free their slots; the rate then applies.
        for _ in 0..MAX_HANDSHAKES_PER_SOURCE {
            g.release(flood);
        }
        let t1 = t0 + Duration::from_secs(100);
        let burst = (0..100).filter(|_| g.admit(flood, t1).is_ok()).count();
        assert_eq!(burst, MAX_HANDSHAKES_PER_SOURCE);
        for _ in 0..burst {
            g.release(flood);
        }
        let refused_before = g.report().refused_rate;
        let mut more = 0;
        for _ in 0..100 {
            if g.admit(flood, t1).is_ok() {
                g.release(flood);
                more += 1;
            }
        }
        assert_eq!(more, ACCEPT_BURST as usize - MAX_HANDSHAKES_PER_SOURCE);
        assert!(g.report().refused_rate > refused_before, "beyond the burst: the rate");
    }

    #[test]
    fn handshakes_are_capped_in_all() {
        let t0 = Instant::now();
        let mut g = AcceptGate::default();
        let mut n = 0;
        for host in 1..=100u8 {
            for _ in 0..MAX_HANDSHAKES_PER_SOURCE {
                n += usize::from(g.admit(IpAddr::from([10, 0, 1, host]), t0).is_ok());
            }
        }
        assert_eq!(n, MAX_HANDSHAKES);
        assert_eq!(g.admit(ip("10.0.2.1"), t0), Err(Refusal::Handshakes));
        g.release(IpAddr::from([10, 0, 1, 1]));
        assert_eq!(g.admit(ip("10.0.2.1"), t0), Ok(()));
    }

    #[test]
    fn the_source_table_stays_bounded_and_ipv6_counts_by_64() {
        let t0 = Instant::now();
        let mut g = AcceptGate::default();
        for i in 0..10_000u32 {
            let a = IpAddr::from((0x0a00_0000u32 + i).to_be_bytes());
            if g.admit(a, t0).is_ok() {
                g.release(a);
            }
        }
        assert!(g.report().sources as usize <= MAX_ACCEPT_SOURCES);
        assert_eq!(source_key(ip("fd00::1")), source_key(ip("fd00::ffff:1:2")));
        assert_ne!(source_key(ip("fd00::1")), source_key(ip("fd00:0:0:1::1")));
        assert_eq!(source_key(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
    }

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
