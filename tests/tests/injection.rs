//! Packets crafted on the underlay by a host that is not a peer: with a password, neither a
//! VXLAN packet nor a forged sleeve datagram reaches a pod; without one, sleeve still accepts a
//! datagram only from the address of the peer it claims to come from. Each test also shows its
//! crafted packets are well-formed (they do reach the pod where weft lets them), so a pass is
//! not for want of a valid packet.

use std::time::Duration;

use weft_e2e::*;

const T: Duration = Duration::from_secs(30);
const PORT: &str = "9999";
const STOP: &str = "STOP";

fn opts(nick: &str, extra: &[&str]) -> AgentOpts {
    let mut e = vec!["--nickname".to_owned(), nick.to_owned()];
    e.extend(extra.iter().map(|s| s.to_string()));
    AgentOpts { extra: e, ..AgentOpts::default() }
}

/// Agents on the first two hosts (h2 connects to h1); the third host stays a bare underlay
/// host, the attacker. Returns the agents, one pod on each, and the attacker's namespace.
fn two_peers_and_an_outsider(lab: &Lab, hosts: Vec<Netns>, extra: &[&str]) -> Setup {
    let mut hosts = hosts.into_iter();
    let h1 = Agent::start_in(hosts.next().expect("h1"), opts("h1", extra));
    let e2 = [extra, &[lab.ip(1)]].concat();
    let h2 = Agent::start_in(hosts.next().expect("h2"), opts("h2", &e2));
    let outsider = hosts.next().expect("h3");
    let (p1, p2) = (h1.pod("10.32.1.2/12"), h2.pod("10.32.2.2/12"));
    wait_until(T, "p1 to reach p2", || p1.ping("10.32.2.2"));
    Setup { h1, h2, p1, p2, outsider }
}

struct Setup {
    h1: Agent,
    h2: Agent,
    p1: Netns,
    p2: Netns,
    outsider: Netns,
}

fn pod_mac(pod: &Netns) -> String {
    let out = must(pod.cmd("ip").args(["-o", "link", "show", "eth0"]));
    let mut words = out.split_whitespace();
    words.find(|w| *w == "link/ether").and_then(|_| words.next()).expect("MAC of eth0").to_owned()
}

/// Runs `inject.py ARGS` in `ns`.
fn inject(ns: &Netns, args: &[&str]) {
    let tool = nettool().with_file_name("inject.py");
    must(ns.cmd("python3").arg(tool).args(args));
}

/// A forged VXLAN packet from `from` to h2, carrying `message` to p2.
fn vxlan(s: &Setup, lab: &Lab, from: &Netns, message: &str) {
    let mac = pod_mac(&s.p2);
    let args = ["vxlan", lab.ip(2), "6784", "0x776674", &mac, "10.32.1.2", "10.32.2.2", PORT];
    inject(from, &[&args[..], &[message]].concat());
}

/// A forged sleeve datagram from `from` to h2, claiming to come from h1, carrying `message` to p2.
fn sleeve(s: &Setup, lab: &Lab, from: &Netns, message: &str) {
    let (mac, n1, n2) = (pod_mac(&s.p2), s.h1.peer_name(), s.h2.peer_name());
    let args = ["sleeve", lab.ip(2), "6783", &n1, &n2, &mac, "10.32.1.2", "10.32.2.2", PORT];
    inject(from, &[&args[..], &[message]].concat());
}

/// What p2 receives on its UDP port while `work` runs. `work` is followed by a real datagram
/// from p1 through the overlay: it arrives after everything sent before it, so what has not
/// arrived by then was dropped.
fn received(s: &Setup, work: impl FnOnce()) -> Vec<String> {
    let rx = Server::start(&s.p2, &["udp-collect", PORT, STOP, "20"]);
    work();
    must(s.p1.cmd("python3").arg(nettool()).args(["udp-send", "10.32.2.2", PORT, STOP]));
    let got: Vec<String> = rx.result().split_whitespace().map(str::to_owned).collect();
    assert_eq!(got.last().map(String::as_str), Some(STOP), "p1's datagram reached p2: {got:?}");
    got
}

fn dropped_bad(a: &Agent) -> u64 {
    a.status().expect("status")["overlay"]["sleeve"]["dropped_bad"].as_u64().unwrap_or(0)
}

/// Issue 16, items 1 and 2: with a password (and no trusted subnets), an underlay host that is
/// not a peer cannot get a frame to a pod, neither through the VXLAN port nor through sleeve.
#[test]
fn with_a_password_crafted_vxlan_and_forged_sleeve_never_reach_a_pod() {
    let (lab, hosts) = Lab::new(3, 1500);
    let s = two_peers_and_an_outsider(&lab, hosts, &["--password", "s3cret"]);
    let bad_before = dropped_bad(&s.h2);
    let got = received(&s, || {
        for i in 0..3 {
            vxlan(&s, &lab, &s.outsider, &format!("VXLAN-FROM-OUTSIDER-{i}"));
            sleeve(&s, &lab, &s.outsider, &format!("SLEEVE-FROM-OUTSIDER-{i}"));
            // From a peer's own address, unencrypted, the datagram is no better.
            sleeve(&s, &lab, s.h1.host(), &format!("SLEEVE-PLAIN-FROM-H1-{i}"));
        }
    });
    assert_eq!(got, [STOP], "crafted packets reached the pod");
    // The overlay publishes its counters on its tick: poll.
    wait_until(Duration::from_secs(10), "h2's sleeve to count the forgeries it dropped", || {
        dropped_bad(&s.h2) >= bad_before + 3
    });
}

/// Issue 16, item 2, and the controls for the test above: without a password, the crafted
/// VXLAN packet and a sleeve datagram from h1's own address reach the pod (so both are
/// well-formed), while the same sleeve datagram from another address does not.
#[test]
fn sleeve_accepts_a_datagram_only_from_the_address_of_the_peer_it_claims() {
    let (lab, hosts) = Lab::new(3, 1500);
    let s = two_peers_and_an_outsider(&lab, hosts, &[]);
    let got = received(&s, || {
        sleeve(&s, &lab, &s.outsider, "SLEEVE-FROM-OUTSIDER");
        sleeve(&s, &lab, s.h1.host(), "SLEEVE-FROM-H1");
        vxlan(&s, &lab, &s.outsider, "VXLAN-WITHOUT-PASSWORD");
    });
    assert!(got.iter().any(|m| m == "SLEEVE-FROM-H1"), "a valid sleeve datagram arrives: {got:?}");
    assert!(got.iter().any(|m| m == "VXLAN-WITHOUT-PASSWORD"), "open VXLAN arrives: {got:?}");
    assert!(!got.iter().any(|m| m == "SLEEVE-FROM-OUTSIDER"), "forged source accepted: {got:?}");
}
