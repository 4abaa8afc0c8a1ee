//! The endpoint service over the recording fake dataplane and a real store in a temporary
//! directory: the ordering of ADD, DEL, CHECK, GC, reconciliation and the DEL queue, without
//! root and without a kernel.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::state::{AttachReserve, CniReserve, StateConfig};
use super::{CniAdd, Endpoints, Readiness, Started, start};
use crate::addr::{AddrRequest, Mac};
use crate::dataplane::fake::{Op, RecordingDataplane};
use crate::dataplane::host_ifname_for;
use crate::endpoints::error::EndpointError;
use crate::endpoints::record::{Kind, cni_id};
use crate::identity::PeerName;
use crate::ipam::{InitMode, IpamConfig};
use crate::mesh::gossip::GossipChannel;
use crate::store::Store;

/// The service under test. Dropping it ends the owner thread (its queue closes).
pub(crate) struct Rig {
    pub(crate) endpoints: Endpoints,
    pub(crate) dp: Arc<RecordingDataplane>,
    dir: tempfile::TempDir,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn me() -> PeerName {
    PeerName::new(0x0a0b0c0d0e0f).unwrap()
}

/// A started endpoint service that owns the whole range (seeded with itself), ready.
fn rig_in(dir: tempfile::TempDir, dp: Arc<RecordingDataplane>) -> Rig {
    let store = Arc::new(Store::open(dir.path()).unwrap());
    let cfg = StateConfig {
        bridge: "weft".into(),
        bridge_mac: Mac([0x02, 0, 0, 0, 0, 1]),
        mtu: 1450,
        firewall_table: "weft".into(),
        guarded_ports: vec![],
        dns_tcp_ports: vec![],
    };
    let ipam = IpamConfig {
        me: me(),
        incarnation: 1,
        range: "10.32.0.0/12".parse().unwrap(),
        default_subnet: "10.32.0.0/12".parse().unwrap(),
        mode: InitMode::Seed(vec![me()]),
    };
    // The gossip channel goes nowhere: a single peer has nobody to tell.
    let (_events_tx, events) = mpsc::channel(16);
    let (out, _out_rx) = mpsc::unbounded_channel();
    let channel = GossipChannel::new("ipam".into(), me(), events, out);
    let (_, ready) = watch::channel(Readiness { ready: true, reason: String::new() });
    let Started { endpoints, thread, .. } =
        start(store, dp.clone(), cfg, ipam, channel.sender(), ready).unwrap();
    Rig { endpoints, dp, dir, thread: Some(thread) }
}

pub(crate) fn rig() -> Rig {
    rig_in(tempfile::tempdir().unwrap(), Arc::new(RecordingDataplane::default()))
}

fn add(container: &str, netns: &str) -> CniAdd {
    CniAdd {
        reserve: CniReserve {
            container_id: container.into(),
            ifname: "eth0".into(),
            netns: PathBuf::from(netns),
            network: "weft".into(),
            mtu: None,
            hairpin: false,
            pod: None,
            requests: Vec::new(),
        },
        wait_ready: Duration::from_secs(2),
    }
}

/// The pods (the list also holds the bridge's gateway address, `weft:expose`).
async fn pods(e: &Endpoints) -> Vec<crate::endpoints::record::EndpointRecord> {
    e.list().await.unwrap().into_iter().filter(|r| r.kind == Kind::Cni).collect()
}

async fn used(e: &Endpoints) -> u64 {
    e.report().await.unwrap().1.used
}

#[tokio::test]
async fn a_failed_add_leaves_nothing_behind() {
    let r = rig();
    r.dp.fail_nth(Op::SetupEndpoint, 1);
    let err = r.endpoints.cni_add(add("c1", "/run/netns/p1")).await.unwrap_err();
    assert!(matches!(err, EndpointError::CheckFailed(_)), "{err}");
    assert!(pods(&r.endpoints).await.is_empty(), "no record");
    assert_eq!(used(&r.endpoints).await, 1, "the pod's address went back; the gateway stays");
    let host = host_ifname_for(&cni_id("c1", "eth0"));
    assert!(
        r.dp.calls().iter().any(|c| c.op == Op::TeardownEndpoint && c.subject == host),
        "the half-made interface is removed"
    );
    // The next ADD works and gets the address the failed one had.
    let ok = r.endpoints.cni_add(add("c1", "/run/netns/p1")).await.unwrap();
    assert_eq!(ok.record.addresses.len(), 1);
    assert_eq!(r.dp.links().len(), 1);
}

#[tokio::test]
async fn a_repeated_add_returns_the_same_endpoint() {
    let r = rig();
    let a = r.endpoints.cni_add(add("c1", "/run/netns/p1")).await.unwrap();
    let b = r.endpoints.cni_add(add("c1", "/run/netns/p1")).await.unwrap();
    assert_eq!(a.record.addresses, b.record.addresses);
    assert_eq!(pods(&r.endpoints).await.len(), 1);
    assert_eq!(used(&r.endpoints).await, 2, "one pod and the bridge's gateway address");
    // The runtime re-created the sandbox: same addresses, new namespace.
    let c = r.endpoints.cni_add(add("c1", "/run/netns/p1-again")).await.unwrap();
    assert_eq!(c.record.addresses, a.record.addresses);
    assert_eq!(c.record.netns.as_deref(), Some(std::path::Path::new("/run/netns/p1-again")));
}

#[tokio::test]
async fn add_refuses_bad_input_before_touching_anything() {
    let r = rig();
    r.dp.remove_netns(std::path::Path::new("/run/netns/gone"));
    let err = r.endpoints.cni_add(add("c1", "/run/netns/gone")).await.unwrap_err();
    assert!(matches!(err, EndpointError::Netns(_)), "{err}");
    let mut bad = add("c2", "/run/netns/p2");
    bad.reserve.ifname = "eth0/x".into();
    let err = r.endpoints.cni_add(bad).await.unwrap_err();
    assert!(matches!(err, EndpointError::Invalid { field: "ifname", .. }), "{err}");
    assert_eq!(r.dp.count(Op::SetupEndpoint), 0);
    assert_eq!(used(&r.endpoints).await, 0);
}

#[tokio::test]
async fn del_of_an_unknown_endpoint_succeeds_and_removes_a_leftover_interface() {
    let r = rig();
    assert!(!r.endpoints.cni_del("never-added", "eth0").await.unwrap());
    let host = host_ifname_for(&cni_id("never-added", "eth0"));
    assert!(r.dp.calls().iter().any(|c| c.op == Op::TeardownEndpoint && c.subject == host));
    r.endpoints.cni_add(add("c1", "/run/netns/p1")).await.unwrap();
    assert!(r.endpoints.cni_del("c1", "eth0").await.unwrap());
    assert!(!r.endpoints.cni_del("c1", "eth0").await.unwrap(), "DEL is idempotent");
    assert_eq!(used(&r.endpoints).await, 1, "only the gateway stays");
    assert!(r.dp.links().is_empty());
}

/// Item 22 of the robustness review: without a record, the interface name is only a 48-bit
/// hash of a caller-chosen id, so a DEL may remove it only if it was made for that id.
#[tokio::test]
async fn del_without_a_record_removes_only_an_interface_made_for_that_id() {
    use crate::dataplane::{Dataplane, EndpointSpec};
    let r = rig();
    let leftover = |owner: String, host_ifname: String| EndpointSpec {
        owner,
        bridge: "weft".into(),
        host_ifname,
        netns: "/run/netns/gone".into(),
        ifname: "eth0".into(),
        mtu: 1376,
        mac: None,
        addresses: vec![],
        routes: vec![],
        hairpin: false,
    };
    // Left by a crash for c1, whose record is gone.
    let mine = host_ifname_for(&cni_id("c1", "eth0"));
    r.dp.setup_endpoint(&leftover(cni_id("c1", "eth0"), mine.clone())).unwrap();
    // Made for somebody else, under the name a crafted id hashes to.
    let theirs = host_ifname_for(&cni_id("crafted", "eth0"));
    r.dp.setup_endpoint(&leftover(cni_id("someone", "eth0"), theirs.clone())).unwrap();
    assert!(!r.endpoints.cni_del("c1", "eth0").await.unwrap());
    assert!(!r.endpoints.cni_del("crafted", "eth0").await.unwrap());
    assert_eq!(r.dp.links().into_keys().collect::<Vec<_>>(), [theirs]);
}

#[tokio::test]
async fn del_keeps_the_record_when_the_kernel_refuses() {
    let r = rig();
    r.endpoints.cni_add(add("c1", "/run/netns/p1")).await.unwrap();
    r.dp.fail_nth(Op::TeardownEndpoint, 1);
    assert!(r.endpoints.cni_del("c1", "eth0").await.is_err());
    assert_eq!(pods(&r.endpoints).await.len(), 1, "retried by the runtime later");
    assert!(r.endpoints.cni_del("c1", "eth0").await.unwrap());
}

#[tokio::test]
async fn check_compares_the_record_and_the_kernel() {
    let r = rig();
    let a = r.endpoints.cni_add(add("c1", "/run/netns/p1")).await.unwrap();
    let netns = PathBuf::from("/run/netns/p1");
    r.endpoints.cni_check("c1", "eth0", &netns, a.record.addresses.clone()).await.unwrap();
    let other = vec!["10.40.0.9/12".parse().unwrap()];
    let err = r.endpoints.cni_check("c1", "eth0", &netns, other).await.unwrap_err();
    assert!(matches!(err, EndpointError::CheckFailed(_)), "{err}");
    r.dp.lose_link(&a.record.host_ifname);
    assert!(r.endpoints.cni_check("c1", "eth0", &netns, vec![]).await.is_err());
    let err = r.endpoints.cni_check("nope", "eth0", &netns, vec![]).await.unwrap_err();
    assert!(matches!(err, EndpointError::Unknown(_)), "{err}");
}

#[tokio::test]
async fn reconcile_releases_gone_pods_repairs_lost_interfaces_and_removes_strays() {
    let r = rig();
    let gone = r.endpoints.cni_add(add("c1", "/run/netns/p1")).await.unwrap();
    let lost = r.endpoints.cni_add(add("c2", "/run/netns/p2")).await.unwrap();
    r.dp.remove_netns(std::path::Path::new("/run/netns/p1"));
    r.dp.lose_link(&lost.record.host_ifname);
    r.dp.add_stray_link("vwf0123456789ab");
    r.endpoints.reconcile(true).await.unwrap();
    let ids: Vec<String> = pods(&r.endpoints).await.into_iter().map(|e| e.id).collect();
    assert_eq!(ids, vec![cni_id("c2", "eth0")], "the pod whose namespace went is released");
    let links = r.dp.links();
    assert!(links.contains_key(&lost.record.host_ifname), "the lost interface is set up again");
    assert!(!links.contains_key(&gone.record.host_ifname));
    assert!(
        r.dp.calls().iter().any(|c| c.op == Op::TeardownEndpoint && c.subject == "vwf0123456789ab"),
        "an interface no endpoint owns is removed"
    );
    assert_eq!(used(&r.endpoints).await, 2);
}

/// Found by the soak: a DEL that ran between reconcile's snapshot of the records and its lock
/// on the endpoint had its interface put back by the repair, and the next ADD in that
/// namespace failed with "eth0 already exists".
#[tokio::test]
async fn reconcile_does_not_repair_an_endpoint_deleted_after_its_snapshot() {
    let r = rig();
    let a = r.endpoints.cni_add(add("c1", "/run/netns/p1")).await.unwrap();
    let id = a.record.id.clone();
    // Hold the endpoint's lock as a DEL in progress does, and let reconcile reach it.
    let held = r.endpoints.inner.locks.lock(&id).await;
    let checks = r.dp.count(Op::CheckNetns);
    let reconcile = tokio::spawn({
        let e = r.endpoints.clone();
        async move { e.reconcile(false).await }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while r.dp.count(Op::CheckNetns) == checks {
        assert!(std::time::Instant::now() < deadline, "reconcile never checked the namespace");
        tokio::task::yield_now().await;
    }
    // What the DEL does under the lock: the interface goes, then the record.
    r.dp.lose_link(&a.record.host_ifname);
    let gone = id.clone();
    r.endpoints.inner.state.call(move |s| s.remove(&gone)).await.unwrap().unwrap();
    drop(held);
    reconcile.await.unwrap().unwrap();
    assert!(!r.dp.links().contains_key(&a.record.host_ifname), "the deleted interface stays gone");
    assert_eq!(r.dp.count(Op::SetupEndpoint), 1, "only the ADD set the endpoint up");
}

#[tokio::test]
async fn reconcile_keeps_pods_whose_namespace_cannot_be_opened_for_lack_of_fds() {
    let r = rig();
    let a = r.endpoints.cni_add(add("c1", "/run/netns/p1")).await.unwrap();
    r.endpoints.cni_add(add("c2", "/run/netns/p2")).await.unwrap();
    r.dp.fail_netns(std::path::Path::new("/run/netns/p1"), libc::EMFILE);
    r.dp.fail_netns(std::path::Path::new("/run/netns/p2"), libc::ENFILE);
    r.endpoints.reconcile(true).await.unwrap();
    assert_eq!(pods(&r.endpoints).await.len(), 2, "no pod is released on EMFILE/ENFILE");
    assert!(r.dp.links().contains_key(&a.record.host_ifname));
    assert_eq!(r.dp.count(Op::TeardownEndpoint), 0);
    assert_eq!(used(&r.endpoints).await, 3);
}

#[tokio::test]
async fn records_and_allocations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let dp = Arc::new(RecordingDataplane::default());
    let r = rig_in(dir, dp.clone());
    let a = r.endpoints.cni_add(add("c1", "/run/netns/p1")).await.unwrap();
    // Stopped as the daemon stops it: the owner finishes its queue, then the thread ends.
    let Rig { endpoints, thread, dir, .. } = r;
    endpoints.stop();
    thread.expect("a running owner").join().unwrap();
    drop(endpoints);
    assert_eq!(dir.path(), path);
    let r = rig_in(dir, dp);
    let list = pods(&r.endpoints).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].addresses, a.record.addresses);
    // A new pod does not get the address the first one holds.
    let b = r.endpoints.cni_add(add("c2", "/run/netns/p2")).await.unwrap();
    assert_ne!(b.record.addresses, a.record.addresses);
}

#[tokio::test]
async fn gc_releases_only_attachments_of_its_network_the_runtime_forgot() {
    let r = rig();
    r.endpoints.cni_add(add("keep", "/run/netns/p1")).await.unwrap();
    r.endpoints.cni_add(add("drop", "/run/netns/p2")).await.unwrap();
    let mut other = add("other-net", "/run/netns/p3");
    other.reserve.network = "elsewhere".into();
    r.endpoints.cni_add(other).await.unwrap();
    let valid = vec![("keep".to_owned(), "eth0".to_owned())];
    assert_eq!(r.endpoints.cni_gc("weft", &valid).await.unwrap(), 1);
    let mut ids: Vec<String> = pods(&r.endpoints).await.into_iter().map(|e| e.id).collect();
    ids.sort();
    assert_eq!(ids, vec![cni_id("keep", "eth0"), cni_id("other-net", "eth0")]);
}

#[tokio::test]
async fn queued_dels_are_carried_out_and_unreadable_ones_dropped() {
    let r = rig();
    r.endpoints.cni_add(add("c1", "/run/netns/p1")).await.unwrap();
    let queue = r.dir.path().join("cni-del-queue");
    std::fs::create_dir_all(&queue).unwrap();
    let req = weft_api::v1::CniDelRequest {
        container_id: "c1".into(),
        ifname: "eth0".into(),
        ..Default::default()
    };
    let file = queue.join(weft_api::del_queue_file_name("c1", "eth0"));
    std::fs::write(&file, prost::Message::encode_to_vec(&req)).unwrap();
    std::fs::write(queue.join("junk.del"), b"\xff\xff\xff").unwrap();
    std::fs::write(queue.join("unrelated.txt"), b"x").unwrap();
    assert_eq!(r.endpoints.drain_del_queue(&queue).await, 1);
    assert!(pods(&r.endpoints).await.is_empty());
    assert!(!file.exists() && !queue.join("junk.del").exists());
    assert!(queue.join("unrelated.txt").exists(), "only .del files are the queue's");
}

#[tokio::test]
async fn attach_detach_and_the_endpoint_feed() {
    let r = rig();
    let mut feed = r.endpoints.feed();
    let req = AttachReserve {
        id: "/run/netns/x".into(),
        netns: "/run/netns/x".into(),
        ifname: "ethwe".into(),
        requests: vec![AddrRequest::Default, AddrRequest::Subnet("10.33.0.0/24".parse().unwrap())],
        hostname: Some("db".into()),
        multicast_route: true,
    };
    let (rec, added) = r.endpoints.attach(req).await.unwrap();
    assert_eq!(added.len(), 2);
    let summary = feed.wait_for(|f| !f.is_empty()).await.unwrap().clone();
    assert_eq!(summary[0].kind, Kind::Attach);
    assert_eq!(summary[0].hostname.as_deref(), Some("db"));
    assert_eq!(summary[0].addrs, rec.addresses.iter().map(|a| a.addr()).collect::<Vec<_>>());
    let removed = r
        .endpoints
        .detach("/run/netns/x", vec![AddrRequest::Subnet("10.33.0.0/24".parse().unwrap())])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(r.dp.count(Op::RemoveAddresses), 1, "one address off a live interface");
    assert!(r.endpoints.set_hostname("/run/netns/x", None).await.unwrap());
    let summary = feed.wait_for(|f| f.first().is_some_and(|e| e.hostname.is_none())).await;
    assert_eq!(summary.unwrap()[0].addrs.len(), 1);
    assert!(r.endpoints.detach("/run/netns/x", vec![]).await.unwrap().is_some());
    assert!(r.endpoints.detach("/run/netns/x", vec![]).await.unwrap().is_none());
    assert!(r.dp.links().is_empty());
}

#[tokio::test]
async fn expose_programs_the_bridge_and_firewall_once_per_change() {
    let r = rig();
    let addrs = r.endpoints.expose(vec![], None).await.unwrap();
    assert_eq!(addrs.len(), 1);
    let table = r.dp.firewall().expect("the firewall table is installed");
    assert_eq!(table.rule_count(), 3, "masquerade of the range, and of the exposed subnet");
    let before = r.dp.count(Op::ApplyFirewall);
    r.endpoints.reconcile_bridge().await.unwrap();
    assert_eq!(r.dp.count(Op::ApplyFirewall), before, "an intact table is left alone");
    assert_eq!(r.endpoints.hide(vec![]).await.unwrap(), addrs);
    assert_eq!(r.dp.firewall().unwrap().rule_count(), 2);
}

#[tokio::test]
async fn pod_names_reach_the_report() {
    let r = rig();
    let mut req = add("c1", "/run/netns/p1");
    req.reserve.pod = Some(crate::endpoints::record::PodRef {
        namespace: "shop".into(),
        name: "web-1".into(),
        uid: "u1".into(),
    });
    let added = r.endpoints.cni_add(req).await.unwrap();
    r.endpoints.cni_add(add("c2", "/run/netns/p2")).await.unwrap();
    let (_, _, counts) = r.endpoints.report().await.unwrap();
    assert_eq!(counts.cni, 2);
    assert_eq!(
        counts.pods,
        vec![crate::endpoints::report::PodAddresses {
            namespace: "shop".into(),
            name: "web-1".into(),
            addresses: added.record.addresses.clone(),
        }]
    );
}

/// One undecodable endpoint record does not stop a start: it is moved aside and reported,
/// and the other records load with their addresses.
#[tokio::test]
async fn a_start_survives_an_undecodable_record_and_quarantines_it() {
    let dp = Arc::new(RecordingDataplane::default());
    let r = rig_in(tempfile::tempdir().unwrap(), dp.clone());
    let a = r.endpoints.cni_add(add("c1", "/run/netns/p1")).await.unwrap();
    let Rig { endpoints, thread, dir, .. } = r;
    endpoints.stop();
    thread.expect("a running owner").join().unwrap();
    drop(endpoints);
    {
        let store = Store::open(dir.path()).unwrap();
        let bad = crate::store::Op::Put(
            crate::store::Table::Endpoints,
            "broken".into(),
            b"not json".to_vec(),
        );
        store.write(&[bad]).unwrap();
    }
    let r = rig_in(dir, dp);
    let list = pods(&r.endpoints).await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].addresses, a.record.addresses);
    let (_, _, counts) = r.endpoints.report().await.unwrap();
    assert_eq!(counts.quarantined, vec!["broken".to_owned()]);
}

#[tokio::test]
async fn a_docker_endpoint_s_names_go_with_its_leave() {
    let r = rig();
    let mut feed = r.endpoints.feed();
    let t = Duration::from_secs(2);
    let subnet = r.endpoints.docker_pool(None).await.unwrap();
    let addr = r.endpoints.docker_request(subnet, None, t).await.unwrap();
    r.endpoints.docker_bind(addr, "ep1".into(), "net1".into()).await.unwrap();
    r.endpoints.docker_join("ep1", PathBuf::from("/run/netns/sb1")).await.unwrap();
    r.endpoints.docker_name("ep1", "web".into(), vec!["www".into(), "api".into()]).await.unwrap();
    let named = feed
        .wait_for(|f| f.iter().any(|e| e.hostname.as_deref() == Some("web")))
        .await
        .unwrap()
        .clone();
    let ep = named.iter().find(|e| e.kind == Kind::Docker).unwrap();
    assert_eq!(ep.aliases, vec!["www", "api"]);
    let rec = r.endpoints.docker_endpoint("ep1").await.unwrap().unwrap();
    assert_eq!(rec.aliases, vec!["www", "api"], "persisted with the record");
    assert!(r.endpoints.docker_leave("ep1").await.unwrap());
    let left = feed.wait_for(|f| !f.iter().any(|e| e.kind == Kind::Docker)).await;
    assert!(left.is_ok(), "the endpoint (and its names) left the feed");
    let rec = r.endpoints.docker_endpoint("ep1").await.unwrap().unwrap();
    assert_eq!((rec.hostname, rec.aliases), (None, Vec::<String>::new()), "a reservation again");
}
