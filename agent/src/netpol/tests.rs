//! The owner task over the recording kernel: watch events and endpoint changes in, programs
//! out; CNI ADD's wait.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::kernel::FakeKernel;
use super::*;
use crate::endpoints::record::{EndpointSummary, Kind as EndpointKind, PodRef};
use crate::policy::model::{Labels, Namespace, Pod, Policy};
use crate::policy::state::Change;
use crate::policy::tests::policy;

const NODE: &str = "n1";
const PATIENCE: Duration = Duration::from_secs(10);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 32, 0, last))
}

fn pod(name: &str, ips: Vec<IpAddr>) -> Pod {
    Pod {
        key: PodKey::new("ns", name),
        labels: Labels::from([("app".to_owned(), name.to_owned())]),
        ips,
        node: NODE.to_owned(),
        host_network: false,
        finished: false,
        ports: Vec::new(),
    }
}

fn deny_ingress(app: &str) -> Policy {
    policy(
        "ns",
        &format!("deny-{app}"),
        json!({"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Ingress"]}),
    )
}

fn endpoint(pod: &str, addr: IpAddr) -> EndpointSummary {
    EndpointSummary {
        id: format!("cni:{pod}"),
        kind: EndpointKind::Cni,
        netns: None,
        hostname: None,
        aliases: Vec::new(),
        addrs: vec![addr],
        mac: None,
        pod: Some(PodRef { namespace: "ns".into(), name: pod.into(), uid: String::new() }),
    }
}

struct Rig {
    handle: PolicyHandle,
    events: mpsc::Sender<Event>,
    feed: watch::Sender<Arc<Vec<EndpointSummary>>>,
    kernel: Arc<FakeKernel>,
    shutdown: CancellationToken,
}

impl Rig {
    fn start() -> Rig {
        let kernel = Arc::new(FakeKernel::default());
        let (feed, feed_rx) = watch::channel(Arc::new(Vec::new()));
        let (events, events_rx) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let cfg = NetpolConfig { node: NODE.to_owned(), check_every: Duration::from_millis(50) };
        let (handle, task) = owner(cfg, feed_rx, events_rx, kernel.clone(), shutdown.clone());
        tokio::spawn(task);
        Rig { handle, events, feed, kernel, shutdown }
    }

    async fn send(&self, e: Event) {
        self.events.send(e).await.expect("the owner runs");
    }

    /// Lists every kind: namespace `ns`, `pods`, `policies`.
    async fn list(&self, pods: Vec<Pod>, policies: Vec<Policy>) {
        let ns = Namespace { name: "ns".into(), labels: Labels::new() };
        self.send(Event::Namespace(Change::Resync(vec![ns]))).await;
        self.send(Event::Pod(Change::Resync(pods))).await;
        self.send(Event::Policy(Change::Resync(policies))).await;
    }

    /// Waits until the published state satisfies `f`.
    async fn until(&self, what: &str, f: impl Fn(&Programmed) -> bool) -> Arc<Programmed> {
        let mut rx = self.handle.programmed.clone();
        match tokio::time::timeout(PATIENCE, rx.wait_for(|p| f(p))).await {
            Ok(Ok(p)) => p.clone(),
            _ => panic!("{what}: not within {PATIENCE:?}; last {:?}", self.handle.programmed()),
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test]
async fn events_in_program_applied_after_every_kind_is_listed() {
    let r = Rig::start();
    r.list(vec![pod("web", vec![ip(2)]), pod("db", vec![ip(3)])], vec![deny_ingress("web")]).await;
    let p = r.until("first install", |p| p.installs >= 1).await;
    assert!(p.unlisted.is_empty());
    let first = r.kernel.applied.lock().expect("not poisoned")[0].clone();
    assert_eq!(
        first.ingress.keys().copied().collect::<Vec<_>>(),
        vec![ip(2)],
        "the first program already has everything listed: nothing went in half-read"
    );
    let web = &p.pods[&PodKey::new("ns", "web")];
    assert_eq!(web.ingress, vec![deny_ingress("web").key()]);
    assert!(p.pods[&PodKey::new("ns", "db")].ingress.is_empty());

    r.send(Event::Policy(Change::Apply(deny_ingress("db")))).await;
    r.until("db isolated", |p| !p.pods[&PodKey::new("ns", "db")].ingress.is_empty()).await;
    let last = r.kernel.last().expect("a program");
    assert_eq!(last.ingress.keys().copied().collect::<Vec<_>>(), vec![ip(2), ip(3)]);

    r.send(Event::Policy(Change::Delete(deny_ingress("web").key()))).await;
    r.until("web open", |p| p.pods[&PodKey::new("ns", "web")].ingress.is_empty()).await;
    let last = r.kernel.last().expect("a program");
    assert_eq!(last.ingress.keys().copied().collect::<Vec<_>>(), vec![ip(3)]);
}

#[tokio::test]
async fn nothing_is_programmed_before_every_kind_is_listed() {
    let r = Rig::start();
    let ns = Namespace { name: "ns".into(), labels: Labels::new() };
    r.send(Event::Namespace(Change::Resync(vec![ns]))).await;
    r.send(Event::Pod(Change::Resync(vec![pod("web", vec![ip(2)])]))).await;
    r.until("namespaces and pods listed", |p| p.unlisted == vec![Kind::NetworkPolicies]).await;
    assert_eq!(r.kernel.attempts.load(Ordering::SeqCst), 0);
    let e = r.handle.wait_programmed(&PodKey::new("ns", "web"), ip(2), DEBOUNCE).await;
    let msg = e.expect_err("not programmed").to_string();
    assert!(msg.contains("has not listed networkpolicies"), "{msg}");
    assert!(msg.contains("RBAC"), "{msg}");
}

#[tokio::test]
async fn a_new_pod_gets_its_address_from_the_endpoint_feed_and_cni_add_waits_for_it() {
    let r = Rig::start();
    // The API knows the pod and its labels, not yet its address.
    r.list(vec![pod("web", Vec::new())], vec![deny_ingress("web")]).await;
    r.until("first install", |p| p.installs >= 1).await;
    let key = PodKey::new("ns", "web");
    let waiting = {
        let h = r.handle.clone();
        let key = key.clone();
        tokio::spawn(async move { h.wait_programmed(&key, ip(9), PATIENCE).await })
    };
    r.feed.send_replace(Arc::new(vec![endpoint("web", ip(9))]));
    waiting.await.expect("no panic").expect("programmed");
    let last = r.kernel.last().expect("a program");
    assert_eq!(last.ingress.keys().copied().collect::<Vec<_>>(), vec![ip(9)]);
    assert_eq!(r.handle.programmed().pods[&key].ips, vec![ip(9)]);
}

#[tokio::test]
async fn cni_add_wait_times_out_naming_what_to_check() {
    let r = Rig::start();
    r.list(Vec::new(), Vec::new()).await;
    r.feed.send_replace(Arc::new(vec![endpoint("ghost", ip(5))]));
    let e = r
        .handle
        .wait_programmed(&PodKey::new("ns", "ghost"), ip(5), Duration::from_millis(300))
        .await
        .expect_err("the API never showed the pod");
    let msg = e.to_string();
    assert!(msg.contains("ns/ghost (10.32.0.5)"), "{msg}");
    assert!(msg.contains("has not seen this pod in the API"), "{msg}");
    assert!(msg.contains("list and watch pods"), "{msg}");
}

#[tokio::test]
async fn a_refused_program_is_retried_until_the_kernel_takes_it() {
    let r = Rig::start();
    r.kernel.failing.store(true, Ordering::SeqCst);
    r.list(vec![pod("web", vec![ip(2)])], vec![deny_ingress("web")]).await;
    let p = r.until("refusal published", |p| p.error.is_some()).await;
    assert_eq!(p.installs, 0);
    assert!(p.pods.is_empty(), "nothing is accounted for while the kernel refuses");
    r.kernel.failing.store(false, Ordering::SeqCst);
    let p = r.until("installed on a retry", |p| p.installs == 1).await;
    assert!(p.error.is_none());
    assert!(r.kernel.attempts.load(Ordering::SeqCst) >= 2);
    assert!(r.kernel.last().expect("a program").ingress.contains_key(&ip(2)));
}

#[tokio::test]
async fn an_unchanged_program_is_not_installed_again() {
    let r = Rig::start();
    r.list(vec![pod("web", vec![ip(2)])], vec![deny_ingress("web")]).await;
    r.until("first install", |p| p.installs == 1).await;
    // A label change no policy looks at: same program, the pod still accounted for.
    let mut relabelled = pod("web", vec![ip(2)]);
    relabelled.labels.insert("tier".into(), "front".into());
    r.send(Event::Pod(Change::Apply(relabelled))).await;
    r.send(Event::Pod(Change::Apply(pod("other", vec![ip(3)])))).await;
    r.until("other accounted", |p| p.pods.contains_key(&PodKey::new("ns", "other"))).await;
    assert_eq!(r.kernel.count(), 1, "the kernel already holds this program");
}

#[tokio::test]
async fn a_table_lost_from_the_kernel_is_written_again() {
    let r = Rig::start();
    r.list(vec![pod("web", vec![ip(2)])], vec![deny_ingress("web")]).await;
    r.until("first install", |p| p.installs == 1).await;
    // Checks that find the table as written write nothing (six of them in 300 ms).
    let mut rx = r.handle.programmed.clone();
    let again = tokio::time::timeout(Duration::from_millis(300), rx.wait_for(|p| p.installs > 1));
    assert!(again.await.is_err(), "an intact table was written again");
    r.kernel.lost.store(true, Ordering::SeqCst);
    let p = r.until("written again", |p| p.installs == 2).await;
    assert!(p.error.is_none());
    let applied = r.kernel.applied.lock().expect("not poisoned").clone();
    assert_eq!(applied[1], applied[0], "the same program, written again");
}
