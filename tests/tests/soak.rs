//! The soak: three hosts under mixed load for five minutes — on every host a CNI ADD/DEL
//! loop, weave.local DNS queries and TCP transfers between pods on different hosts — while
//! one agent (h3) is SIGKILLed and restarted in the middle of every minute. At the end of every
//! minute the load pauses and each agent's VmRSS and open fds (all but the epoll/event fds of
//! per-thread runtimes) are read from /proc: after the first minute (warm-up: thread pools and
//! buffers growing to their working size) RSS stays within 10 % of minute 2's, and the fds
//! never rise above the warm-up level by more than 10 % or 5, whichever is more. No address is
//! ever held by two live pods, and once the load stops nothing is left: no CNI endpoint, veth,
//! allocation, DEL queue file or interface in a pod namespace, and the fds are back within that
//! bound.
//!
//! `WEFT_SOAK_SECONDS` shortens the run for iteration (the suite runs the full 300 s); the
//! five "minutes" are then fifths of it. The figures are printed (docs/benchmarks.md).

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_e2e::*;

const HOSTS: usize = 3;
/// The agent killed every minute (1-based).
const VICTIM: usize = 3;
/// CNI pods alive at once per host: pod i is deleted when pod i + WINDOW is added.
const WINDOW: usize = 2;
/// One round of load per host at most this often (ADD, DEL, a DNS query, a TCP transfer).
const ROUND: Duration = Duration::from_millis(400);
const TCP_PORT: &str = "9000";
const TCP_BYTES: &str = "262144";
/// The sample the others are compared with: minute 2, the first after warm-up.
const BASE: usize = 1;
/// Allowed drift of RSS and fd counts from the minute-2 figures...
const FLAT: f64 = 0.10;
/// ... but for fds never less than this many above the highest warm-up reading: with ~30 fds
/// the count moves by up to 5 between pauses (h2, never restarted, read 29, 27, 32, 29, 29 in
/// one run) while mesh connections to the restarted h3 and in-flight CNI calls come and go. A
/// leak under this load (about 1 500 ADD/DEL, 5 restarts) would be tens of fds or more.
const FD_SLACK: u64 = 5;

/// What one host's load loop needs, as plain data (the agents stay with the main thread).
#[derive(Clone)]
struct HostLoad {
    host: usize,
    bins: Bins,
    conf: String,
    /// Namespace of this host's long-lived pod, the client of DNS and TCP.
    pod: String,
    dns: String,
    /// The next host's long-lived pod: its DNS name and address.
    peer_name: String,
    peer_ip: String,
}

#[derive(Default)]
struct Counters {
    add: AtomicU64,
    del: AtomicU64,
    dns_ok: AtomicU64,
    dns_failed: AtomicU64,
    tcp_ok: AtomicU64,
    tcp_failed: AtomicU64,
}

/// Shared between the main thread and the load loops.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    pause: AtomicBool,
    /// Per host: whether its loop is parked at a pause.
    parked: [AtomicBool; HOSTS],
    counters: Counters,
    /// Every live pod address and its owner, across hosts.
    live: Mutex<HashMap<String, String>>,
    failures: Mutex<Vec<String>>,
}

impl Shared {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).push(what);
    }

    /// Records a new live address; a second holder is a failure.
    fn claim(&self, ip: &str, owner: &str) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(other) = live.insert(ip.to_owned(), owner.to_owned()) {
            self.fail(format!("duplicate address {ip}: given to {owner} while {other} holds it"));
        }
    }

    fn release(&self, ip: &str) {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(ip);
    }
}

/// One agent's figures at one moment.
#[derive(Clone, Copy, Debug)]
struct Sample {
    rss_kib: u64,
    fds: u64,
}

fn sample(a: &Agent) -> Sample {
    let pid = a.pid().expect("the agent runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc fd")
        .filter_map(Result::ok)
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| !is_runtime_internal(&t)))
        .count() as u64;
    Sample { rss_kib, fds }
}

/// The epoll and event fds of a thread's own tokio runtime (each blocking thread that ran a
/// data-plane operation keeps one, for as long as tokio keeps the idle thread): they come and
/// go with the thread pool, bounded by it, and are not what a leak is made of. Sockets, files,
/// pidfds and namespace handles are all counted.
fn is_runtime_internal(target: &std::path::Path) -> bool {
    matches!(
        target.to_str(),
        Some("anon_inode:[eventpoll]" | "anon_inode:[eventfd]" | "anon_inode:[timerfd]")
    )
}

/// The agents' samples while the load is paused: RSS as last read, and the lowest fd count seen
/// until the counts have held still for `QUIET` (polled; at most `SETTLE`): connections being
/// closed (a mesh reconnect, a pod's last TCP connection) take a moment to go.
fn settled(agents: &[Agent]) -> Vec<Sample> {
    const QUIET: Duration = Duration::from_secs(11);
    const SETTLE: Duration = Duration::from_secs(30);
    let deadline = Instant::now() + SETTLE;
    let mut last: Vec<Sample> = agents.iter().map(sample).collect();
    let mut low: Vec<u64> = last.iter().map(|s| s.fds).collect();
    let mut since = Instant::now();
    while Instant::now() < deadline && since.elapsed() < QUIET {
        std::thread::sleep(Duration::from_millis(100));
        let now: Vec<Sample> = agents.iter().map(sample).collect();
        if now.iter().zip(&last).any(|(a, b)| a.fds != b.fds) {
            since = Instant::now();
        }
        for (l, s) in low.iter_mut().zip(&now) {
            *l = (*l).min(s.fds);
        }
        last = now;
    }
    last.into_iter().zip(low).map(|(s, fds)| Sample { fds, ..s }).collect()
}

/// Paces the load and the timeline: waits until `t` (not a synchronisation point).
fn pace_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn in_ns(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

/// `weft expose`: the bridge address, where the host's DNS server listens.
fn expose(a: &Agent) -> String {
    let out = must(a.weft().arg("expose"));
    out.lines().next().and_then(|l| l.split('/').next()).unwrap_or_default().to_owned()
}

/// The CNI ADD/DEL loop of one host, with a DNS query and a TCP transfer per round.
fn load(l: HostLoad, shared: Arc<Shared>) {
    let slots: Vec<Netns> = (0..=WINDOW).map(|_| Netns::new("s")).collect();
    let mut live: BTreeMap<usize, String> = BTreeMap::new();
    let id = |i: usize| format!("soak{}-{i}", l.host);
    let mut i = 0usize;
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.pause.load(Ordering::SeqCst) {
            shared.parked[l.host - 1].store(true, Ordering::SeqCst);
            while shared.pause.load(Ordering::SeqCst) && !shared.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            shared.parked[l.host - 1].store(false, Ordering::SeqCst);
            continue;
        }
        let next = Instant::now() + ROUND;
        if live.len() >= WINDOW {
            let (&old, _) = live.iter().next().expect("a live pod");
            del(&l, &shared, &slots, &mut live, old, &id(old));
        }
        let out =
            cni(&l.bins, "ADD", &id(i), "eth0", Some(&slots[i % slots.len()].path()), &l.conf);
        if out.code == 0 {
            let ip = out.ip();
            shared.claim(&ip, &id(i));
            live.insert(i, ip);
            shared.counters.add.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.fail(format!("ADD {}: {out:?}", id(i)));
        }
        i += 1;
        dns(&l, &shared);
        tcp(&l, &shared);
        pace_until(next);
    }
    for old in live.keys().copied().collect::<Vec<_>>() {
        del(&l, &shared, &slots, &mut live, old, &id(old));
    }
    for s in &slots {
        if s.links() != vec!["lo".to_owned()] {
            shared.fail(format!("interfaces left in pod namespace {}: {:?}", s.name, s.links()));
        }
    }
}

fn del(
    l: &HostLoad,
    shared: &Shared,
    slots: &[Netns],
    live: &mut BTreeMap<usize, String>,
    i: usize,
    id: &str,
) {
    let out = cni(&l.bins, "DEL", id, "eth0", Some(&slots[i % slots.len()].path()), &l.conf);
    if out.code != 0 {
        shared.fail(format!("DEL {id}: {out:?}"));
    }
    if let Some(ip) = live.remove(&i) {
        shared.release(&ip);
    }
    shared.counters.del.fetch_add(1, Ordering::Relaxed);
}

fn dns(l: &HostLoad, shared: &Shared) {
    let out = run(in_ns(&l.pod, "dig")
        .arg(format!("@{}", l.dns))
        .args(["+short", "+tries=1", "+time=2"])
        .arg(format!("{}.weave.local", l.peer_name)));
    let c = &shared.counters;
    if String::from_utf8_lossy(&out.stdout).trim() == l.peer_ip {
        c.dns_ok.fetch_add(1, Ordering::Relaxed);
    } else {
        c.dns_failed.fetch_add(1, Ordering::Relaxed);
    }
}

fn tcp(l: &HostLoad, shared: &Shared) {
    let out = run(in_ns(&l.pod, "python3")
        .arg(nettool())
        .args(["send", &l.peer_ip, TCP_PORT, TCP_BYTES]));
    let c = &shared.counters;
    if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == TCP_BYTES {
        c.tcp_ok.fetch_add(1, Ordering::Relaxed);
    } else {
        c.tcp_failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Parks every load loop, runs `f`, lets them go on.
fn paused<T>(shared: &Shared, f: impl FnOnce() -> T) -> T {
    shared.pause.store(true, Ordering::SeqCst);
    wait_until(Duration::from_secs(60), "the load loops to park", || {
        shared.parked.iter().all(|p| p.load(Ordering::SeqCst))
    });
    let r = f();
    shared.pause.store(false, Ordering::SeqCst);
    r
}

/// Addresses of every endpoint on every agent: none may appear twice.
fn check_no_duplicates(agents: &[Agent]) {
    let mut seen: HashMap<String, String> = HashMap::new();
    for a in agents {
        for e in a.endpoints() {
            for addr in e["addresses"].as_array().into_iter().flatten() {
                let ip = addr.as_str().unwrap_or_default().split('/').next().unwrap_or_default();
                let who = format!("{} on {}", e["id"], a.name);
                if let Some(other) = seen.insert(ip.to_owned(), who.clone()) {
                    panic!("duplicate address {ip}: {who} and {other}");
                }
            }
        }
    }
}

/// Every agent is connected to all the others.
fn wait_meshed(agents: &[Agent]) {
    for a in agents {
        wait_until(Duration::from_secs(60), &format!("{} to reach all peers", a.name), || {
            a.status()
                .and_then(|s| s["overlay"]["links"].as_array().map(Vec::len))
                .is_some_and(|n| n >= HOSTS - 1)
        });
    }
}

#[test]
fn five_minutes_of_mixed_load_and_sigkills_leave_memory_fds_and_state_flat() {
    let total = Duration::from_secs(
        std::env::var("WEFT_SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(300),
    );
    let minute = total / 5;
    let (lab, hosts) = Lab::new(HOSTS, 1500);
    let mut agents = lab.agents(hosts, &[]);
    wait_meshed(&agents);
    let servers: Vec<String> = agents.iter().map(expose).collect();

    // A long-lived named pod per host, running a TCP sink.
    let mut pods = Vec::new();
    let mut ips = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        let ns = Netns::new("p");
        let name = format!("soakpod{}", i + 1);
        let got = must(a.weft().args(["attach", "--name", &name, "--netns"]).arg(ns.path()));
        ips.push(got.trim().split('/').next().unwrap_or_default().to_owned());
        pods.push(ns);
    }
    let sinks: Vec<Server> =
        pods.iter().map(|p| Server::start(p, &["serve-many", TCP_PORT])).collect();
    let shared = Arc::new(Shared::default());
    for (i, ip) in ips.iter().enumerate() {
        shared.claim(ip, &format!("soakpod{}", i + 1));
    }
    // Names are gossiped: wait until every host resolves its peer's pod.
    for i in 0..HOSTS {
        let j = (i + 1) % HOSTS;
        wait_until(Duration::from_secs(30), "the pod names to spread", || {
            let out = run(pods[i]
                .cmd("dig")
                .arg(format!("@{}", servers[i]))
                .args(["+short", "+tries=1", "+time=1"])
                .arg(format!("soakpod{}.weave.local", j + 1)));
            String::from_utf8_lossy(&out.stdout).trim() == ips[j]
        });
    }
    let baseline: Vec<(usize, Vec<String>, Value)> = agents
        .iter()
        .map(|a| (a.endpoints().len(), a.endpoint_links(), a.ipam()["used"].clone()))
        .collect();

    let loops: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let j = (i + 1) % HOSTS;
            let l = HostLoad {
                host: i + 1,
                bins: a.bins.clone(),
                conf: a.conf("1.0.0"),
                pod: pods[i].name.clone(),
                dns: servers[i].clone(),
                peer_name: format!("soakpod{}", j + 1),
                peer_ip: ips[j].clone(),
            };
            let s = shared.clone();
            std::thread::spawn(move || load(l, s))
        })
        .collect();

    let start = Instant::now();
    let mut samples: Vec<Vec<Sample>> = Vec::new();
    let mut restarts = 0;
    for m in 1..=5u32 {
        pace_until(start + minute * m - minute / 2);
        agents[VICTIM - 1].kill9();
        agents[VICTIM - 1].restart();
        restarts += 1;
        pace_until(start + minute * m);
        let row = paused(&shared, || {
            wait_meshed(&agents);
            check_no_duplicates(&agents);
            settled(&agents)
        });
        let c = &shared.counters;
        eprintln!(
            "soak minute {m} ({:?}): {} | ADD {} DEL {} DNS ok {} failed {} TCP ok {} failed {}",
            start.elapsed(),
            row.iter()
                .enumerate()
                .map(|(i, s)| format!("h{} rss {} KiB fds {}", i + 1, s.rss_kib, s.fds))
                .collect::<Vec<_>>()
                .join(", "),
            c.add.load(Ordering::Relaxed),
            c.del.load(Ordering::Relaxed),
            c.dns_ok.load(Ordering::Relaxed),
            c.dns_failed.load(Ordering::Relaxed),
            c.tcp_ok.load(Ordering::Relaxed),
            c.tcp_failed.load(Ordering::Relaxed),
        );
        samples.push(row);
    }
    shared.stop.store(true, Ordering::SeqCst);
    for l in loops {
        l.join().expect("a load loop panicked");
    }
    drop(sinks);

    let failures = shared.failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));

    // Nothing leaked: the endpoints, veths and allocations are those of before the load, the
    // DEL queue is empty, and the fds are back at (or under) the minute-2 level.
    let end: Vec<Sample> = settled(&agents);
    for (i, a) in agents.iter().enumerate() {
        let (eps, links, used) = &baseline[i];
        let now = a.endpoints();
        assert_eq!(now.len(), *eps, "h{}: endpoint records left: {now:?}", i + 1);
        assert_eq!(&a.endpoint_links(), links, "h{}: veths left", i + 1);
        assert_eq!(&a.ipam()["used"], used, "h{}: allocations left", i + 1);
        let queue = weft_api::del_queue_dir(&a.socket);
        let queued = std::fs::read_dir(&queue).map(Iterator::count).unwrap_or(0);
        assert_eq!(queued, 0, "h{}: files left in {}", i + 1, queue.display());
    }
    check_no_duplicates(&agents);

    let c = &shared.counters;
    let (add, del) = (c.add.load(Ordering::Relaxed), c.del.load(Ordering::Relaxed));
    let (dns_ok, tcp_ok) = (c.dns_ok.load(Ordering::Relaxed), c.tcp_ok.load(Ordering::Relaxed));
    eprintln!(
        "soak summary: {total:?}, {restarts} SIGKILL restarts of h{VICTIM}, ADD {add}, DEL {del}, \
         DNS ok {dns_ok} failed {}, TCP ok {tcp_ok} failed {}, duplicates 0",
        c.dns_failed.load(Ordering::Relaxed),
        c.tcp_failed.load(Ordering::Relaxed),
    );
    for (i, e) in end.iter().enumerate() {
        let (first, base, last) = (samples[0][i], samples[BASE][i], samples[4][i]);
        eprintln!(
            "soak h{}: minute 1 rss {} KiB fds {}; minute 2 rss {} KiB fds {}; minute 5 rss {} \
             KiB fds {}; after the load fds {}",
            i + 1,
            first.rss_kib,
            first.fds,
            base.rss_kib,
            base.fds,
            last.rss_kib,
            last.fds,
            e.fds
        );
    }
    assert_eq!(add, del, "every ADD was deleted");
    assert!(add > 0 && dns_ok > 0 && tcp_ok > 0, "the load barely ran");

    // Flat: RSS within 10 % of minute 2; fds never above the warm-up level by more than
    // 10 % or FD_SLACK (fewer fds is connections closed, not a leak).
    let mut drift = Vec::new();
    let fd_base: Vec<u64> = (0..HOSTS)
        .map(|i| samples[..=BASE].iter().map(|row| row[i].fds).max().unwrap_or(0))
        .collect();
    for (m, row) in samples.iter().enumerate().skip(BASE + 1) {
        for (i, s) in row.iter().enumerate() {
            let f = samples[BASE][i];
            let off = |a: u64, b: u64| (a as f64 - b as f64).abs() / b.max(1) as f64;
            if off(s.rss_kib, f.rss_kib) > FLAT || !fds_flat(s.fds, fd_base[i]) {
                drift.push(format!(
                    "h{} minute {}: {s:?} against minute 2 {f:?} (fds at warm-up {})",
                    i + 1,
                    m + 1,
                    fd_base[i]
                ));
            }
        }
    }
    for (i, e) in end.iter().enumerate() {
        if !fds_flat(e.fds, fd_base[i]) {
            drift.push(format!(
                "h{} after the load: {} fds (at warm-up {})",
                i + 1,
                e.fds,
                fd_base[i]
            ));
        }
    }
    assert!(drift.is_empty(), "not flat within 10 %:\n{}", drift.join("\n"));
}

/// Whether an fd count is at most [`FLAT`] or [`FD_SLACK`] (whichever is more) above `base`.
fn fds_flat(now: u64, base: u64) -> bool {
    let allowed = ((base as f64 * FLAT).ceil() as u64).max(FD_SLACK);
    now <= base + allowed
}
