//! The cross-host data plane with real agents on a namespace underlay: fastdp, fallback to
//! sleeve and back, relaying through partial connectivity, encryption, large packets with a
//! lowered underlay MTU, broadcast and multicast, isolation by subnet, and an agent restart
//! under a live TCP stream.

use std::time::{Duration, Instant};

use serde_json::Value;
use weft_e2e::*;

const T: Duration = Duration::from_secs(30);
const MIB10: &str = "10485760";

fn opts(nick: &str, extra: &[&str]) -> AgentOpts {
    let mut e = vec!["--nickname".to_owned(), nick.to_owned()];
    e.extend(extra.iter().map(|s| s.to_string()));
    AgentOpts { extra: e, ..AgentOpts::default() }
}

/// Starts agents on lab hosts: host 1 first, the others connecting to it.
fn agents(lab: &Lab, hosts: Vec<Netns>, extra: &[&str]) -> Vec<Agent> {
    let mut out = Vec::new();
    for (i, h) in hosts.into_iter().enumerate() {
        let mut e: Vec<&str> = extra.to_vec();
        if i > 0 {
            e.push(lab.ip(1));
        }
        out.push(Agent::start_in(h, opts(&format!("h{}", i + 1), &e)));
    }
    out
}

fn wait_mode(a: &Agent, peer: &str, mode: &str, within: Duration) -> Duration {
    let start = Instant::now();
    wait_until(within, &format!("the link to {peer} to use {mode}"), || {
        a.overlay_mode(peer).as_deref() == Some(mode)
    });
    start.elapsed()
}

/// 10 MiB from `from` to `to` (listening on `ip`) over TCP; returns the bytes received.
fn transfer(from: &Netns, to: &Netns, ip: &str, marker: &str) -> u64 {
    let server = Server::start(to, &["serve", "9000"]);
    let out = must(from.cmd("python3").arg(nettool()).args(["send", ip, "9000", MIB10, marker]));
    assert_eq!(out.trim(), MIB10, "sender");
    server.result().trim().parse().unwrap_or(0)
}

fn ping_big(from: &Netns, ip: &str) -> bool {
    run(from.cmd("ping").args(["-c2", "-W3", "-s", "10000", ip])).status.success()
}

#[test]
fn pods_on_three_hosts_talk_over_fastdp() {
    let (lab, hosts) = Lab::new(3, 1500);
    let a = agents(&lab, hosts, &[]);
    let pods: Vec<Netns> = (1..=3).map(|i| a[i - 1].pod(&format!("10.32.{i}.2/12"))).collect();
    for (i, p) in pods.iter().enumerate() {
        for j in 1..=3 {
            if j != i + 1 {
                let ip = format!("10.32.{j}.2");
                wait_until(T, &format!("pod {} to reach {ip}", i + 1), || p.ping(&ip));
            }
        }
    }
    assert_eq!(transfer(&pods[0], &pods[2], "10.32.3.2", ""), 10 << 20);
    assert!(ping_big(&pods[1], "10.32.1.2"), "ping -s 10000 over fastdp");
    for x in &a {
        let s = x.status().expect("status");
        let links = s["overlay"]["links"].as_array().expect("links").clone();
        assert_eq!(links.len(), 2, "{links:?}");
        assert!(links.iter().all(|l| l["mode"] == "fastdp"), "{links:?}");
    }
    let text = must(a[0].weft().args(["status", "connections"]));
    assert!(text.contains("fastdp"), "{text}");
    // The kernel counted the 10 MiB per peer: sent by host 1 to host 3 (data), received by
    // host 3 from host 1, and not to host 2 (a few heartbeats only). The report is published
    // every second: poll it.
    let link = |x: &Agent, to: &Agent| -> Value {
        let s = x.status().unwrap_or_default();
        let links = s["overlay"]["links"].as_array().cloned().unwrap_or_default();
        let peer = to.peer_name();
        links.into_iter().find(|l| l["peer"] == peer.as_str()).unwrap_or_default()
    };
    let bytes = |l: &Value, key: &str| l["fastdp_traffic"][key].as_u64().unwrap_or(0);
    wait_until(T, "host 1 to count 10 MiB of fastdp sent to host 3", || {
        bytes(&link(&a[0], &a[2]), "tx_bytes") > 10 << 20
    });
    wait_until(T, "host 3 to count 10 MiB of fastdp from host 1", || {
        bytes(&link(&a[2], &a[0]), "rx_bytes") > 10 << 20
    });
    let to_h2 = link(&a[0], &a[1]);
    assert!(bytes(&to_h2, "tx_bytes") < 1 << 20, "host 2 got no share of it: {to_h2}");
    assert!(bytes(&to_h2, "tx_packets") > 0, "but its heartbeats: {to_h2}");
}

fn nft(ns: &Netns, script: &str) {
    use std::io::Write;
    let mut c =
        ns.cmd("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().expect("nft");
    c.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("script");
    assert!(c.wait().expect("nft").success(), "nft rejected: {script}");
}

#[test]
fn blocked_fastdp_moves_to_sleeve_and_back() {
    let (lab, hosts) = Lab::new(2, 1500);
    let a = agents(&lab, hosts, &[]);
    let (p1, p2) = (a[0].pod("10.32.1.2/12"), a[1].pod("10.32.2.2/12"));
    let n2 = a[1].peer_name();
    wait_mode(&a[0], &n2, "fastdp", T);
    wait_until(T, "pod-to-pod", || p1.ping("10.32.2.2"));
    // Drop fastdp's UDP port on host 1, both ways.
    nft(
        a[0].host(),
        "table inet wtedrop {\n\
         chain o { type filter hook output priority 0; udp dport 6784 drop; }\n\
         chain i { type filter hook input priority 0; udp dport 6784 drop; }\n\
         }\n",
    );
    let took = wait_mode(&a[0], &n2, "sleeve", Duration::from_secs(10));
    eprintln!("moved to sleeve after {took:?}");
    // The status shows the switch as soon as it is decided; the kernel's forwarding entries
    // follow a moment later, so a packet sent in between may be lost.
    wait_until(Duration::from_secs(3), "traffic to flow over sleeve", || p1.ping("10.32.2.2"));
    assert_eq!(transfer(&p1, &p2, "10.32.2.2", ""), 10 << 20);
    must(a[0].host().cmd("nft").args(["delete", "table", "inet", "wtedrop"]));
    wait_mode(&a[0], &n2, "fastdp", T);
    assert!(p1.ping("10.32.2.2"));
}

#[test]
fn partial_connectivity_is_bridged_by_the_middle_host() {
    let (lab, mut hosts) = Lab::new(3, 1500);
    lab.cut(1, 3);
    let h3 = Agent::start_in(hosts.pop().expect("h3"), opts("h3", &[lab.ip(2)]));
    let h2 = Agent::start_in(hosts.pop().expect("h2"), opts("h2", &[lab.ip(1)]));
    let h1 = Agent::start_in(hosts.pop().expect("h1"), opts("h1", &[]));
    let (p1, p3) = (h1.pod("10.32.1.2/12"), h3.pod("10.32.3.2/12"));
    wait_until(T, "pod on h1 to reach the pod on h3 through h2", || p1.ping("10.32.3.2"));
    assert!(p3.ping("10.32.1.2"));
    assert_eq!(transfer(&p1, &p3, "10.32.3.2", ""), 10 << 20);
    let s = h1.status().expect("status");
    let relayed = s["overlay"]["relayed"].as_array().cloned().unwrap_or_default();
    assert!(
        relayed.iter().any(|r| r[0] == h3.peer_name().as_str() && r[1] == h2.peer_name().as_str()),
        "h3 is reached via h2: {relayed:?}"
    );
    // The overlay's report (sleeve counters included) is published on its tick, so it may
    // predate a transfer this fast: poll it.
    wait_until(T, "h2's report to show relayed datagrams", || {
        h2.status().is_some_and(|s| s["overlay"]["sleeve"]["relayed"].as_u64().unwrap_or(0) > 0)
    });
}

#[test]
fn with_a_password_pod_traffic_on_the_wire_is_encrypted() {
    for password in [true, false] {
        let (lab, hosts) = Lab::new(2, 1500);
        let pw: &[&str] = if password { &["--password", "s3cret"] } else { &[] };
        let a = agents(&lab, hosts, pw);
        let (p1, p2) = (a[0].pod("10.32.1.2/12"), a[1].pod("10.32.2.2/12"));
        let n2 = a[1].peer_name();
        wait_mode(&a[0], &n2, if password { "sleeve" } else { "fastdp" }, T);
        wait_until(T, "pod-to-pod", || p1.ping("10.32.2.2"));
        let marker = format!("WEFT-MARKER-{}", unique("m"));
        let cap = lab.capture(|| {
            assert_eq!(transfer(&p1, &p2, "10.32.2.2", &marker), 10 << 20);
        });
        assert!(cap.len() > 5 << 20, "the capture saw the transfer ({} bytes)", cap.len());
        assert_eq!(
            contains(&cap, marker.as_bytes()),
            !password,
            "marker on the wire (password: {password})"
        );
    }
}

#[test]
fn large_packets_cross_both_overlays_over_a_lowered_mtu() {
    let (lab, hosts) = Lab::new(2, 1300);
    let mut a = agents(&lab, hosts, &[]);
    let (p1, p2) = (a[0].pod("10.32.1.2/12"), a[1].pod("10.32.2.2/12"));
    let mtu = must(p1.cmd("cat").arg("/sys/class/net/eth0/mtu"));
    assert_eq!(mtu.trim(), "1250", "pod MTU = underlay 1300 - 50");
    for mode in ["fastdp", "sleeve"] {
        if mode == "sleeve" {
            for (i, x) in a.iter_mut().enumerate() {
                let mut e = vec!["--no-fastdp"];
                if i > 0 {
                    e.push(lab.ip(1));
                }
                x.restart_with(opts(&format!("h{}", i + 1), &e));
            }
        }
        let n2 = a[1].peer_name();
        wait_mode(&a[0], &n2, mode, T);
        wait_until(T, &format!("ping -s 10000 over {mode}"), || ping_big(&p1, "10.32.2.2"));
        assert_eq!(transfer(&p1, &p2, "10.32.2.2", ""), 10 << 20, "{mode}");
    }
}

#[test]
fn broadcast_and_multicast_reach_pods_on_other_hosts() {
    let (lab, hosts) = Lab::new(2, 1500);
    let a = agents(&lab, hosts, &[]);
    let (p1, p2) = (a[0].pod("10.32.1.2/12"), a[1].pod("10.32.2.2/12"));
    wait_until(T, "pod-to-pod", || p1.ping("10.32.2.2"));
    // `weft attach` routes multicast over the weft interface, as Weave did.
    let mroute = must(p1.cmd("ip").args(["route", "show", "224.0.0.0/4"]));
    assert!(mroute.contains("dev eth0"), "multicast route: {mroute}");
    // ARP for an endpoint the agent knows is answered on the local host: with p2 sending and
    // receiving no ARP at all, p1 still resolves it after forgetting.
    nft(
        &p2,
        "table arp wtenoarp {\n\
         chain i { type filter hook input priority 0; drop; }\n\
         chain o { type filter hook output priority 0; drop; }\n\
         }\n",
    );
    must(p1.cmd("ip").args(["neigh", "flush", "dev", "eth0"]));
    wait_until(T, "the pod's ARP to be answered on its host", || {
        let _ = p1.ping("10.32.2.2");
        must(p1.cmd("ip").args(["neigh", "show", "10.32.2.2"])).contains("0a:58:0a:20:02:02")
    });
    must(p2.cmd("nft").args(["delete", "table", "arp", "wtenoarp"]));
    // ARP for an address weft does not know (configured by hand) floods across hosts.
    let p3 = a[1].pod("10.32.2.3/12");
    must(p3.cmd("ip").args(["addr", "add", "10.32.2.77/12", "dev", "eth0"]));
    wait_until(T, "a hand-configured address on another host", || p1.ping("10.32.2.77"));
    for (dst, group) in [("239.1.2.3", "239.1.2.3"), ("10.47.255.255", "")] {
        let mut args = vec!["udp-recv", "9999", "10"];
        if !group.is_empty() {
            args.push(group);
        }
        let rx = Server::start(&p2, &args);
        must(p1.cmd("python3").arg(nettool()).args(["udp-send", dst, "9999", "hello-across"]));
        assert_eq!(rx.result().trim(), "hello-across", "datagram to {dst}");
    }
}

#[test]
fn subnets_are_isolated_and_expose_hide_work_across_hosts() {
    let (lab, hosts) = Lab::new(2, 1500);
    let a = agents(&lab, hosts, &["--ipalloc-default-subnet", "10.32.0.0/24"]);
    // Weave's 130 scenario: three subnets, two hosts.
    let a1 = a[0].pod("10.2.1.1/24");
    let a2 = a[1].pod("10.2.1.2/24");
    let b1 = a[0].pod("10.2.2.1/24");
    let b2 = a[1].pod("10.2.2.2/24");
    wait_until(T, "same-subnet pods across hosts", || a1.ping("10.2.1.2") && b1.ping("10.2.2.2"));
    assert!(
        !a1.ping("10.2.2.2") && !b2.ping("10.2.1.1"),
        "different subnets must not reach each other"
    );
    assert!(!a[0].host().ping("10.2.1.1"), "the host is not on the network until exposed");
    let ex = must(a[0].weft().args(["expose", "10.2.2.101/24"]));
    assert_eq!(ex.trim(), "10.2.2.101/24");
    must(a[0].weft().args(["expose", "10.2.2.101/24"]));
    assert!(a[0].host().ping("10.2.2.2"), "exposed subnet reachable from the host, across hosts");
    assert!(!a[0].host().ping("10.2.1.2"), "only the exposed subnet");
    must(a[0].weft().args(["hide", "10.2.2.101/24"]));
    must(a[0].weft().args(["hide", "10.2.2.101/24"]));
    assert!(!a[0].host().ping("10.2.2.2"));
    let _ = (a2, b2);
}

#[test]
fn a_killed_agent_does_not_break_a_fastdp_stream() {
    let (lab, hosts) = Lab::new(2, 1500);
    let mut a = agents(&lab, hosts, &[]);
    let (p1, p2) = (a[0].pod("10.32.1.2/12"), a[1].pod("10.32.2.2/12"));
    wait_mode(&a[0], &a[1].peer_name(), "fastdp", T);
    wait_until(T, "pod-to-pod", || p1.ping("10.32.2.2"));
    let server = Server::start(&p2, &["serve", "9000"]);
    let mut client = p1
        .cmd("python3")
        .arg(nettool())
        .args(["stream", "10.32.2.2", "9000", "12"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("stream");
    // Let the stream run, then kill the agent of its source host and bring it back.
    wait_until(T, "the stream to be established", || {
        must(p1.cmd("ss").args(["-tn", "state", "established", "dst", "10.32.2.2"])).lines().count()
            > 1
    });
    a[0].kill9();
    a[0].restart();
    let status = client.wait().expect("stream");
    assert!(status.success(), "the stream failed across the agent restart");
    let received: u64 = server.result().trim().parse().unwrap_or(0);
    assert!(received > 0);
    for p in [&p1, &p2] {
        let nstat = must(p.cmd("nstat").args(["-az", "TcpEstabResets", "TcpExtTCPAbortOnData"]));
        for line in nstat.lines().skip(1) {
            let v: u64 = line.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(1);
            assert_eq!(v, 0, "connection resets in {}: {nstat}", p.name);
        }
    }
}

/// `bridge fdb` entries on a host's VXLAN device that send to `dst`.
fn vxlan_entries_to(a: &Agent, dst: &str) -> usize {
    let fdb = must(a.host().cmd("bridge").args(["fdb", "show", "dev", "weft-vx"]));
    fdb.lines().filter(|l| l.contains(&format!("dst {dst} "))).count()
}

#[test]
fn forwarding_entries_of_a_peer_that_is_gone_are_pruned() {
    let (lab, hosts) = Lab::new(2, 1500);
    let mut a = agents(&lab, hosts, &[]);
    let p1 = a[0].pod("10.32.1.2/12");
    let _p2 = a[1].pod("10.32.2.2/12");
    wait_mode(&a[0], &a[1].peer_name(), "fastdp", T);
    wait_until(T, "pod-to-pod", || p1.ping("10.32.2.2"));
    let h2 = lab.ip(2).to_owned();
    assert!(vxlan_entries_to(&a[0], &h2) > 0, "fastdp programmed no entries towards h2");
    // Both restart, and neither dials the other any more (h2 was the one told about h1, and
    // forgets it): the kernel keeps h1's entries towards h2 until the agent prunes them.
    must(a[1].weft().args(["forget", lab.ip(1)]));
    a[0].stop();
    a[1].restart_with(opts("h2", &[]));
    a[0].restart();
    let start = Instant::now();
    // The agent prunes 30 s after its start (PRUNE_AFTER), then on its next programming pass.
    wait_until(Duration::from_secs(30) + T, "h1's VXLAN entries towards h2 to go", || {
        vxlan_entries_to(&a[0], &h2) == 0
    });
    eprintln!("entries towards the departed peer pruned {:?} after the restart", start.elapsed());
    assert!(!p1.ping("10.32.2.2"), "pods still reach each other through stale entries");
}

/// How often `needle` occurs in `hay` (e.g. a marker in a capture).
fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// A pod that weft does not know: a namespace plugged into `a`'s bridge by hand, with `cidr` on
/// its `eth0`. weft never learns its MAC, so frames to it stay unknown unicast on other hosts,
/// as a pod's frames are while its MAC is being learned.
fn unmanaged_pod(a: &Agent, cidr: &str) -> Netns {
    let ns = Netns::new("p");
    let port = unique("u");
    let veth = format!("link add eth0 netns {} type veth peer name {port}", ns.name);
    must(a.cmd("ip").args(veth.split(' ')));
    must(a.cmd("ip").args(["link", "set", &port, "master", "weft", "up"]));
    must(ns.cmd("ip").args(["addr", "add", cidr, "dev", "eth0"]));
    must(ns.cmd("ip").args(["link", "set", "eth0", "up"]));
    ns
}

/// Issue 13, item 3. Three hosts with a password; h1 and h2 trust each other, h3 trusts no
/// one. Nothing sent from h1 to an endpoint on h3 may cross any wire in the clear: not to a pod
/// whose MAC h1 knows, not to one whose MAC it does not know (such frames used to be flooded
/// over the plaintext VXLAN link to h2), not as a broadcast, not relayed through h2 (the hop to
/// h2 used to be unencrypted). Traffic between h1 and h2 may be in the clear, and is: that shows
/// the capture would see a marker.
#[test]
fn with_trusted_subnets_traffic_for_an_untrusted_peer_is_never_in_the_clear() {
    let (lab, hosts) = Lab::new(3, 1500);
    let mut hosts = hosts.into_iter();
    let mut start = |nick: &str, extra: &[&str]| {
        let e = [&["--password", "s3cret"][..], extra].concat();
        Agent::start_in(hosts.next().expect("host"), opts(nick, &e))
    };
    let h1 = start("h1", &["--trusted-subnets", "10.99.0.2/32"]);
    let h2 = start("h2", &["--trusted-subnets", "10.99.0.1/32", lab.ip(1)]);
    let h3 = start("h3", &[lab.ip(1), lab.ip(2)]);
    let (n2, n3) = (h2.peer_name(), h3.peer_name());
    wait_mode(&h1, &n2, "fastdp", T);
    wait_mode(&h1, &n3, "sleeve", T);
    wait_mode(&h2, &n3, "sleeve", T);
    let (p1, p2, p3) = (h1.pod("10.32.1.2/12"), h2.pod("10.32.2.2/12"), h3.pod("10.32.3.2/12"));
    let hidden = unmanaged_pod(&h3, "10.32.3.77/12");
    for ip in ["10.32.2.2", "10.32.3.2", "10.32.3.77"] {
        wait_until(T, &format!("p1 to reach {ip}"), || p1.ping(ip));
    }
    // Each kind of traffic in a capture of its own, so a failure says which one leaked.
    let marker = format!("WEFT-MARKER-{}", unique("m"));
    let seen = |least: usize, work: &dyn Fn()| {
        let cap = lab.capture(work);
        assert!(cap.len() > least, "the capture saw the traffic ({} bytes)", cap.len());
        count(&cap, marker.as_bytes())
    };
    let to = |pod: &Netns, ip: &str| {
        seen(5 << 20, &|| assert_eq!(transfer(&p1, pod, ip, &marker), 10 << 20, "p1 -> {ip}"))
    };
    let trusted = to(&p2, "10.32.2.2");
    let known = to(&p3, "10.32.3.2");
    let unknown = to(&hidden, "10.32.3.77");
    let broadcast = seen(100, &|| {
        let rx = Server::start(&p3, &["udp-recv", "9999", "10"]);
        must(p1.cmd("python3").arg(nettool()).args(["udp-send", "10.47.255.255", "9999", &marker]));
        assert_eq!(rx.result().trim(), marker, "a broadcast from p1 reaches p3");
    });
    // Without a direct path, h1 reaches h3 through h2, which it trusts.
    lab.cut(1, 3);
    wait_until(Duration::from_secs(60), "h1 to reach h3 through h2", || {
        let s = h1.status().unwrap_or_default();
        s["overlay"]["relayed"]
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r[0] == n3.as_str() && r[1] == n2.as_str()))
            && p1.ping("10.32.3.2")
    });
    let relayed = to(&p3, "10.32.3.2");
    eprintln!(
        "markers in the clear: p1->p2 (trusted) {trusted}, p1->p3 {known}, \
         p1->unknown MAC on h3 {unknown}, broadcast {broadcast}, p1->p3 relayed by h2 {relayed}"
    );
    assert!(trusted > 1000, "h1-h2 traffic is in the clear, and the capture sees it");
    assert_eq!(
        (known, unknown, broadcast, relayed),
        (0, 0, 0, 0),
        "traffic for h3 crossed a wire in the clear"
    );
}
