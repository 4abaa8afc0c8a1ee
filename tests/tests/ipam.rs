//! The shared IP allocation ring with real agents on a namespace underlay, ported from Weave's
//! 3xx scenarios: reuse after release, claims across peers and outside the range, claims after
//! persistence is wiped (320), rolling reset (330), rmpeer of a SIGKILLed owner (335),
//! observers (340, 350), separately seeded rings meeting (360), a range change (362),
//! persistence across a restart with an endpoint removed while down (370), explicit seeds (380).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use weft_e2e::*;

const T: Duration = Duration::from_secs(30);
/// Addresses in 10.32.0.0/12.
const RANGE_SIZE: u64 = 1 << 20;

/// `weft attach ADDR... --netns NS`; the addresses it printed, or the error.
fn attach(a: &Agent, ns: &Netns, addrs: &[&str]) -> Result<String, String> {
    let out = run(a.weft().arg("attach").args(addrs).arg("--netns").arg(ns.path()));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// A new namespace with one address from `a` (default subnet); returns it and the address.
fn pod(a: &Agent) -> (Netns, String) {
    let ns = Netns::new("p");
    let got = attach(a, &ns, &[]).unwrap_or_else(|e| panic!("attach on {}: {e}", a.name));
    (ns, got)
}

/// `weft attach` in the background (it may wait for address space).
fn attach_later(a: &Agent, ns: &Netns, addr: &str) -> Child {
    a.weft()
        .arg("attach")
        .arg(addr)
        .arg("--netns")
        .arg(ns.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning weft attach")
}

fn ip_of(cidr: &str) -> Ipv4Addr {
    cidr.split('/').next().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{cidr:?}"))
}

/// Each peer's (name, owned, reachable) in `a`'s ring.
fn shares(a: &Agent) -> Vec<(String, u64, bool)> {
    a.ipam()["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            (
                p["peer"].as_str().unwrap_or_default().to_owned(),
                p["owned"].as_u64().unwrap_or(0),
                p["reachable"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

/// The ranges ("first-last") `a` owns.
fn owned(a: &Agent) -> Vec<String> {
    serde_json::from_value(a.ipam()["owned"].clone()).unwrap_or_default()
}

fn in_ranges(ip: Ipv4Addr, ranges: &[String]) -> bool {
    ranges.iter().any(|r| {
        let (lo, hi) = r.split_once('-').unwrap_or(("", ""));
        let parse = |s: &str| s.parse::<Ipv4Addr>().unwrap_or_else(|_| panic!("range {r:?}"));
        let (lo, hi) = (parse(lo), parse(hi));
        lo <= ip && ip <= hi
    })
}

/// Waits until every agent's ring has exactly `owners` (by name), all reachable, covering
/// the whole range.
fn wait_converged(agents: &[&Agent], owners: &BTreeSet<String>) {
    for a in agents {
        wait_until(T, &format!("{}'s ring to have owners {owners:?}", a.name), || {
            let s = shares(a);
            let names: BTreeSet<String> = s.iter().map(|(n, _, _)| n.clone()).collect();
            names == *owners
                && s.iter().all(|(_, _, r)| *r)
                && s.iter().map(|(_, o, _)| o).sum::<u64>() == RANGE_SIZE
        });
    }
}

fn names(agents: &[&Agent]) -> BTreeSet<String> {
    agents.iter().map(|a| a.peer_name()).collect()
}

#[test]
fn addresses_are_reused_after_release_and_claims_work_across_peers() {
    let (lab, hosts) = Lab::new(2, 1500);
    let a = lab.agents(hosts, &[]);
    let (p1, first) = pod(&a[0]);
    must(a[0].weft().args(["detach", "--netns"]).arg(p1.path()));
    let (_p2, again) = pod(&a[0]);
    assert_eq!(again, first, "the released address is handed out again");

    // Both peers allocate in one small subnet: the space is shared, never doubly used.
    let mut seen = BTreeSet::new();
    let mut keep = Vec::new();
    for i in 0..6 {
        let ns = Netns::new("p");
        let got = attach(&a[i % 2], &ns, &["net:10.33.7.0/28"]).expect("allocation in a subnet");
        assert!(got.starts_with("10.33.7."), "{got}");
        assert!(seen.insert(got.clone()), "{got} handed out twice");
        keep.push(ns);
    }

    // A static address in the other peer's space is claimed from it.
    wait_converged(&[&a[0], &a[1]], &names(&[&a[0], &a[1]]));
    let theirs = owned(&a[1]);
    let first_theirs = ip_of(theirs[0].split('-').next().unwrap_or_default());
    let wanted = Ipv4Addr::from(u32::from(first_theirs) + 1000);
    let ns = Netns::new("p");
    let got = attach(&a[0], &ns, &[&format!("ip:{wanted}/12")]).expect("claim from the owner");
    assert_eq!(got, format!("{wanted}/12"));
    wait_until(T, "the claimed address to move to the claimer in both rings", || {
        in_ranges(wanted, &owned(&a[0])) && !in_ranges(wanted, &owned(&a[1]))
    });
    // A claim outside the range needs nobody.
    let out = Netns::new("p");
    assert_eq!(attach(&a[0], &out, &["ip:192.168.77.7/24"]).unwrap(), "192.168.77.7/24");
    // Claiming an address in use elsewhere is refused.
    let dup = Netns::new("p");
    let err = attach(&a[1], &dup, &[&format!("ip:{wanted}/12")]).unwrap_err();
    assert!(err.contains("in use") || err.contains(&a[0].peer_name()), "{err}");
}

/// Issue 13, item 1: with the default subnet in one peer's half, an attach on the other
/// peer right after the peers connect (the ring forms on that first request) must ask the
/// owner for space — in the default subnet and in another /24 of the same half, whose free
/// hint is stale right after the first grant — instead of failing with "no free address".
#[test]
fn attach_right_after_the_ring_forms_gets_space_from_the_owner() {
    let (lab, hosts) = Lab::new(2, 1500);
    let flags = ["--ipalloc-default-subnet", "10.2.2.0/24"];
    let a: Vec<Agent> = hosts
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let mut e = flags.to_vec();
            e.push(lab.ip(2 - i));
            let opts = AgentOpts {
                range: "10.2.0.0/16".into(),
                ..AgentOpts::nick(&format!("h{}", i + 1), &e)
            };
            Agent::start_in(h, opts)
        })
        .collect();
    wait_until(T, "the peers to connect", || reachable(&a[0], &a[1]) && reachable(&a[1], &a[0]));
    // The lower peer name seeds the first half (10.2.0.0/17, both subnets); the other asks.
    let asker = if a[0].peer_name() < a[1].peer_name() { &a[1] } else { &a[0] };
    let mut pods = Vec::new();
    for (subnet, want) in [("net:default", "10.2.2."), ("net:10.2.3.0/24", "10.2.3.")] {
        for _ in 0..2 {
            let ns = Netns::new("p");
            let got = attach(asker, &ns, &[subnet])
                .unwrap_or_else(|e| panic!("attach {subnet} on {}: {e}", asker.name));
            assert!(got.starts_with(want), "{subnet}: {got}");
            pods.push(ns);
        }
    }
}

#[test]
fn claims_after_wiping_persistence_get_the_same_addresses_back_320() {
    let (lab, hosts) = Lab::new(3, 1500);
    let names = ["02:00:00:00:03:01", "02:00:00:00:03:02", "02:00:00:00:03:03"];
    let mut a: Vec<Agent> = hosts
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let mut e = vec!["--name", names[i]];
            e.extend((1..=3).filter(|j| *j != i + 1).map(|j| lab.ip(j)));
            Agent::start_in(h, AgentOpts::nick(&format!("h{}", i + 1), &e))
        })
        .collect();
    let pods: Vec<(Netns, String)> = (0..3).map(|_| pod(&a[0])).collect();
    let others: Vec<String> = (0..3).map(|i| pod(&a[1 + i % 2]).1).collect();
    wait_converged(&[&a[0], &a[1], &a[2]], &names.iter().map(|s| s.to_string()).collect());

    // Host 1 loses everything it persisted, keeps its name and its running pods.
    a[0].stop();
    std::fs::remove_file(a[0].state_dir().join("weft.db")).expect("wiping the state");
    a[0].restart();
    wait_until(T, "the restarted peer to learn the ring again", || a[0].ipam()["state"] == "ready");
    for (ns, addr) in &pods {
        let got = attach(&a[0], ns, &[&format!("ip:{addr}")]).expect("claim after the wipe");
        assert_eq!(&got, addr, "the pod gets its address back");
    }
    // Nobody else hands those addresses out.
    for i in 0..6 {
        let (_ns, got) = pod(&a[1 + i % 2]);
        assert!(!pods.iter().any(|(_, p)| *p == got), "{got} was handed out twice");
        assert!(!others.contains(&got), "{got} was handed out twice");
    }
}

#[test]
fn a_rolling_reset_hands_all_space_over_330() {
    let (lab, hosts) = Lab::new(3, 1500);
    let mut a = lab.agents(hosts, &[]);
    for x in &a {
        pod(x);
    }
    wait_converged(&[&a[0], &a[1], &a[2]], &names(&[&a[0], &a[1], &a[2]]));
    for x in a.iter_mut() {
        let before = x.peer_name();
        x.reset();
        assert!(!x.state_dir().join("weft.db").exists(), "reset removes the state");
        let links = must(x.host().cmd("ip").args(["-o", "link", "show"]));
        assert!(!links.contains(": weft:"), "reset removes the bridge: {links}");
        x.restart();
        assert_ne!(x.peer_name(), before, "a reset peer comes back as a new peer");
        pod(x);
    }
    // Every address belongs to one of the three current peers, all reachable: nothing was
    // left with a peer that is gone.
    wait_converged(&[&a[0], &a[1], &a[2]], &names(&[&a[0], &a[1], &a[2]]));
    for x in &a {
        assert_eq!(x.ipam()["unreachable"], 0, "{}", x.ipam());
    }
}

#[test]
fn rmpeer_takes_over_the_space_of_a_killed_peer_335() {
    let (lab, hosts) = Lab::new(3, 1500);
    let mut a = lab.agents(hosts, &[]);
    let (_p3, on_h3) = pod(&a[2]);
    for x in &a[..2] {
        pod(x);
    }
    let all = names(&[&a[0], &a[1], &a[2]]);
    wait_converged(&[&a[0], &a[1], &a[2]], &all);
    let h3 = a[2].peer_name();
    let h3_share = shares(&a[0]).iter().find(|s| s.0 == h3).map(|s| s.1).unwrap_or(0);
    assert!(h3_share > 0);
    let h3_ranges = owned(&a[2]);

    let err = must_fail(a[0].weft().args(["rmpeer", "h2"]));
    assert!(err.contains("reachable"), "rmpeer of a live peer is refused: {err}");

    a[2].kill9();
    wait_until(T, "h3's space to be reported unreachable", || {
        a[0].ipam()["unreachable"].as_u64() == Some(h3_share)
    });
    // A claim of an address h3 owns waits while h3 is unreachable...
    let wanted = Ipv4Addr::from(u32::from(ip_of(&on_h3)) + 7);
    assert!(in_ranges(wanted, &h3_ranges));
    let ns = Netns::new("p");
    let claim = attach_later(&a[0], &ns, &format!("ip:{wanted}/12"));
    wait_until(T, "the claim to be pending", || {
        a[0].ipam()["pending_claims"].as_array().is_some_and(|c| !c.is_empty())
    });
    // ... and completes once the space is taken over.
    let out = must(a[0].weft().args(["rmpeer", "h3"]));
    assert_eq!(out.trim(), format!("{h3_share} addresses taken over from h3"));
    let done = claim.wait_with_output().expect("attach");
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert_eq!(String::from_utf8_lossy(&done.stdout).trim(), format!("{wanted}/12"));
    let live = names(&[&a[0], &a[1]]);
    wait_converged(&[&a[0], &a[1]], &live);
    assert!(in_ranges(ip_of(&on_h3), &owned(&a[0])), "h1 owns what h3 owned");
}

#[test]
fn observers_do_not_vote_340() {
    let (lab, hosts) = Lab::new(3, 1500);
    let mut hosts = hosts.into_iter();
    let h1 = Agent::start_in(
        hosts.next().unwrap(),
        AgentOpts::nick("h1", &["--ipalloc-init", "consensus=2", lab.ip(2), lab.ip(3)]),
    );
    let h2 = Agent::start_in(
        hosts.next().unwrap(),
        AgentOpts::nick("h2", &["--ipalloc-init", "observer", lab.ip(1), lab.ip(3)]),
    );
    wait_until(T, "h1 and h2 to connect", || h1.ipam().is_object() && reachable(&h1, &h2));
    let ns = Netns::new("p");
    let waiting = attach_later(&h1, &ns, "net:default");
    wait_until(T, "h1 to wait for a second elector", || {
        h1.ipam()["state"].as_str().is_some_and(|s| s.contains("awaiting consensus: 1 of 2"))
    });
    assert!(h1.ipam()["peers"].as_array().is_some_and(Vec::is_empty), "no ring yet");
    // A second voter makes the quorum.
    let h3 = Agent::start_in(
        hosts.next().unwrap(),
        AgentOpts::nick("h3", &["--ipalloc-init", "consensus=2", lab.ip(1), lab.ip(2)]),
    );
    let done = waiting.wait_with_output().expect("attach");
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let seeds: BTreeSet<String> =
        serde_json::from_value(h1.ipam()["ring_seeds"].clone()).unwrap_or_default();
    assert_eq!(seeds, names(&[&h1, &h3]), "the observer is not among the first owners");
    // The observer gets space by asking.
    let (_p, got) = pod(&h2);
    assert!(got.starts_with("10."), "{got}");
    wait_until(T, "the observer to own space", || !owned(&h2).is_empty());
}

fn reachable(a: &Agent, b: &Agent) -> bool {
    let name = b.peer_name();
    a.status().is_some_and(|s| {
        s["mesh"]["unicast"].as_array().is_some_and(|u| u.iter().any(|r| r[0] == name.as_str()))
    })
}

#[test]
fn an_observer_triggers_consensus_among_the_voters_350() {
    let (lab, hosts) = Lab::new(3, 1500);
    let a: Vec<Agent> = hosts
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            let init = if i == 2 { "observer" } else { "consensus=2" };
            let mut e = vec!["--ipalloc-init", init];
            e.extend((1..=3).filter(|j| *j != i + 1).map(|j| lab.ip(j)));
            Agent::start_in(h, AgentOpts::nick(&format!("h{}", i + 1), &e))
        })
        .collect();
    wait_until(T, "the observer to reach both voters", || {
        reachable(&a[2], &a[0]) && reachable(&a[2], &a[1])
    });
    assert!(a[0].ipam()["peers"].as_array().is_some_and(Vec::is_empty), "no ring before asked");
    let (_p, got) = pod(&a[2]);
    assert!(got.starts_with("10."), "{got}");
    let seeds: BTreeSet<String> =
        serde_json::from_value(a[2].ipam()["ring_seeds"].clone()).unwrap_or_default();
    assert_eq!(seeds, names(&[&a[0], &a[1]]));
    assert!(in_ranges(ip_of(&got), &owned(&a[2])), "the observer allocated from its own space");
}

#[test]
fn separately_seeded_rings_meeting_are_reported_and_nothing_breaks_360() {
    let (lab, hosts) = Lab::new(2, 1500);
    let mut hosts = hosts.into_iter();
    let h1 = Agent::start_in(hosts.next().unwrap(), AgentOpts::nick("h1", &[]));
    let h2 = Agent::start_in(hosts.next().unwrap(), AgentOpts::nick("h2", &[]));
    let (_p1, x) = pod(&h1);
    let (_p2, y) = pod(&h2);
    assert_eq!(x, y, "each formed a ring of its own");
    must(h1.weft().args(["connect", lab.ip(2)]));
    for (me, other) in [(&h1, &h2), (&h2, &h1)] {
        let them = other.peer_name();
        wait_until(T, "the mismatch to be reported", || {
            me.ipam()["mismatches"]
                .as_array()
                .is_some_and(|m| m.iter().any(|e| e[0] == them.as_str()))
        });
        let text = must(me.weft().args(["status", "ipam"]));
        assert!(text.contains("seeded by different peers"), "{text}");
    }
    // Both keep working on their own ring, stay connected, and say it once.
    let (_p3, z) = pod(&h1);
    assert_ne!(z, x);
    assert!(reachable(&h1, &h2) && reachable(&h2, &h1), "still connected");
    let conns = h1.status().expect("status")["mesh"]["connections"].clone();
    assert_eq!(conns.as_array().map(Vec::len), Some(1), "{conns}");
    assert_eq!(conns[0]["state"], "established", "{conns}");
    for a in [&h1, &h2] {
        let refused = a.log().matches("IP allocation message refused").count();
        assert_eq!(refused, 1, "the mismatch is logged once, not in a loop:\n{}", a.log());
        assert_eq!(shares(a).len(), 1, "the ring was not merged");
    }
}

#[test]
fn a_range_change_discards_the_persisted_ring_362() {
    let mut a = Agent::start(AgentOpts::nick("h1", &[]));
    let (_p, first) = pod(&a);
    assert!(first.starts_with("10.32."), "{first}");
    a.restart_with(AgentOpts { range: "10.40.0.0/16".into(), ..AgentOpts::nick("h1", &[]) });
    assert!(a.log().contains("range changed from 10.32.0.0/12 to 10.40.0.0/16"), "{}", a.log());
    let (_q, second) = pod(&a);
    assert!(second.starts_with("10.40."), "{second}");
    assert_eq!(owned(&a), vec!["10.40.0.0-10.40.255.255".to_owned()]);
    assert_eq!(a.ipam()["range"], "10.40.0.0/16");
}

#[test]
fn persistence_survives_a_restart_with_an_endpoint_removed_while_down_370() {
    let (lab, hosts) = Lab::new(2, 1500);
    let mut a = lab.agents(hosts, &[]);
    let (pa, addr_a) = pod(&a[0]);
    let (pb, addr_b) = pod(&a[0]);
    let (_pc, addr_c) = pod(&a[0]);
    pod(&a[1]);
    wait_converged(&[&a[0], &a[1]], &names(&[&a[0], &a[1]]));
    let ranges = owned(&a[0]);
    a[0].stop();
    drop(pb);
    a[0].restart();
    let eps = a[0].endpoints();
    let addrs: Vec<String> = eps
        .iter()
        .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    assert!(addrs.contains(&addr_a) && addrs.contains(&addr_c), "{addrs:?}");
    assert!(!addrs.contains(&addr_b), "the removed pod's address is released: {addrs:?}");
    assert_eq!(owned(&a[0]), ranges, "the ring came back from disk");
    let (_pd, d) = pod(&a[0]);
    assert_eq!(d, addr_b, "the freed address is the lowest free one");
    assert!(pa.ping(&ip_of(&addr_c).to_string()), "the surviving pods still talk");
}

#[test]
fn explicit_seeds_allocate_without_talking_380() {
    let (lab, hosts) = Lab::new(3, 1500);
    let (n1, n2, n3) = ("02:00:00:00:38:01", "02:00:00:00:38:02", "02:00:00:00:38:03");
    let seed = format!("seed={n1},{n2}");
    let mut hosts = hosts.into_iter();
    let h1 = Agent::start_in(
        hosts.next().unwrap(),
        AgentOpts::nick("h1", &["--name", n1, "--ipalloc-init", &seed]),
    );
    let h2 = Agent::start_in(
        hosts.next().unwrap(),
        AgentOpts::nick("h2", &["--name", n2, "--ipalloc-init", &seed]),
    );
    // Not connected, yet both allocate at once, from disjoint halves.
    let (_p1, x) = pod(&h1);
    let (_p2, y) = pod(&h2);
    assert!(x.starts_with("10.32."), "{x}");
    assert!(y.starts_with("10.40."), "{y}");
    must(h1.weft().args(["connect", lab.ip(2)]));
    wait_converged(&[&h1, &h2], &[n1.to_owned(), n2.to_owned()].into());
    assert!(h1.ipam()["mismatches"].as_array().is_some_and(Vec::is_empty));
    // A third peer, not a seed, asks for space.
    let h3 = Agent::start_in(
        hosts.next().unwrap(),
        AgentOpts::nick("h3", &["--name", n3, "--ipalloc-init", &seed, lab.ip(1), lab.ip(2)]),
    );
    let (_p3, z) = pod(&h3);
    assert!(z != x && z != y, "{z}");
    wait_converged(&[&h1, &h2, &h3], &[n1, n2, n3].iter().map(|s| s.to_string()).collect());
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

fn default_request() -> Vec<weft_api::v1::AddressRequest> {
    use weft_api::v1::{AddressRequest, Empty, address_request::Kind};
    vec![AddressRequest { kind: Some(Kind::DefaultSubnet(Empty {})) }]
}

async fn reserve(a: &Agent, id: &str) -> Result<Vec<String>, tonic::Status> {
    let mut c = weft_api::connect(&a.socket).await.expect("connect");
    let req =
        weft_api::v1::ReserveRequest { id: id.into(), addresses: default_request(), wait_ms: 0 };
    let reply = c.reserve(req).await?.into_inner();
    Ok(reply
        .addresses
        .iter()
        .filter_map(|n| ipnet::IpNet::try_from(n).ok())
        .map(|n| n.to_string())
        .collect())
}

async fn unreserve(a: &Agent, id: &str) -> bool {
    let mut c = weft_api::connect(&a.socket).await.expect("connect");
    let req = weft_api::v1::UnreserveRequest { id: id.into() };
    c.unreserve(req).await.expect("unreserve").into_inner().found
}

#[test]
fn reservations_hold_addresses_without_an_interface_and_survive_restarts() {
    let mut a = Agent::start(AgentOpts::nick("h1", &[]));
    let rt = rt();
    let x = rt.block_on(reserve(&a, "docker-1")).expect("reserve");
    assert_eq!(x.len(), 1);
    assert_eq!(rt.block_on(reserve(&a, "docker-1")).expect("again"), x, "idempotent");
    let y = rt.block_on(reserve(&a, "docker-2")).expect("reserve");
    assert_ne!(x, y);
    assert_eq!(a.status().expect("status")["endpoints"]["reserved"], 2);
    a.stop();
    a.restart();
    assert_eq!(rt.block_on(reserve(&a, "docker-1")).expect("after restart"), x, "persisted");
    assert!(rt.block_on(unreserve(&a, "docker-1")));
    assert!(!rt.block_on(unreserve(&a, "docker-1")), "released once");
    let (_p, attached) = pod(&a);
    assert_eq!(vec![attached], x, "the released address is handed out again");
    let ps = a.endpoints();
    let id = ps.iter().find(|e| e["kind"] == "attach").expect("attached")["id"].clone();
    let err = rt.block_on(reserve(&a, id.as_str().unwrap_or_default())).unwrap_err();
    assert!(err.message().contains("not a reservation"), "{err}");
}

/// Runs a command that must fail; returns its stderr.
fn must_fail(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}
