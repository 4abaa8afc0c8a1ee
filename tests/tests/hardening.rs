//! Issue 16, what a pod (or a local user) can do to its own agent: flood DNS towards an
//! upstream that drops everything, reach the mesh and overlay ports on its gateway, read the
//! password from the agent's command line; and the privileges the agent keeps.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use weft_e2e::*;

/// `weft expose`: the host's bridge address (the pods' gateway, where DNS listens).
fn expose(a: &Agent) -> String {
    let out = must(a.weft().arg("expose"));
    out.lines().next().and_then(|l| l.split('/').next()).unwrap_or_default().to_owned()
}

/// A pod with an automatically allocated address and the DNS name `name`.
fn pod(a: &Agent, name: &str) -> (Netns, String) {
    let ns = Netns::new("p");
    let got = must(
        a.weft()
            .args(["attach", "--name", name, "--netns"])
            .arg(ns.path())
            .args(["--ifname", "eth0"]),
    );
    (ns, got.trim().split('/').next().unwrap_or_default().to_owned())
}

/// The pid of the `weft agent` process running in `host`.
fn agent_pid(host: &Netns) -> u32 {
    let out = must(std::process::Command::new("ip").args(["netns", "pids", &host.name]));
    out.split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"agent"))
        })
        .expect("the agent's process in its host namespace")
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).expect("/proc/PID/fd").count()
}

/// A line of /proc/PID/status, e.g. "CapBnd".
fn status_field(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("{key} missing from /proc/{pid}/status"))
}

/// What `weft ps` says, without fields that may change on their own.
fn ps(a: &Agent) -> BTreeSet<String> {
    a.endpoints().iter().map(|e| format!("{} {} {}", e["id"], e["addresses"], e["netns"])).collect()
}

/// 2000 queries for distinct outside names, sent at once from one UDP socket; prints how
/// many answers came back within the wait.
const FLOOD: &str = r#"
import socket, struct, sys, time
gw, n, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
for i in range(n):
    q = struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0)
    for label in (b"q%d" % i, b"flood", b"example"):
        q += bytes([len(label)]) + label
    q += b"\0" + struct.pack(">HH", 1, 1)
    s.sendto(q, (gw, 53))
print("sent", flush=True)
s.settimeout(0.5)
got, end = 0, time.time() + wait
while time.time() < end:
    try:
        s.recv(4096)
        got += 1
    except socket.timeout:
        pass
print(got, flush=True)
"#;

#[test]
fn a_dns_flood_towards_a_dropping_upstream_leaves_pods_and_fds_alone() {
    let (lab, h) = Lab::new(1, 1500);
    // The upstream: an address on the underlay that takes every packet and answers none.
    must(lab.underlay.cmd("ip").args(["addr", "add", "10.99.0.253/24", "dev", "br0"]));
    let mut nft =
        lab.underlay.cmd("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().expect("nft");
    std::io::Write::write_all(
        &mut nft.stdin.take().expect("stdin"),
        b"table inet wtedrop {\nchain input {\ntype filter hook input priority 0; policy accept;\n\
          ip daddr 10.99.0.253 udp dport 53 drop\nip daddr 10.99.0.253 tcp dport 53 drop\n}\n}\n",
    )
    .expect("nft script");
    assert!(nft.wait().expect("nft").success());
    let conf = std::path::PathBuf::from("/run/wte").join(format!("{}.resolv", lab.underlay.name));
    std::fs::create_dir_all("/run/wte").expect("/run/wte");
    std::fs::write(&conf, "nameserver 10.99.0.253\n").expect("resolv.conf");
    let conf_arg = conf.display().to_string();
    // Forwards are held for 10 s each, and the namespaces are checked every second, so an fd
    // shortage during the flood would meet a reconciliation.
    let agents = lab.agents(
        h,
        &["--resolv-conf", &conf_arg, "--dns-fallback-timeout", "10", "--reconcile-interval", "1"],
    );
    let a = &agents[0];
    let gw = expose(a);
    let pods: Vec<(Netns, String)> = (0..3).map(|i| pod(a, &format!("p{i}"))).collect();
    let pid = agent_pid(a.host());
    // The flood must not depend on how generous the machine's limit is: 1024, like most hosts.
    must(std::process::Command::new("prlimit").args([
        "--pid",
        &pid.to_string(),
        "--nofile=1024:1024",
    ]));
    let before_ps = ps(a);
    let before_links: BTreeSet<String> = a.endpoint_links().into_iter().collect();
    let before_fds = fd_count(pid);

    let mut flood = pods[0]
        .0
        .cmd("python3")
        .args(["-c", FLOOD, &gw, "2000", "12"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3");
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(flood.stdout.take().expect("stdout")));
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("sent"));
    // While the forwards are pending (10 s), watch the agent's descriptors and its pods.
    let mut peak = 0;
    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        peak = peak.max(fd_count(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        peak <= before_fds + 256 + 64,
        "the agent held {peak} descriptors during the flood (had {before_fds})"
    );
    assert_eq!(ps(a), before_ps, "weft ps changed during the flood");
    let answered: usize =
        lines.next().and_then(Result::ok).and_then(|l| l.parse().ok()).unwrap_or(0);
    let _ = flood.wait();
    assert!(answered > 0, "queries beyond the cap are answered at once, not dropped");
    // Once the forwards have timed out, everything is as it was.
    wait_until(Duration::from_secs(20), "the agent's descriptors to come back", || {
        fd_count(pid) <= before_fds + 4
    });
    assert_eq!(ps(a), before_ps, "weft ps changed after the flood");
    assert_eq!(a.endpoint_links().into_iter().collect::<BTreeSet<_>>(), before_links);
    for (ns, ip) in &pods {
        assert!(ns.links().contains(&"eth0".to_owned()), "a pod lost its interface");
        let addrs = must(ns.cmd("ip").args(["-o", "-4", "addr", "show", "eth0"]));
        assert!(addrs.contains(&format!("{ip}/")), "a pod lost its address: {addrs}");
    }
    assert!(!a.log().contains("releasing the endpoint"), "{}", a.log());
    let _ = std::fs::remove_file(conf);
}

/// Packets counted by the rule with `comment` in the probe table.
fn counted(host: &Netns, comment: &str) -> u64 {
    let out = must(host.cmd("nft").args(["list", "table", "inet", "wteprobe"]));
    out.lines()
        .find(|l| l.contains(comment))
        .and_then(|l| l.split("packets ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter {comment} in {out}"))
}

#[test]
fn pods_cannot_reach_the_agents_mesh_and_overlay_ports_but_dns_answers() {
    let (lab, h) = Lab::new(1, 1500);
    let agents = lab.agents(h, &[]);
    let a = &agents[0];
    let gw = expose(a);
    let (client, ip) = pod(a, "client");
    // Counters before (priority -10) and after (priority 10) weft's input chain (priority 0).
    let probe = "table inet wteprobe {\n\
        chain early { type filter hook input priority -10; policy accept;\n\
          iifname \"weft\" udp dport { 6783, 6784 } counter comment \"early-udp\"\n\
          iifname \"weft\" tcp dport 6783 counter comment \"early-tcp\"\n}\n\
        chain late { type filter hook input priority 10; policy accept;\n\
          iifname \"weft\" udp dport { 6783, 6784 } counter comment \"late-udp\"\n\
          iifname \"weft\" tcp dport 6783 counter comment \"late-tcp\"\n}\n}\n";
    let mut nft = a.host().cmd("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().expect("nft");
    std::io::Write::write_all(&mut nft.stdin.take().expect("stdin"), probe.as_bytes())
        .expect("nft");
    assert!(nft.wait().expect("nft").success(), "nft rejected the probe table");

    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for port in (6783, 6784):\n    for _ in range(5):\n        s.sendto(b'x' * 64, ('{gw}', port))\n\
         t = socket.socket()\nt.settimeout(2)\n\
         try:\n    print(t.connect_ex(('{gw}', 6783)))\nexcept OSError as e:\n    print('error', e)\n"
    );
    let out = must(client.cmd("python3").args(["-c", &script]));
    assert_ne!(out.trim(), "0", "a pod opened a TCP connection to the agent's mesh port");
    assert!(counted(a.host(), "early-udp") >= 10, "the datagrams reached the host");
    assert!(counted(a.host(), "early-tcp") >= 1, "the SYN reached the host");
    assert_eq!(counted(a.host(), "late-udp"), 0, "a datagram got past weft's input chain");
    assert_eq!(counted(a.host(), "late-tcp"), 0, "a SYN got past weft's input chain");
    // DNS on the same address still answers the pod.
    let dig = must(client.cmd("dig").args([
        &format!("@{gw}"),
        "+short",
        "+time=2",
        "+tries=1",
        "client.weave.local",
    ]));
    assert_eq!(dig.trim(), ip);
    // And the mesh itself still works between hosts: the agent's peers are not on the bridge.
    let _ = run(a.host().cmd("nft").args(["delete", "table", "inet", "wteprobe"]));
}

#[test]
fn the_agent_keeps_only_the_documented_capabilities_and_hides_its_password() {
    let mut a =
        Agent::start(AgentOpts::nick("caps", &["--password", "correct-horse-battery-staple"]));
    let pid = agent_pid(a.host());
    // NET_BIND_SERVICE (10), NET_ADMIN (12), NET_RAW (13), SYS_ADMIN (21): see docs/security.md.
    let mask = "0000000000203400";
    assert_eq!(status_field(pid, "CapBnd"), mask);
    assert_eq!(status_field(pid, "CapPrm"), mask);
    assert_eq!(status_field(pid, "CapEff"), mask);
    assert_eq!(status_field(pid, "CapInh"), "0000000000000000");
    assert_eq!(status_field(pid, "CapAmb"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    assert!(
        !String::from_utf8_lossy(&cmdline).contains("correct-horse"),
        "the password is in /proc/PID/cmdline"
    );
    // Its files are its own.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: std::path::PathBuf| {
        std::fs::metadata(&p).expect("state file").permissions().mode() & 0o777
    };
    assert_eq!(mode(a.state_dir()), 0o700);
    assert_eq!(mode(a.state_dir().join("weft.db")), 0o600);
    // With these capabilities it still does its work: a pod attached, reachable, detached.
    let gw = expose(&a);
    let (p, _) = pod(&a, "x");
    assert!(p.ping(&gw), "the pod reaches its gateway");
    must(a.weft().args(["detach", "--netns"]).arg(p.path()));
    assert!(a.endpoints().iter().all(|e| e["netns"] != p.path().display().to_string()));
    // Its own namespace is refused as a pod's.
    let own = format!("/proc/{pid}/ns/net");
    let out = run(a.weft().args(["attach", "--netns", &own, "--ifname", "eth9"]));
    assert!(!out.status.success(), "the agent attached its own namespace");
    a.stop();
}

/// The documented cap (docs/security.md; `DNS_TCP_PER_SOURCE` in agent/src/dataplane/nft.rs).
const DNS_TCP_PER_SOURCE: u32 = 16;

/// Opens `n` TCP connections to `gw:53` at once and holds them; prints how many were
/// accepted, then waits for stdin to close.
const HOLD_TCP: &str = r#"
import socket, sys
gw, n = sys.argv[1], int(sys.argv[2])
held = []
for _ in range(n):
    s = socket.socket()
    s.settimeout(2)
    if s.connect_ex((gw, 53)) == 0:
        held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"#;

#[test]
fn a_pod_cannot_hold_more_than_its_share_of_dns_tcp_connections() {
    let (lab, h) = Lab::new(1, 1500);
    let agents = lab.agents(h, &[]);
    let a = &agents[0];
    let gw = expose(a);
    let (greedy, _) = pod(a, "greedy");
    let (other, other_ip) = pod(a, "other");
    let pid = agent_pid(a.host());
    let before_fds = fd_count(pid);

    let mut hold = greedy
        .cmd("python3")
        .args(["-c", HOLD_TCP, &gw, "64"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(hold.stdout.take().expect("stdout")));
    let held: u32 = lines
        .next()
        .and_then(Result::ok)
        .and_then(|l| l.trim().parse().ok())
        .expect("the holder's count");
    // Every connection the pod got is one the agent accepted: the cap, and no more.
    assert_eq!(held, DNS_TCP_PER_SOURCE, "connections held by one pod");
    assert!(
        fd_count(pid) <= before_fds + held as usize + 4,
        "the agent holds {} descriptors (had {before_fds})",
        fd_count(pid)
    );
    // Another pod still resolves over TCP while the first holds its share.
    let dig = must(other.cmd("dig").args([
        &format!("@{gw}"),
        "+tcp",
        "+short",
        "+time=2",
        "+tries=1",
        "other.weave.local",
    ]));
    assert_eq!(dig.trim(), other_ip);
    drop(hold.stdin.take());
    let _ = hold.wait();
}

#[test]
fn dns_refuses_queries_from_the_underlay_even_when_routed_to_the_gateway() {
    let (lab, h) = Lab::new(1, 1500);
    let agents = lab.agents(h, &[]);
    let a = &agents[0];
    let gw = expose(a);
    let (client, ip) = pod(a, "client");
    // Another underlay machine that routes the pod range through this host.
    must(lab.underlay.cmd("ip").args(["addr", "add", "10.99.0.200/24", "dev", "br0"]));
    must(lab.underlay.cmd("ip").args(["route", "add", &format!("{gw}/32"), "via", lab.ip(1)]));
    must(a.host().cmd("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]));
    let ask = |ns: &Netns, name: &str| {
        must(ns.cmd("dig").args([&format!("@{gw}"), "+time=2", "+tries=1", name]))
    };
    for name in ["client.weave.local", "example.org"] {
        let out = ask(&lab.underlay, name);
        assert!(out.contains("status: REFUSED"), "{name} from the underlay: {out}");
    }
    // The pod itself is answered, over the same address.
    let out = ask(&client, "client.weave.local");
    assert!(out.contains("status: NOERROR") && out.contains(&ip), "{out}");
}
