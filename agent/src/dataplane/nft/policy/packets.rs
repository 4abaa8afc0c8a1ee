//! The policy table on real packets: the conformance lab's nine pods (namespaces x, y, z; pods
//! a, b, c) in namespaces of their own on one bridge, in a node namespace that holds the
//! table, with br_netfilter handing bridged packets to the forward hook as on a weft node.
//! Every pod serves TCP and UDP on 80 and 81; every pod probes every other on each, and what
//! gets through must be what `Program::decide` and the evaluator say. A sequence of cluster
//! states is written through [`PolicyTable`], so both the whole-table and the in-place element
//! paths are held to the packets.

use std::io::{Read, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;

use super::{Denied, PolicyTable, TableOptions, Written};
use crate::dataplane::nft::NftSocket;
use crate::policy::compile::{Packet, Program};
use crate::policy::eval::{Cluster, Flow};
use crate::policy::model::{PodKey, Protocol};
use crate::policy::tests::{lab, policy};

const PORTS: [u16; 2] = [80, 81];
const PROTOCOLS: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];
/// How long a probe waits for a SYN-ACK or a UDP answer before it counts as dropped; an
/// answer on a bridge in one kernel takes microseconds.
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);
const NODE: &str = "n1";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread of its own that has entered network namespace `ns`; threads it
/// starts are in `ns` too, and sockets it makes stay there.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("the namespace");
            // SAFETY: setns moves only this thread, which nothing else uses.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the namespace thread")
    })
}

/// The node and pod namespaces, removed on drop.
struct Lab {
    node: String,
    pods: Vec<(PodKey, Ipv4Addr, String)>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.pods.iter().map(|p| &p.2).chain([&self.node]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Lab {
    fn new(cluster: &Cluster) -> Lab {
        // Tests in this process run at once: each lab gets names of its own.
        static LABS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let tag = format!("wtp{}-{}", std::process::id(), LABS.fetch_add(1, Ordering::Relaxed));
        let node = format!("{tag}-n");
        let mut lab = Lab { node: node.clone(), pods: Vec::new() };
        ip(&["netns", "add", &node]);
        ip(&["-n", &node, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &node, "link", "set", "br0", "up"]);
        for (i, pod) in cluster.pods.values().enumerate() {
            let IpAddr::V4(addr) = pod.ips[0] else { panic!("IPv4 pods only") };
            let ns = format!("{tag}-p{i}");
            ip(&["netns", "add", &ns]);
            lab.pods.push((pod.key.clone(), addr, ns.clone()));
            let host = format!("v{i}");
            ip(&[
                "-n", &node, "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ]);
            ip(&["-n", &node, "link", "set", &host, "master", "br0", "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/16"), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    /// Starts every pod's servers; they stop when the returned guards drop.
    fn serve(&self) -> Vec<Servers> {
        self.pods.iter().map(|(_, addr, ns)| in_netns(ns, || Servers::bind(*addr))).collect()
    }

    fn write(&self, table: &mut PolicyTable, p: &Program) -> Written {
        in_netns(&self.node, || {
            let mut sock = NftSocket::open().expect("netlink");
            table.apply(&mut sock, p).expect("the kernel takes the program")
        })
    }

    /// The dispatch chains' drop counters.
    fn denied(&self, table: &PolicyTable) -> Vec<Denied> {
        in_netns(&self.node, || {
            let mut sock = NftSocket::open().expect("netlink");
            table.denied(&mut sock).expect("the counters")
        })
    }

    /// Every (from, to, port, protocol) probe and whether it got an answer.
    fn probe_all(&self) -> Vec<(usize, usize, u16, Protocol, bool)> {
        let targets: Vec<Ipv4Addr> = self.pods.iter().map(|p| p.1).collect();
        std::thread::scope(|s| {
            let sources: Vec<_> = self
                .pods
                .iter()
                .enumerate()
                .map(|(from, (_, _, ns))| {
                    let targets = &targets;
                    s.spawn(move || in_netns(ns, || probe_from(from, targets)))
                })
                .collect();
            sources.into_iter().flat_map(|t| t.join().expect("a probing thread")).collect()
        })
    }
}

fn probe_from(from: usize, targets: &[Ipv4Addr]) -> Vec<(usize, usize, u16, Protocol, bool)> {
    std::thread::scope(|s| {
        let mut probes = Vec::new();
        for (to, addr) in targets.iter().enumerate().filter(|(to, _)| *to != from) {
            for port in PORTS {
                for protocol in PROTOCOLS {
                    let target = SocketAddr::new(IpAddr::V4(*addr), port);
                    probes.push(
                        s.spawn(move || (from, to, port, protocol, answers(target, protocol))),
                    );
                }
            }
        }
        probes.into_iter().map(|p| p.join().expect("a probe")).collect()
    })
}

fn answers(target: SocketAddr, protocol: Protocol) -> bool {
    let mut byte = [0u8; 1];
    match protocol {
        Protocol::Tcp => TcpStream::connect_timeout(&target, PROBE_TIMEOUT).is_ok_and(|mut c| {
            c.set_read_timeout(Some(PROBE_TIMEOUT)).is_ok() && c.read_exact(&mut byte).is_ok()
        }),
        Protocol::Udp => {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
            sock.set_read_timeout(Some(PROBE_TIMEOUT)).expect("a timeout");
            sock.send_to(b"?", target).is_ok() && sock.recv(&mut byte).is_ok()
        }
        Protocol::Sctp => unreachable!("this kernel has no SCTP"),
    }
}

/// One pod's TCP and UDP servers on 80 and 81, each answering with one byte.
struct Servers {
    tcp: Vec<TcpListener>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Servers {
    fn bind(addr: Ipv4Addr) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let mut s = Servers { tcp: Vec::new(), stop: stop.clone(), threads: Vec::new() };
        for port in PORTS {
            let l = TcpListener::bind((addr, port)).expect("a TCP port");
            let u = UdpSocket::bind((addr, port)).expect("a UDP port");
            let lc = l.try_clone().expect("clone");
            // A UDP receive cannot be woken safely (std panics on the empty address a shut
            // down socket returns), so the UDP server looks at the stop flag between waits.
            u.set_read_timeout(Some(Duration::from_millis(50))).expect("a timeout");
            let stop = stop.clone();
            s.threads.push(std::thread::spawn(move || {
                while let Ok((mut c, _)) = lc.accept() {
                    let _ = c.write_all(b"!");
                }
            }));
            s.threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 16];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(b"!", peer);
                    }
                }
            }));
            s.tcp.push(l);
        }
        s
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // shutdown() wakes a thread blocked in accept with an error, ending its loop.
        for fd in self.tcp.iter().map(AsRawFd::as_raw_fd) {
            // SAFETY: the fd is open; it is owned by self and closed only after this.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The conformance lab with every pod on this node, so that every pod is enforced here.
fn one_node(mut c: Cluster) -> Cluster {
    for pod in c.pods.values_mut() {
        pod.node = NODE.to_owned();
    }
    c
}

/// The probes against the program and the evaluator: the differing cells, if any, and how
/// many probes were dropped.
fn differences(lab: &Lab, c: &Cluster, p: &Program) -> (Vec<String>, usize) {
    let mut wrong = Vec::new();
    let mut dropped = 0;
    for (from, to, port, protocol, got) in lab.probe_all() {
        dropped += usize::from(!got);
        let (a, b) = (&lab.pods[from], &lab.pods[to]);
        let packet = Packet { src: IpAddr::V4(a.1), dst: IpAddr::V4(b.1), protocol, port };
        // A finished pod's address is just an address to the evaluator.
        let (from_party, to_party) = (c.party_of(packet.src), c.party_of(packet.dst));
        let flow = Flow { from: from_party, to: to_party, protocol, port };
        let (program, evaluator) = (p.decide(&packet), c.evaluate(&flow).allowed());
        if got != program || got != evaluator {
            wrong.push(format!(
                "{} -> {} {}/{port}: packets {}, program {}, evaluator {}",
                a.0,
                b.0,
                protocol.name(),
                verdict(got),
                verdict(program),
                verdict(evaluator)
            ));
        }
    }
    (wrong, dropped)
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "pass" } else { "dropped" }
}

/// Policies in x only, so that the later steps (labels and pods elsewhere) change elements.
fn policies() -> Vec<crate::policy::model::Policy> {
    vec![
        // x/a: from pods labelled pod=b in namespaces other than x, TCP 81 and UDP 80-81.
        policy(
            "x",
            "a-from-b",
            json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["x"]}]},
                "podSelector": {"matchLabels": {"pod": "b"}}}],
                "ports": [{"protocol": "TCP", "port": 81}, {"protocol": "UDP", "port": 80, "endPort": 81}]}]}),
        ),
        // x/b: TCP to a named port resolved on each destination, UDP to z.
        policy(
            "x",
            "b-out",
            json!({"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"],
            "egress": [{"ports": [{"port": "serve-80-tcp"}]},
                       {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "z"}}}],
                        "ports": [{"protocol": "UDP"}]}]}),
        ),
        // x/c: from the pod network except y's pods, on any port.
        policy(
            "x",
            "c-except-y",
            json!({"podSelector": {"matchLabels": {"pod": "c"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.32.0.0/16", "except": ["10.32.2.0/24"]}}]}]}),
        ),
    ]
}

fn with(mut c: Cluster, policies: Vec<crate::policy::model::Policy>) -> Cluster {
    for p in policies {
        c.add_policy(p);
    }
    c
}

#[test]
fn packets_through_the_table_agree_with_the_program_and_the_evaluator() {
    let base = one_node(lab());
    let lab = Lab::new(&base);
    let _servers = lab.serve();
    // Logging on: the kernel must take the log rules too.
    let mut table = PolicyTable::new(TableOptions { log: true, strict: false });

    // Each step: a cluster state, and whether its program must be written in place.
    let mut relabelled = with(base.clone(), policies());
    relabelled
        .pods
        .get_mut(&PodKey::new("y", "c"))
        .expect("y/c")
        .labels
        .insert("pod".into(), "b".into());
    let mut finished = relabelled.clone();
    finished.pods.get_mut(&PodKey::new("z", "b")).expect("z/b").finished = true;
    let steps: Vec<(&str, Cluster, bool)> = vec![
        ("no policy", base.clone(), false),
        ("three policies in x", with(base.clone(), policies()), false),
        ("y/c relabelled pod=b: a peer of x/a now", relabelled, true),
        ("z/b finished: out of every set", finished, true),
        ("the policies deleted", base.clone(), false),
    ];
    let mut report = Vec::new();
    for (name, cluster, in_place) in &steps {
        let program = Program::compile(cluster, NODE);
        let written = lab.write(&mut table, &program);
        if *in_place {
            assert!(
                matches!(written, Written::Elements(n) if n > 0),
                "{name}: written {written:?}, expected in place"
            );
        }
        let (wrong, dropped) = differences(&lab, cluster, &program);
        // Every dropped probe sent at least one packet to a drop rule, counted since the
        // table was last written whole.
        let counted: u64 = lab.denied(&table).iter().map(|d| d.packets).sum();
        assert!(
            counted >= dropped as u64,
            "{name}: {counted} packets counted, {dropped} probes dropped"
        );
        report.push(format!(
            "{name} ({written:?}): {dropped} of 288 probes dropped, {counted} packets counted, {} differing",
            wrong.len()
        ));
        assert!(wrong.is_empty(), "{name} ({written:?}):\n{}", wrong.join("\n"));
    }
    eprintln!("{}", report.join("\n"));
}

/// What happens to a TCP connection x/a -> x/b:82 (both pods isolated, each policy allowing it)
/// when x/b's policy stops allowing it: with the default table it lives on and only new
/// connections are refused; with a strict one it stops at its next packet. Either way the
/// replies of an allowed connection pass although both ends are isolated.
#[test]
fn established_connections_outlive_their_policy_unless_strict() {
    let base = one_node(lab());
    let lab = Lab::new(&base);
    let pod = |name: &str| lab.pods.iter().find(|p| p.0 == PodKey::new("x", name)).expect("pod");
    let ((_, _, a_ns), (_, b_addr, b_ns)) = (pod("a"), pod("b"));
    let server = SocketAddr::new(IpAddr::V4(*b_addr), 82);
    let listener = in_netns(b_ns, || TcpListener::bind(server).expect("port 82"));
    let _echo = Echo::serve(listener);
    let allowing = |from: &str| {
        with(
            base.clone(),
            vec![
                policy(
                    "x",
                    "b-in",
                    json!({"podSelector": {"matchLabels": {"pod": "b"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": from}}}],
                                 "ports": [{"port": 82}]}]}),
                ),
                policy(
                    "x",
                    "a-out",
                    json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"],
                    "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                                "ports": [{"port": 82}]}]}),
                ),
            ],
        )
    };
    let (before, after) = (allowing("a"), allowing("c"));
    let connect = || in_netns(a_ns, || TcpStream::connect_timeout(&server, PROBE_TIMEOUT));
    for strict in [false, true] {
        let mut table = PolicyTable::new(TableOptions { log: false, strict });
        lab.write(&mut table, &Program::compile(&before, NODE));
        let mut conn = connect().expect("x/a reaches x/b:82 while b-in allows it");
        assert!(exchange(&mut conn), "strict {strict}: no echo while allowed");
        lab.write(&mut table, &Program::compile(&after, NODE));
        assert!(connect().is_err(), "strict {strict}: a new connection after b-in changed");
        assert_eq!(
            exchange(&mut conn),
            !strict,
            "strict {strict}: the established connection after b-in changed"
        );
    }
}

/// A line sent and the same line echoed within the probe timeout.
fn exchange(conn: &mut TcpStream) -> bool {
    let mut back = [0u8; 5];
    conn.set_read_timeout(Some(PROBE_TIMEOUT)).is_ok()
        && conn.write_all(b"ping\n").is_ok()
        && conn.read_exact(&mut back).is_ok()
        && &back == b"ping\n"
}

/// Echoes every connection on a listener; stops (and joins) on drop.
struct Echo {
    listener: TcpListener,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn serve(listener: TcpListener) -> Echo {
        let accepting = listener.try_clone().expect("clone");
        let thread = std::thread::spawn(move || {
            while let Ok((mut c, _)) = accepting.accept() {
                std::thread::spawn(move || {
                    // a connection the strict table cut never sees its end
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = c.read(&mut buf) {
                        if c.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Echo { listener, thread: Some(thread) }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        // SAFETY: the fd is open and owned by self; shutdown wakes the accepting thread.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
