//! The peer mesh with real agents on a namespace underlay: discovery, relaying through partial
//! connectivity, targets, partitions, passwords (ported from Weave's 1xx scenarios).

use std::time::{Duration, Instant};

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

/// A pod on `a` with the address 10.32.`i`.2 and the DNS name p`i`.
fn named_pod(a: &Agent, i: usize) -> Netns {
    let ns = Netns::new("p");
    let cidr = format!("10.32.{i}.2/12");
    let name = format!("p{i}");
    must(a.weft().args(["attach", &cidr, "--name", &name, "--netns"]).arg(ns.path()));
    ns
}

/// Whether weft DNS on `a` resolves p`i` to its pod's address.
fn resolves(a: &Agent, i: usize) -> bool {
    let out = run(a.weft().args(["dns-lookup", &format!("p{i}")]));
    out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == format!("10.32.{i}.2")
}

/// One quick ping (a lost one costs 0.2 s, so polling stays fine-grained).
fn pings(from: &Netns, i: usize) -> bool {
    run(from.cmd("ping").args(["-c1", "-W0.2", &format!("10.32.{i}.2")])).status.success()
}

/// Polls `cond` until `deadline`; returns how long after `t0` it first held.
fn by(t0: Instant, deadline: Instant, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let limit = deadline.saturating_duration_since(t0);
    wait_until(
        deadline.saturating_duration_since(Instant::now()),
        &format!("{what} within {limit:?}"),
        &mut cond,
    );
    t0.elapsed()
}

/// Whether `a` reports a refused dial of `ip`.
fn refused(a: &Agent, ip: &str) -> bool {
    let s = a.status().unwrap_or_default();
    s["mesh"]["connections"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            c["state"] == "failed"
                && c["address"].as_str().is_some_and(|x| x.starts_with(ip))
                && c["info"].as_str().is_some_and(|i| i.contains("refused"))
        })
    })
}

/// `weft status connections` is one established line per other peer, with no failure,
/// no dial in progress and no degraded overlay left over, and `weft status` counts them.
fn clean_connections(a: &Agent, peers: &[String]) -> Result<(), String> {
    let text =
        |args: &[&str]| String::from_utf8_lossy(&run(a.weft().args(args)).stdout).into_owned();
    let summary = text(&["status"]);
    let want = format!("Connections: {n} ({n} established)", n = peers.len());
    if !summary.contains(&want) {
        return Err(summary);
    }
    let text = text(&["status", "connections"]);
    let lines: Vec<&str> = text.lines().collect();
    let one_each =
        peers.iter().all(|p| lines.iter().filter(|l| l.contains(p.as_str())).count() == 1);
    let ok = lines.len() == peers.len()
        && one_each
        && lines.iter().all(|l| l.contains("established") && l.contains(" fastdp unencrypted "));
    if ok { Ok(()) } else { Err(text) }
}

/// Issue 13, item 2: after `weft stop` and a start of one host, its names, MACs and routes
/// are known everywhere within 2 s of its connections being up (they used to wait for the
/// 30-s anti-entropy), and `weft status connections` shows one clean line per peer.
#[test]
fn a_restarted_host_exchanges_names_and_reaches_pods_within_two_seconds() {
    let (lab, hosts) = Lab::new(3, 1500);
    let mut a = lab.agents(hosts, &[]);
    let pods: Vec<Netns> = (1..=3).map(|i| named_pod(&a[i - 1], i)).collect();
    let names: Vec<String> = a.iter().map(name).collect();
    for (x, agent) in a.iter().enumerate() {
        for i in (1..=3).filter(|i| *i != x + 1) {
            wait_until(T, &format!("h{} to resolve p{i}", x + 1), || resolves(agent, i));
            wait_until(T, &format!("p{} to reach p{i}", x + 1), || pings(&pods[x], i));
        }
    }

    // h3 stops; the others forget it, and its name with it.
    a[2].stop();
    for (x, agent) in a.iter().enumerate().take(2) {
        wait_until(T, &format!("h{} to forget h3", x + 1), || {
            !known_peers(agent).contains(&names[2]) && !resolves(agent, 3)
        });
        // Its dials of h3 fail meanwhile: status must not keep them once h3 is back.
        wait_until(T, &format!("h{} to fail dialling h3", x + 1), || refused(agent, lab.ip(3)));
    }

    // h3 starts again; the clock starts once its connections to both are established.
    a[2].start_again();
    let up = |x: usize, y: usize| connected(&a[x], "established").contains(&names[y]);
    wait_until(T, "h3's connections to h1 and h2", || up(2, 0) && up(2, 1) && up(0, 2) && up(1, 2));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(2);
    let mut figures = Vec::new();
    for (x, i) in [(0, 3), (1, 3), (2, 1), (2, 2)] {
        let what = format!("h{} to resolve p{i}", x + 1);
        figures.push((what.clone(), by(t0, deadline, &what, || resolves(&a[x], i))));
    }
    for (x, i) in [(2, 1), (2, 2), (0, 3), (1, 3)] {
        let what = format!("p{} to reach p{i}", x + 1);
        figures.push((what.clone(), by(t0, deadline, &what, || pings(&pods[x], i))));
    }
    eprintln!("after the connections were up: {figures:?}");

    // Nothing stale in status: one established fastdp line per peer, on every host.
    a[2].wait_ready();
    for (x, agent) in a.iter().enumerate() {
        let others: Vec<String> =
            names.iter().enumerate().filter(|(y, _)| *y != x).map(|(_, n)| n.clone()).collect();
        let deadline = Instant::now() + T;
        while let Err(text) = clean_connections(agent, &others) {
            assert!(Instant::now() < deadline, "h{}'s connections are not clean:\n{text}", x + 1);
            std::thread::sleep(Duration::from_millis(100));
        }
        let targets = targets(agent);
        for y in (1..=3).filter(|y| *y != x + 1) {
            assert!(targets.contains(&lab.ip(y).to_owned()), "h{}: {targets:?}", x + 1);
        }
    }
}
