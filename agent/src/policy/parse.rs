//! From the Kubernetes API's objects (k8s-openapi) to the policy model, once, at the edge.
//! The apiserver validates NetworkPolicies already; what it would reject is refused here too,
//! with the field that is wrong, so a policy weft cannot read is reported rather than half
//! enforced.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::networking::v1 as net;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::model::{
    NamedPort, Namespace, Namespaces, Peer, Pod, PodKey, Policy, Port, PortMatch, Protocol,
    Requirement, Rule, Selector,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("{field}: missing")]
    Missing { field: &'static str },
    #[error("{field}: {value:?} is not {expected}")]
    Invalid { field: &'static str, value: String, expected: &'static str },
}

fn invalid(field: &'static str, value: impl ToString, expected: &'static str) -> ParseError {
    ParseError::Invalid { field, value: value.to_string(), expected }
}

pub fn policy(p: &net::NetworkPolicy) -> Result<Policy, ParseError> {
    let namespace =
        p.metadata.namespace.clone().ok_or(ParseError::Missing { field: "metadata.namespace" })?;
    let name = p.metadata.name.clone().ok_or(ParseError::Missing { field: "metadata.name" })?;
    let spec = p.spec.as_ref().ok_or(ParseError::Missing { field: "spec" })?;
    let pod_selector = spec.pod_selector.as_ref().map(selector).transpose()?.unwrap_or_default();
    let (has_ingress, has_egress) = policy_types(spec)?;
    let ingress = match has_ingress {
        true => Some(rules(spec.ingress.iter().flatten().map(|r| (&r.from, &r.ports)))?),
        false => None,
    };
    let egress = match has_egress {
        true => Some(rules(spec.egress.iter().flatten().map(|r| (&r.to, &r.ports)))?),
        false => None,
    };
    Ok(Policy { namespace, name, pod_selector, ingress, egress })
}

/// `policyTypes`, or the apiserver's default when absent: Ingress always, Egress when there
/// are egress rules.
fn policy_types(spec: &net::NetworkPolicySpec) -> Result<(bool, bool), ParseError> {
    let Some(types) = &spec.policy_types else {
        return Ok((true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())));
    };
    let (mut ingress, mut egress) = (false, false);
    for t in types {
        match t.as_str() {
            "Ingress" => ingress = true,
            "Egress" => egress = true,
            other => return Err(invalid("spec.policyTypes", other, "Ingress or Egress")),
        }
    }
    Ok((ingress, egress))
}

type RawRule<'a> =
    (&'a Option<Vec<net::NetworkPolicyPeer>>, &'a Option<Vec<net::NetworkPolicyPort>>);

fn rules<'a>(raw: impl Iterator<Item = RawRule<'a>>) -> Result<Vec<Rule>, ParseError> {
    raw.map(|(peers, ports)| {
        Ok(Rule {
            peers: peers.iter().flatten().map(peer).collect::<Result<_, _>>()?,
            ports: ports.iter().flatten().map(port).collect::<Result<_, _>>()?,
        })
    })
    .collect()
}

fn peer(p: &net::NetworkPolicyPeer) -> Result<Peer, ParseError> {
    if let Some(block) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return Err(invalid("ipBlock", &block.cidr, "alone in its peer"));
        }
        let cidr = cidr(&block.cidr)?;
        let except = block.except.iter().flatten().map(|e| cidr_within(e, cidr));
        return Ok(Peer::Block { cidr, except: except.collect::<Result<_, _>>()? });
    }
    let namespaces = match &p.namespace_selector {
        Some(s) => Namespaces::Matching(selector(s)?),
        None => Namespaces::Own,
    };
    let pods = match (&p.pod_selector, &p.namespace_selector) {
        (Some(s), _) => selector(s)?,
        (None, Some(_)) => Selector::everything(),
        (None, None) => return Err(ParseError::Missing { field: "peer selector or ipBlock" }),
    };
    Ok(Peer::Pods { namespaces, pods })
}

fn cidr(s: &str) -> Result<IpNet, ParseError> {
    s.parse::<IpNet>().map_err(|_| invalid("ipBlock.cidr", s, "a CIDR"))
}

fn cidr_within(s: &str, outer: IpNet) -> Result<IpNet, ParseError> {
    let net = s.parse::<IpNet>().map_err(|_| invalid("ipBlock.except", s, "a CIDR"))?;
    match outer.contains(&net) {
        true => Ok(net),
        false => Err(invalid("ipBlock.except", s, "inside ipBlock.cidr")),
    }
}

fn port(p: &net::NetworkPolicyPort) -> Result<Port, ParseError> {
    let protocol = protocol(p.protocol.as_deref(), "ports.protocol")?;
    let port = match (&p.port, p.end_port) {
        (None, None) => PortMatch::Any,
        (None, Some(_)) => return Err(ParseError::Missing { field: "ports.port (with endPort)" }),
        (Some(IntOrString::String(name)), None) => PortMatch::Named(name.clone()),
        (Some(IntOrString::String(name)), Some(_)) => {
            return Err(invalid("ports.port", name, "a number when endPort is set"));
        }
        (Some(IntOrString::Int(n)), end) => {
            let first = port_number(*n, "ports.port")?;
            let last = end.map(|e| port_number(e, "ports.endPort")).transpose()?.unwrap_or(first);
            if last < first {
                return Err(invalid("ports.endPort", last, "at least ports.port"));
            }
            PortMatch::Range { first, last }
        }
    };
    Ok(Port { protocol, port })
}

fn port_number(n: i32, field: &'static str) -> Result<u16, ParseError> {
    u16::try_from(n).ok().filter(|p| *p > 0).ok_or_else(|| invalid(field, n, "in 1-65535"))
}

fn protocol(p: Option<&str>, field: &'static str) -> Result<Protocol, ParseError> {
    match p {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(invalid(field, other, "TCP, UDP or SCTP")),
    }
}

pub fn selector(s: &LabelSelector) -> Result<Selector, ParseError> {
    let labels = s.match_labels.clone().unwrap_or_default();
    let expressions = s.match_expressions.iter().flatten().map(requirement);
    Ok(Selector { labels, expressions: expressions.collect::<Result<_, _>>()? })
}

fn requirement(r: &LabelSelectorRequirement) -> Result<Requirement, ParseError> {
    let key = r.key.clone();
    let values = r.values.clone().unwrap_or_default();
    match (r.operator.as_str(), values.is_empty()) {
        ("In", false) => Ok(Requirement::In(key, values)),
        ("NotIn", false) => Ok(Requirement::NotIn(key, values)),
        ("Exists", true) => Ok(Requirement::Exists(key)),
        ("DoesNotExist", true) => Ok(Requirement::DoesNotExist(key)),
        ("In" | "NotIn", true) => Err(invalid("matchExpressions.values", &r.key, "non-empty")),
        ("Exists" | "DoesNotExist", false) => {
            Err(invalid("matchExpressions.values", &r.key, "empty for Exists/DoesNotExist"))
        }
        (op, _) => {
            Err(invalid("matchExpressions.operator", op, "In, NotIn, Exists or DoesNotExist"))
        }
    }
}

pub fn namespace(ns: &core::Namespace) -> Result<Namespace, ParseError> {
    let name = ns.metadata.name.clone().ok_or(ParseError::Missing { field: "metadata.name" })?;
    Ok(Namespace { name, labels: ns.metadata.labels.clone().unwrap_or_default() })
}

pub fn pod(p: &core::Pod) -> Result<Pod, ParseError> {
    let namespace = p
        .metadata
        .namespace
        .as_deref()
        .ok_or(ParseError::Missing { field: "metadata.namespace" })?;
    let name = p.metadata.name.as_deref().ok_or(ParseError::Missing { field: "metadata.name" })?;
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref());
    let ips = status
        .into_iter()
        .flat_map(|s| s.pod_ips.iter().flatten().map(|i| i.ip.as_str()).chain(s.pod_ip.as_deref()))
        .filter_map(|s| s.parse::<IpAddr>().ok());
    let mut addrs: Vec<IpAddr> = Vec::new();
    for ip in ips {
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    Ok(Pod {
        key: PodKey::new(namespace, name),
        labels: p.metadata.labels.clone().unwrap_or_default(),
        ips: addrs,
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        finished: matches!(phase, Some("Succeeded" | "Failed")),
        ports: spec.map(named_ports).unwrap_or_default(),
    })
}

/// The named container ports; a port with a protocol weft does not know is left out (it can
/// match no rule).
fn named_ports(spec: &core::PodSpec) -> Vec<NamedPort> {
    let ports = spec.containers.iter().flat_map(|c| c.ports.iter().flatten());
    ports
        .filter_map(|p| {
            let name = p.name.clone()?;
            let protocol = protocol(p.protocol.as_deref(), "containerPort.protocol").ok()?;
            let port = port_number(p.container_port, "containerPort").ok()?;
            Some(NamedPort { name, protocol, port })
        })
        .collect()
}
