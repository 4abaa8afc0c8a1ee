//! What the DNS server answers from: an immutable snapshot of the live entries, rebuilt when
//! the table changes and swapped in whole, so that queries never wait for the table's owner.
//! [`Zone::answer`] decides every query (authoritative answer, NXDOMAIN, or forward to the
//! upstream resolvers) without I/O.

use std::collections::HashMap;
use std::net::IpAddr;

use hickory_server::proto::rr::rdata::{A, AAAA, PTR, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use rand::seq::SliceRandom;

use super::domain::Domain;
use super::table::Entry;

/// How a query is answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// NOERROR with these records; none means the name exists without records of that type.
    Records(Vec<Record>),
    /// The name is in our domain and nobody registered it (the SOA goes in the authority
    /// section, for negative caching).
    NxDomain,
    /// Not ours: ask the upstream resolvers.
    Forward,
}

/// The snapshot.
#[derive(Clone, Debug)]
pub struct Zone {
    domain: LowerName,
    ttl: u32,
    forward: HashMap<LowerName, Vec<IpAddr>>,
    reverse: HashMap<IpAddr, Name>,
    soa: Record,
    entries: usize,
}

impl Zone {
    /// Builds the snapshot of `live` entries for `domain`.
    pub fn build<'a>(domain: &Domain, ttl: u32, live: impl Iterator<Item = &'a Entry>) -> Zone {
        let apex = Name::from_ascii(domain.as_str()).unwrap_or_else(|_| Name::root());
        let mut forward: HashMap<LowerName, Vec<IpAddr>> = HashMap::new();
        // Several live names for one address (dns-add): the smallest name, so that every peer
        // gives the same answer.
        let mut reverse: HashMap<IpAddr, (String, Name)> = HashMap::new();
        let mut entries = 0;
        for e in live {
            let Ok(name) = Name::from_ascii(&e.name) else { continue };
            entries += 1;
            let addrs = forward.entry(LowerName::new(&name)).or_default();
            if !addrs.contains(&e.addr) {
                addrs.push(e.addr);
            }
            let lname = e.name.to_ascii_lowercase();
            match reverse.get(&e.addr) {
                Some((held, _)) if *held <= lname => {}
                _ => {
                    reverse.insert(e.addr, (lname, name));
                }
            }
        }
        let host = Name::from_ascii("ns").and_then(|n| n.append_domain(&apex));
        let mname = host.unwrap_or_else(|_| apex.clone());
        let rname = Name::from_ascii("hostmaster").and_then(|n| n.append_domain(&apex));
        let soa = SOA::new(mname, rname.unwrap_or_else(|_| apex.clone()), 1, 3600, 600, 86400, ttl);
        Zone {
            domain: LowerName::new(&apex),
            ttl,
            forward,
            reverse: reverse.into_iter().map(|(a, (_, n))| (a, n)).collect(),
            soa: Record::from_rdata(apex, ttl, RData::SOA(soa)),
            entries,
        }
    }

    /// Live entries in the snapshot.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// The SOA of the domain (authority section of negative answers).
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// The addresses of a name, in the table's order (for `weft dns-lookup`).
    pub fn addresses(&self, name: &Name) -> Vec<IpAddr> {
        self.forward.get(&LowerName::new(name)).cloned().unwrap_or_default()
    }

    /// Decides how to answer `qtype` for `qname`. Addresses come in random order (the
    /// poor man's load balancing Weave users rely on).
    pub fn answer(&self, qname: &Name, qtype: RecordType) -> Answer {
        let lower = LowerName::new(qname);
        if self.domain.zone_of(&lower) {
            return match self.forward.get(&lower) {
                Some(addrs) => Answer::Records(self.addresses_of(qname, addrs, qtype)),
                None if lower == self.domain && qtype == RecordType::SOA => {
                    Answer::Records(vec![self.soa.clone()])
                }
                None if lower == self.domain => Answer::Records(Vec::new()),
                None => Answer::NxDomain,
            };
        }
        // Resolvers that do not apply search domains ask for "db." meaning "db.weave.local.".
        if lower.num_labels() == 1 {
            let qualified = Name::from(lower).append_domain(&Name::from(&self.domain));
            if let Some(addrs) = qualified.ok().and_then(|n| self.forward.get(&LowerName::new(&n)))
            {
                return Answer::Records(self.addresses_of(qname, addrs, qtype));
            }
            return Answer::Forward;
        }
        if qtype == RecordType::PTR {
            let known = qname
                .parse_arpa_name()
                .ok()
                .filter(|net| net.prefix_len() == net.max_prefix_len())
                .and_then(|net| self.reverse.get(&net.addr()));
            if let Some(target) = known {
                let ptr = RData::PTR(PTR(target.clone()));
                return Answer::Records(vec![Record::from_rdata(qname.clone(), self.ttl, ptr)]);
            }
        }
        Answer::Forward
    }

    fn addresses_of(&self, owner: &Name, addrs: &[IpAddr], qtype: RecordType) -> Vec<Record> {
        let mut records: Vec<Record> = addrs
            .iter()
            .filter_map(|a| match (a, qtype) {
                (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
                    Some(RData::AAAA(AAAA(*v6)))
                }
                _ => None,
            })
            .map(|rdata| Record::from_rdata(owner.clone(), self.ttl, rdata))
            .collect();
        records.shuffle(&mut rand::rng());
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PeerName;

    fn entry(name: &str, addr: &str) -> Entry {
        Entry {
            name: name.into(),
            addr: addr.parse().unwrap(),
            endpoint: "c".into(),
            origin: PeerName::new(1).unwrap(),
            version: 1,
            tombstone: 0,
        }
    }

    fn zone(entries: &[Entry]) -> Zone {
        Zone::build(&"weave.local".parse().unwrap(), 1, entries.iter())
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn addrs(a: &Answer) -> Vec<String> {
        let Answer::Records(r) = a else { panic!("not records: {a:?}") };
        let mut v: Vec<String> = r.iter().map(|r| r.data.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_records_for_every_address_in_any_case_with_the_ttl() {
        let z = zone(&[
            entry("SeEtWo.weave.local.", "10.32.0.2"),
            entry("seetwo.weave.local.", "10.32.0.3"),
            entry("other.weave.local.", "10.32.0.4"),
        ]);
        let a = z.answer(&name("SEETWO.Weave.Local."), RecordType::A);
        assert_eq!(addrs(&a), vec!["10.32.0.2", "10.32.0.3"]);
        let Answer::Records(r) = a else { unreachable!() };
        assert!(r.iter().all(|r| r.ttl == 1 && r.name == name("SEETWO.Weave.Local.")));
    }

    #[test]
    fn order_varies_between_answers() {
        let many: Vec<Entry> =
            (1..=20).map(|i| entry("lb.weave.local.", &format!("10.32.0.{i}"))).collect();
        let z = zone(&many);
        let first = |z: &Zone| match z.answer(&name("lb.weave.local."), RecordType::A) {
            Answer::Records(r) => r[0].data.to_string(),
            other => panic!("{other:?}"),
        };
        let seen: std::collections::BTreeSet<String> = (0..50).map(|_| first(&z)).collect();
        assert!(seen.len() > 1, "always {seen:?} first");
    }

    #[test]
    fn negative_answers() {
        let z = zone(&[entry("c1.weave.local.", "10.32.0.1")]);
        assert_eq!(z.answer(&name("c1.weave.local."), RecordType::MX), Answer::Records(vec![]));
        assert_eq!(z.answer(&name("c1.weave.local."), RecordType::AAAA), Answer::Records(vec![]));
        assert_eq!(z.answer(&name("xx.weave.local."), RecordType::A), Answer::NxDomain);
        assert_eq!(z.answer(&name("xx.invalid."), RecordType::A), Answer::Forward);
        assert_eq!(z.answer(&name("weave.local."), RecordType::A), Answer::Records(vec![]));
        let soa = z.answer(&name("weave.local."), RecordType::SOA);
        assert_eq!(soa, Answer::Records(vec![z.soa().clone()]));
    }

    #[test]
    fn short_names_are_tried_in_the_domain() {
        let z = zone(&[entry("mysql.weave.local.", "10.32.0.9")]);
        assert_eq!(addrs(&z.answer(&name("MySQL."), RecordType::A)), vec!["10.32.0.9"]);
        assert_eq!(z.answer(&name("unknown."), RecordType::A), Answer::Forward);
    }

    #[test]
    fn reverse_lookups_of_known_addresses_only() {
        let z = zone(&[
            entry("b.weave.local.", "10.32.0.1"),
            entry("a.weave.local.", "10.32.0.1"),
            entry("v6.weave.local.", "fd00::1"),
        ]);
        let ptr = |q: &str| z.answer(&name(q), RecordType::PTR);
        assert_eq!(addrs(&ptr("1.0.32.10.in-addr.arpa.")), vec!["a.weave.local."]);
        assert_eq!(addrs(&ptr("1.0.32.10.IN-ADDR.ARPA.")), vec!["a.weave.local."]);
        let v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
        assert_eq!(addrs(&ptr(v6)), vec!["v6.weave.local."]);
        assert_eq!(ptr("8.8.8.8.in-addr.arpa."), Answer::Forward);
        assert_eq!(ptr("32.10.in-addr.arpa."), Answer::Forward);
    }

    #[test]
    fn custom_domains_and_subdomains() {
        let z = Zone::build(
            &"foo.bar".parse().unwrap(),
            5,
            [entry("x.sub1.foo.bar.", "10.1.0.1"), entry("weave.local.", "10.1.0.2")].iter(),
        );
        assert_eq!(addrs(&z.answer(&name("X.SUB1.foo.bar."), RecordType::A)), vec!["10.1.0.1"]);
        assert_eq!(z.answer(&name("y.sub2.foo.bar."), RecordType::A), Answer::NxDomain);
        assert_eq!(z.answer(&name("c1.weave.local."), RecordType::A), Answer::Forward);
        let Answer::Records(r) = z.answer(&name("x.sub1.foo.bar."), RecordType::A) else {
            unreachable!()
        };
        assert_eq!(r[0].ttl, 5);
    }
}
