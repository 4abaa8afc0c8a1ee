//! The NetworkPolicy oracle: given the cluster's namespaces, pods and policies, may this
//! packet that opens a connection pass? The rules of Kubernetes v1 (docs/network-policy.md):
//! a pod is isolated in a direction when a policy of that direction selects it, and then
//! only what some such policy's rules allow passes (policies add up, none denies); both the
//! sender's egress and the receiver's ingress must allow; traffic between a pod and its own
//! node always passes; hostNetwork and finished pods are invisible to pod selectors.
//! The nftables program is checked against this, and the conformance test's expectations
//! come from it. Pure.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::model::{
    Direction, Namespace, Namespaces, Peer, Pod, PodKey, Policy, PolicyKey, Port, PortMatch,
    Protocol, Rule,
};

/// One end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Party {
    Pod(PodKey),
    /// A node's own address (kubelet probes, host processes).
    Node {
        name: String,
        ip: IpAddr,
    },
    /// Anything else: outside the cluster, or an address no known pod has.
    Ip(IpAddr),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub from: Party,
    pub to: Party,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// `direction` of the pod that is isolated there refused; `isolating` are the policies
    /// that select it in that direction (none of whose rules matched).
    Denied {
        direction: Direction,
        pod: PodKey,
        isolating: Vec<PolicyKey>,
    },
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        matches!(self, Verdict::Allowed)
    }
}

/// A consistent view of what policy depends on.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<PodKey, Pod>,
    pub policies: BTreeMap<PolicyKey, Policy>,
}

/// A resolved end: its address and, if it is a pod, the pod.
struct End<'a> {
    ip: Option<IpAddr>,
    pod: Option<&'a Pod>,
    node: Option<&'a str>,
}

impl Cluster {
    pub fn add_namespace(&mut self, ns: Namespace) {
        self.namespaces.insert(ns.name.clone(), ns);
    }

    pub fn add_pod(&mut self, pod: Pod) {
        self.pods.insert(pod.key.clone(), pod);
    }

    pub fn add_policy(&mut self, policy: Policy) {
        self.policies.insert(policy.key(), policy);
    }

    pub fn remove_namespace(&mut self, name: &str) {
        self.namespaces.remove(name);
    }

    pub fn remove_pod(&mut self, key: &PodKey) {
        self.pods.remove(key);
    }

    pub fn remove_policy(&mut self, key: &PolicyKey) {
        self.policies.remove(key);
    }

    /// The party an address stands for: a live pod's, else a node's (a hostNetwork pod's
    /// address is its node's), else just the address.
    pub fn party_of(&self, ip: IpAddr) -> Party {
        let live = self.pods.values().find(|p| p.selectable() && p.ips.contains(&ip));
        if let Some(p) = live {
            return Party::Pod(p.key.clone());
        }
        let host =
            self.pods.values().find(|p| p.host_network && !p.finished && p.ips.contains(&ip));
        match host {
            Some(p) => Party::Node { name: p.node.clone(), ip },
            None => Party::Ip(ip),
        }
    }

    /// The policies that select `pod` in `d` (empty: the pod is not isolated there).
    pub fn isolating(&self, pod: &Pod, d: Direction) -> Vec<&Policy> {
        if !pod.selectable() {
            return Vec::new();
        }
        let first = PolicyKey { namespace: pod.key.namespace.clone(), name: String::new() };
        self.policies
            .range(first..)
            .map(|(_, p)| p)
            .take_while(|p| p.namespace == pod.key.namespace)
            .filter(|p| p.rules(d).is_some() && p.pod_selector.matches(&pod.labels))
            .collect()
    }

    /// The pods of namespace `ns` (keys sort by namespace first).
    pub fn pods_in<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        let first = PodKey { namespace: ns.to_owned(), name: String::new() };
        self.pods.range(first..).map(|(_, p)| p).take_while(move |p| p.key.namespace == ns)
    }

    pub fn evaluate(&self, flow: &Flow) -> Verdict {
        let from = self.end(&flow.from);
        let to = self.end(&flow.to);
        if same_node(&from, &to) {
            return Verdict::Allowed;
        }
        let egress = from.pod.map(|p| (p, Direction::Egress, &to));
        let ingress = to.pod.map(|p| (p, Direction::Ingress, &from));
        for (pod, d, other) in egress.into_iter().chain(ingress) {
            let policies = self.isolating(pod, d);
            if policies.is_empty() {
                continue;
            }
            // Named ports are the destination pod's, in both directions.
            let dst = match d {
                Direction::Egress => other.pod,
                Direction::Ingress => Some(pod),
            };
            let allowed = policies.iter().any(|p| {
                let rules = p.rules(d).unwrap_or_default();
                rules.iter().any(|r| self.rule_matches(p, r, other, dst, flow))
            });
            if !allowed {
                let isolating = policies.iter().map(|p| p.key()).collect();
                return Verdict::Denied { direction: d, pod: pod.key.clone(), isolating };
            }
        }
        Verdict::Allowed
    }

    fn end<'a>(&'a self, party: &'a Party) -> End<'a> {
        match party {
            Party::Pod(key) => match self.pods.get(key) {
                Some(p) if p.host_network => {
                    End { ip: p.ips.first().copied(), pod: None, node: Some(&p.node) }
                }
                Some(p) if p.selectable() => {
                    End { ip: p.ips.first().copied(), pod: Some(p), node: Some(&p.node) }
                }
                _ => End { ip: None, pod: None, node: None },
            },
            Party::Node { name, ip } => End { ip: Some(*ip), pod: None, node: Some(name) },
            Party::Ip(ip) => End { ip: Some(*ip), pod: None, node: None },
        }
    }

    /// Whether `rule` of `policy` lets the traffic through: its peers include `other` and
    /// its ports include the flow's, with named ports looked up on `dst`.
    fn rule_matches(
        &self,
        policy: &Policy,
        rule: &Rule,
        other: &End<'_>,
        dst: Option<&Pod>,
        flow: &Flow,
    ) -> bool {
        let peer_ok =
            rule.peers.is_empty() || rule.peers.iter().any(|p| self.peer_matches(policy, p, other));
        let port_ok = rule.ports.is_empty()
            || rule.ports.iter().any(|p| port_matches(p, dst, flow.protocol, flow.port));
        peer_ok && port_ok
    }

    fn peer_matches(&self, policy: &Policy, peer: &Peer, other: &End<'_>) -> bool {
        match peer {
            Peer::Pods { namespaces, pods } => {
                let Some(pod) = other.pod else { return false };
                let ns_ok = match namespaces {
                    Namespaces::Own => pod.key.namespace == policy.namespace,
                    Namespaces::Matching(sel) => self
                        .namespaces
                        .get(&pod.key.namespace)
                        .is_some_and(|ns| sel.matches(&ns.labels)),
                };
                ns_ok && pods.matches(&pod.labels)
            }
            Peer::Block { cidr, except } => other
                .ip
                .is_some_and(|ip| cidr.contains(&ip) && !except.iter().any(|e| e.contains(&ip))),
        }
    }
}

fn same_node(a: &End<'_>, b: &End<'_>) -> bool {
    // Only pod <-> its node: between two pods of one node policy applies as anywhere.
    let (node_a, node_b) = match (a.node, b.node) {
        (Some(x), Some(y)) => (x, y),
        _ => return false,
    };
    node_a == node_b && (a.pod.is_none() != b.pod.is_none())
}

fn port_matches(port: &Port, dst: Option<&Pod>, protocol: Protocol, number: u16) -> bool {
    if port.protocol != protocol {
        return false;
    }
    match &port.port {
        PortMatch::Any => true,
        PortMatch::Range { first, last } => (*first..=*last).contains(&number),
        PortMatch::Named(name) => dst.and_then(|p| p.resolve(name, protocol)) == Some(number),
    }
}
