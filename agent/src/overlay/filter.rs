//! Who may send VXLAN to this host. The kernel's VXLAN device takes frames from any sender;
//! with a password, fastdp (unencrypted) may only carry frames from peers that both sides
//! trust, so an nftables table of the overlay's own (`inet <table>-overlay`) accepts UDP to
//! the fastdp port only from the underlay addresses of the linked peers fastdp is allowed
//! for, and drops the rest (IPv6 too: fastdp runs over IPv4 only).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::dataplane::nft::{
    Action, Chain, ChainType, CmpOp, Family, Hook, L4, Match, Rule, Table, Verdict,
};

/// The senders VXLAN is accepted from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VxlanFilter {
    pub table: String,
    pub port: u16,
    pub allowed: BTreeSet<Ipv4Addr>,
}

impl VxlanFilter {
    /// The nftables table enforcing the filter, replaced as a whole when `allowed` changes.
    pub fn table(&self) -> Table {
        let mut rules: Vec<Rule> = self
            .allowed
            .iter()
            .map(|a| Rule {
                matches: vec![
                    Match::IpSaddr(CmpOp::Eq, Ipv4Net::from(*a)),
                    Match::Dport(L4::Udp, self.port),
                ],
                action: Action::Verdict(Verdict::Accept),
            })
            .collect();
        rules.push(Rule {
            matches: vec![Match::Dport(L4::Udp, self.port)],
            action: Action::Verdict(Verdict::Drop),
        });
        Table {
            family: Family::Inet,
            name: self.table.clone(),
            sets: vec![],
            chains: vec![Chain {
                name: "vxlan-input".into(),
                kind: ChainType::Filter,
                hook: Hook::Input,
                priority: 0,
                rules,
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowed_senders_reach_the_port() {
        let f = VxlanFilter {
            table: "weft-overlay".into(),
            port: 6784,
            allowed: [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 1)].into(),
        };
        let t = f.table();
        assert_eq!(t.family, Family::Inet);
        let rules = &t.chains[0].rules;
        assert_eq!(rules.len(), 3);
        let first = Match::IpSaddr(CmpOp::Eq, "10.0.0.1/32".parse().expect("net"));
        assert_eq!(rules[0].matches, [first, Match::Dport(L4::Udp, 6784)]);
        assert_eq!(rules[0].action, Action::Verdict(Verdict::Accept));
        assert_eq!(rules[2].matches, [Match::Dport(L4::Udp, 6784)], "the rest is dropped");
        assert_eq!(rules[2].action, Action::Verdict(Verdict::Drop));
        let nobody = VxlanFilter { allowed: BTreeSet::new(), ..f };
        assert_eq!(nobody.table().rule_count(), 1, "without trusted peers, nobody");
    }
}
