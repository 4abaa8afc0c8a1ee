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
//! Policies that name the same peer (the same selectors, the same prefixes) or the same named
//! port share one set: the sets follow the policies' text, not the pods', so the shape stays
//! when pods come and go, and a thousand policies over a few selectors make a few sets.
//! [`Program::decide`] runs a program on one packet, so tests can hold it to `eval`. Pure.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;

use super::eval::Cluster;
use super::model::{
    Direction, Namespaces, Peer, Pod, Policy, PolicyKey, PortMatch, Protocol, Selector,
};

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
            addr_sets: HashMap::new(),
            service_sets: HashMap::new(),
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
    addr_sets: HashMap<AddrKey, SetId>,
    service_sets: HashMap<ServiceKey, SetId>,
}

/// What an address set stands for: two rules with equal keys match the same addresses.
#[derive(PartialEq, Eq, Hash)]
enum AddrKey {
    /// A pod peer; with no namespace selector, of the policy's own namespace.
    Pods {
        own: Option<String>,
        peer: Peer,
    },
    Prefixes(BTreeSet<IpNet>),
}

/// What a named-port set stands for: the port's name and protocol on the destinations (on
/// ingress, the pods the policy selects in its namespace; on egress, any pod).
#[derive(PartialEq, Eq, Hash)]
struct ServiceKey {
    targets: Option<(String, Selector)>,
    name: String,
    protocol: Protocol,
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
            Peer::Pods { namespaces, .. } => {
                let own = (*namespaces == Namespaces::Own).then(|| policy.namespace.clone());
                let set = self.pod_set(policy, peer, AddrKey::Pods { own, peer: peer.clone() });
                accepts(PeerMatch::In(set), ports)
            }
            Peer::Block { cidr, except } if except.is_empty() => {
                accepts(PeerMatch::In(self.prefix_set([*cidr].into())), ports)
            }
            Peer::Block { cidr, except } => {
                let excepted = self.prefix_set(except.iter().copied().collect());
                let inside = self.prefix_set([*cidr].into());
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

    /// The set of the pods a pod peer stands for, made once per distinct peer.
    fn pod_set(&mut self, policy: &Policy, peer: &Peer, key: AddrKey) -> SetId {
        if let Some(id) = self.addr_sets.get(&key) {
            return *id;
        }
        let set = self.peer_pods(policy, peer);
        self.add_addrs(key, set)
    }

    fn prefix_set(&mut self, prefixes: BTreeSet<IpNet>) -> SetId {
        let key = AddrKey::Prefixes(prefixes.clone());
        match self.addr_sets.get(&key) {
            Some(id) => *id,
            None => self.add_addrs(key, prefixes),
        }
    }

    /// The host prefixes of the pods a pod peer stands for: the pods of the namespaces it
    /// names that its selector matches.
    fn peer_pods(&self, policy: &Policy, peer: &Peer) -> BTreeSet<IpNet> {
        let Peer::Pods { namespaces, pods } = peer else { return BTreeSet::new() };
        let names: Vec<&str> = match namespaces {
            Namespaces::Own => vec![&policy.namespace],
            Namespaces::Matching(sel) => self
                .cluster
                .namespaces
                .values()
                .filter(|ns| sel.matches(&ns.labels))
                .map(|ns| ns.name.as_str())
                .collect(),
        };
        names
            .into_iter()
            .flat_map(|ns| self.cluster.pods_in(ns))
            .filter(|p| p.selectable() && pods.matches(&p.labels))
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
                    PortCond::Named(self.service_set(policy, d, name, p.protocol))
                }
            })
            .collect()
    }

    /// The named-port set of `name`/`protocol` for `policy` in `d`, made once per distinct
    /// destination selector, name and protocol.
    fn service_set(
        &mut self,
        policy: &Policy,
        d: Direction,
        name: &str,
        protocol: Protocol,
    ) -> SetId {
        let targets = (d == Direction::Ingress)
            .then(|| (policy.namespace.clone(), policy.pod_selector.clone()));
        let key = ServiceKey { targets, name: name.to_owned(), protocol };
        if let Some(id) = self.service_sets.get(&key) {
            return *id;
        }
        let set = self.named_ports(policy, d, name, protocol);
        self.program.services.push(set);
        let id = self.program.services.len() - 1;
        self.service_sets.insert(key, id);
        id
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
        let candidates: Box<dyn Iterator<Item = &Pod>> = match d {
            Direction::Ingress => Box::new(
                self.cluster
                    .pods_in(&policy.namespace)
                    .filter(|p| policy.pod_selector.matches(&p.labels)),
            ),
            Direction::Egress => Box::new(self.cluster.pods.values()),
        };
        let destinations = candidates.filter(|p| p.selectable());
        destinations
            .filter_map(|p| p.resolve(name, protocol).map(|n| (p, n)))
            .flat_map(|(p, n)| p.ips.iter().map(move |ip| (*ip, protocol, n)))
            .collect()
    }

    fn add_addrs(&mut self, key: AddrKey, set: BTreeSet<IpNet>) -> SetId {
        self.program.addrs.push(set);
        let id = self.program.addrs.len() - 1;
        self.addr_sets.insert(key, id);
        id
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
