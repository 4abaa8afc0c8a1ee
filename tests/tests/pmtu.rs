//! Path-MTU adaptation with real agents on a namespace underlay whose path drops UDP datagrams
//! longer than 700 bytes (as a VPN or cloud path with an MTU below the interface's does,
//! silently): sleeve finds the size that gets through, fastdp falls back to sleeve, and large
//! pings and TCP cross both ways; when the path grows back, so does the size, and fastdp
//! returns.

use std::time::{Duration, Instant};

use weft_e2e::*;

/// The bound: from the agents' start to large packets crossing both ways.
const WITHIN: Duration = Duration::from_secs(60);
const MIB5: &str = "5242880";
/// The largest underlay packet the lossy path carries: 700 bytes of UDP + 20 of IPv4.
const SMALL_PATH: u64 = 720;

/// The underlay drops UDP longer than 700 bytes (UDP header included) between the hosts, in
/// both directions; TCP (the mesh) passes.
const DROP_LARGE_UDP: &str = "table bridge wtepmtu {\n\
     chain f { type filter hook forward priority 0; policy accept;\n\
     udp length > 700 drop\n\
     ip protocol udp ip length > 720 drop\n\
     }\n}\n";

/// The lab's underlay: the hosts' packets reach the filter segmented, as they reach a wire.
/// (Between veths a UDP segmentation-offload super-packet travels whole, so the filter would
/// see, and drop, one packet of many datagrams; a NIC or the kernel segments it before a
/// real wire.)
fn small_path_lab() -> (Lab, Vec<Netns>) {
    let (lab, hosts) = Lab::new(2, 1500);
    for h in &hosts {
        must(h.cmd("ip").args(["link", "set", "eth0", "gso_max_segs", "1"]));
    }
    (lab, hosts)
}

fn nft(ns: &Netns, script: &str) {
    use std::io::Write;
    let mut c =
        ns.cmd("nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().expect("nft");
    c.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("script");
    assert!(c.wait().expect("nft").success(), "nft rejected: {script}");
}

fn ping_4000(from: &Netns, ip: &str) -> bool {
    run(from.cmd("ping").args(["-c1", "-W2", "-s", "4000", ip])).status.success()
}

/// 5 MiB from `from` to `to` (listening on `ip`) over TCP; returns the bytes received. The
/// sender gives up after 20 s without progress, so a black hole fails the test.
fn transfer(from: &Netns, to: &Netns, ip: &str) -> u64 {
    let server = Server::start(to, &["serve", "9000"]);
    let out = run(from.cmd("python3").arg(nettool()).args(["send", ip, "9000", MIB5]));
    assert!(out.status.success(), "sender: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), MIB5, "sender");
    server.result().trim().parse().unwrap_or(0)
}

/// The status entry of `a`'s link to `peer`.
fn link(a: &Agent, peer: &str) -> Value {
    let s = a.status().expect("status");
    let links = s["overlay"]["links"].as_array().cloned().unwrap_or_default();
    links.into_iter().find(|l| l["peer"] == peer).unwrap_or(Value::Null)
}

fn path_mtu(a: &Agent, peer: &str) -> u64 {
    link(a, peer)["path_mtu"].as_u64().unwrap_or(0)
}

#[test]
fn a_path_dropping_large_udp_carries_big_pings_and_tcp_both_ways_within_a_minute() {
    small_path_carries_large_packets(&[]);
}

/// Encrypted sleeve datagrams carry a 16-byte tag: they are sized to the path as well.
#[test]
fn an_encrypted_link_over_a_path_dropping_large_udp_carries_big_pings_and_tcp() {
    small_path_carries_large_packets(&["--password", "s3cret"]);
}

fn small_path_carries_large_packets(extra: &[&str]) {
    let encrypted = !extra.is_empty();
    let (lab, hosts) = small_path_lab();
    nft(&lab.underlay, DROP_LARGE_UDP);
    let start = Instant::now();
    let a = lab.agents(hosts, extra);
    let (p1, p2) = (a[0].pod("10.32.1.2/12"), a[1].pod("10.32.2.2/12"));
    let names = [a[0].peer_name(), a[1].peer_name()];
    let left = || WITHIN.saturating_sub(start.elapsed());
    wait_until(left(), "ping -s 4000 from h1's pod to h2's", || ping_4000(&p1, "10.32.2.2"));
    wait_until(left(), "ping -s 4000 from h2's pod to h1's", || ping_4000(&p2, "10.32.1.2"));
    assert_eq!(transfer(&p1, &p2, "10.32.2.2"), 5 << 20, "h1 -> h2");
    assert_eq!(transfer(&p2, &p1, "10.32.1.2"), 5 << 20, "h2 -> h1");
    let took = start.elapsed();
    eprintln!("large pings and 5 MiB both ways after {took:?} (encrypted: {encrypted})");
    assert!(took <= WITHIN, "took {took:?}");
    for (i, x) in a.iter().enumerate() {
        let peer = &names[1 - i];
        // The search may still be narrowing down when the traffic is through already.
        wait_until(left(), "the path MTU found", || {
            (SMALL_PATH - 20..=SMALL_PATH).contains(&path_mtu(x, peer))
        });
        let l = link(x, peer);
        assert_eq!(l["mode"], "sleeve", "fastdp cannot carry full frames here: {l}");
        let pmtu = l["path_mtu"].as_u64().unwrap_or(0);
        assert!((SMALL_PATH - 20..=SMALL_PATH).contains(&pmtu), "path MTU found: {l}");
        let why = l["degraded"].as_str().unwrap_or_default();
        let text = must(x.weft().args(["status", "connections"]));
        let line = text.lines().find(|l| l.contains(peer.as_str())).unwrap_or_default();
        assert!(line.contains(" sleeve (fastdp "), "{text}");
        assert!(line.ends_with(&format!(" path-mtu={pmtu}")), "{text}");
        if !encrypted {
            assert!(why.contains(&format!("at most {pmtu} bytes; fastdp needs 1500")), "{l}");
        }
    }
}

#[test]
fn the_path_mtu_follows_a_path_that_shrinks_and_grows_back() {
    let (lab, hosts) = small_path_lab();
    let a = lab.agents(hosts, &[]);
    let (p1, p2) = (a[0].pod("10.32.1.2/12"), a[1].pod("10.32.2.2/12"));
    let n2 = a[1].peer_name();
    let t = Duration::from_secs(30);
    wait_until(t, "fastdp over the clean path, path MTU 1500", || {
        let l = link(&a[0], &n2);
        l["mode"] == "fastdp" && l["path_mtu"] == 1500
    });
    assert!(ping_4000(&p1, "10.32.2.2"));
    nft(&lab.underlay, DROP_LARGE_UDP);
    let shrunk = Instant::now();
    wait_until(t, "sleeve with the small path MTU", || {
        a[0].overlay_mode(&n2).as_deref() == Some("sleeve") && path_mtu(&a[0], &n2) <= SMALL_PATH
    });
    wait_until(t, "ping -s 4000 over the small path", || ping_4000(&p1, "10.32.2.2"));
    eprintln!("adapted to the smaller path after {:?}", shrunk.elapsed());
    assert_eq!(transfer(&p2, &p1, "10.32.1.2"), 5 << 20);
    must(lab.underlay.cmd("nft").args(["delete", "table", "bridge", "wtepmtu"]));
    wait_until(t, "fastdp and path MTU 1500 again", || {
        let l = link(&a[0], &n2);
        l["mode"] == "fastdp" && l["path_mtu"] == 1500
    });
    assert!(ping_4000(&p1, "10.32.2.2"));
}
