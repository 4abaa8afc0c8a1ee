//! Address allocation inside the address space this peer owns. Which space that is comes from
//! outside (the whole range on a single host; the ring's share once peers share the range);
//! this type only guarantees that an address is handed to one owner at a time and that the
//! lowest free address is used first. Pure and deterministic.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::Range;

use ipnet::IpNet;

use super::space::{self, Space};

/// Why an allocation or claim failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("subnet {subnet} is not inside the allocation range {range}")]
    OutsideRange { subnet: IpNet, range: IpNet },
    #[error("subnet {0} is too small (at most /30 for IPv4, /126 for IPv6)")]
    SubnetTooSmall(IpNet),
    #[error("{0} is not a network address (did you mean {1}?)")]
    NotNetworkAddress(IpNet, IpNet),
    #[error("no free address in {0}")]
    Exhausted(IpNet),
    #[error("{addr} is already in use by {owner}")]
    Conflict { addr: IpAddr, owner: String },
    #[error("{0} belongs to address space owned by another peer")]
    NotOwned(IpAddr),
    #[error("{0} is a network or broadcast address of its subnet")]
    Reserved(IpNet),
    #[error("{0}")]
    Invalid(String),
}

/// The allocator of one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocator {
    range: IpNet,
    default_subnet: IpNet,
    owned: Vec<Range<u128>>,
    free: Space,
    used: BTreeMap<u128, String>,
}

impl Allocator {
    /// An allocator for `range` that owns nothing yet.
    pub fn new(range: IpNet, default_subnet: IpNet) -> Allocator {
        Allocator {
            range: range.trunc(),
            default_subnet: default_subnet.trunc(),
            owned: Vec::new(),
            free: Space::default(),
            used: BTreeMap::new(),
        }
    }

    pub fn range(&self) -> IpNet {
        self.range
    }

    pub fn default_subnet(&self) -> IpNet {
        self.default_subnet
    }

    /// Sets the address space this peer owns. Addresses in use stay in use wherever they are.
    pub fn set_owned(&mut self, mut ranges: Vec<Range<u128>>) {
        ranges.sort_by_key(|r| r.start);
        self.free = Space::default();
        for r in &ranges {
            self.free.add(r.clone());
            for k in block_zero_keys(r.clone()) {
                self.free.remove(k..k + 1);
            }
        }
        for k in self.used.keys() {
            self.free.remove(*k..*k + 1);
        }
        self.owned = ranges;
    }

    /// Owns the whole range (a single peer).
    pub fn own_everything(&mut self) {
        self.set_owned(vec![space::net_range(self.range)]);
    }

    pub fn owned(&self) -> &[Range<u128>] {
        &self.owned
    }

    fn owns(&self, k: u128) -> bool {
        self.owned.iter().any(|r| r.contains(&k))
    }

    /// Checks that `subnet` can be allocated from: inside the range, a network address, big enough.
    pub fn validate_subnet(&self, subnet: IpNet) -> Result<(), IpamError> {
        if subnet.trunc() != subnet {
            return Err(IpamError::NotNetworkAddress(subnet, subnet.trunc()));
        }
        let max_prefix = if subnet.addr().is_ipv4() { 30 } else { 126 };
        if subnet.prefix_len() > max_prefix {
            return Err(IpamError::SubnetTooSmall(subnet));
        }
        if !self.range.contains(&subnet) {
            return Err(IpamError::OutsideRange { subnet, range: self.range });
        }
        Ok(())
    }

    /// Allocates the lowest free address of `subnet` to `owner`, with the subnet's prefix.
    pub fn allocate(&mut self, owner: &str, subnet: IpNet) -> Result<IpNet, IpamError> {
        self.validate_subnet(subnet)?;
        let k =
            self.free.take_lowest(space::host_range(subnet)).ok_or(IpamError::Exhausted(subnet))?;
        self.used.insert(k, owner.to_owned());
        Ok(IpNet::new(space::addr(k), subnet.prefix_len()).unwrap_or(subnet))
    }

    /// Claims exactly `net.addr()` for `owner`. Idempotent for the same owner. Addresses
    /// outside the range are recorded without ownership (nobody else allocates them).
    pub fn claim(&mut self, owner: &str, net: IpNet) -> Result<(), IpamError> {
        let k = space::key(net.addr());
        if let Some(current) = self.used.get(&k) {
            return if current == owner {
                Ok(())
            } else {
                Err(IpamError::Conflict { addr: net.addr(), owner: current.clone() })
            };
        }
        let in_range = self.range.contains(&net.addr());
        if in_range {
            if !space::host_range(net.trunc()).contains(&k)
                && net.prefix_len() < net.max_prefix_len() - 1
            {
                return Err(IpamError::Reserved(net));
            }
            if !self.owns(k) {
                return Err(IpamError::NotOwned(net.addr()));
            }
            self.free.remove(k..k + 1);
        }
        self.used.insert(k, owner.to_owned());
        Ok(())
    }

    /// Records `net.addr()` as used by `owner` whoever owns its range (an address found in use
    /// at start); it becomes allocatable by nobody else here.
    pub fn restore(&mut self, owner: &str, net: IpNet) {
        let k = space::key(net.addr());
        self.free.remove(k..k + 1);
        self.used.insert(k, owner.to_owned());
    }

    /// Whether any address in `r` is in use.
    pub fn has_used_in(&self, r: Range<u128>) -> bool {
        self.used.range(r).next().is_some()
    }

    /// What to give a peer asking for space in `within` (see [`Space::donation`]).
    pub fn donation(&self, within: Range<u128>) -> Option<Range<u128>> {
        self.free.donation(within)
    }

    /// Free addresses of the owned space in `r`.
    pub fn free_in_range(&self, r: Range<u128>) -> u128 {
        self.free.count_in(r)
    }

    /// Releases one address; returns its owner.
    pub fn release(&mut self, ip: IpAddr) -> Option<String> {
        let k = space::key(ip);
        let owner = self.used.remove(&k)?;
        if self.owns(k) && !is_block_zero(k) {
            self.free.add(k..k + 1);
        }
        Some(owner)
    }

    /// Releases every address of `owner`.
    pub fn release_owner(&mut self, owner: &str) -> Vec<IpAddr> {
        let keys: Vec<u128> =
            self.used.iter().filter(|(_, o)| o.as_str() == owner).map(|(k, _)| *k).collect();
        keys.into_iter()
            .filter_map(|k| self.release(space::addr(k)).map(|_| space::addr(k)))
            .collect()
    }

    /// Gives an address in use to another owner; false if it is not in use.
    pub fn rename(&mut self, ip: IpAddr, owner: &str) -> bool {
        match self.used.get_mut(&space::key(ip)) {
            Some(o) => {
                owner.clone_into(o);
                true
            }
            None => false,
        }
    }

    pub fn owner_of(&self, ip: IpAddr) -> Option<&str> {
        self.used.get(&space::key(ip)).map(String::as_str)
    }

    /// Addresses in use, with owners, in address order.
    pub fn used(&self) -> impl Iterator<Item = (IpAddr, &str)> {
        self.used.iter().map(|(k, o)| (space::addr(*k), o.as_str()))
    }

    pub fn used_count(&self) -> usize {
        self.used.len()
    }

    /// Free addresses in the owned space (network/broadcast addresses of the range excluded).
    pub fn free_count(&self) -> u128 {
        self.free.count_in(space::host_range(self.range))
    }

    /// Free addresses of `subnet` in the owned space.
    pub fn free_in(&self, subnet: IpNet) -> u128 {
        self.free.count_in(space::host_range(subnet))
    }
}

/// Whether `k` is an IPv4 address ending in `.0.0`. Inside a subnet larger than a /16 such
/// an address is a host address, but people read `10.38.0.0` as a network address (and the
/// first one a peer hands out in a fresh share becomes its bridge and DNS address), so it is
/// never allocated; an explicit claim may still take it.
pub fn is_block_zero(k: u128) -> bool {
    k >> 32 == 0xffff && k & 0xffff == 0
}

/// The `.0.0` IPv4 addresses inside `r` (at most 65 536; none in IPv6 ranges).
fn block_zero_keys(r: Range<u128>) -> impl Iterator<Item = u128> {
    const BLOCK: u128 = 1 << 16;
    const V4: Range<u128> = 0xffff_u128 << 32..0x1_0000_u128 << 32;
    let (start, end) = (r.start.max(V4.start), r.end.min(V4.end));
    let first = start.div_ceil(BLOCK) * BLOCK;
    (first..end.max(first)).step_by(BLOCK as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn alloc(range: &str) -> Allocator {
        let r: IpNet = range.parse().unwrap();
        let mut a = Allocator::new(r, r);
        a.own_everything();
        a
    }

    #[test]
    fn lowest_address_first_and_reuse_after_release() {
        let mut a = alloc("10.32.0.0/12");
        let d = a.default_subnet();
        assert_eq!(a.allocate("x", d).unwrap().to_string(), "10.32.0.1/12");
        assert_eq!(a.allocate("y", d).unwrap().to_string(), "10.32.0.2/12");
        assert_eq!(a.release("10.32.0.1".parse().unwrap()).as_deref(), Some("x"));
        assert_eq!(a.allocate("z", d).unwrap().to_string(), "10.32.0.1/12");
    }

    #[test]
    fn dot_zero_zero_addresses_of_big_subnets_are_never_handed_out() {
        let range: IpNet = "10.32.0.0/12".parse().unwrap();
        let mut a = Allocator::new(range, range);
        // A share that starts on a /16 boundary inside the range (a peer's half or a donation).
        let start = space::key("10.38.0.0".parse().unwrap());
        let share = start..start + 4;
        a.set_owned(vec![share]);
        assert_eq!(a.allocate("x", range).unwrap().to_string(), "10.38.0.1/12");
        assert_eq!(a.free_in_range(start..start + 4), 2, "10.38.0.0 does not count as free");
        // Claimed on purpose and released, it does not become allocatable.
        a.claim("y", "10.38.0.0/12".parse().unwrap()).unwrap();
        a.release("10.38.0.0".parse().unwrap());
        assert_eq!(a.allocate("z", range).unwrap().to_string(), "10.38.0.2/12");
        assert_eq!(a.allocate("w", range).unwrap().to_string(), "10.38.0.3/12");
        assert_eq!(a.allocate("v", range), Err(IpamError::Exhausted(range)));
        // In a /24 the first address is the network address anyway.
        let mut b = alloc("10.2.3.0/24");
        assert_eq!(b.allocate("x", b.default_subnet()).unwrap().to_string(), "10.2.3.1/24");
    }

    #[test]
    fn subnets_are_validated() {
        let mut a = alloc("10.2.0.0/16");
        assert!(matches!(
            a.allocate("x", "10.2.3.2/30".parse().unwrap()),
            Err(IpamError::NotNetworkAddress(..))
        ));
        assert!(matches!(
            a.allocate("x", "10.2.3.0/31".parse().unwrap()),
            Err(IpamError::SubnetTooSmall(_))
        ));
        assert!(matches!(
            a.allocate("x", "10.3.0.0/24".parse().unwrap()),
            Err(IpamError::OutsideRange { .. })
        ));
        assert_eq!(
            a.allocate("x", "10.2.3.0/24".parse().unwrap()).unwrap().to_string(),
            "10.2.3.1/24"
        );
    }

    #[test]
    fn exhaustion_is_reported() {
        let mut a = alloc("10.9.0.0/30");
        let d = a.default_subnet();
        a.allocate("a", d).unwrap();
        a.allocate("b", d).unwrap();
        assert_eq!(a.allocate("c", d), Err(IpamError::Exhausted(d)));
        assert_eq!(a.free_count(), 0);
    }

    #[test]
    fn claims() {
        let mut a = alloc("10.32.0.0/12");
        a.claim("x", "10.32.1.5/12".parse().unwrap()).unwrap();
        a.claim("x", "10.32.1.5/12".parse().unwrap()).unwrap();
        assert!(matches!(
            a.claim("y", "10.32.1.5/12".parse().unwrap()),
            Err(IpamError::Conflict { .. })
        ));
        a.claim("y", "192.168.7.1/24".parse().unwrap()).unwrap();
        assert_eq!(a.owner_of("192.168.7.1".parse().unwrap()), Some("y"));
        assert!(matches!(
            a.claim("y", "10.47.255.255/12".parse().unwrap()),
            Err(IpamError::Reserved(_))
        ));
        let mut b =
            Allocator::new("10.32.0.0/12".parse().unwrap(), "10.32.0.0/12".parse().unwrap());
        assert!(matches!(
            b.claim("y", "10.32.0.9/12".parse().unwrap()),
            Err(IpamError::NotOwned(_))
        ));
        assert!(matches!(b.allocate("y", b.default_subnet()), Err(IpamError::Exhausted(_))));
    }

    #[test]
    fn rename_moves_an_address_to_another_owner() {
        let mut a = alloc("10.2.3.0/24");
        let n = a.allocate("pending", a.default_subnet()).unwrap();
        assert!(a.rename(n.addr(), "docker:10.2.3.1"));
        assert_eq!(a.owner_of(n.addr()), Some("docker:10.2.3.1"));
        assert!(a.release_owner("pending").is_empty());
        assert_eq!(a.release_owner("docker:10.2.3.1"), vec![n.addr()]);
        assert!(!a.rename(n.addr(), "x"), "a free address has no owner to change");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u8, u8),
        Claim(u8, u8),
        Release(u8),
        ReleaseOwner(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6, 0u8..3).prop_map(|(o, s)| Op::Alloc(o, s)),
            (0u8..6, any::<u8>()).prop_map(|(o, a)| Op::Claim(o, a)),
            any::<u8>().prop_map(Op::Release),
            (0u8..6).prop_map(Op::ReleaseOwner),
        ]
    }

    proptest! {
        /// No address is ever held twice, freed addresses come back, and rebuilding the
        /// allocator from what it handed out (what the agent persists) gives the same state.
        #[test]
        fn never_twice_and_persistence_round_trips(ops in proptest::collection::vec(op(), 1..300)) {
            let mut a = alloc("10.40.0.0/24");
            let subnets: [IpNet; 3] = ["10.40.0.0/24".parse().unwrap(), "10.40.0.0/26".parse().unwrap(), "10.40.0.128/28".parse().unwrap()];
            let mut held: Vec<(IpAddr, String)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(o, s) => {
                        if let Ok(net) = a.allocate(&format!("o{o}"), subnets[s as usize]) {
                            prop_assert!(!held.iter().any(|(ip, _)| *ip == net.addr()), "{} handed out twice", net);
                            held.push((net.addr(), format!("o{o}")));
                        }
                    }
                    Op::Claim(o, last) => {
                        let net: IpNet = format!("10.40.0.{last}/24").parse().unwrap();
                        let owner = format!("o{o}");
                        match a.claim(&owner, net) {
                            Ok(()) => {
                                if let Some((_, h)) = held.iter().find(|(ip, _)| *ip == net.addr()) {
                                    prop_assert_eq!(h, &owner);
                                } else {
                                    held.push((net.addr(), owner));
                                }
                            }
                            Err(IpamError::Conflict { owner: cur, .. }) => {
                                prop_assert!(held.iter().any(|(ip, h)| *ip == net.addr() && *h == cur));
                            }
                            Err(IpamError::Reserved(_)) => prop_assert!(last == 0 || last == 255),
                            Err(e) => prop_assert!(false, "unexpected {e}"),
                        }
                    }
                    Op::Release(last) => {
                        let ip: IpAddr = format!("10.40.0.{last}").parse().unwrap();
                        let was = held.iter().position(|(h, _)| *h == ip);
                        prop_assert_eq!(a.release(ip).is_some(), was.is_some());
                        if let Some(i) = was { held.remove(i); }
                    }
                    Op::ReleaseOwner(o) => {
                        let owner = format!("o{o}");
                        let freed: HashSet<IpAddr> = a.release_owner(&owner).into_iter().collect();
                        let expect: HashSet<IpAddr> = held.iter().filter(|(_, h)| *h == owner).map(|(ip, _)| *ip).collect();
                        prop_assert_eq!(freed, expect);
                        held.retain(|(_, h)| *h != owner);
                    }
                }
                prop_assert_eq!(a.used_count(), held.len());
                prop_assert_eq!(a.free_count() + held.len() as u128, 254);
            }
            let mut rebuilt = alloc("10.40.0.0/24");
            for (ip, owner) in &held {
                rebuilt.claim(owner, IpNet::new(*ip, 24).unwrap()).unwrap();
            }
            prop_assert_eq!(rebuilt, a);
        }
    }
}
