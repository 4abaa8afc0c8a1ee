//! Kubernetes NetworkPolicy v1 as weft's own types, already validated: selectors with their
//! operators as an enum, `policyTypes` resolved into which directions a policy has, ports as
//! protocol plus number, range or name, ipBlocks as prefixes. Built by `parse` from the API's
//! objects; read by `eval`. No I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

pub type Labels = BTreeMap<String, String>;

/// A label selector. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    pub labels: Labels,
    pub expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    pub fn everything() -> Selector {
        Selector::default()
    }

    pub fn labels<const N: usize>(pairs: [(&str, &str); N]) -> Selector {
        let labels = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Selector { labels, expressions: Vec::new() }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|r| r.matches(labels))
    }
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            // As in Kubernetes: a missing key satisfies NotIn.
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// Which ports of a protocol a rule opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMatch {
    /// Every port of the protocol (`ports: [{protocol: UDP}]`).
    Any,
    /// `port` through `endPort` inclusive (`first == last` without `endPort`).
    Range { first: u16, last: u16 },
    /// A container port name, resolved on the destination pod with this protocol.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub protocol: Protocol,
    pub port: PortMatch,
}

/// Which namespaces a pod peer is drawn from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Namespaces {
    /// No `namespaceSelector`: the policy's own namespace.
    Own,
    Matching(Selector),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Pods matching `pods` (everything when `None`) in `namespaces`.
    Pods { namespaces: Namespaces, pods: Selector },
    /// Addresses in `cidr` but in none of `except`, pods or not.
    Block { cidr: IpNet, except: Vec<IpNet> },
}

/// One ingress or egress rule. `peers` empty: every peer; `ports` empty: every port and
/// protocol (the API's "missing or empty" both mean all).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub peers: Vec<Peer>,
    pub ports: Vec<Port>,
}

/// A NetworkPolicy. A direction is `None` when the policy does not apply to it
/// (`policyTypes`), and `Some(vec![])` when it isolates without allowing anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl Policy {
    pub fn rules(&self, d: Direction) -> Option<&[Rule]> {
        match d {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    pub fn key(&self) -> PolicyKey {
        PolicyKey { namespace: self.namespace.clone(), name: self.name.clone() }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A named container port of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    pub fn new(namespace: &str, name: &str) -> PodKey {
        PodKey { namespace: namespace.to_owned(), name: name.to_owned() }
    }
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What policy needs of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub key: PodKey,
    pub labels: Labels,
    pub ips: Vec<IpAddr>,
    pub node: String,
    /// Uses its node's addresses: never selected by pod selectors, only matched by ipBlock.
    pub host_network: bool,
    /// Succeeded or Failed: its addresses may already belong to another pod.
    pub finished: bool,
    pub ports: Vec<NamedPort>,
}

impl Pod {
    /// Whether selectors see this pod at all (as a target or as a pod peer).
    pub fn selectable(&self) -> bool {
        !self.host_network && !self.finished && !self.ips.is_empty()
    }

    /// The number `name` stands for on this pod with `protocol`.
    pub fn resolve(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports.iter().find(|p| p.name == name && p.protocol == protocol).map(|p| p.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}
