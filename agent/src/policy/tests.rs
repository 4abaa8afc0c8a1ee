//! The scenarios of k8s-wave §2.4 (ported from the upstream e2e tests and Cyclonus) against
//! the evaluator, on the conformance lab's layout: namespaces x, y, z, pods a, b, c in each
//! (a on node n1, b on n2, c on n3), serving TCP and UDP on 80 and 81 with named ports
//! `serve-<port>-<proto>`. Each test states the whole expected matrix (81 pairs x 2 ports x
//! 2 protocols, loopback left out as upstream does) and prints every differing cell.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use serde_json::{Value, json};

use super::compile::{Packet, Program};
use super::eval::{Cluster, Flow, Party, Verdict};
use super::model::{Direction, NamedPort, Namespace, Pod, PodKey, PolicyKey, Protocol};
use super::parse;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const PORTS: [u16; 2] = [80, 81];
const PROTOCOLS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

fn pod_ip(ns: usize, pod: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 32, ns as u8 + 1, pod as u8 + 1))
}

fn node_ip(node: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 168, 0, node as u8 + 1))
}

fn labels(pairs: &[(&str, &str)]) -> super::model::Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn serving_ports() -> Vec<NamedPort> {
    let mut out = Vec::new();
    for port in [80, 81] {
        for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            let name = format!("serve-{port}-{}", protocol.name().to_lowercase());
            out.push(NamedPort { name, protocol, port });
        }
    }
    out
}

pub(crate) fn lab() -> Cluster {
    let mut c = Cluster::default();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        c.add_namespace(Namespace {
            name: (*ns).to_owned(),
            labels: labels(&[("kubernetes.io/metadata.name", ns)]),
        });
        for (j, pod) in PODS.iter().enumerate() {
            c.add_pod(Pod {
                key: PodKey::new(ns, pod),
                labels: labels(&[("pod", pod)]),
                ips: vec![pod_ip(i, j)],
                node: format!("n{}", j + 1),
                host_network: false,
                finished: false,
                ports: serving_ports(),
            });
        }
    }
    c
}

pub(crate) fn policy(namespace: &str, name: &str, spec: Value) -> super::model::Policy {
    let object = json!({"metadata": {"namespace": namespace, "name": name}, "spec": spec});
    let np = serde_json::from_value(object).expect("a NetworkPolicy");
    parse::policy(&np).expect("a valid policy")
}

pub(crate) fn with(policies: Vec<super::model::Policy>) -> Cluster {
    let mut c = lab();
    for p in policies {
        c.add_policy(p);
    }
    c
}

/// One cell of the matrix: source pod, destination pod, port, protocol.
struct Cell<'a> {
    from: &'a PodKey,
    to: &'a PodKey,
    port: u16,
    protocol: Protocol,
}

impl Cell<'_> {
    fn from(&self, ns: &str, pod: &str) -> bool {
        self.from.namespace == ns && self.from.name == pod
    }
    fn to(&self, ns: &str, pod: &str) -> bool {
        self.to.namespace == ns && self.to.name == pod
    }
    fn tcp(&self, port: u16) -> bool {
        self.protocol == Protocol::Tcp && self.port == port
    }
}

fn flow(from: &PodKey, to: &PodKey, port: u16, protocol: Protocol) -> Flow {
    Flow { from: Party::Pod(from.clone()), to: Party::Pod(to.clone()), protocol, port }
}

/// What the compiled programs of the source's and the destination's nodes decide.
fn compiled(c: &Cluster, programs: &BTreeMap<String, Program>, f: &Flow) -> bool {
    let (Party::Pod(from), Party::Pod(to)) = (&f.from, &f.to) else {
        panic!("pod to pod flows only")
    };
    let (a, b) = (&c.pods[from], &c.pods[to]);
    let packet = Packet { src: a.ips[0], dst: b.ips[0], protocol: f.protocol, port: f.port };
    programs[&a.node].decide(&packet) && programs[&b.node].decide(&packet)
}

fn programs(c: &Cluster) -> BTreeMap<String, Program> {
    let nodes: BTreeSet<&String> = c.pods.values().map(|p| &p.node).collect();
    nodes.into_iter().map(|n| (n.clone(), Program::compile(c, n))).collect()
}

/// Every pair, port and protocol against `expect`, by the evaluator and by the programs
/// compiled for each node; panics listing the cells that differ.
fn assert_matrix(c: &Cluster, expect: impl Fn(&Cell<'_>) -> bool) {
    let programs = programs(c);
    let keys: Vec<PodKey> =
        NAMESPACES.iter().flat_map(|ns| PODS.iter().map(move |p| PodKey::new(ns, p))).collect();
    let mut wrong = Vec::new();
    let mut cells = 0;
    for from in &keys {
        for to in keys.iter().filter(|k| *k != from) {
            for port in PORTS {
                for protocol in PROTOCOLS {
                    let cell = Cell { from, to, port, protocol };
                    let f = flow(from, to, port, protocol);
                    let want = expect(&cell);
                    cells += 1;
                    let evaluated = c.evaluate(&f).allowed();
                    for (by, got) in [("evaluator", evaluated), ("nft", compiled(c, &programs, &f))]
                    {
                        if got != want {
                            let want = if want { "allowed" } else { "denied" };
                            let proto = protocol.name();
                            wrong.push(format!("{by}: {from} -> {to} {proto}/{port}: want {want}"));
                        }
                    }
                }
            }
        }
    }
    assert_eq!(cells, 72 * 4);
    assert!(wrong.is_empty(), "{} of {cells} cells differ:\n{}", wrong.len(), wrong.join("\n"));
}

fn isolate_x_a_ingress(ingress: Value) -> super::model::Policy {
    policy("x", "x-a", json!({"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": ingress}))
}

#[test]
fn row01_no_policy_allows_everything() {
    assert_matrix(&lab(), |_| true);
}

#[test]
fn row02_default_deny_ingress_in_x() {
    let c = with(vec![policy("x", "deny", json!({"podSelector": {}, "policyTypes": ["Ingress"]}))]);
    assert_matrix(&c, |k| k.to.namespace != "x");
}

#[test]
fn row03_default_deny_both_directions_in_x() {
    let spec = json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]});
    let c = with(vec![policy("x", "deny", spec)]);
    assert_matrix(&c, |k| k.to.namespace != "x" && k.from.namespace != "x");
}

#[test]
fn row04_ingress_from_a_pod_selector_is_the_policys_namespace() {
    let c = with(vec![isolate_x_a_ingress(
        json!([{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]),
    )]);
    assert_matrix(&c, |k| !k.to("x", "a") || k.from("x", "b"));
}

#[test]
fn row05_ingress_from_a_namespace_selector() {
    let c = with(vec![isolate_x_a_ingress(json!([{"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}
    ]}]))]);
    assert_matrix(&c, |k| !k.to("x", "a") || k.from.namespace == "y");
}

#[test]
fn row06_empty_namespace_selector_is_every_pod() {
    let c = with(vec![isolate_x_a_ingress(json!([{"from": [{"namespaceSelector": {}}]}]))]);
    assert_matrix(&c, |_| true);
    // ... but not an address outside the cluster.
    let outside = Flow {
        from: Party::Ip("198.51.100.7".parse().expect("ip")),
        to: Party::Pod(PodKey::new("x", "a")),
        protocol: Protocol::Tcp,
        port: 80,
    };
    assert!(!c.evaluate(&outside).allowed());
}

#[test]
fn row07_two_peers_are_alternatives() {
    let c = with(vec![isolate_x_a_ingress(json!([{"from": [
        {"namespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}]}},
        {"podSelector": {"matchLabels": {"pod": "b"}}}
    ]}]))]);
    assert_matrix(&c, |k| !k.to("x", "a") || !k.from("x", "c"));
}

#[test]
fn row08_namespace_and_pod_selector_in_one_peer_must_both_match() {
    let c = with(vec![isolate_x_a_ingress(json!([{"from": [{
        "namespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}]},
        "podSelector": {"matchLabels": {"pod": "b"}}
    }]}]))]);
    assert_matrix(&c, |k| !k.to("x", "a") || k.from("y", "b") || k.from("z", "b"));
}

#[test]
fn row09_match_expressions_on_pod_and_namespace_labels() {
    let targets =
        json!({"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["c"]}]});
    let from_y = json!({
        "namespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["y"]}]},
        "podSelector": {"matchExpressions": [{"key": "pod", "operator": "Exists"}]}
    });
    let nobody = json!({"matchExpressions": [{"key": "pod", "operator": "DoesNotExist"}]});
    let c = with(vec![
        policy("x", "in-y", json!({"podSelector": targets, "ingress": [{"from": [from_y]}]})),
        // Selects no pod (all have the label): changes nothing.
        policy("y", "none", json!({"podSelector": nobody, "policyTypes": ["Ingress", "Egress"]})),
    ]);
    assert_matrix(&c, |k| k.to.namespace != "x" || k.to.name == "c" || k.from.namespace == "y");
}

fn from_y_on(ports: Value) -> Value {
    json!([{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}}}],
            "ports": ports}])
}

#[test]
fn row10_ports_restrict_a_rule() {
    let c = with(vec![isolate_x_a_ingress(from_y_on(json!([{"protocol": "TCP", "port": 81}])))]);
    assert_matrix(&c, |k| !k.to("x", "a") || (k.from.namespace == "y" && k.tcp(81)));
}

#[test]
fn row11_policies_add_up() {
    let c = with(vec![
        isolate_x_a_ingress(from_y_on(json!([{"protocol": "TCP", "port": 81}]))),
        policy(
            "x",
            "x-a-80",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
                   "ingress": from_y_on(json!([{"protocol": "TCP", "port": 80}]))}),
        ),
    ]);
    assert_matrix(&c, |k| {
        !k.to("x", "a") || (k.from.namespace == "y" && k.protocol == Protocol::Tcp)
    });
}

#[test]
fn row12_an_allow_all_rule_wins() {
    let c = with(vec![
        policy("x", "port-80", json!({"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]})),
        policy("x", "all", json!({"podSelector": {}, "ingress": [{}]})),
    ]);
    assert_matrix(&c, |_| true);
}

#[test]
fn row13_named_port_in_ingress() {
    let spec = json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]});
    let c = with(vec![policy("x", "named", spec)]);
    assert_matrix(&c, |k| k.to.namespace != "x" || k.tcp(81));
}

#[test]
fn row14_named_port_in_egress_is_resolved_on_the_destination() {
    let spec = json!({"podSelector": {}, "policyTypes": ["Egress"],
                      "egress": [{"ports": [{"port": "serve-80-tcp"}]}]});
    let c = with(vec![policy("x", "named", spec)]);
    assert_matrix(&c, |k| k.from.namespace != "x" || k.tcp(80));
    // DNS to a resolver outside is refused unless allowed.
    let dns = Flow {
        from: Party::Pod(PodKey::new("x", "a")),
        to: Party::Ip("10.96.0.10".parse().expect("ip")),
        protocol: Protocol::Udp,
        port: 53,
    };
    assert!(!c.evaluate(&dns).allowed());
}

#[test]
fn row15_named_port_with_the_wrong_protocol_matches_nothing() {
    let ingress = json!([{"ports": [{"protocol": "TCP", "port": "serve-80-udp"}]}]);
    let c = with(vec![isolate_x_a_ingress(ingress)]);
    assert_matrix(&c, |k| !k.to("x", "a"));
}

#[test]
fn row16_end_port_ranges() {
    let range = |protocol: &str, port: u16, end: u16| {
        isolate_x_a_ingress(
            json!([{"ports": [{"protocol": protocol, "port": port, "endPort": end}]}]),
        )
    };
    let c = with(vec![range("TCP", 80, 81)]);
    assert_matrix(&c, |k| !k.to("x", "a") || k.protocol == Protocol::Tcp);
    let c = with(vec![range("TCP", 79, 80)]);
    assert_matrix(&c, |k| !k.to("x", "a") || k.tcp(80));
    let c = with(vec![range("UDP", 80, 81)]);
    assert_matrix(&c, |k| !k.to("x", "a") || k.protocol == Protocol::Udp);
}

#[test]
fn row17_protocol_without_port_is_every_port() {
    let c = with(vec![isolate_x_a_ingress(json!([{"ports": [{"protocol": "TCP"}]}]))]);
    assert_matrix(&c, |k| !k.to("x", "a") || k.protocol == Protocol::Tcp);
}

#[test]
fn row18_udp_and_sctp_rules_never_open_tcp() {
    let c = with(vec![isolate_x_a_ingress(json!([{"ports": [{"protocol": "UDP", "port": 81}]}]))]);
    assert_matrix(&c, |k| !k.to("x", "a") || (k.protocol == Protocol::Udp && k.port == 81));
    let c = with(vec![isolate_x_a_ingress(json!([{"ports": [{"protocol": "SCTP", "port": 81}]}]))]);
    assert_matrix(&c, |k| !k.to("x", "a"));
    let sctp = flow(&PodKey::new("y", "b"), &PodKey::new("x", "a"), 81, Protocol::Sctp);
    assert!(c.evaluate(&sctp).allowed());
}

#[test]
fn row19_empty_egress_denies_egress_only() {
    let spec = json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                      "egress": []});
    let c = with(vec![policy("x", "no-egress", spec)]);
    assert_matrix(&c, |k| !k.from("x", "a"));
}

#[test]
fn row20_both_the_senders_egress_and_the_receivers_ingress_must_allow() {
    let egress = json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}},
                            "podSelector": {"matchLabels": {"pod": "a"}}}]}]});
    let ingress = json!({
        "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]},
        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}},
                               "podSelector": {"matchLabels": {"pod": "a"}}}]}]});
    let c = with(vec![policy("x", "out", egress), policy("y", "in", ingress)]);
    assert_matrix(&c, |k| {
        let into_y_ab = k.to("y", "a") || k.to("y", "b");
        if k.from("x", "a") { k.to("y", "a") } else { !into_y_ab }
    });
}

#[test]
fn row21_egress_to_one_address() {
    let spec = json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": format!("{}/32", pod_ip(1, 1))}}]}]});
    let c = with(vec![policy("x", "one", spec)]);
    assert_matrix(&c, |k| !k.from("x", "a") || k.to("y", "b"));
}

#[test]
fn row22_ip_block_except_and_a_second_policy_that_allows_it() {
    let x_b = pod_ip(0, 1);
    let spec = json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.32.0.0/16", "except": [format!("{x_b}/32")]}}]}]});
    let mut c = with(vec![policy("x", "wide", spec)]);
    assert_matrix(&c, |k| !k.from("x", "a") || !k.to("x", "b"));
    let spec = json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": format!("{x_b}/32")}}]}]});
    c.add_policy(policy("x", "x-b", spec));
    assert_matrix(&c, |_| true);
}

#[test]
fn row23_updates_in_place_and_deletion() {
    let mut c = with(vec![policy("x", "p", json!({"podSelector": {}, "ingress": [{}]}))]);
    assert_matrix(&c, |_| true);
    c.add_policy(policy("x", "p", json!({"podSelector": {}, "ingress": []})));
    assert_matrix(&c, |k| k.to.namespace != "x");
    c.policies.clear();
    assert_matrix(&c, |_| true);
}

#[test]
fn row24_label_changes_take_effect() {
    let allow = json!({"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]});
    let deny = json!({"podSelector": {"matchLabels": {"target": "isolated"}},
                      "policyTypes": ["Ingress"]});
    let mut c = with(vec![policy("x", "blue", allow), policy("y", "deny", deny)]);
    assert_matrix(&c, |k| k.to.namespace != "x");
    let z = c.namespaces.get_mut("z").expect("z");
    z.labels.insert("team".into(), "blue".into());
    assert_matrix(&c, |k| k.to.namespace != "x" || k.from.namespace == "z");
    let y_b = c.pods.get_mut(&PodKey::new("y", "b")).expect("y/b");
    y_b.labels.insert("target".into(), "isolated".into());
    assert_matrix(&c, |k| (k.to.namespace != "x" || k.from.namespace == "z") && !k.to("y", "b"));
}

#[test]
fn row25_own_node_always_passes_and_host_network_pods_are_only_addresses() {
    let deny = json!({"podSelector": {}, "policyTypes": ["Ingress"]});
    let mut c = with(vec![policy("x", "deny", deny)]);
    let to_x_a = |from: Party| Flow {
        from,
        to: Party::Pod(PodKey::new("x", "a")),
        protocol: Protocol::Tcp,
        port: 80,
    };
    // x/a runs on n1: n1's probes pass, n2's do not.
    assert!(c.evaluate(&to_x_a(Party::Node { name: "n1".into(), ip: node_ip(0) })).allowed());
    assert!(!c.evaluate(&to_x_a(Party::Node { name: "n2".into(), ip: node_ip(1) })).allowed());

    c.add_pod(Pod {
        key: PodKey::new("y", "host"),
        labels: labels(&[("pod", "host")]),
        ips: vec![node_ip(1)],
        node: "n2".into(),
        host_network: true,
        finished: false,
        ports: Vec::new(),
    });
    let every_pod = json!({"podSelector": {}, "ingress": [{"from": [
        {"namespaceSelector": {}, "podSelector": {}}]}]});
    c.add_policy(policy("x", "pods", every_pod));
    let host = Party::Pod(PodKey::new("y", "host"));
    assert_eq!(c.party_of(node_ip(1)), Party::Node { name: "n2".into(), ip: node_ip(1) });
    assert!(!c.evaluate(&to_x_a(host.clone())).allowed(), "pod selectors never match hostNetwork");
    let by_ip = json!({"podSelector": {}, "ingress": [{"from": [
        {"ipBlock": {"cidr": format!("{}/32", node_ip(1))}}]}]});
    c.add_policy(policy("x", "node2", by_ip));
    assert!(c.evaluate(&to_x_a(host)).allowed());
    // A hostNetwork pod is never a target either.
    let isolate_all = json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]});
    c.add_policy(policy("y", "all", isolate_all));
    let host_pod = c.pods.get(&PodKey::new("y", "host")).expect("pod");
    assert!(c.isolating(host_pod, Direction::Ingress).is_empty());
}

#[test]
fn row26_finished_pods_leave_the_selection_and_their_address() {
    let allow_b = json!([{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]);
    let mut c = with(vec![isolate_x_a_ingress(allow_b)]);
    let x_b = PodKey::new("x", "b");
    c.pods.get_mut(&x_b).expect("x/b").finished = true;
    // The finished pod's address now belongs to a new pod that no rule allows.
    c.add_pod(Pod {
        key: PodKey::new("x", "new"),
        labels: labels(&[("pod", "new")]),
        ips: vec![pod_ip(0, 1)],
        node: "n2".into(),
        host_network: false,
        finished: false,
        ports: Vec::new(),
    });
    assert_eq!(c.party_of(pod_ip(0, 1)), Party::Pod(PodKey::new("x", "new")));
    let new_to_a = flow(&PodKey::new("x", "new"), &PodKey::new("x", "a"), 80, Protocol::Tcp);
    assert!(!c.evaluate(&new_to_a).allowed());
    assert!(!c.evaluate(&flow(&x_b, &PodKey::new("x", "a"), 80, Protocol::Tcp)).allowed());
}

#[test]
fn a_denial_names_the_direction_and_the_isolating_policies() {
    let c = with(vec![isolate_x_a_ingress(json!([]))]);
    let v = c.evaluate(&flow(&PodKey::new("y", "a"), &PodKey::new("x", "a"), 80, Protocol::Tcp));
    let want = Verdict::Denied {
        direction: Direction::Ingress,
        pod: PodKey::new("x", "a"),
        isolating: vec![PolicyKey { namespace: "x".into(), name: "x-a".into() }],
    };
    assert_eq!(v, want);
}

#[test]
fn invalid_policies_are_refused_with_the_field() {
    let bad = [
        json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]}),
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "endPort": 80}]}]}),
        json!({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 80}]}]}),
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8",
            "except": ["192.168.0.0/16"]}}]}]}),
        json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "nonsense"}}]}]}),
        json!({"podSelector": {"matchExpressions": [{"key": "k", "operator": "In"}]}}),
        json!({"podSelector": {"matchExpressions": [{"key": "k", "operator": "Gt", "values": ["1"]}]}}),
        json!({"podSelector": {}, "policyTypes": ["Sideways"]}),
        json!({"podSelector": {}, "ingress": [{"from": [{}]}]}),
    ];
    for spec in bad {
        let object = json!({"metadata": {"namespace": "x", "name": "bad"}, "spec": spec.clone()});
        let np = serde_json::from_value(object).expect("a NetworkPolicy");
        let err = parse::policy(&np).expect_err(&spec.to_string());
        assert!(!err.to_string().is_empty());
    }
}

#[test]
fn policy_types_default_as_the_apiserver_does() {
    let p = policy("x", "p", json!({"podSelector": {}, "egress": [{}]}));
    assert!(p.ingress.is_some() && p.egress.is_some());
    let p = policy("x", "p", json!({"podSelector": {}, "egress": []}));
    assert!(p.ingress.is_some() && p.egress.is_none());
}

#[test]
fn pods_are_read_with_their_named_ports_and_phase() {
    let object = json!({
        "metadata": {"namespace": "x", "name": "a", "labels": {"pod": "a"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [
            {"name": "serve-80-tcp", "containerPort": 80},
            {"name": "serve-80-udp", "containerPort": 80, "protocol": "UDP"},
            {"containerPort": 9000}]}]},
        "status": {"phase": "Succeeded", "podIP": "10.32.1.1", "podIPs": [{"ip": "10.32.1.1"}]}
    });
    let pod = parse::pod(&serde_json::from_value(object).expect("a Pod")).expect("valid");
    assert_eq!(pod.ips, vec![pod_ip(0, 0)]);
    assert_eq!(pod.resolve("serve-80-udp", Protocol::Udp), Some(80));
    assert_eq!(pod.resolve("serve-80-udp", Protocol::Tcp), None);
    assert_eq!(pod.ports.len(), 2);
    assert!(pod.finished && !pod.selectable());
}

mod properties {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    use super::super::eval::Verdict;
    use super::super::model::Protocol;
    use super::{NAMESPACES, PODS, PORTS, compiled, flow, policy, programs, with};
    use crate::policy::model::PodKey;

    fn pod_selector() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(json!({})),
            prop::sample::select(PODS.to_vec()).prop_map(|p| json!({"matchLabels": {"pod": p}})),
            prop::sample::select(PODS.to_vec()).prop_map(|p| json!({"matchExpressions": [
                {"key": "pod", "operator": "NotIn", "values": [p]}]})),
        ]
    }

    fn peer() -> impl Strategy<Value = Value> {
        let ns = prop::sample::select(NAMESPACES.to_vec())
            .prop_map(|n| json!({"matchLabels": {"kubernetes.io/metadata.name": n}}));
        prop_oneof![
            pod_selector().prop_map(|s| json!({"podSelector": s})),
            (ns.clone(), pod_selector())
                .prop_map(|(n, s)| json!({"namespaceSelector": n, "podSelector": s})),
            ns.prop_map(|n| json!({"namespaceSelector": n})),
            Just(json!({"ipBlock": {"cidr": "10.32.0.0/16", "except": ["10.32.2.0/24"]}})),
        ]
    }

    fn port() -> impl Strategy<Value = Value> {
        prop_oneof![
            prop::sample::select(vec!["TCP", "UDP"]).prop_map(|p| json!({"protocol": p})),
            (79u16..=82).prop_map(|p| json!({"port": p})),
            Just(json!({"protocol": "UDP", "port": 80, "endPort": 81})),
            Just(json!({"port": "serve-81-tcp"})),
        ]
    }

    fn rule(peers: &'static str) -> impl Strategy<Value = Value> {
        (prop::collection::vec(peer(), 0..3), prop::collection::vec(port(), 0..3))
            .prop_map(move |(p, q)| json!({peers: p, "ports": q}))
    }

    fn spec() -> impl Strategy<Value = Value> {
        let types =
            prop::sample::select(vec![vec!["Ingress"], vec!["Egress"], vec!["Ingress", "Egress"]]);
        (pod_selector(), types, prop::collection::vec(rule("from"), 0..3), prop::collection::vec(rule("to"), 0..3))
            .prop_map(|(s, t, i, e)| json!({"podSelector": s, "policyTypes": t, "ingress": i, "egress": e}))
    }

    proptest! {
        /// Policies add up: a flow that another policy turns from allowed to denied was
        /// denied at a pod the new policy isolated for the first time.
        #[test]
        fn a_new_policy_only_denies_where_it_starts_isolation(
            specs in prop::collection::vec((prop::sample::select(NAMESPACES.to_vec()), spec()), 0..4),
            extra in (prop::sample::select(NAMESPACES.to_vec()), spec()),
        ) {
            let policies = specs.iter().enumerate().map(|(i, (ns, s))| policy(ns, &format!("p{i}"), s.clone()));
            let before = with(policies.collect());
            let mut after = before.clone();
            after.add_policy(policy(extra.0, "extra", extra.1.clone()));
            let keys: Vec<PodKey> = NAMESPACES.iter().flat_map(|n| PODS.iter().map(move |p| PodKey::new(n, p))).collect();
            for from in &keys {
                for to in &keys {
                    for port in PORTS {
                        for protocol in [Protocol::Tcp, Protocol::Udp] {
                            let f = flow(from, to, port, protocol);
                            if !before.evaluate(&f).allowed() {
                                continue;
                            }
                            if let Verdict::Denied { direction, pod, .. } = after.evaluate(&f) {
                                let p = before.pods.get(&pod).expect("pod");
                                prop_assert!(before.isolating(p, direction).is_empty(),
                                    "{from} -> {to} {}/{port} denied at {pod} {direction:?}, which was isolated before", protocol.name());
                            }
                        }
                    }
                }
            }
        }
    }

    proptest! {
        /// The programs compiled for the nodes decide every pod-to-pod packet as the evaluator.
        #[test]
        fn compiled_programs_agree_with_the_evaluator(
            specs in prop::collection::vec((prop::sample::select(NAMESPACES.to_vec()), spec()), 0..5),
        ) {
            let policies = specs.iter().enumerate().map(|(i, (ns, s))| policy(ns, &format!("p{i}"), s.clone()));
            let c = with(policies.collect());
            let programs = programs(&c);
            let keys: Vec<PodKey> = NAMESPACES.iter().flat_map(|n| PODS.iter().map(move |p| PodKey::new(n, p))).collect();
            for from in &keys {
                for to in keys.iter().filter(|k| *k != from) {
                    for port in [79, 80, 81, 82] {
                        for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                            let f = flow(from, to, port, protocol);
                            prop_assert_eq!(c.evaluate(&f).allowed(), compiled(&c, &programs, &f),
                                "{} -> {} {}/{}", from, to, protocol.name(), port);
                        }
                    }
                }
            }
        }
    }
}
