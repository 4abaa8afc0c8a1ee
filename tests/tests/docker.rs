//! Plain Docker hosts (issue 17): a real dockerd (Debian's docker.io 20.10) per lab host,
//! driving the agent's remote network and IPAM driver over /run/docker/plugins/weft.sock
//! (each host's own, see weft_e2e::docker), with a busybox image loaded locally.

use std::path::PathBuf;
use std::time::Duration;

use weft_e2e::docker::{DockerHost, IMAGE, mount_namespace};
use weft_e2e::{Agent, AgentOpts, Lab, wait_until};

const T: Duration = Duration::from_secs(30);
const RANGE: &str = "10.2.0.0/16";

/// A lab host with its agent and its dockerd (dockerd goes first on drop, while the agent
/// still answers its Leave calls).
struct Host {
    docker: DockerHost,
    agent: Agent,
}

fn hosts(lab: &Lab, netns: Vec<weft_e2e::Netns>) -> Vec<Host> {
    let n = netns.len();
    netns
        .into_iter()
        .enumerate()
        .map(|(i, ns)| {
            let dir = PathBuf::from("/run/wte").join(&ns.name);
            let mnt = mount_namespace(&ns, &dir.join("plugins"));
            let ns_path = ns.path();
            let api = dir.join("docker").join("docker.sock");
            let mut extra = vec![
                "--docker-plugin".to_owned(),
                "--docker-socket".to_owned(),
                api.display().to_string(),
                // What `weft launch` adds on a Docker host.
                "--docker-network".to_owned(),
                "weft".to_owned(),
                "--ipalloc-default-subnet".to_owned(),
                "10.2.1.0/24".to_owned(),
            ];
            extra.extend((1..=n).filter(|j| *j != i + 1).map(|j| lab.ip(j).to_owned()));
            let e: Vec<&str> = extra.iter().map(String::as_str).collect();
            let mut opts = AgentOpts::nick(&format!("h{}", i + 1), &e);
            opts.range = RANGE.to_owned();
            let agent = Agent::start_in_mount(ns, mnt.clone(), opts);
            let docker = DockerHost::start(&ns_path, &mnt, &dir.join("docker"));
            Host { docker, agent }
        })
        .collect()
}

fn ip_of(h: &Host, container: &str) -> String {
    h.docker
        .ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            container,
        ])
        .split_whitespace()
        .find(|a| a.starts_with("10.2."))
        .unwrap_or_default()
        .to_owned()
}

fn pings(h: &Host, container: &str, target: &str) -> bool {
    h.docker.try_docker(&["exec", container, "ping", "-c1", "-W1", target]).0
}

fn run_on(h: &Host, name: &str, net: &str, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["run", "-d", "--name", name, "--network", net];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, "sleep", "3600"]);
    h.docker.try_docker(&args)
}

/// The container's default gateway: the bridge's address, where weft's DNS listens.
fn gw_of(h: &Host, container: &str) -> String {
    let route = h.docker.ok(&["exec", container, "ip", "route", "show", "default"]);
    route.split_whitespace().nth(2).unwrap_or_default().to_owned()
}

fn docker_endpoints(h: &Host) -> Vec<String> {
    h.agent
        .endpoints()
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .filter(|id| id.starts_with("docker:"))
        .collect()
}

/// `docker network create -d weft --ipam-driver weft --subnet 10.2.3.0/24 net1` on every host.
fn create_net1(hosts: &[Host]) {
    for x in hosts {
        x.docker.ok(&[
            "network",
            "create",
            "-d",
            "weft",
            "--ipam-driver",
            "weft",
            "--subnet",
            "10.2.3.0/24",
            "net1",
        ]);
    }
}

#[test]
fn docker_containers_across_hosts() {
    let (lab, netns) = Lab::new(2, 1500);
    let h = hosts(&lab, netns);
    create_net1(&h);
    // The agent made the `weft` network exist (as `weft launch` does): `--network weft` works.
    for x in &h {
        wait_until(T, "the weft network", || {
            x.docker.try_docker(&["network", "inspect", "weft"]).0
        });
    }
    assert!(run_on(&h[0], "w1", "weft", &[]).0);
    assert!(run_on(&h[1], "w2", "weft", &[]).0);
    let w2 = ip_of(&h[1], "w2");
    assert!(w2.starts_with("10.2.1."), "{w2}");
    wait_until(T, "w1 -> w2 on the weft network", || pings(&h[0], "w1", &w2));

    let (ok, _, err) = run_on(&h[0], "c1", "net1", &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = run_on(&h[1], "c2", "net1", &[]);
    assert!(ok, "{err}");
    let (ip1, ip2) = (ip_of(&h[0], "c1"), ip_of(&h[1], "c2"));
    assert!(ip1.starts_with("10.2.3.") && ip2.starts_with("10.2.3.") && ip1 != ip2, "{ip1} {ip2}");
    let inside = h[0].docker.ok(&["exec", "c1", "ip", "-4", "-o", "addr", "show", "ethwe0"]);
    assert!(inside.contains(&format!("{ip1}/24")), "{inside}");
    wait_until(T, "c1 -> c2 across hosts", || pings(&h[0], "c1", &ip2));
    assert!(pings(&h[1], "c2", &ip1));

    // Names: the container's name is in weave.local on every host, served by weft's DNS at
    // the gateway (the bridge's address), which `--dns` hands to Docker's embedded resolver.
    let route = h[0].docker.ok(&["exec", "c1", "ip", "route", "show", "default"]);
    let gw = route.split_whitespace().nth(2).unwrap_or_default().to_owned();
    let resolves = |x: &Host, c: &str, name: &str, want: &str| {
        let (ok, out, _) = x.docker.try_docker(&["exec", c, "nslookup", name, &gw_of(x, c)]);
        ok && out.contains(want)
    };
    wait_until(T, "c2.weave.local on h1", || resolves(&h[0], "c1", "c2.weave.local", &ip2));
    wait_until(T, "c1.weave.local on h2", || resolves(&h[1], "c2", "c1.weave.local", &ip1));
    let (ok, out, err) = h[0].docker.try_docker(&[
        "run",
        "--rm",
        "--network",
        "net1",
        "--dns",
        &gw,
        IMAGE,
        "ping",
        "-c1",
        "-W2",
        "c2.weave.local",
    ]);
    assert!(ok, "ping by name through Docker's resolver: {out}\n{err}");

    // --ip is honoured, and nobody else gets the address.
    let (ok, _, err) = run_on(&h[1], "c3", "net1", &["--ip", "10.2.3.77"]);
    assert!(ok, "{err}");
    assert_eq!(ip_of(&h[1], "c3"), "10.2.3.77");
    wait_until(T, "c1 -> c3", || pings(&h[0], "c1", "10.2.3.77"));
    let before = (docker_endpoints(&h[0]), docker_endpoints(&h[1]));
    let (ok, _, err) = run_on(&h[1], "dup", "net1", &["--ip", "10.2.3.77"]);
    assert!(!ok && err.contains("10.2.3.77 is already in use"), "{err}");
    // Bad input: errors Docker shows, saying what to fix, and nothing changes.
    let (ok, _, err) = h[0].docker.try_docker(&[
        "network",
        "create",
        "-d",
        "weft",
        "--ipam-driver",
        "weft",
        "--subnet",
        "192.168.50.0/24",
        "bad",
    ]);
    assert!(!ok && err.contains("choose a --subnet inside 10.2.0.0/16"), "{err}");
    let (ok, _, err) = h[0].docker.try_docker(&[
        "network",
        "create",
        "-d",
        "weft",
        "--ipam-driver",
        "weft",
        "--subnet",
        "10.2.9.0/24",
        "--ipv6",
        "--subnet",
        "fd00:9::/64",
        "bad6",
    ]);
    assert!(!ok && err.contains("IPv6"), "{err}");
    let _ = h[1].docker.try_docker(&["rm", "-f", "dup"]);
    assert_eq!(
        (docker_endpoints(&h[0]), docker_endpoints(&h[1])),
        before,
        "a refused call changed nothing"
    );

    // Two weft networks with different subnets do not reach each other.
    for x in &h {
        x.docker.ok(&[
            "network",
            "create",
            "-d",
            "weft",
            "--ipam-driver",
            "weft",
            "--subnet",
            "10.2.4.0/24",
            "net2",
        ]);
    }
    let (ok, _, err) = run_on(&h[1], "d2", "net2", &[]);
    assert!(ok, "{err}");
    let (ok, _, err) = run_on(&h[0], "d1", "net2", &[]);
    assert!(ok, "{err}");
    let d2 = ip_of(&h[1], "d2");
    wait_until(T, "d1 -> d2 on net2", || pings(&h[0], "d1", &d2));
    assert!(!pings(&h[0], "c1", &d2), "net1 must not reach net2");
    assert!(!pings(&h[1], "d2", &ip1), "net2 must not reach net1");

    // Removing a container releases its address and interface.
    wait_until(T, "c3.weave.local on h1", || resolves(&h[0], "c1", "c3.weave.local", "10.2.3.77"));
    h[1].docker.ok(&["rm", "-f", "c3"]);
    assert!(!docker_endpoints(&h[1]).contains(&"docker:10.2.3.77".to_owned()));
    wait_until(T, "c3's name to go on h1", || {
        !resolves(&h[0], "c1", "c3.weave.local", "10.2.3.77")
    });
    let (ok, _, err) = run_on(&h[1], "c3b", "net1", &["--ip", "10.2.3.77"]);
    assert!(ok, "the released address is free again: {err}");
}

#[test]
fn dockerd_and_agent_restarts_keep_containers_connected() {
    let (lab, netns) = Lab::new(2, 1500);
    let mut h = hosts(&lab, netns);
    create_net1(&h);
    assert!(run_on(&h[0], "k1", "net1", &[]).0);
    assert!(run_on(&h[1], "k2", "net1", &[]).0);
    let (ip1, ip2) = (ip_of(&h[0], "k1"), ip_of(&h[1], "k2"));
    wait_until(T, "k1 -> k2", || pings(&h[0], "k1", &ip2));

    // dockerd restarts (--live-restore): the containers keep their addresses and paths.
    h[0].docker.restart();
    assert_eq!(ip_of(&h[0], "k1"), ip1);
    assert!(pings(&h[0], "k1", &ip2) && pings(&h[1], "k2", &ip1));

    // The agent is killed and started again: same addresses, still connected, and Docker's
    // calls work again (a new container, and removing one).
    let records = docker_endpoints(&h[0]);
    h[0].agent.kill9();
    h[0].agent.restart();
    assert_eq!(docker_endpoints(&h[0]), records, "the records survive the crash");
    let log = h[0].agent.log();
    for bad in ["could not be repaired", "namespace is gone", "endpoint repaired"] {
        assert!(
            !log.contains(bad),
            "start-up reconciliation found the Docker endpoints intact: {bad}"
        );
    }
    assert_eq!(ip_of(&h[0], "k1"), ip1);
    wait_until(T, "k2 -> k1 after the agent restart", || pings(&h[1], "k2", &ip1));
    assert!(run_on(&h[0], "k3", "net1", &[]).0);
    let ip3 = ip_of(&h[0], "k3");
    assert!(!ip3.is_empty() && ip3 != ip1);
    wait_until(T, "k2 -> k3", || pings(&h[1], "k2", &ip3));
    h[0].docker.ok(&["rm", "-f", "k3"]);
    assert_eq!(docker_endpoints(&h[0]), records, "k3's address is released");
}

/// `nslookup NAME` at weft's DNS (the container's gateway) from container `c` answers `want`.
fn resolves_at_gw(h: &Host, c: &str, name: &str, want: &str) -> bool {
    let (ok, out, _) = h.docker.try_docker(&["exec", c, "nslookup", name, &gw_of(h, c)]);
    ok && out.contains(want)
}

#[test]
fn docker_hostname_and_network_alias_in_weave_local() {
    let (lab, netns) = Lab::new(2, 1500);
    let h = hosts(&lab, netns);
    for x in &h {
        wait_until(T, "the weft network", || {
            x.docker.try_docker(&["network", "inspect", "weft"]).0
        });
    }
    let (ok, _, err) =
        run_on(&h[0], "n1", "weft", &["--hostname", "hn1", "--network-alias", "al1"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run_on(&h[1], "q2", "weft", &[]);
    assert!(ok, "{err}");
    let ip1 = ip_of(&h[0], "n1");
    assert!(ip1.starts_with("10.2.1."), "{ip1}");
    for name in ["n1.weave.local", "hn1.weave.local", "al1.weave.local"] {
        wait_until(T, &format!("{name} on h2"), || resolves_at_gw(&h[1], "q2", name, &ip1));
    }
    // Docker's defaults (the short id as hostname and alias) are not registered.
    let id = h[0].docker.ok(&["inspect", "-f", "{{.Id}}", "n1"]);
    let short = format!("{}.weave.local", &id[..12]);
    assert!(!resolves_at_gw(&h[1], "q2", &short, &ip1), "{short} must not be registered");
    // `weft ps` shows the container's name for the driver's endpoint.
    let ps =
        String::from_utf8_lossy(&weft_e2e::run(h[0].agent.weft().arg("ps")).stdout).to_string();
    assert!(
        ps.lines().any(|l| l.starts_with("docker:") && l.contains(&ip1) && l.ends_with(" n1")),
        "{ps}"
    );

    h[0].docker.ok(&["rm", "-f", "n1"]);
    for name in ["n1.weave.local", "hn1.weave.local", "al1.weave.local"] {
        wait_until(T, &format!("{name} to go on h2"), || !resolves_at_gw(&h[1], "q2", name, &ip1));
    }
}

#[test]
fn weft_attach_by_docker_container_name() {
    let (lab, netns) = Lab::new(2, 1500);
    let h = hosts(&lab, netns);
    for x in &h {
        wait_until(T, "the weft network", || {
            x.docker.try_docker(&["network", "inspect", "weft"]).0
        });
    }
    let (ok, _, err) = run_on(&h[1], "w2", "weft", &[]);
    assert!(ok, "{err}");
    let w2 = ip_of(&h[1], "w2");
    // A container on Docker's default bridge, knowing nothing of weft.
    h[0].docker.ok(&["run", "-d", "--name", "plain", IMAGE, "sleep", "3600"]);
    let sock = h[0].docker.socket.display().to_string();
    let weft = |args: &[&str]| {
        let mut c = h[0].agent.weft();
        c.args(args).args(["--docker-socket", &sock]);
        weft_e2e::run(&mut c)
    };
    let text = |o: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };

    let out = weft(&["attach", "plain"]);
    assert!(out.status.success(), "{}", text(&out));
    let cidr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(cidr.starts_with("10.2.1.") && cidr.ends_with("/24"), "{cidr}");
    let addr = cidr.split('/').next().unwrap_or_default().to_owned();
    let inside = h[0].docker.ok(&["exec", "plain", "ip", "-4", "-o", "addr", "show", "ethwe"]);
    assert!(inside.contains(&cidr), "{inside}");
    wait_until(T, "plain -> w2 across hosts", || pings(&h[0], "plain", &w2));
    wait_until(T, "plain.weave.local on h2", || {
        resolves_at_gw(&h[1], "w2", "plain.weave.local", &addr)
    });

    // weft ps: by name, and filtered by container (name or id).
    let id = h[0].docker.ok(&["inspect", "-f", "{{.Id}}", "plain"]);
    let ps = text(&weft(&["ps"]));
    let line = format!("docker-cli:{id}");
    assert!(
        ps.lines().any(|l| l.starts_with(&line) && l.contains(&cidr) && l.ends_with(" plain")),
        "{ps}"
    );
    for target in ["plain", &id[..12]] {
        let only = weft(&["ps", target]);
        assert!(only.status.success(), "{}", text(&only));
        let only = String::from_utf8_lossy(&only.stdout).to_string();
        assert_eq!(only.lines().count(), 1, "{only}");
        assert!(only.starts_with(&line), "{only}");
    }

    // Errors say what to fix.
    let out = weft(&["attach", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("no such container nosuch"), "{}", text(&out));
    h[0].docker.ok(&["create", "--name", "stopped", IMAGE, "sleep", "1"]);
    let out = weft(&["attach", "stopped"]);
    assert!(text(&out).contains("container stopped is not running"), "{}", text(&out));
    let out = run_weft_with(&h[0], &["attach", "plain", "--docker-socket", "/nonexistent.sock"]);
    assert!(text(&out).contains("Docker API at /nonexistent.sock"), "{}", text(&out));
    let out = weft(&["attach", "plain", "other"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // Detach by name: the interface goes and the address is released.
    let out = weft(&["detach", "plain"]);
    assert!(out.status.success(), "{}", text(&out));
    let (has_if, _, _) = h[0].docker.try_docker(&["exec", "plain", "ip", "link", "show", "ethwe"]);
    assert!(!has_if, "ethwe is gone after detach");
    let ps = text(&weft(&["ps"]));
    assert!(!ps.contains("docker-cli:") && !ps.contains(&cidr), "{ps}");
    assert!(
        !h[0].agent.endpoints().iter().any(|e| e.to_string().contains(&addr)),
        "the address is released"
    );
}

/// `weft ARGS` against host `h`'s agent, with exactly the given flags.
fn run_weft_with(h: &Host, args: &[&str]) -> std::process::Output {
    weft_e2e::run(h.agent.weft().args(args))
}
