//! The cluster as one agent learns it: the watches' events (namespaces, pods, policies, each
//! kind listed once and then changed object by object, or listed again after a relist) and
//! this node's own endpoints. A pod's address is known here at CNI ADD, before the API has
//! `status.podIPs`, so the endpoint feed's addresses win over the API's for the pods it
//! names. What the node must enforce ([`State::program`]) and what the status shows
//! ([`State::local_pods`]) are both derived from that merged view. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::compile::Program;
use super::eval::Cluster;
use super::model::{Direction, Namespace, Pod, PodKey, Policy, PolicyKey};

/// One change of one kind of object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<T, K> {
    Apply(T),
    Delete(K),
    /// The whole list, after the first listing or a relist: replaces every object of the kind.
    Resync(Vec<T>),
}

/// What the watches report, already parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Namespace(Change<Namespace, String>),
    Pod(Change<Pod, PodKey>),
    Policy(Change<Policy, PolicyKey>),
}

/// The kinds of object the state needs a listing of before it means anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespaces,
    Pods,
    NetworkPolicies,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespaces => "namespaces",
            Kind::Pods => "pods",
            Kind::NetworkPolicies => "networkpolicies",
        }
    }
}

/// A pod of this node as the program sees it: its addresses and the policies that isolate it
/// in each direction (none: not isolated there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub key: PodKey,
    pub ips: Vec<IpAddr>,
    pub ingress: Vec<PolicyKey>,
    pub egress: Vec<PolicyKey>,
}

#[derive(Debug, Default)]
pub struct State {
    api: Cluster,
    listed: [bool; 3],
    /// This node's pods' addresses, from the endpoint feed.
    local: BTreeMap<PodKey, Vec<IpAddr>>,
}

impl State {
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Namespace(c) => {
                self.change(c, Kind::Namespaces, |api| &mut api.namespaces, |n| n.name.clone())
            }
            Event::Pod(c) => self.change(c, Kind::Pods, |api| &mut api.pods, |p| p.key.clone()),
            Event::Policy(c) => {
                self.change(c, Kind::NetworkPolicies, |api| &mut api.policies, Policy::key)
            }
        }
    }

    fn change<T, K: Ord>(
        &mut self,
        change: Change<T, K>,
        kind: Kind,
        map: impl Fn(&mut Cluster) -> &mut BTreeMap<K, T>,
        key: impl Fn(&T) -> K,
    ) {
        let objects = map(&mut self.api);
        match change {
            Change::Apply(t) => {
                objects.insert(key(&t), t);
            }
            Change::Delete(k) => {
                objects.remove(&k);
            }
            Change::Resync(all) => {
                *objects = all.into_iter().map(|t| (key(&t), t)).collect();
                self.listed[kind as usize] = true;
            }
        }
    }

    /// Replaces this node's pod addresses; whether they changed.
    pub fn set_local(&mut self, local: BTreeMap<PodKey, Vec<IpAddr>>) -> bool {
        if self.local == local {
            return false;
        }
        self.local = local;
        true
    }

    /// The kinds not listed yet. Until each has been, the state is partial: enforcing it
    /// would drop policies the agent has not read yet.
    pub fn unlisted(&self) -> Vec<Kind> {
        [Kind::Namespaces, Kind::Pods, Kind::NetworkPolicies]
            .into_iter()
            .filter(|k| !self.listed[*k as usize])
            .collect()
    }

    pub fn synced(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }

    /// The API's view with this node's endpoint addresses in place of the API's for the pods
    /// the endpoint feed names (a pod without `status.podIPs` yet gets its address here). A
    /// pod the feed names but the API does not is left out: without its labels no selector
    /// can be decided for it. The feed is the truth for this node's addresses: one it gives a
    /// pod is no other pod's, whatever the API still says of a pod that is going (freed
    /// addresses are handed out again at once). A pod the API places on another node keeps
    /// the API's view: a sandbox of it left here is stale.
    pub fn cluster(&self, node: &str) -> Cluster {
        let mut c = self.api.clone();
        let claimed: BTreeSet<IpAddr> = self.local.values().flatten().copied().collect();
        for pod in c.pods.values_mut() {
            let here = self.local.get(&pod.key).filter(|ips| !ips.is_empty());
            match here {
                Some(ips) if pod.node.is_empty() || pod.node == node => {
                    pod.ips.clone_from(ips);
                    pod.node = node.to_owned();
                }
                _ => pod.ips.retain(|ip| !claimed.contains(ip)),
            }
        }
        c
    }

    pub fn program(&self, node: &str) -> Program {
        Program::compile(&self.cluster(node), node)
    }

    /// The pods of `node` the program accounts for, with their isolation.
    pub fn local_pods(&self, node: &str) -> Vec<LocalPod> {
        local_pods(&self.cluster(node), node)
    }
}

/// The live pods of `node` in `cluster`, with the policies isolating each.
pub fn local_pods(cluster: &Cluster, node: &str) -> Vec<LocalPod> {
    let keys = |p: &Pod, d| cluster.isolating(p, d).iter().map(|p| p.key()).collect();
    cluster
        .pods
        .values()
        .filter(|p| p.node == node && p.selectable())
        .map(|p| LocalPod {
            key: p.key.clone(),
            ips: p.ips.clone(),
            ingress: keys(p, Direction::Ingress),
            egress: keys(p, Direction::Egress),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use serde_json::json;

    use super::*;
    use crate::policy::model::Labels;
    use crate::policy::tests::policy;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 32, 0, last))
    }

    fn pod(ns: &str, name: &str, app: &str, node: &str, ips: Vec<IpAddr>) -> Pod {
        Pod {
            key: PodKey::new(ns, name),
            labels: Labels::from([("app".to_owned(), app.to_owned())]),
            ips,
            node: node.to_owned(),
            host_network: false,
            finished: false,
            ports: Vec::new(),
        }
    }

    fn namespace(name: &str) -> Namespace {
        Namespace { name: name.to_owned(), labels: Labels::new() }
    }

    fn deny_ingress(ns: &str, app: &str) -> Policy {
        policy(
            ns,
            &format!("deny-{app}"),
            json!({"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Ingress"]}),
        )
    }

    /// Every kind listed: `ns` with `pods` and `policies`.
    fn listed(pods: Vec<Pod>, policies: Vec<Policy>) -> State {
        let mut s = State::default();
        s.apply(Event::Namespace(Change::Resync(vec![namespace("ns")])));
        s.apply(Event::Pod(Change::Resync(pods)));
        s.apply(Event::Policy(Change::Resync(policies)));
        s
    }

    /// Review finding: IPAM hands a freed address out again at once, while the API may still
    /// list the pod that had it.
    #[test]
    fn an_address_the_feed_gives_a_new_pod_is_no_longer_the_going_pods() {
        let going = pod("ns", "old", "web", "n1", vec![ip(5)]);
        let new = pod("ns", "new", "db", "n1", Vec::new());
        let mut s = listed(vec![going, new], vec![deny_ingress("ns", "web")]);
        s.set_local(BTreeMap::from([(PodKey::new("ns", "new"), vec![ip(5)])]));
        let c = s.cluster("n1");
        assert_eq!(c.pods[&PodKey::new("ns", "new")].ips, vec![ip(5)]);
        assert!(c.pods[&PodKey::new("ns", "old")].ips.is_empty(), "not the going pod's any more");
        assert!(s.program("n1").ingress.is_empty(), "the new pod is not isolated by deny-web");
    }

    /// Review finding: a pod recreated on another node under the same name, while a stale
    /// sandbox of it is still here.
    #[test]
    fn a_pod_the_api_places_elsewhere_keeps_the_apis_view() {
        let moved = pod("ns", "web-0", "web", "n2", vec![ip(9)]);
        let mut s = listed(vec![moved], vec![deny_ingress("ns", "web")]);
        s.set_local(BTreeMap::from([(PodKey::new("ns", "web-0"), vec![ip(3)])]));
        let c = s.cluster("n1");
        let p = &c.pods[&PodKey::new("ns", "web-0")];
        assert_eq!((p.node.as_str(), p.ips.clone()), ("n2", vec![ip(9)]));
        assert!(s.program("n1").ingress.is_empty(), "not n1's to isolate");
    }

    #[test]
    fn not_synced_until_every_kind_is_listed() {
        let mut s = State::default();
        assert_eq!(s.unlisted(), vec![Kind::Namespaces, Kind::Pods, Kind::NetworkPolicies]);
        s.apply(Event::Policy(Change::Apply(deny_ingress("ns", "web"))));
        s.apply(Event::Pod(Change::Resync(Vec::new())));
        assert_eq!(s.unlisted(), vec![Kind::Namespaces, Kind::NetworkPolicies]);
        assert!(!s.synced());
        s.apply(Event::Namespace(Change::Resync(vec![namespace("ns")])));
        s.apply(Event::Policy(Change::Resync(Vec::new())));
        assert!(s.synced());
    }

    #[test]
    fn apply_delete_and_resync_change_the_program() {
        let web = pod("ns", "web", "web", "n1", vec![ip(2)]);
        let mut s = listed(vec![web.clone()], Vec::new());
        assert!(s.program("n1").ingress.is_empty(), "no policy: nothing isolated");

        s.apply(Event::Policy(Change::Apply(deny_ingress("ns", "web"))));
        assert!(s.program("n1").ingress.contains_key(&ip(2)));
        assert!(s.program("n2").ingress.is_empty(), "the pod is n1's, not n2's");

        s.apply(Event::Policy(Change::Delete(deny_ingress("ns", "web").key())));
        assert!(s.program("n1").ingress.is_empty());

        s.apply(Event::Policy(Change::Apply(deny_ingress("ns", "web"))));
        s.apply(Event::Policy(Change::Resync(vec![deny_ingress("ns", "db")])));
        assert!(s.program("n1").ingress.is_empty(), "the relist dropped deny-web");

        s.apply(Event::Pod(Change::Delete(web.key.clone())));
        s.apply(Event::Policy(Change::Apply(deny_ingress("ns", "web"))));
        assert!(s.program("n1").ingress.is_empty(), "the pod is gone");
    }

    #[test]
    fn the_endpoint_feed_gives_a_new_pod_its_address_before_the_api_does() {
        let web = pod("ns", "web", "web", "n1", Vec::new());
        let mut s = listed(vec![web.clone()], vec![deny_ingress("ns", "web")]);
        assert!(s.local_pods("n1").is_empty(), "without an address the pod is invisible");

        let local = BTreeMap::from([(web.key.clone(), vec![ip(7)])]);
        assert!(s.set_local(local.clone()));
        assert!(!s.set_local(local), "unchanged");
        assert_eq!(s.program("n1").ingress.keys().copied().collect::<Vec<_>>(), vec![ip(7)]);
        let pods = s.local_pods("n1");
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].ips, vec![ip(7)]);
        assert_eq!(pods[0].ingress, vec![deny_ingress("ns", "web").key()]);
        assert!(pods[0].egress.is_empty());
    }

    #[test]
    fn local_addresses_win_over_the_apis_and_unknown_pods_are_left_out() {
        let web = pod("ns", "web", "web", "", vec![ip(3)]);
        let mut s = listed(vec![web.clone()], vec![deny_ingress("ns", "web")]);
        s.set_local(BTreeMap::from([
            (web.key.clone(), vec![ip(4)]),
            (PodKey::new("ns", "unknown"), vec![ip(5)]),
        ]));
        let program = s.program("n1");
        assert_eq!(program.ingress.keys().copied().collect::<Vec<_>>(), vec![ip(4)]);
        let pods = s.local_pods("n1");
        assert_eq!(pods.iter().map(|p| p.key.clone()).collect::<Vec<_>>(), vec![web.key]);
    }

    #[test]
    fn egress_isolation_is_reported_per_direction() {
        let egress = policy(
            "ns",
            "no-out",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": []}),
        );
        let s = listed(
            vec![pod("ns", "a", "a", "n1", vec![ip(2)]), pod("ns", "b", "b", "n2", vec![ip(3)])],
            vec![egress.clone(), deny_ingress("ns", "a")],
        );
        let pods = s.local_pods("n1");
        assert_eq!(pods.len(), 1);
        assert_eq!(pods[0].egress, vec![egress.key()]);
        assert_eq!(pods[0].ingress, vec![deny_ingress("ns", "a").key()]);
    }
}
