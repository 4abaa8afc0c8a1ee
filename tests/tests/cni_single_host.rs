//! One host, real agent, real plugin, pods as namespaces: the CNI semantics runtimes rely on.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use weft_e2e::*;

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

#[test]
fn two_pods_ping_each_other_and_the_bridge() {
    let agent = Agent::start(AgentOpts::default());
    let (p1, p2) = (Netns::new("p"), Netns::new("p"));
    let conf = agent.conf("1.0.0");
    let a = agent.cni("ADD", "pod-a", Some(&p1.path()), &conf);
    let b = agent.cni("ADD", "pod-b", Some(&p2.path()), &conf);
    let gw = a.ok()["ips"][0]["gateway"].as_str().expect("a gateway").to_owned();
    assert_ne!(a.ip(), b.ip());
    assert!(p1.ping(&b.ip()), "pod a cannot reach pod b");
    assert!(p2.ping(&a.ip()), "pod b cannot reach pod a");
    assert!(p1.ping(&gw), "pod a cannot reach the bridge address {gw}");
    assert!(agent.host().ping(&a.ip()), "the host cannot reach pod a");
    // The pod's interface has the overlay MTU and a default route through the bridge.
    let route = must(p1.cmd("ip").args(["route", "show", "default"]));
    assert!(route.contains(&format!("via {gw}")), "{route}");
}

#[test]
fn results_come_in_the_requested_version() {
    let agent = Agent::start(AgentOpts::default());
    for (i, v) in VERSIONS.iter().enumerate() {
        let ns = Netns::new("p");
        let out = agent.cni("ADD", &format!("v{i}"), Some(&ns.path()), &agent.conf(v)).ok();
        assert_eq!(out["cniVersion"], *v);
        let family = &out["ips"][0]["version"];
        assert_eq!(family.is_null(), v.starts_with('1'), "ips[].version presence for {v}: {out}");
        assert_eq!(out["interfaces"][1]["sandbox"], ns.path().display().to_string());
        agent.cni("DEL", &format!("v{i}"), Some(&ns.path()), &agent.conf(v)).ok();
    }
}

#[test]
fn add_twice_returns_the_same_result_and_del_twice_succeeds() {
    let agent = Agent::start(AgentOpts::default());
    let p = Netns::new("p");
    let conf = agent.conf("1.1.0");
    let first = agent.cni("ADD", "twice", Some(&p.path()), &conf).ok();
    let second = agent.cni("ADD", "twice", Some(&p.path()), &conf).ok();
    assert_eq!(first, second, "a repeated ADD must return the same result");
    assert_eq!(agent.endpoint_links().len(), 1);
    let del_conf = with_prev(&conf, &first);
    agent.cni("DEL", "twice", Some(&p.path()), &del_conf).ok();
    agent.cni("DEL", "twice", Some(&p.path()), &del_conf).ok();
    assert!(agent.endpoint_links().is_empty(), "veth left behind: {:?}", agent.endpoint_links());
    assert!(!p.links().contains(&"eth0".to_owned()));
    // DEL of something never added, with no namespace, also succeeds.
    agent.cni("DEL", "never-added", None, &conf).ok();
}

#[test]
fn check_fails_after_the_address_is_removed_by_hand() {
    let agent = Agent::start(AgentOpts::default());
    let p = Netns::new("p");
    let conf = agent.conf("1.0.0");
    let add = agent.cni("ADD", "chk", Some(&p.path()), &conf);
    let prev = add.ok();
    let check_conf = with_prev(&conf, &prev);
    agent.cni("CHECK", "chk", Some(&p.path()), &check_conf).ok();
    let addr = prev["ips"][0]["address"].as_str().expect("address").to_owned();
    must(p.cmd("ip").args(["addr", "del", &addr, "dev", "eth0"]));
    let msg = agent.cni("CHECK", "chk", Some(&p.path()), &check_conf).error(101);
    assert!(msg.contains(&addr), "{msg}");
    // CHECK for an unknown container is code 3.
    agent.cni("CHECK", "other", Some(&p.path()), &check_conf).error(3);
}

/// The endpoints, links and used-address count, to show that a failed call changed nothing.
fn snapshot(agent: &Agent) -> (usize, Vec<String>, u64) {
    let used = agent.status().expect("status")["ipam"]["used"].as_u64().expect("used");
    (agent.endpoints().len(), agent.endpoint_links(), used)
}

#[test]
fn bad_input_gets_the_right_error_and_changes_nothing() {
    let agent = Agent::start(AgentOpts { range: "10.99.9.0/30".into(), extra: vec![] });
    let p = Netns::new("p");
    let conf = agent.conf("1.0.0");
    // Fill the range: .1 becomes the bridge, .2 the first pod.
    agent.cni("ADD", "filler", Some(&p.path()), &conf).ok();
    let before = snapshot(&agent);
    let q = Netns::new("p");

    agent.cni("ADD", "bad", Some(&q.path()), "{not json").error(6);
    agent
        .cni(
            "ADD",
            "bad",
            Some(&q.path()),
            r#"{"cniVersion":"0.2.0","name":"weft","type":"weft-cni"}"#,
        )
        .error(1);
    agent
        .cni(
            "ADD",
            "bad",
            Some(&q.path()),
            r#"{"cniVersion":"1.0.0","name":"weft","type":"weft-cni","mtu":"x"}"#,
        )
        .error(7);
    let msg = agent.cni("ADD", "bad", None, &conf).error(4);
    assert!(msg.contains("CNI_NETNS"), "{msg}");
    let msg = agent
        .cni("ADD", "bad", Some(std::path::Path::new("/run/netns/does-not-exist")), &conf)
        .error(4);
    assert!(msg.contains("does-not-exist"), "{msg}");
    let msg = cni(&agent.bins, "ADD", "bad", "", Some(&q.path()), &conf).error(4);
    assert!(msg.contains("CNI_IFNAME"), "{msg}");
    let msg = agent.cni("ADD", "bad", Some(&q.path()), &conf).error(100);
    assert!(msg.contains("no free address"), "{msg}");

    assert_eq!(snapshot(&agent), before, "a failed ADD changed the agent's state");
    assert_eq!(q.links(), vec!["lo".to_owned()], "a failed ADD left an interface in the pod");
}

#[test]
fn del_while_the_agent_is_down_is_carried_out_at_start() {
    let mut agent = Agent::start(AgentOpts::default());
    let p = Netns::new("p");
    let conf = agent.conf("1.0.0");
    agent.cni("ADD", "queued", Some(&p.path()), &conf).ok();
    agent.stop();
    agent.cni("DEL", "queued", Some(&p.path()), &conf).ok();
    agent.restart();
    wait_until(Duration::from_secs(10), "the queued DEL to be carried out", || {
        agent.endpoints().iter().all(|e| e["kind"] != "cni") && agent.endpoint_links().is_empty()
    });
    assert_eq!(
        agent.status().expect("status")["ipam"]["used"],
        1,
        "only the bridge address is left"
    );
}

#[test]
fn add_while_the_agent_is_down_waits_then_says_try_again_later() {
    let mut agent = Agent::start(AgentOpts::default());
    agent.stop();
    let p = Netns::new("p");
    let short: Value = serde_json::json!({
        "cniVersion": "1.1.0", "name": "weft", "type": "weft-cni",
        "socket": agent.socket, "readyTimeoutSeconds": 1
    });
    let start = Instant::now();
    let msg = agent.cni("ADD", "early", Some(&p.path()), &short.to_string()).error(11);
    assert!(start.elapsed() >= Duration::from_millis(900), "gave up before the bound");
    assert!(msg.contains("not running"), "{msg}");
    agent.cni("STATUS", "", None, &short.to_string()).error(50);

    // An ADD that starts while the agent is down completes once the agent is up.
    let bins = agent.bins.clone();
    let conf = agent.conf("1.1.0");
    let path = p.path();
    let waiter = std::thread::spawn(move || cni(&bins, "ADD", "late", "eth0", Some(&path), &conf));
    agent.start_again();
    let out = waiter.join().expect("ADD thread");
    out.ok();
    agent.wait_ready();
    agent.cni("STATUS", "", None, &agent.conf("1.1.0")).ok();
}

#[test]
fn gc_releases_what_is_not_valid() {
    let agent = Agent::start(AgentOpts::default());
    let conf = agent.conf("1.1.0");
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("p")).collect();
    for (i, p) in pods.iter().enumerate() {
        agent.cni("ADD", &format!("gc{i}"), Some(&p.path()), &conf).ok();
    }
    let mut gc: Value = serde_json::from_str(&conf).expect("conf");
    gc["cni.dev/valid-attachments"] = serde_json::json!([{"containerID": "gc1", "ifname": "eth0"}]);
    agent.cni("GC", "", None, &gc.to_string()).ok();
    let ids: Vec<String> = agent
        .endpoints()
        .iter()
        .filter(|e| e["kind"] == "cni")
        .map(|e| e["id"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(ids, vec!["gc1/eth0".to_owned()]);
    assert_eq!(agent.endpoint_links().len(), 1);
}

#[test]
fn allocations_survive_a_restart() {
    let mut agent = Agent::start(AgentOpts::default());
    let conf = agent.conf("1.0.0");
    let (p1, p2, p3) = (Netns::new("p"), Netns::new("p"), Netns::new("p"));
    let a = agent.cni("ADD", "keep-a", Some(&p1.path()), &conf).ip();
    let b = agent.cni("ADD", "keep-b", Some(&p2.path()), &conf).ip();
    agent.stop();
    agent.restart();
    let c = agent.cni("ADD", "keep-c", Some(&p3.path()), &conf).ip();
    let all: HashSet<&String> = [&a, &b, &c].into_iter().collect();
    assert_eq!(all.len(), 3, "an address was handed out twice after a restart: {a} {b} {c}");
    assert!(p1.ping(&c) && p3.ping(&b), "pods lost connectivity across the restart");
}

#[test]
fn the_bridge_and_the_firewall_are_repaired() {
    let agent = Agent::start(AgentOpts::default());
    let p = Netns::new("p");
    let ip = agent.cni("ADD", "repair", Some(&p.path()), &agent.conf("1.0.0")).ip();
    must(agent.host().cmd("ip").args(["link", "set", "weft", "down"]));
    // The table of agents before 0.2, `ip weft`, goes when `inet weft` is programmed.
    must(agent.host().cmd("nft").args(["add", "table", "ip", "weft"]));
    must(agent.host().cmd("nft").args(["delete", "table", "inet", "weft"]));
    wait_until(Duration::from_secs(15), "the bridge to be up again", || {
        must(agent.host().cmd("ip").args(["-o", "link", "show", "weft"])).contains(",UP")
    });
    wait_until(Duration::from_secs(15), "the nftables table to come back", || {
        run(agent.host().cmd("nft").args(["list", "table", "inet", "weft"])).status.success()
    });
    let legacy = run(agent.host().cmd("nft").args(["list", "table", "ip", "weft"]));
    assert!(!legacy.status.success(), "the old `ip weft` table is still there");
    assert!(agent.host().ping(&ip));
}

#[test]
fn attach_detach_expose_hide_and_ps() {
    let agent = Agent::start(AgentOpts {
        range: "10.2.0.0/16".into(),
        extra: vec!["--ipalloc-default-subnet".into(), "10.2.1.0/24".into()],
    });
    let ns = Netns::new("p");
    let out = must(
        agent.weft().args(["attach", "10.2.5.5/24", "net:10.2.3.0/24", "--netns"]).arg(ns.path()),
    );
    assert_eq!(out.trim(), "10.2.5.5/24 10.2.3.1/24");
    let out = must(agent.weft().args(["attach", "--netns"]).arg(ns.path()));
    assert!(out.contains("10.2.1.1/24"), "default subnet address added: {out}");
    let ps = must(agent.weft().arg("ps"));
    assert!(ps.contains("10.2.5.5/24 10.2.3.1/24 10.2.1.1/24"), "{ps}");
    // Isolation by subnet: the host has no address in 10.2.3.0/24 until it is exposed.
    assert!(!agent.host().ping("10.2.3.1"));
    let exposed = must(agent.weft().args(["expose", "net:10.2.3.0/24"]));
    assert_eq!(exposed.trim(), "10.2.3.2/24");
    assert_eq!(
        must(agent.weft().args(["expose", "net:10.2.3.0/24"])).trim(),
        "10.2.3.2/24",
        "expose is idempotent"
    );
    assert!(agent.host().ping("10.2.3.1"));
    assert_eq!(must(agent.weft().args(["hide", "net:10.2.3.0/24"])).trim(), "10.2.3.2/24");
    assert!(!agent.host().ping("10.2.3.1"));
    let removed = must(agent.weft().args(["detach", "net:10.2.3.0/24", "--netns"]).arg(ns.path()));
    assert_eq!(removed.trim(), "10.2.3.1/24");
    must(agent.weft().args(["detach", "--netns"]).arg(ns.path()));
    assert!(agent.endpoint_links().is_empty());
    let bad = run(agent.weft().args(["attach", "net:10.2.3.2/30", "--netns"]).arg(ns.path()));
    assert_eq!(bad.status.code(), Some(2), "not a network address is a usage error");
    let bad = run(agent.weft().args(["attach", "net:10.9.0.0/24", "--netns"]).arg(ns.path()));
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not inside the allocation range"));
}
