//! Address arithmetic and a set of free address intervals. Addresses are mapped to `u128`
//! keys (IPv4 as IPv4-mapped IPv6) so one structure serves both families. Pure.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use ipnet::IpNet;

const V4_MAPPED: u128 = 0xffff_u128 << 32;

/// The key of an address.
pub fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => V4_MAPPED | u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address of a key. Keys in ::ffff:0:0/96 are IPv4 (weft never allocates that IPv6 block).
pub fn addr(k: u128) -> IpAddr {
    if k >> 32 == 0xffff {
        IpAddr::V4(Ipv4Addr::from((k & 0xffff_ffff) as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(k))
    }
}

/// All keys of a network.
pub fn net_range(net: IpNet) -> Range<u128> {
    let start = key(net.network());
    let bits = match net {
        IpNet::V4(_) => 32 - u32::from(net.prefix_len()),
        IpNet::V6(_) => 128 - u32::from(net.prefix_len()),
    };
    let size = if bits >= 128 { u128::MAX - start } else { 1u128 << bits };
    start..start.saturating_add(size)
}

/// The addresses of a network that can be given to hosts: without the network address, and
/// for IPv4 without the broadcast address (except /31 and /32, which have neither).
pub fn host_range(net: IpNet) -> Range<u128> {
    let r = net_range(net);
    match net {
        IpNet::V4(n) if n.prefix_len() >= 31 => r,
        IpNet::V4(_) => r.start + 1..r.end - 1,
        IpNet::V6(n) if n.prefix_len() >= 127 => r,
        IpNet::V6(_) => r.start + 1..r.end,
    }
}

/// A set of free addresses as disjoint, non-adjacent intervals `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Space {
    free: BTreeMap<u128, u128>,
}

impl Space {
    /// Marks `r` free, merging with neighbours.
    pub fn add(&mut self, r: Range<u128>) {
        if r.is_empty() {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // Absorb every interval that overlaps or touches [start, end).
        let touching: Vec<(u128, u128)> = self
            .free
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.free.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.free.insert(start, end);
    }

    /// Marks `r` not free.
    pub fn remove(&mut self, r: Range<u128>) {
        if r.is_empty() {
            return;
        }
        let overlapping: Vec<(u128, u128)> = self
            .free
            .range(..r.end)
            .rev()
            .take_while(|(_, e)| **e > r.start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in overlapping {
            self.free.remove(&s);
            if s < r.start {
                self.free.insert(s, r.start);
            }
            if e > r.end {
                self.free.insert(r.end, e);
            }
        }
    }

    /// Whether `k` is free.
    pub fn contains(&self, k: u128) -> bool {
        self.free.range(..=k).next_back().is_some_and(|(_, e)| *e > k)
    }

    /// Removes and returns the lowest free address in `within`.
    pub fn take_lowest(&mut self, within: Range<u128>) -> Option<u128> {
        let k = self.lowest(within)?;
        self.remove(k..k + 1);
        Some(k)
    }

    /// The lowest free address in `within`.
    pub fn lowest(&self, within: Range<u128>) -> Option<u128> {
        if let Some((_, e)) = self.free.range(..=within.start).next_back() {
            if *e > within.start && within.start < within.end {
                return Some(within.start);
            }
        }
        self.free.range(within.start..within.end).next().map(|(s, _)| *s)
    }

    /// Number of free addresses in `within`.
    pub fn count_in(&self, within: Range<u128>) -> u128 {
        let mut n = 0;
        let first =
            self.free.range(..=within.start).next_back().map(|(s, _)| *s).unwrap_or(within.start);
        for (s, e) in self.free.range(first..within.end) {
            let lo = (*s).max(within.start);
            let hi = (*e).min(within.end);
            n += hi.saturating_sub(lo);
        }
        n
    }

    /// The free intervals, in order.
    pub fn intervals(&self) -> impl Iterator<Item = Range<u128>> + '_ {
        self.free.iter().map(|(s, e)| *s..*e)
    }

    /// The free intervals clipped to `within`.
    pub fn intervals_in(&self, within: Range<u128>) -> impl Iterator<Item = Range<u128>> + '_ {
        let first =
            self.free.range(..=within.start).next_back().map(|(s, _)| *s).unwrap_or(within.start);
        self.free
            .range(first..within.end)
            .map(move |(s, e)| (*s).max(within.start)..(*e).min(within.end))
            .filter(|r| !r.is_empty())
    }

    /// What to give a peer that asks for space in `within`: the biggest CIDR-aligned free
    /// block there, but never more than half of the free addresses in `within` (so the donor
    /// keeps room to grow) — except a single free address, which is given: the asker needs it
    /// now, and keeping it would make an allocation fail while a peer has a free address.
    /// Among blocks of equal size the highest is chosen: allocation takes the lowest addresses
    /// first, so donating from the top keeps what is left contiguous.
    pub fn donation(&self, within: Range<u128>) -> Option<Range<u128>> {
        let free = self.count_in(within.clone());
        if free == 0 {
            return None;
        }
        let limit = (free / 2).max(1);
        let mut best: Option<Range<u128>> = None;
        for iv in self.intervals_in(within) {
            if let Some(b) = biggest_aligned_block(iv, limit) {
                let better = best.as_ref().is_none_or(|c| {
                    let (bl, cl) = (b.end - b.start, c.end - c.start);
                    bl > cl || (bl == cl && b.start > c.start)
                });
                if better {
                    best = Some(b);
                }
            }
        }
        best
    }
}

/// The biggest block of power-of-two size at most `limit`, aligned to its size, inside `r`
/// (the highest one of that size).
fn biggest_aligned_block(r: Range<u128>, limit: u128) -> Option<Range<u128>> {
    let len = r.end.checked_sub(r.start).filter(|l| *l > 0)?;
    let mut size = 1u128 << (127 - len.min(limit).leading_zeros());
    while size > 0 {
        // The highest aligned start that still fits.
        let start = (r.end - size) & !(size - 1);
        if start >= r.start {
            return Some(start..start + size);
        }
        size >>= 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn keys_round_trip() {
        for s in ["10.32.0.1", "0.0.0.0", "255.255.255.255", "fd00::1", "::"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(addr(key(ip)), ip);
        }
    }

    #[test]
    fn host_ranges_exclude_network_and_broadcast() {
        let r = host_range("10.32.0.0/12".parse().unwrap());
        assert_eq!(addr(r.start), "10.32.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(addr(r.end - 1), "10.47.255.254".parse::<IpAddr>().unwrap());
        assert_eq!(host_range("10.0.0.0/31".parse().unwrap()).count(), 2);
        assert_eq!(host_range("fd00::/64".parse().unwrap()).start, key("fd00::1".parse().unwrap()));
    }

    #[test]
    fn lowest_first() {
        let mut s = Space::default();
        s.add(10..20);
        s.add(30..40);
        assert_eq!(s.take_lowest(0..100), Some(10));
        assert_eq!(s.take_lowest(15..100), Some(15));
        assert_eq!(s.take_lowest(20..35), Some(30));
        assert_eq!(s.take_lowest(40..100), None);
        assert_eq!(s.count_in(0..100), 17);
        s.add(10..11);
        s.add(15..16);
        assert_eq!(s.intervals().collect::<Vec<_>>(), vec![10..20, 31..40]);
    }

    #[test]
    fn donates_the_biggest_aligned_block_up_to_half() {
        let mut s = Space::default();
        s.add(0..256);
        assert_eq!(s.donation(0..256), Some(128..256));
        s.remove(200..201);
        // 255 free: at most 127, so a /26-sized block (64), the highest aligned one that fits.
        assert_eq!(s.donation(0..256), Some(128..192));
        let mut one = Space::default();
        one.add(7..8);
        assert_eq!(one.donation(0..256), Some(7..8), "a single free address is given");
        assert_eq!(Space::default().donation(0..256), None);
        let mut two = Space::default();
        two.add(5..7);
        assert_eq!(two.donation(0..256), Some(6..7));
    }

    proptest! {
        /// A donation is free, aligned, inside the request, and at most half of what is free.
        #[test]
        fn donations_are_free_aligned_and_bounded(
            frees in proptest::collection::vec((0u128..1000, 1u128..100), 0..20),
            lo in 0u128..1000, len in 1u128..1000,
        ) {
            let mut s = Space::default();
            for (a, l) in frees { s.add(a..a + l); }
            let within = lo..lo + len;
            if let Some(d) = s.donation(within.clone()) {
                let size = d.end - d.start;
                prop_assert!(size.is_power_of_two());
                prop_assert_eq!(d.start % size, 0);
                prop_assert!(within.start <= d.start && d.end <= within.end);
                prop_assert_eq!(s.count_in(d.clone()), size);
                prop_assert!(size <= (s.count_in(within) / 2).max(1));
            } else {
                prop_assert_eq!(s.count_in(within), 0);
            }
        }

        /// The interval set behaves exactly like a set of integers.
        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec((0u8..4, 0u128..200, 0u128..30), 1..200)) {
            let mut s = Space::default();
            let mut model = BTreeSet::new();
            for (op, a, len) in ops {
                let r = a..a + len;
                match op {
                    0 => { s.add(r.clone()); model.extend(r); }
                    1 => { s.remove(r.clone()); for k in r { model.remove(&k); } }
                    2 => {
                        let got = s.take_lowest(r.clone());
                        let want = model.range(r).next().copied();
                        prop_assert_eq!(got, want);
                        if let Some(k) = want { model.remove(&k); }
                    }
                    _ => prop_assert_eq!(s.count_in(r.clone()), model.range(r).count() as u128),
                }
                // invariant: disjoint, non-adjacent, non-empty intervals matching the model
                let iv: Vec<_> = s.intervals().collect();
                for w in iv.windows(2) { prop_assert!(w[0].end < w[1].start); }
                prop_assert!(iv.iter().all(|r| !r.is_empty()));
                let flat: BTreeSet<u128> = iv.into_iter().flatten().collect();
                prop_assert_eq!(&flat, &model);
            }
        }
    }
}
