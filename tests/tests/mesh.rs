//! The peer mesh with real agents on a namespace underlay: discovery, relaying through partial
//! connectivity, targets, partitions, passwords (ported from Weave's 1xx scenarios).

use std::time::Duration;

use weft_e2e::*;

fn opts(nick: &str, extra: &[&str]) -> AgentOpts {
    let mut e = vec!["--nickname".to_owned(), nick.to_owned()];
    e.extend(extra.iter().map(|s| s.to_string()));
    AgentOpts { extra: e, ..AgentOpts::default() }
}

fn name(a: &Agent) -> String {
    a.status().expect("status")["peer"]["name"].as_str().unwrap_or_default().to_owned()
}

/// Connections of `a` in `state`, by peer name.
fn connected(a: &Agent, state: &str) -> Vec<String> {
    let s = a.status().unwrap_or_default();
    s["mesh"]["connections"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter(|c| c["state"] == state)
                .map(|c| c["peer"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn known_peers(a: &Agent) -> Vec<String> {
    let s = a.status().unwrap_or_default();
    s["mesh"]["peers"]
        .as_array()
        .map(|ps| ps.iter().map(|p| p["name"].as_str().unwrap_or("").to_owned()).collect())
        .unwrap_or_default()
}

fn targets(a: &Agent) -> Vec<String> {
    must(a.weft().args(["status", "targets"])).lines().map(str::to_owned).collect()
}

const T: Duration = Duration::from_secs(20);

#[test]
fn with_discovery_the_ends_of_a_chain_connect_and_stay_connected_without_the_middle() {
    let (lab, mut hosts) = Lab::new(3, 1500);
    let h3 = Agent::start_in(hosts.pop().expect("h3"), opts("h3", &[lab.ip(2)]));
    let mut h2 = Agent::start_in(hosts.pop().expect("h2"), opts("h2", &[lab.ip(1)]));
    let h1 = Agent::start_in(hosts.pop().expect("h1"), opts("h1", &[]));
    let (n2, n3) = (name(&h2), name(&h3));
    wait_until(T, "h1 to connect to h3 directly", || connected(&h1, "established").contains(&n3));
    h2.stop();
    wait_until(T, "h2 to disappear from h1's peers", || !known_peers(&h1).contains(&n2));
    assert!(connected(&h1, "established").contains(&n3), "h1-h3 must survive h2 stopping");
    assert!(connected(&h3, "established").contains(&name(&h1)));
}

#[test]
fn without_discovery_the_ends_learn_of_each_other_only_through_the_middle() {
    let (lab, mut hosts) = Lab::new(3, 1500);
    let h3 = Agent::start_in(hosts.pop().expect("h3"), opts("h3", &["--no-discovery", lab.ip(2)]));
    let h2 = Agent::start_in(hosts.pop().expect("h2"), opts("h2", &["--no-discovery", lab.ip(1)]));
    let h1 = Agent::start_in(hosts.pop().expect("h1"), opts("h1", &["--no-discovery"]));
    let n3 = name(&h3);
    wait_until(T, "h1 to learn of h3 through h2", || known_peers(&h1).contains(&n3));
    assert!(
        !connected(&h1, "established").contains(&n3),
        "no direct h1-h3 connection without discovery"
    );
    // Routes to h3 go through h2.
    let s = h1.status().expect("status");
    let via = s["mesh"]["unicast"]
        .as_array()
        .and_then(|r| r.iter().find(|e| e[0] == n3.as_str()).map(|e| e[1].clone()));
    assert_eq!(via, Some(Value::from(name(&h2))));
    // A subsystem's messages cross h2: h1 forms the address ring (broadcast), h3 asks h1 for
    // space (unicast both ways) and gets it.
    let p1 = Netns::new("p");
    must(h1.weft().args(["attach", "--netns"]).arg(p1.path()));
    let p3 = Netns::new("p");
    let got = must(h3.weft().args(["attach", "--netns"]).arg(p3.path()));
    assert!(got.starts_with("10."), "{got}");
    let owners: Vec<String> = h3.status().expect("status")["ipam"]["peers"]
        .as_array()
        .map(|ps| ps.iter().filter_map(|p| p["peer"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    assert!(owners.contains(&name(&h1)) && owners.contains(&n3), "{owners:?}");
    assert!(!connected(&h1, "established").contains(&n3), "still no direct connection");
}

#[test]
fn connect_and_forget_change_targets_and_survive_restarts() {
    let (lab, mut hosts) = Lab::new(3, 1500);
    let h3 = Agent::start_in(hosts.pop().expect("h3"), opts("h3", &[]));
    let h2 = Agent::start_in(hosts.pop().expect("h2"), opts("h2", &[]));
    let mut h1 = Agent::start_in(hosts.pop().expect("h1"), opts("h1", &["--no-discovery"]));
    must(h1.weft().args(["connect", lab.ip(2)]));
    assert_eq!(targets(&h1), vec![lab.ip(2).to_owned()]);
    wait_until(T, "h1 to connect to h2", || connected(&h1, "established").contains(&name(&h2)));
    h1.stop();
    h1.restart();
    assert_eq!(targets(&h1), vec![lab.ip(2).to_owned()], "targets persist across a restart");
    wait_until(T, "h1 to reconnect to h2", || connected(&h1, "established").contains(&name(&h2)));
    must(h1.weft().args(["connect", "--replace", lab.ip(3)]));
    assert_eq!(targets(&h1), vec![lab.ip(3).to_owned()]);
    wait_until(T, "h1 to connect to h3", || connected(&h1, "established").contains(&name(&h3)));
    must(h1.weft().args(["forget", lab.ip(3)]));
    assert!(targets(&h1).is_empty());
    h1.stop();
    h1.restart();
    assert!(targets(&h1).is_empty(), "a forgotten target stays forgotten");
    // An explicit list at start replaces the persisted one.
    must(h1.weft().args(["connect", lab.ip(3)]));
    h1.restart_with(opts("h1", &["--no-discovery", lab.ip(2)]));
    assert_eq!(targets(&h1), vec![lab.ip(2).to_owned()]);
}

#[test]
fn a_partition_heals_by_itself_once_lifted() {
    let (lab, mut hosts) = Lab::new(2, 1500);
    let h2 = Agent::start_in(hosts.pop().expect("h2"), opts("h2", &[lab.ip(1)]));
    let h1 = Agent::start_in(hosts.pop().expect("h1"), opts("h1", &[]));
    let n2 = name(&h2);
    wait_until(T, "h1-h2", || connected(&h1, "established").contains(&n2));
    lab.cut(1, 2);
    wait_until(Duration::from_secs(30), "the partition to be noticed", || {
        !connected(&h1, "established").contains(&n2)
    });
    lab.heal(1, 2);
    wait_until(
        Duration::from_secs(30),
        "the mesh to heal within 30 s of the partition ending",
        || {
            connected(&h1, "established").contains(&n2)
                && connected(&h2, "established").contains(&name(&h1))
        },
    );
}

#[test]
fn a_wrong_or_missing_password_is_refused_and_reported() {
    let (lab, mut hosts) = Lab::new(3, 1500);
    let h3 = Agent::start_in(hosts.pop().expect("h3"), opts("h3", &[lab.ip(1)]));
    let h2 =
        Agent::start_in(hosts.pop().expect("h2"), opts("h2", &["--password", "other", lab.ip(1)]));
    let h1 = Agent::start_in(hosts.pop().expect("h1"), opts("h1", &["--password", "secret"]));
    let failure = |a: &Agent, needle: &str| {
        let s = a.status().unwrap_or_default();
        s["mesh"]["connections"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["state"] == "failed" && c["info"].as_str().unwrap_or("").contains(needle)
            })
        })
    };
    wait_until(T, "h2 to report the wrong password", || failure(&h2, "authentication failed"));
    wait_until(T, "h3 to report the missing password", || failure(&h3, "password"));
    assert!(failure(&h1, "authentication failed"), "the refusing side reports it too");
    assert!(connected(&h1, "established").is_empty());
    assert!(h1.log().contains("refused inbound mesh connection"));
}

#[test]
fn with_a_password_every_connection_is_encrypted_and_no_gossip_is_in_the_clear() {
    for password in [true, false] {
        let (lab, mut hosts) = Lab::new(3, 1500);
        let marker = format!("mk{}", unique("n"));
        let pw: &[&str] = if password { &["--password", "s3cret"] } else { &[] };
        let mut agents = Vec::new();
        let cap = lab.capture(|| {
            let h3 = Agent::start_in(
                hosts.pop().expect("h3"),
                opts(&format!("{marker}3"), &[pw, &[lab.ip(1)]].concat()),
            );
            let h2 = Agent::start_in(
                hosts.pop().expect("h2"),
                opts(&format!("{marker}2"), &[pw, &[lab.ip(1)]].concat()),
            );
            let h1 = Agent::start_in(hosts.pop().expect("h1"), opts(&format!("{marker}1"), pw));
            wait_until(T, "a full mesh", || {
                connected(&h1, "established").len() == 2 && connected(&h2, "established").len() == 2
            });
            agents = vec![h1, h2, h3];
        });
        for a in &agents {
            let s = a.status().expect("status");
            for c in s["mesh"]["connections"]
                .as_array()
                .expect("connections")
                .iter()
                .filter(|c| c["state"] == "established")
            {
                assert_eq!(c["encrypted"], password, "{c}");
            }
        }
        assert!(cap.len() > 1000, "the capture saw the mesh traffic ({} bytes)", cap.len());
        assert_eq!(
            contains(&cap, marker.as_bytes()),
            !password,
            "nicknames travel in gossip: in the clear without a password, never with one"
        );
    }
}
