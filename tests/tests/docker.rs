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
    // An --ip outside the network's subnet: Docker refuses it before asking weft, naming
    // the address (weft's own message is in docs/docker.md for other clients).
    let (ok, _, err) = run_on(&h[1], "out", "net1", &["--ip", "10.2.4.1"]);
    assert!(!ok && err.contains("10.2.4.1") && err.to_lowercase().contains("subnet"), "{err}");
    let _ = h[1].docker.try_docker(&["rm", "-f", "out"]);
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

/// The lines of this host's dockerd log from byte `from` on that mention the plugin.
fn plugin_log(h: &Host, from: usize) -> Vec<String> {
    let text = std::fs::read_to_string(h.docker.dir.join("dockerd.log")).unwrap_or_default();
    text.get(from..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("plugin") || l.contains("weft") || l.contains("elease"))
        .map(str::to_owned)
        .collect()
}

fn log_len(h: &Host) -> usize {
    std::fs::metadata(h.docker.dir.join("dockerd.log")).map(|m| m.len() as usize).unwrap_or(0)
}

#[test]
fn containers_removed_while_the_agent_is_down_are_released_when_it_returns() {
    let (lab, netns) = Lab::new(2, 1500);
    let mut h = hosts(&lab, netns);
    create_net1(&h);
    for (x, name) in [(0, "s1"), (0, "g1"), (0, "d1"), (1, "r2")] {
        let (ok, _, err) = run_on(&h[x], name, "net1", &[]);
        assert!(ok, "{name}: {err}");
    }
    let (s1, g1, r2) = (ip_of(&h[0], "s1"), ip_of(&h[0], "g1"), ip_of(&h[1], "r2"));
    wait_until(T, "s1 -> r2", || pings(&h[0], "s1", &r2));
    let gone = format!("docker:{g1}");
    let left = format!("docker:{}", ip_of(&h[0], "d1"));
    assert!(docker_endpoints(&h[0]).contains(&gone));

    // The agent is killed; Docker removes g1 and disconnects d1 (which keeps running, so its
    // sandbox stays) meanwhile. dockerd's calls find no plugin.
    h[0].agent.kill9();
    let mark = log_len(&h[0]);
    let t = std::time::Instant::now();
    std::thread::scope(|s| {
        let d = &h[0].docker;
        s.spawn(move || d.ok(&["network", "disconnect", "net1", "d1"]));
        d.ok(&["rm", "-f", "g1"]);
    });
    eprintln!("docker rm -f with the agent down: {:.1} s", t.elapsed().as_secs_f64());
    for l in plugin_log(&h[0], mark) {
        eprintln!("dockerd: {l}");
    }

    // The agent comes back: Docker no longer has g1's endpoint, so its address is released.
    h[0].agent.start_again();
    let t = std::time::Instant::now();
    wait_until(T, "the agent to answer", || h[0].agent.status().is_some());
    wait_until(Duration::from_secs(5), "g1's address released", || {
        !docker_endpoints(&h[0]).contains(&gone)
    });
    eprintln!("g1's address released {:.1} s after the restart", t.elapsed().as_secs_f64());
    h[0].agent.wait_ready();
    // dockerd gave up on each of its four calls after ≈15 s, so g1's Join is over 60 s old
    // and the namespace check may release it first; Docker's view would otherwise.
    let released_by = |id: &str| {
        let log = h[0].agent.log();
        let line = log.lines().find(|l| {
            l.contains(&format!("endpoint={id} "))
                && (l.contains("Docker no longer has") || l.contains("namespace is gone"))
        });
        line.map(str::to_owned)
    };
    let by = released_by(&gone);
    eprintln!("g1: {by:?}");
    assert!(by.is_some(), "the release is logged");
    // d1's sandbox is alive, so only Docker's view says its endpoint is gone: released, and
    // not set up again in the container.
    wait_until(Duration::from_secs(5), "d1's address released", || {
        !docker_endpoints(&h[0]).contains(&left)
    });
    let by = released_by(&left).unwrap_or_default();
    eprintln!("d1: {by}");
    assert!(by.contains("Docker no longer has this endpoint"), "{by}");
    let log = h[0].agent.log();
    assert!(!log.contains("endpoint repaired"), "d1's interface is not put back");
    wait_until(T, "d1 without a weft interface", || {
        !h[0].docker.try_docker(&["exec", "d1", "ip", "link", "show", "ethwe0"]).0
    });

    // The survivors keep address and connectivity; no interface is left for g1.
    assert_eq!(ip_of(&h[0], "s1"), s1);
    assert_eq!(ip_of(&h[1], "r2"), r2);
    wait_until(T, "r2 -> s1 after the restart", || pings(&h[1], "r2", &s1));
    assert!(pings(&h[0], "s1", &r2));
    let joined = h[0].agent.endpoints().iter().filter(|e| e["kind"] == "docker").count();
    assert_eq!(h[0].agent.endpoint_links().len(), joined, "one veth per joined endpoint");
    assert!(docker_endpoints(&h[0]).contains(&format!("docker:{s1}")));

    // The freed address can be handed out again.
    let (ok, _, err) = run_on(&h[0], "g2", "net1", &["--ip", &g1]);
    assert!(ok, "the released address is free again: {err}");
    assert_eq!(ip_of(&h[0], "g2"), g1);
    wait_until(T, "r2 -> g2", || pings(&h[1], "r2", &g1));
}

/// The `m…` container names in this host's DNS (every host's entries).
fn dns_names(h: &Host) -> Vec<String> {
    let st = String::from_utf8_lossy(&weft_e2e::run(h.agent.weft().args(["status", "dns"])).stdout)
        .to_string();
    st.split_whitespace()
        .filter(|w| w.starts_with('m') && w.ends_with(".weave.local."))
        .map(str::to_owned)
        .collect()
}

/// Runs `op` for every (host index, container) at once, one thread each; asserts that all
/// succeeded and returns the seconds they took together.
fn on_each_at_once(
    h: &[Host],
    names: &[(usize, String)],
    what: &str,
    op: impl Fn(&Host, &str) -> (bool, String) + Sync,
) -> f64 {
    let t = std::time::Instant::now();
    let results: Vec<(&str, bool, String)> = std::thread::scope(|s| {
        let threads: Vec<_> = names
            .iter()
            .map(|(x, n)| {
                let (host, op) = (&h[*x], &op);
                s.spawn(move || {
                    let (ok, err) = op(host, n);
                    (n.as_str(), ok, err)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("a container thread")).collect()
    });
    let secs = t.elapsed().as_secs_f64();
    for (n, ok, err) in &results {
        assert!(ok, "{what} {n}: {err}");
    }
    secs
}

#[test]
fn fifty_containers_started_and_removed_at_once_on_two_hosts() {
    const PER_HOST: usize = 25;
    let (lab, netns) = Lab::new(2, 1500);
    let h = hosts(&lab, netns);
    create_net1(&h);
    let names: Vec<(usize, String)> =
        (0..2).flat_map(|x| (0..PER_HOST).map(move |i| (x, format!("m{x}-{i:02}")))).collect();

    let start_all = on_each_at_once(&h, &names, "docker run", |host, n| {
        let (ok, _, err) = run_on(host, n, "net1", &[]);
        (ok, err)
    });

    // Every container got an address, and no two the same.
    let mut seen = std::collections::BTreeMap::new();
    for (x, n) in &names {
        let ip = ip_of(&h[*x], n);
        assert!(ip.starts_with("10.2.3."), "{n} has no weft address: {ip:?}");
        if let Some(other) = seen.insert(ip.clone(), n.clone()) {
            panic!("{ip} given to both {other} and {n}");
        }
    }
    assert_eq!(seen.len(), 2 * PER_HOST);
    for x in &h {
        assert_eq!(docker_endpoints(x).len(), PER_HOST, "one record per container");
    }
    // A sample across hosts talks, and the names arrive.
    let far = ip_of(&h[1], "m1-24");
    wait_until(T, "m0-00 -> m1-24", || pings(&h[0], "m0-00", &far));
    let t_names = std::time::Instant::now();
    wait_until(Duration::from_secs(60), "all 50 names in DNS on both hosts", || {
        h.iter().all(|x| dns_names(x).len() == 2 * PER_HOST)
    });
    let names_s = t_names.elapsed().as_secs_f64();

    let remove_all = on_each_at_once(&h, &names, "docker rm -f", |host, n| {
        let (ok, _, err) = host.docker.try_docker(&["rm", "-f", n]);
        (ok, err)
    });

    // Nothing leaked: no records or reservations, no veths, no names.
    for (i, x) in h.iter().enumerate() {
        wait_until(T, &format!("h{} to hold no Docker endpoint", i + 1), || {
            docker_endpoints(x).is_empty()
        });
        wait_until(T, &format!("h{} to have no endpoint veth", i + 1), || {
            x.agent.endpoint_links().is_empty()
        });
        wait_until(T, &format!("h{} to have none of the names", i + 1), || dns_names(x).is_empty());
    }
    eprintln!(
        "50 containers on 2 hosts: start-all {start_all:.1} s, names everywhere {names_s:.1} s \
         later, remove-all {remove_all:.1} s"
    );
}

/// Bytes host `h`'s agent has sent over sleeve, from its status.
fn sleeve_tx_bytes(h: &Host) -> u64 {
    let s = h.agent.status().unwrap_or_default();
    s["overlay"]["sleeve"]["tx_bytes"].as_u64().unwrap_or(0)
}

/// Lab hosts where dockerd starts before the agent, in a namespace with IPv4 forwarding off,
/// so that dockerd enables forwarding itself and sets the FORWARD policy to DROP (what a
/// host that starts docker.service first gets). `legacy[i]`: host i's dockerd uses
/// iptables-legacy. `agent_first[i]`: host i keeps the documented start order instead.
fn hosts_forward_drop(
    lab: &Lab,
    netns: Vec<weft_e2e::Netns>,
    legacy: &[bool],
    agent_first: &[bool],
) -> Vec<Host> {
    for ns in &netns {
        assert!(ns.sh("sysctl -qw net.ipv4.ip_forward=0").status.success());
    }
    hosts_with(lab, netns, legacy, agent_first, &[])
}

/// Agent options of lab host `i` (0-based) of `n`, as `hosts` gives them, plus `flags`.
fn host_opts(lab: &Lab, dir: &std::path::Path, i: usize, n: usize, flags: &[&str]) -> AgentOpts {
    let api = dir.join("docker").join("docker.sock");
    let mut extra = vec![
        "--docker-plugin".to_owned(),
        "--docker-socket".to_owned(),
        api.display().to_string(),
        "--docker-network".to_owned(),
        "weft".to_owned(),
        "--ipalloc-default-subnet".to_owned(),
        "10.2.1.0/24".to_owned(),
    ];
    extra.extend(flags.iter().map(|f| f.to_string()));
    extra.extend((1..=n).filter(|j| *j != i + 1).map(|j| lab.ip(j).to_owned()));
    let e: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut opts = AgentOpts::nick(&format!("h{}", i + 1), &e);
    opts.range = RANGE.to_owned();
    opts
}

/// Lab hosts with dockerd using iptables-legacy where `legacy[i]`, started after the agent
/// where `agent_first[i]` (before it otherwise), agents with `flags` added.
fn hosts_with(
    lab: &Lab,
    netns: Vec<weft_e2e::Netns>,
    legacy: &[bool],
    agent_first: &[bool],
    flags: &[&str],
) -> Vec<Host> {
    let n = netns.len();
    netns
        .into_iter()
        .enumerate()
        .map(|(i, ns)| {
            let dir = PathBuf::from("/run/wte").join(&ns.name);
            let mnt = mount_namespace(&ns, &dir.join("plugins"));
            let ns_path = ns.path();
            let opts = host_opts(lab, &dir, i, n, flags);
            let path = legacy[i].then(|| weft_e2e::docker::legacy_iptables(&dir));
            let start_docker =
                || DockerHost::start_with_path(&ns_path, &mnt, &dir.join("docker"), path.clone());
            if agent_first[i] {
                let agent = Agent::start_in_mount(ns, mnt.clone(), opts);
                Host { docker: start_docker(), agent }
            } else {
                let docker = start_docker();
                Host { docker, agent: Agent::start_in_mount(ns, mnt.clone(), opts) }
            }
        })
        .collect()
}

/// `iptables[-legacy] -S CHAIN` in the host; returns (stdout, stderr).
fn iptables_s(h: &Host, legacy: bool, chain: &str) -> (String, String) {
    let prog = if legacy { "iptables-legacy" } else { "iptables-nft" };
    let out = weft_e2e::run(h.agent.cmd(prog).args(["-S", chain]));
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn weft_rules(h: &Host) -> Vec<String> {
    let (out, _) = iptables_s(h, false, "DOCKER-USER");
    out.lines().filter(|l| l.contains("--comment \"weft:weft\"")).map(str::to_owned).collect()
}

#[test]
fn docker_forward_drop_with_iptables_nft() {
    let (lab, netns) = Lab::new(2, 1500);
    let mut h = hosts_forward_drop(&lab, netns, &[false, false], &[false, false]);
    for x in &h {
        let (fwd, _) = iptables_s(x, false, "FORWARD");
        assert!(fwd.contains("-P FORWARD DROP"), "dockerd set DROP: {fwd}");
        wait_until(T, "the weft network", || {
            x.docker.try_docker(&["network", "inspect", "weft"]).0
        });
    }
    assert!(run_on(&h[0], "w1", "weft", &[]).0);
    assert!(run_on(&h[0], "w3", "weft", &[]).0);
    assert!(run_on(&h[1], "w2", "weft", &[]).0);
    let (w2, w3) = (ip_of(&h[1], "w2"), ip_of(&h[0], "w3"));
    // Bridged on one host (br_netfilter), across hosts (fastdp), out through masquerade.
    wait_until(T, "w1 -> w3 on one host", || pings(&h[0], "w1", &w3));
    wait_until(T, "w1 -> w2 across hosts", || pings(&h[0], "w1", &w2));
    wait_until(T, "w1 -> h2's underlay address", || pings(&h[0], "w1", lab.ip(2)));

    // What weft added, as iptables-nft shows it, without warnings, ahead of Docker's RETURN.
    let (rules, err) = iptables_s(&h[0], false, "DOCKER-USER");
    assert!(err.trim().is_empty(), "iptables -S warns: {err}");
    let want = [
        "-A DOCKER-USER -i weft -m comment --comment \"weft:weft\" -j ACCEPT",
        "-A DOCKER-USER -o weft -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"weft:weft\" -j ACCEPT",
        "-A DOCKER-USER -d 10.2.1.0/24 -o weft -m comment --comment \"weft:weft\" -j ACCEPT",
    ];
    let lines: Vec<&str> = rules.lines().collect();
    assert_eq!(&lines[1..4], &want, "{rules}");
    assert_eq!(lines.last(), Some(&"-A DOCKER-USER -j RETURN"), "{rules}");

    // dockerd restarts (it re-creates its chains): still connected, no duplicates.
    h[0].docker.restart();
    assert!(pings(&h[0], "w1", &w3) && pings(&h[0], "w1", &w2));
    assert_eq!(weft_rules(&h[0]).len(), 3, "{:?}", iptables_s(&h[0], false, "DOCKER-USER"));
    // The agent restarts: it rewrites its rules once, still no duplicates.
    h[0].agent.kill9();
    h[0].agent.restart();
    wait_until(T, "w1 -> w2 after the agent restart", || pings(&h[0], "w1", &w2));
    assert_eq!(weft_rules(&h[0]).len(), 3, "{:?}", iptables_s(&h[0], false, "DOCKER-USER"));

    // `weft reset` removes weft's rules and only those.
    for c in ["w1", "w3"] {
        h[0].docker.ok(&["rm", "-f", c]);
    }
    h[0].agent.reset();
    let (rules, _) = iptables_s(&h[0], false, "DOCKER-USER");
    assert_eq!(rules.trim(), "-N DOCKER-USER\n-A DOCKER-USER -j RETURN", "{rules}");
    let (fwd, _) = iptables_s(&h[0], false, "FORWARD");
    assert!(fwd.contains("-A FORWARD -j DOCKER-USER"), "Docker's rules stay: {fwd}");
}

#[test]
fn docker_forward_drop_with_iptables_legacy() {
    let (lab, netns) = Lab::new(2, 1500);
    // h1 starts docker first (legacy DROP); h2 keeps the documented start order.
    let h = hosts_forward_drop(&lab, netns, &[true, true], &[false, true]);
    let (fwd1, _) = iptables_s(&h[0], true, "FORWARD");
    assert!(fwd1.contains("-P FORWARD DROP"), "{fwd1}");
    let (fwd2, _) = iptables_s(&h[1], true, "FORWARD");
    assert!(fwd2.contains("-P FORWARD ACCEPT"), "weft first: forwarding was on: {fwd2}");
    for x in &h {
        wait_until(T, "the weft network", || {
            x.docker.try_docker(&["network", "inspect", "weft"]).0
        });
    }

    // h1: the agent cannot fix iptables-legacy; it says so, with the fix.
    let warning = |x: &Host| {
        x.agent.status().and_then(|s| s["bridge"]["forward_warning"].as_str().map(str::to_owned))
    };
    let w = warning(&h[0]).unwrap_or_default();
    assert!(w.contains("iptables-legacy -I DOCKER-USER -i weft -j ACCEPT"), "{w}");
    assert!(h[0].agent.log().contains("weft's forwarded traffic is dropped"));
    let text = weft_e2e::must(h[0].agent.weft().arg("status"));
    assert!(text.contains("WARNING") && text.contains("before docker.service"), "{text}");
    assert_eq!(warning(&h[1]), None);

    assert!(run_on(&h[0], "w1", "weft", &[]).0);
    assert!(run_on(&h[0], "w3", "weft", &[]).0);
    assert!(run_on(&h[1], "w2", "weft", &[]).0);
    let (w2, w3) = (ip_of(&h[1], "w2"), ip_of(&h[0], "w3"));
    // The failure the warning is about: even two containers on one bridge are cut off.
    assert!(!pings(&h[0], "w1", &w3), "legacy DROP drops bridged traffic");
    // The fix the warning gives.
    for dir in ["-i", "-o"] {
        weft_e2e::must(h[0].agent.cmd("iptables-legacy").args([
            "-I",
            "DOCKER-USER",
            dir,
            "weft",
            "-j",
            "ACCEPT",
        ]));
    }
    wait_until(T, "w1 -> w3 after the fix", || pings(&h[0], "w1", &w3));
    wait_until(T, "w1 -> w2 after the fix", || pings(&h[0], "w1", &w2));
    // h2 (weft before dockerd): works without anything added.
    assert!(run_on(&h[1], "w4", "weft", &[]).0);
    let w4 = ip_of(&h[1], "w4");
    wait_until(T, "w2 -> w4 on h2", || pings(&h[1], "w2", &w4));
}

/// Median of some figures.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Seconds from `docker run --rm` to its container's first successful ping of `target`.
fn run_to_ping(h: &Host, net: &str, target: &str) -> f64 {
    let start = std::time::Instant::now();
    let until = format!("until ping -c1 -W1 {target} >/dev/null; do :; done");
    h.docker.ok(&["run", "--rm", "--network", net, IMAGE, "sh", "-c", &until]);
    start.elapsed().as_secs_f64()
}

/// The network namespace of a running container, as a path for `nsenter --net=`.
fn netns_of(h: &Host, container: &str) -> String {
    let pid = h.docker.ok(&["inspect", "-f", "{{.State.Pid}}", container]);
    format!("/proc/{pid}/ns/net")
}

/// One iperf3 run of `seconds` from the namespace `client` to `server_ip` served in
/// `server` (namespace paths); Gbit/s.
fn iperf(server: &str, client: &str, server_ip: &str, seconds: u32) -> f64 {
    let mut srv = std::process::Command::new("nsenter")
        .args([&format!("--net={server}"), "iperf3", "-s", "-1", "-p", "5301"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    wait_until(T, "the iperf3 server to listen", || {
        let o = weft_e2e::run(std::process::Command::new("nsenter").args([
            &format!("--net={server}"),
            "ss",
            "-ltn",
        ]));
        String::from_utf8_lossy(&o.stdout).contains(":5301")
    });
    let out = weft_e2e::run(std::process::Command::new("nsenter").args([
        &format!("--net={client}"),
        "iperf3",
        "-c",
        server_ip,
        "-p",
        "5301",
        "-t",
        &seconds.to_string(),
        "-J",
        "--connect-timeout",
        "3000",
    ]));
    // `-1` ends the server after one test, but not always promptly: end it.
    let _ = srv.kill();
    let _ = srv.wait();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    json["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(f64::NAN) / 1e9
}

/// The repo's reference overlay (as dp-bench builds it): a kernel VXLAN (VNI 47, port 4790)
/// between two plain bridges, with one namespace on each; returns those namespaces.
fn hand_built_vxlan(h: &[Host]) -> Vec<weft_e2e::Netns> {
    let pods: Vec<weft_e2e::Netns> = (0..2).map(|_| weft_e2e::Netns::new("vx")).collect();
    for (i, (x, pod)) in h.iter().zip(&pods).enumerate() {
        let script = format!(
            "ip link add vxbr type bridge && ip link set vxbr mtu 1450 up && \
             ip link add vxr type vxlan id 47 dstport 4790 local 10.99.0.{me} dev eth0 nolearning && \
             ip link set vxr mtu 1450 master vxbr up && \
             bridge fdb append 00:00:00:00:00:00 dev vxr dst 10.99.0.{other} && \
             ip link add vxp netns {pod} type veth peer name vxh && ip link set vxh mtu 1450 master vxbr up && \
             ip -n {pod} link set vxp name eth0 && ip -n {pod} link set eth0 mtu 1450 up && \
             ip -n {pod} addr add 10.47.0.{me}/16 dev eth0",
            me = i + 1,
            other = 2 - i,
            pod = pod.name
        );
        let out = x.agent.host().sh(&script);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    pods
}

/// The benchmark of issue 17 (`scripts/bench.sh docker`; `WEFT_BENCH_ROUNDS`, default 5):
/// `docker run --rm` to the first successful ping on weft and on Docker's own bridge, and
/// container→container TCP across two hosts on fastdp and sleeve against the hand-built VXLAN
/// reference, interleaved round by round.
#[test]
#[ignore = "a benchmark: scripts/bench.sh docker"]
fn docker_bench() {
    let rounds: usize =
        std::env::var("WEFT_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(5);
    let (lab, netns) = Lab::new(2, 1500);
    let mut h = hosts_with(&lab, netns, &[false, false], &[true, true], &[]);
    for x in &h {
        wait_until(T, "the weft network", || {
            x.docker.try_docker(&["network", "inspect", "weft"]).0
        });
    }
    assert!(run_on(&h[0], "b1", "bridge", &[]).0);
    assert!(run_on(&h[0], "w1", "weft", &[]).0);
    assert!(run_on(&h[1], "w2", "weft", &[]).0);
    let (w1, w2) = (ip_of(&h[0], "w1"), ip_of(&h[1], "w2"));
    let b1 = h[0].docker.ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "b1"]);
    wait_until(T, "w1 -> w2", || pings(&h[0], "w1", &w2));
    let (mut on_weft, mut on_bridge) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        on_weft.push(run_to_ping(&h[0], "weft", &w1));
        on_bridge.push(run_to_ping(&h[0], "bridge", &b1));
    }
    println!(
        "docker run --rm to first ping ({rounds} rounds): weft {:.3} s, Docker bridge {:.3} s (medians); weft {on_weft:.3?}, bridge {on_bridge:.3?}",
        median(on_weft.clone()),
        median(on_bridge.clone())
    );

    let pods = hand_built_vxlan(&h);
    let (p1, p2) = (pods[0].path().display().to_string(), pods[1].path().display().to_string());
    let secs = 5;
    let phase = |label: &str, h: &[Host]| {
        let (c1, c2) = (netns_of(&h[0], "w1"), netns_of(&h[1], "w2"));
        let (mut weft, mut vx) = (Vec::new(), Vec::new());
        let sleeve_before = sleeve_tx_bytes(&h[0]);
        for _ in 0..rounds {
            vx.push(iperf(&p2, &p1, "10.47.0.2", secs));
            weft.push(iperf(&c2, &c1, &w2, secs));
        }
        let (mw, mv) = (median(weft.clone()), median(vx.clone()));
        // Proof of the path: on sleeve, the bytes iperf moved went through the agent.
        let moved = weft.iter().sum::<f64>() * 1e9 / 8.0 * f64::from(secs);
        let through_sleeve = (sleeve_tx_bytes(&h[0]) - sleeve_before) as f64;
        println!(
            "{label}: sleeve sent {:.2} GB while iperf moved {:.2} GB",
            through_sleeve / 1e9,
            moved / 1e9
        );
        if label == "sleeve" {
            assert!(through_sleeve >= 0.9 * moved, "iperf's traffic did not go through sleeve");
        }
        assert!(mw.is_finite() && mv.is_finite(), "iperf3 failed: {label} {weft:?}, VXLAN {vx:?}");
        println!(
            "container->container TCP across hosts ({rounds} rounds x {secs} s): {label} {mw:.2} Gbit/s vs hand-built VXLAN {mv:.2} Gbit/s = {:.2}x; {label} {weft:.2?}, VXLAN {vx:.2?}",
            mw / mv
        );
    };
    let peer = h[1].agent.peer_name();
    assert_eq!(h[0].agent.overlay_mode(&peer).as_deref(), Some("fastdp"));
    phase("fastdp", &h);
    // `--no-fastdp` does not remove an existing VXLAN device: remove it (and with it the
    // forwarding entries that would keep the traffic on the kernel path) while the agent is down.
    for (i, x) in h.iter_mut().enumerate() {
        let dir = PathBuf::from("/run/wte").join(&x.agent.name);
        x.agent.stop();
        assert!(x.agent.host().sh("ip link del weft-vx").status.success());
        x.agent.restart_with(host_opts(&lab, &dir, i, 2, &["--no-fastdp"]));
        assert!(!x.agent.host().links().contains(&"weft-vx".to_owned()));
    }
    wait_until(T, "sleeve", || h[0].agent.overlay_mode(&peer).as_deref() == Some("sleeve"));
    wait_until(T, "w1 -> w2 on sleeve", || pings(&h[0], "w1", &w2));
    phase("sleeve", &h);
}
