//! From the cluster's policies to the program one node enforces, in the shape nftables runs:
//! address sets and verdict maps instead of a rule per pod pair. Two base chains on the
//! forward hook, egress first: an accept in one base chain only hands the packet to the next,
//! while a drop is final, so a connection passes when the sender's egress and the receiver's
//! ingress both accept. In each, a map from a local isolated pod's address to the chain of the
//! policies that isolate it: one chain per distinct list of policies, shared by every pod they
//! select, so a new pod under known policies is one map element, not a new chain. That chain
//! jumps to the chain of each of its policies and drops what none accepts.
//! A policy chain has one rule per (peer, port) alternative. An ipBlock with `except` gets a
//! sub-chain whose first rule returns on the excepted addresses. Traffic between a pod and its
//! own node takes the input and output hooks, not forward, so it is never seen here.
//! [`Program::decide`] runs a program on one packet, so tests can hold it to `eval`. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::eval::Cluster;
use super::model::{Direction, Namespaces, Peer, Pod, Policy, PolicyKey, PortMatch, Protocol};

pub type SetId = usize;
pub type ChainId = usize;

/// Where a rule looks for the other end: the source address on ingress, the destination on
/// egress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMatch {
    Any,
    In(SetId),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortCond {
    Any,
    Protocol(Protocol),
    Range {
        protocol: Protocol,
        first: u16,
        last: u16,
    },
    /// (destination address, protocol, destination port) is in the set: named ports resolved
    /// on each pod that could be the destination.
    Named(SetId),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Accept,
    Return,
    Jump(ChainId),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub peer: PeerMatch,
    pub port: PortCond,
    pub action: Action,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    /// Ingress chains look at the source, egress chains at the destination.
    pub direction: Direction,
    pub rules: Vec<Rule>,
    /// A dispatch chain ends in a drop (counted per list of policies); others fall back to
    /// the caller.
    pub drop_at_end: bool,
    /// For a dispatch chain: the policies that isolate the pods it serves, whose rules it runs.
    pub isolated_by: Vec<PolicyKey>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Program {
    pub ingress: BTreeMap<IpAddr, ChainId>,
    pub egress: BTreeMap<IpAddr, ChainId>,
    pub chains: Vec<Chain>,
    /// Address sets (prefixes; a pod's address is a host prefix).
    pub addrs: Vec<BTreeSet<IpNet>>,
    /// Named-port sets: (address, protocol, port).
    pub services: Vec<BTreeSet<(IpAddr, Protocol, u16)>>,
}

impl Program {
    /// Everything but the contents of the sets and maps: two programs of the same shape differ
    /// only in elements, which can be changed in place.
    pub fn same_shape(&self, other: &Program) -> bool {
        self.chains == other.chains
            && self.addrs.len() == other.addrs.len()
            && self.services.len() == other.services.len()
    }
}

/// One packet that opens a connection, as the forward hook sees it.
#[derive(Clone, Copy, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl Program {
    /// The program for the pods of `node`.
    pub fn compile(cluster: &Cluster, node: &str) -> Program {
        let mut b = Builder {
            cluster,
            program: Program::default(),
            policy_chains: BTreeMap::new(),
            dispatch_chains: BTreeMap::new(),
        };
        // Chains are made in the order of the distinct lists of isolating policies, not of
        // the pods, so that a pod coming or going under known policies keeps the shape.
        let mut isolated: BTreeMap<(Vec<PolicyKey>, Direction), Vec<IpAddr>> = BTreeMap::new();
        let local = cluster.pods.values().filter(|p| p.node == node && p.selectable());
        for pod in local {
            for d in [Direction::Ingress, Direction::Egress] {
                let keys: Vec<PolicyKey> =
                    cluster.isolating(pod, d).iter().map(|p| p.key()).collect();
                if !keys.is_empty() {
                    isolated.entry((keys, d)).or_default().extend(&pod.ips);
                }
            }
        }
        for ((keys, d), ips) in isolated {
            let policies: Vec<&Policy> =
                keys.iter().filter_map(|k| cluster.policies.get(k)).collect();
            let chain = b.dispatch_chain(&policies, d);
            let map = match d {
                Direction::Ingress => &mut b.program.ingress,
                Direction::Egress => &mut b.program.egress,
            };
            map.extend(ips.into_iter().map(|ip| (ip, chain)));
        }
        b.program
    }

    /// Whether the packet passes both base chains.
    pub fn decide(&self, p: &Packet) -> bool {
        let egress = self.egress.get(&p.src).is_none_or(|c| self.run(*c, p, p.dst) == Some(true));
        let ingress = self.ingress.get(&p.dst).is_none_or(|c| self.run(*c, p, p.src) == Some(true));
        egress && ingress
    }

    /// Runs chain `id`: `Some(true)` accept, `Some(false)` drop, `None` fell off its end.
    fn run(&self, id: ChainId, p: &Packet, other: IpAddr) -> Option<bool> {
        let chain = &self.chains[id];
        for r in &chain.rules {
            if !self.peer_matches(&r.peer, other) || !self.port_matches(&r.port, p) {
                continue;
            }
            match r.action {
                Action::Accept => return Some(true),
                Action::Return => return None,
                Action::Jump(c) => {
                    if let Some(v) = self.run(c, p, other) {
                        return Some(v);
                    }
                }
            }
        }
        chain.drop_at_end.then_some(false)
    }

    fn peer_matches(&self, m: &PeerMatch, addr: IpAddr) -> bool {
        match m {
            PeerMatch::Any => true,
            PeerMatch::In(s) => self.addrs[*s].iter().any(|n| n.contains(&addr)),
        }
    }

    fn port_matches(&self, c: &PortCond, p: &Packet) -> bool {
        match c {
            PortCond::Any => true,
            PortCond::Protocol(proto) => *proto == p.protocol,
            PortCond::Range { protocol, first, last } => {
                *protocol == p.protocol && (*first..=*last).contains(&p.port)
            }
            PortCond::Named(s) => self.services[*s].contains(&(p.dst, p.protocol, p.port)),
        }
    }
}

struct Builder<'a> {
    cluster: &'a Cluster,
    program: Program,
    policy_chains: BTreeMap<(PolicyKey, Direction), ChainId>,
    dispatch_chains: BTreeMap<(Vec<PolicyKey>, Direction), ChainId>,
}

impl Builder<'_> {
    fn push_chain(&mut self, chain: Chain) -> ChainId {
        self.program.chains.push(chain);
        self.program.chains.len() - 1
    }

    /// The chain of the pods these policies isolate, built once however many pods they share.
    fn dispatch_chain(&mut self, policies: &[&Policy], d: Direction) -> ChainId {
        let keys: Vec<PolicyKey> = policies.iter().map(|p| p.key()).collect();
        if let Some(c) = self.dispatch_chains.get(&(keys.clone(), d)) {
            return *c;
        }
        let rules = policies
            .iter()
            .map(|p| Rule {
                peer: PeerMatch::Any,
                port: PortCond::Any,
                action: Action::Jump(self.policy_chain(p, d)),
            })
            .collect();
        let name = format!("isolated-{}-{}", direction_tag(d), self.dispatch_chains.len());
        let id = self.push_chain(Chain {
            name,
            direction: d,
            rules,
            drop_at_end: true,
            isolated_by: keys.clone(),
        });
        self.dispatch_chains.insert((keys, d), id);
        id
    }

    /// The chain of `policy` in `d`, built once however many pods it selects.
    fn policy_chain(&mut self, policy: &Policy, d: Direction) -> ChainId {
        if let Some(c) = self.policy_chains.get(&(policy.key(), d)) {
            return *c;
        }
        let mut rules = Vec::new();
        for (i, rule) in policy.rules(d).unwrap_or_default().iter().enumerate() {
            let ports = self.port_conds(policy, d, &rule.ports);
            if rule.peers.is_empty() {
                rules.extend(accepts(PeerMatch::Any, &ports));
            }
            for (j, peer) in rule.peers.iter().enumerate() {
                let name = format!("policy-{}-{}-r{i}p{j}", direction_tag(d), policy.key());
                rules.extend(self.peer_rules(policy, peer, &ports, name, d));
            }
        }
        let name = format!("policy-{}-{}", direction_tag(d), policy.key());
        let id = self.push_chain(Chain {
            name,
            direction: d,
            rules,
            drop_at_end: false,
            isolated_by: Vec::new(),
        });
        self.policy_chains.insert((policy.key(), d), id);
        id
    }

    fn peer_rules(
        &mut self,
        policy: &Policy,
        peer: &Peer,
        ports: &[PortCond],
        name: String,
        d: Direction,
    ) -> Vec<Rule> {
        match peer {
            Peer::Pods { .. } => {
                let set = self.add_addrs(self.peer_pods(policy, peer));
                accepts(PeerMatch::In(set), ports)
            }
            Peer::Block { cidr, except } if except.is_empty() => {
                accepts(PeerMatch::In(self.add_addrs([*cidr].into())), ports)
            }
            Peer::Block { cidr, except } => {
                let excepted = self.add_addrs(except.iter().copied().collect());
                let inside = self.add_addrs([*cidr].into());
                let mut sub = vec![Rule {
                    peer: PeerMatch::In(excepted),
                    port: PortCond::Any,
                    action: Action::Return,
                }];
                sub.extend(accepts(PeerMatch::In(inside), ports));
                let chain = self.push_chain(Chain {
                    name,
                    direction: d,
                    rules: sub,
                    drop_at_end: false,
                    isolated_by: Vec::new(),
                });
                vec![Rule {
                    peer: PeerMatch::Any,
                    port: PortCond::Any,
                    action: Action::Jump(chain),
                }]
            }
        }
    }

    /// The host prefixes of the pods a pod peer stands for.
    fn peer_pods(&self, policy: &Policy, peer: &Peer) -> BTreeSet<IpNet> {
        let Peer::Pods { namespaces, pods } = peer else { return BTreeSet::new() };
        let in_namespace = |p: &Pod| match namespaces {
            Namespaces::Own => p.key.namespace == policy.namespace,
            Namespaces::Matching(sel) => self
                .cluster
                .namespaces
                .get(&p.key.namespace)
                .is_some_and(|ns| sel.matches(&ns.labels)),
        };
        self.cluster
            .pods
            .values()
            .filter(|p| p.selectable() && in_namespace(p) && pods.matches(&p.labels))
            .flat_map(|p| p.ips.iter().map(|ip| IpNet::from(*ip)))
            .collect()
    }

    fn port_conds(
        &mut self,
        policy: &Policy,
        d: Direction,
        ports: &[super::model::Port],
    ) -> Vec<PortCond> {
        if ports.is_empty() {
            return vec![PortCond::Any];
        }
        ports
            .iter()
            .map(|p| match &p.port {
                PortMatch::Any => PortCond::Protocol(p.protocol),
                PortMatch::Range { first, last } => {
                    PortCond::Range { protocol: p.protocol, first: *first, last: *last }
                }
                PortMatch::Named(name) => {
                    let set = self.named_ports(policy, d, name, p.protocol);
                    self.program.services.push(set);
                    PortCond::Named(self.program.services.len() - 1)
                }
            })
            .collect()
    }

    /// (address, protocol, number) of every pod that could be the destination and has the
    /// named port: on ingress the policy's targets, on egress any live pod.
    fn named_ports(
        &self,
        policy: &Policy,
        d: Direction,
        name: &str,
        protocol: Protocol,
    ) -> BTreeSet<(IpAddr, Protocol, u16)> {
        let destinations = self.cluster.pods.values().filter(|p| {
            p.selectable()
                && match d {
                    Direction::Ingress => {
                        p.key.namespace == policy.namespace
                            && policy.pod_selector.matches(&p.labels)
                    }
                    Direction::Egress => true,
                }
        });
        destinations
            .filter_map(|p| p.resolve(name, protocol).map(|n| (p, n)))
            .flat_map(|(p, n)| p.ips.iter().map(move |ip| (*ip, protocol, n)))
            .collect()
    }

    fn add_addrs(&mut self, set: BTreeSet<IpNet>) -> SetId {
        self.program.addrs.push(set);
        self.program.addrs.len() - 1
    }
}

fn accepts(peer: PeerMatch, ports: &[PortCond]) -> Vec<Rule> {
    ports
        .iter()
        .map(|port| Rule { peer: peer.clone(), port: port.clone(), action: Action::Accept })
        .collect()
}

fn direction_tag(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "in",
        Direction::Egress => "out",
    }
}
