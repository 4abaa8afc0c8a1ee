//! weft DNS against dnsmasq, in the same run, both serving the same names from host 1 of a
//! two-host namespace underlay, queried by dnsperf from host 2 (the method of
//! ../shared/reference/weave-measured.md §5). Prints, per round and as medians:
//! - throughput: dnsperf unthrottled (`-c 4`, 100 outstanding) for `--seconds`, queries/s;
//! - latency: p50 and p99 of every answer at a fixed 10 000 queries/s (dnsperf `-v`);
//! - the memory per 1000 entries: the names are registered on a second agent (host 2) and
//!   reach the serving agent by gossip, whose RSS is read before and after (what every
//!   peer pays for the cluster's names); dnsmasq's RSS with the same names;
//! - the time to register a name through the local API.
//!
//! usage: dns-bench [--names N] [--rounds R] [--seconds S]   (as root)

// Printing the report on stdout is what this program is for.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft_api::v1;
use weft_bench::*;

const P: &str = "wbd";
const WEFT_ADDR: &str = "10.99.0.1";
const DNSMASQ_ADDR: &str = "10.99.0.11";
/// The fixed load of the latency measurement.
const LATENCY_QPS: u32 = 10_000;

fn name(i: usize) -> String {
    format!("name{i}.weave.local")
}

fn address(i: usize) -> String {
    format!("10.36.{}.{}", i / 250, i % 250 + 1)
}

/// An agent in lab host `host` that never forwards (no upstream resolvers).
fn spawn_weft(bin: &Path, dir: &Path, host: u32, extra: &[&str]) -> Child {
    let mut args = vec!["--resolv-conf", "/dev/null"];
    args.extend_from_slice(extra);
    spawn_agent(bin, &format!("{P}-h{host}"), dir, &args)
}

// The caller kills and waits for the returned child.
#[allow(clippy::zombie_processes)]
fn spawn_dnsmasq(hosts: &Path) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &format!("{P}-h1"), "dnsmasq", "-k", "--no-resolv", "--no-hosts"])
        .arg(format!("--addn-hosts={}", hosts.display()))
        .args([&format!("--listen-address={DNSMASQ_ADDR}"), "--bind-interfaces", "--pid-file="])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting dnsmasq (install dnsmasq-base)")
}

/// Registers the names; returns the median time of one registration.
async fn register(c: &mut Client, names: usize) -> Duration {
    let mut took = Vec::with_capacity(names);
    for i in 0..names {
        let ip: std::net::IpAddr = address(i).parse().expect("address");
        let start = Instant::now();
        c.dns_add(v1::DnsAddRequest {
            name: name(i),
            addresses: vec![ip.into()],
            endpoint_id: String::new(),
        })
        .await
        .expect("dns-add");
        took.push(start.elapsed());
    }
    percentile(&took, 0.5)
}

/// Polls until `server` answers `name` with `want` (bounded).
fn wait_answer(server: &str, name: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &format!("{P}-h2"), "kdig", "+short", "+time=1", "+retry=0"])
            .arg(format!("@{server}"))
            .arg(name)
            .output()
            .expect("kdig (install knot-dnsutils)");
        if String::from_utf8_lossy(&out.stdout).trim() == want {
            return;
        }
        assert!(Instant::now() < deadline, "{server} does not answer {name} with {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// dnsperf from host 2; returns its standard output.
fn dnsperf(server: &str, queries: &Path, extra: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("{P}-h2"), "dnsperf", "-s", server, "-d"])
        .arg(queries)
        .args(extra)
        .output()
        .expect("dnsperf (install dnsperf)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Unthrottled queries per second, and lost queries.
fn throughput(server: &str, queries: &Path, seconds: u32) -> (f64, u64) {
    let text = dnsperf(server, queries, &["-l", &seconds.to_string(), "-c", "4"]);
    let field = |label: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {label:?} in dnsperf output:\n{text}"))
    };
    (field("Queries per second:"), field("Queries lost:") as u64)
}

/// p50 and p99 latency at a fixed rate, from dnsperf's per-answer report.
fn latency(server: &str, queries: &Path) -> (Duration, Duration) {
    let rate = LATENCY_QPS.to_string();
    let text = dnsperf(server, queries, &["-l", "3", "-Q", &rate, "-v"]);
    let samples: Vec<Duration> = text
        .lines()
        .filter(|l| l.starts_with('>'))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .collect();
    assert!(samples.len() > 1000, "too few answers at {rate}/s from {server}:\n{text}");
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    require_root();
    let args: Vec<String> = std::env::args().collect();
    let names: usize = arg(&args, "--names", 1000);
    let rounds: usize = arg(&args, "--rounds", 3);
    let seconds: u32 = arg(&args, "--seconds", 10);
    let bin = bin_dir();
    underlay_lab(P, 2, 1500);
    must(Command::new("ip").args([
        "-n",
        &format!("{P}-h1"),
        "addr",
        "add",
        &format!("{DNSMASQ_ADDR}/24"),
        "dev",
        "eth0",
    ]));
    let dir = PathBuf::from(format!("/run/{P}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");

    let hosts = dir.join("hosts");
    let queries = dir.join("queries");
    let lines: Vec<String> = (0..names).map(|i| format!("{} {}", address(i), name(i))).collect();
    std::fs::write(&hosts, lines.join("\n") + "\n").expect("hosts file");
    let qs: Vec<String> = (0..names).map(|i| format!("{} A", name(i))).collect();
    std::fs::write(&queries, qs.join("\n") + "\n").expect("query file");

    let listen = format!("{WEFT_ADDR}:53");
    let mut weft = spawn_weft(&bin, &dir.join("weft"), 1, &["--dns-listen", &listen]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(client(&dir.join("weft/weft.sock")));
    let mut other =
        spawn_weft(&bin, &dir.join("other"), 2, &["--dns-listen", "127.0.0.1:5353", "10.99.0.1"]);
    let mut c = rt.block_on(client(&dir.join("other/weft.sock")));
    // Connected once a first name registered on the other peer is served here.
    let first: std::net::IpAddr = "10.35.0.1".parse().expect("address");
    rt.block_on(c.dns_add(v1::DnsAddRequest {
        name: "probe.weave.local".into(),
        addresses: vec![first.into()],
        endpoint_id: String::new(),
    }))
    .expect("dns-add");
    wait_answer(WEFT_ADDR, "probe.weave.local", "10.35.0.1");
    let rss_empty = rss_kib(weft.id());
    let add_median = rt.block_on(register(&mut c, names));
    let last = names - 1;
    wait_answer(WEFT_ADDR, &name(last), &address(last));
    let rss_full = rss_kib(weft.id());
    let mut dnsmasq = spawn_dnsmasq(&hosts);
    wait_answer(DNSMASQ_ADDR, &name(last), &address(last));

    println!(
        "dns-bench: {names} names, {rounds} rounds of {seconds} s, dnsperf -c 4 from another host"
    );
    let (mut wq, mut dq, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for r in 1..=rounds {
        let (w, wlost) = throughput(WEFT_ADDR, &queries, seconds);
        let (d, dlost) = throughput(DNSMASQ_ADDR, &queries, seconds);
        println!(
            "round {r}: weft {w:>9.0} q/s (lost {wlost}), dnsmasq {d:>9.0} q/s (lost {dlost}), ratio {:.2}",
            w / d
        );
        wq.push(w);
        dq.push(d);
        ratios.push(w / d);
    }
    let (wp50, wp99) = latency(WEFT_ADDR, &queries);
    let (dp50, dp99) = latency(DNSMASQ_ADDR, &queries);
    let dnsmasq_rss = rss_kib(dnsmasq.id());
    let weft_rss = rss_kib(weft.id());
    println!(
        "median throughput: weft {:.0} q/s, dnsmasq {:.0} q/s; median ratio weft/dnsmasq {:.2} (target >= 1.5)",
        median(wq),
        median(dq),
        median(ratios)
    );
    println!(
        "latency at {LATENCY_QPS} q/s: weft p50 {:.3} ms p99 {:.3} ms; dnsmasq p50 {:.3} ms p99 {:.3} ms",
        ms(wp50),
        ms(wp99),
        ms(dp50),
        ms(dp99)
    );
    println!(
        "memory: weft RSS {rss_empty} KiB without names, {rss_full} KiB with {names} gossiped from another peer ({:.0} KiB per 1000 entries), {weft_rss} KiB after the runs; dnsmasq {dnsmasq_rss} KiB",
        (rss_full.saturating_sub(rss_empty)) as f64 * 1000.0 / names as f64
    );
    println!("dns-add through the local API: median {:.3} ms per name", ms(add_median));
    for agent in [&mut weft, &mut other] {
        let _ = agent.kill();
        let _ = agent.wait();
    }
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    cleanup_prefix(P);
    let _ = std::fs::remove_dir_all(&dir);
}
