//! The Kubernetes calls of `weft agent --kube` against a real API server: ring seed race,
//! node registry, reclaim Lease compare-and-swap, the direct Node GET, the Node watch, and a
//! reclaim pass end to end, all in a namespace of their own (other users of the cluster are
//! not disturbed). Needs KUBECONFIG and WEFT_KUBE_TEST_NAMESPACE (an existing, empty
//! namespace); run with
//!   cargo test -p weft --test kube_api -- --ignored
//! e.g. against the lab: eval "$(scripts/k8s-lab.sh env)"; kubectl create ns weft-kubetest.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use weft::endpoints::ipam::ReclaimError;
use weft::identity::PeerName;
use weft::ipam::InitMode;
use weft::kube::api::KubeApi;
use weft::kube::client::KubeClient;
use weft::kube::reclaim::{Outcome, Reclaimer, Takeover, Why};
use weft::kube::{lease, registry, ring};

fn p(n: u8) -> PeerName {
    format!("00:00:00:00:00:{n:02x}").parse().expect("peer name")
}

async fn client() -> Arc<KubeClient> {
    let ns = std::env::var("WEFT_KUBE_TEST_NAMESPACE")
        .expect("set WEFT_KUBE_TEST_NAMESPACE to an empty namespace (and KUBECONFIG)");
    Arc::new(KubeClient::connect(ns).await.expect("connecting to the API server"))
}

#[derive(Default)]
struct Recorder(Mutex<Vec<PeerName>>);

#[async_trait::async_trait]
impl Takeover for Recorder {
    async fn rmpeer(&self, peer: PeerName) -> Result<u128, ReclaimError> {
        self.0.lock().expect("lock").push(peer);
        Ok(1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a Kubernetes API server: KUBECONFIG and WEFT_KUBE_TEST_NAMESPACE"]
async fn real_api_server() {
    let api = client().await;

    // The ring seed race: eight agents, one winner, all agree.
    let joins: Vec<_> = (1..=8u8)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(async move {
                ring::decide(api.as_ref(), p(i), &format!("gone-{i}")).await.expect("decide").mode
            })
        })
        .collect();
    let mut modes = Vec::new();
    for j in joins {
        modes.push(j.await.expect("task"));
    }
    assert!(matches!(&modes[0], InitMode::Seed(s) if s.len() == 1), "{modes:?}");
    assert!(modes.iter().all(|m| *m == modes[0]), "{modes:?}");

    // The registry under concurrent registration.
    let joins: Vec<_> = (1..=5u8)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(async move {
                registry::register(api.as_ref(), &format!("gone-{i}"), p(i)).await
            })
        })
        .collect();
    for j in joins {
        j.await.expect("task").expect("register");
    }
    assert_eq!(registry::read(api.as_ref()).await.expect("read").peers.len(), 5);

    // The Lease: one of many, then released.
    let now = 1_700_000_000;
    let joins: Vec<_> = (0..6)
        .map(|i| {
            let api = api.clone();
            tokio::spawn(async move { lease::acquire(api.as_ref(), &format!("a{i}"), now).await })
        })
        .collect();
    let mut held = Vec::new();
    for j in joins {
        if let Some(l) = j.await.expect("task").expect("acquire") {
            held.push(l);
        }
    }
    assert_eq!(held.len(), 1, "{held:?}");
    lease::release(api.as_ref(), &held[0]).await.expect("release");

    // The direct GET: a name no Node has is NotFound.
    assert!(!api.node_exists("weft-no-such-node").await.expect("get"));
    let nodes = api.list_nodes().await.expect("list");
    if let Some(n) = nodes.first() {
        assert!(api.node_exists(&n.name).await.expect("get"));
    }

    // The watch delivers the whole list.
    let shutdown = CancellationToken::new();
    let (mut rx, task) = api.watch_nodes(shutdown.clone());
    let watcher = tokio::spawn(task);
    let listed = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(Option::is_some))
        .await
        .expect("a Node list within 20 s")
        .expect("watch")
        .clone()
        .expect("list");
    assert_eq!(listed.len(), nodes.len());
    shutdown.cancel();
    watcher.await.expect("watcher");

    // A reclaim pass end to end: the gone-* "Nodes" do not exist, so the two agents left
    // (gone-1 and gone-2, pretending) take over 3..5, each exactly once, on the second pass.
    let recs = [Arc::new(Recorder::default()), Arc::new(Recorder::default())];
    let mut rs = [Reclaimer::new("gone-1".into(), p(1)), Reclaimer::new("gone-2".into(), p(2))];
    let empty = BTreeSet::new();
    for pass in 0..3 {
        for (r, rec) in rs.iter_mut().zip(&recs) {
            let out = r.pass(api.as_ref(), rec.as_ref(), &empty, now + pass).await.expect("pass");
            if pass == 0 {
                assert!(out.iter().all(|o| matches!(o, Outcome::Candidate(..))), "{out:?}");
            }
            for o in &out {
                if let Outcome::Reclaimed(_, why, _) = o {
                    assert!(matches!(why, Why::NodeDeleted(_)));
                }
            }
        }
    }
    let mut taken: Vec<PeerName> =
        recs.iter().flat_map(|r| r.0.lock().expect("lock").clone()).collect();
    taken.sort();
    // gone-1 and gone-2 are candidates for each other too (their "Nodes" do not exist
    // either); everything registered except the agent itself ends up reclaimed once.
    let mut uniq = taken.clone();
    uniq.dedup();
    assert_eq!(taken, uniq, "a peer was reclaimed twice: {taken:?}");
    assert!(taken.contains(&p(3)) && taken.contains(&p(4)) && taken.contains(&p(5)), "{taken:?}");
}
