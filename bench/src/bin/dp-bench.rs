//! Pod-to-pod TCP throughput across two lab hosts, from one run: the underlay (host to host),
//! a hand-built kernel VXLAN (the reference), weft fastdp, weft sleeve, weft sleeve encrypted,
//! and a naive Python TAP/UDP overlay. Prints Gbit/s (median of the runs), the ratio to the
//! hand-built VXLAN, and CPU seconds per GB moved (whole machine, from /proc/stat).
//!
//! usage: dp-bench [--rounds N] [--seconds S] [--mtu M]   (as root)

// Printing the report on stdout is what this program is for.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use weft_bench::*;

const P: &str = "wbd";

fn ns(name: &str) -> String {
    format!("{P}-{name}")
}

fn ip(args: &[&str]) {
    must(Command::new("ip").args(args));
}

fn in_ns(n: &str, cmd: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns(n)]).args(cmd);
    c
}

/// Busy and total jiffies of the whole machine.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// One iperf3 run from `client` to `server_ip` (served in `server`): Gbit/s and bytes.
fn iperf(server: &str, client: &str, server_ip: &str, seconds: u64) -> Option<(f64, f64)> {
    let mut srv = in_ns(server, &["iperf3", "-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    // Wait for the server to listen instead of sleeping.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let out = in_ns(server, &["ss", "-ltn"]).output().ok()?;
        if String::from_utf8_lossy(&out.stdout).contains(":5201") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = in_ns(
        client,
        &[
            "iperf3",
            "-c",
            server_ip,
            "-p",
            "5201",
            "-t",
            &seconds.to_string(),
            "-J",
            "--connect-timeout",
            "3000",
        ],
    )
    .output()
    .ok();
    let parsed =
        out.as_ref().and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok());
    let result = parsed.as_ref().and_then(|v| {
        let r = &v["end"]["sum_received"];
        Some((r["bits_per_second"].as_f64()? / 1e9, r["bytes"].as_f64()?))
    });
    if result.is_none() {
        let _ = srv.kill();
        eprintln!(
            "iperf3 {client} -> {server_ip} failed: {}",
            parsed.map(|v| v["error"].to_string()).unwrap_or_default()
        );
    }
    let _ = srv.wait();
    result
}

/// Waits until `ip` answers pings from namespace `from` (the path is up).
fn wait_reachable(from: &str, ip: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !in_ns(from, &["ping", "-c1", "-W1", ip]).output().is_ok_and(|o| o.status.success()) {
        assert!(Instant::now() < deadline, "{ip} is not reachable from {from}");
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn lab(mtu: u32) {
    underlay_lab(P, 2, mtu);
}

/// A pod namespace `pod` plugged into bridge `bridge` of host `h` with `addr`.
fn plain_pod(h: u32, pod: &str, bridge: &str, addr: &str, mtu: u32) {
    let host = ns(&format!("h{h}"));
    add_netns(&ns(pod));
    let port = format!("{pod}p");
    ip(&[
        "link",
        "add",
        "eth0",
        "netns",
        &ns(pod),
        "type",
        "veth",
        "peer",
        "name",
        &port,
        "netns",
        &host,
    ]);
    ip(&["-n", &host, "link", "set", &port, "mtu", &mtu.to_string(), "master", bridge, "up"]);
    ip(&["-n", &ns(pod), "link", "set", "eth0", "mtu", &mtu.to_string(), "up"]);
    ip(&["-n", &ns(pod), "addr", "add", addr, "dev", "eth0"]);
}

fn hand_built_vxlan(mtu: u32) {
    let inner = mtu - 50;
    for i in 1..=2u32 {
        let h = ns(&format!("h{i}"));
        ip(&["-n", &h, "link", "add", "vxbr", "type", "bridge"]);
        ip(&["-n", &h, "link", "set", "vxbr", "mtu", &inner.to_string(), "up"]);
        ip(&[
            "-n",
            &h,
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            "42",
            "dstport",
            "4789",
            "local",
            &format!("10.99.0.{i}"),
            "dev",
            "eth0",
            "nolearning",
        ]);
        ip(&["-n", &h, "link", "set", "vx0", "mtu", &inner.to_string(), "master", "vxbr", "up"]);
        plain_pod(i, &format!("vx{i}"), "vxbr", &format!("10.47.0.{i}/16"), inner);
    }
    for i in 1..=2u32 {
        let j = 3 - i;
        let h = ns(&format!("h{i}"));
        must(Command::new("bridge").args([
            "-n",
            &h,
            "fdb",
            "append",
            "00:00:00:00:00:00",
            "dev",
            "vx0",
            "dst",
            &format!("10.99.0.{j}"),
        ]));
        let out =
            must(Command::new("ip").args(["-n", &ns(&format!("vx{j}")), "link", "show", "eth0"]));
        let mac = out
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        must(Command::new("bridge").args([
            "-n",
            &h,
            "fdb",
            "add",
            &mac,
            "dev",
            "vx0",
            "dst",
            &format!("10.99.0.{j}"),
            "self",
            "permanent",
        ]));
    }
}

fn naive_overlay(script: &std::path::Path) -> Vec<Child> {
    let mut kids = Vec::new();
    for i in 1..=2u32 {
        let h = format!("h{i}");
        ip(&["-n", &ns(&h), "link", "add", "nvbr", "type", "bridge"]);
        ip(&["-n", &ns(&h), "link", "set", "nvbr", "mtu", "1400", "up"]);
        let child = in_ns(
            &h,
            &[
                "python3",
                script.to_str().unwrap_or_default(),
                "nvtap",
                &format!("10.99.0.{i}"),
                "6799",
                &format!("10.99.0.{}", 3 - i),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("naive overlay");
        kids.push(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Command::new("ip")
            .args(["-n", &ns(&h), "link", "show", "nvtap"])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "naive overlay did not create its TAP");
            std::thread::sleep(Duration::from_millis(20));
        }
        ip(&["-n", &ns(&h), "link", "set", "nvtap", "mtu", "1400", "master", "nvbr", "up"]);
        plain_pod(i, &format!("nv{i}"), "nvbr", &format!("10.48.0.{i}/16"), 1400);
    }
    kids
}

/// One weft deployment on both hosts: its own bridge, ports, socket, table and pods.
struct Weft {
    tag: &'static str,
    flags: Vec<&'static str>,
    /// Second octet of its range, 10.N.0.0/16.
    net: u8,
    /// Mesh port; fastdp uses the next one.
    port: u16,
    mode: &'static str,
}

impl Weft {
    fn sock(&self, i: u32) -> String {
        format!("/run/{P}/{}-h{i}/weft.sock", self.tag)
    }

    fn cli(&self, bin: &std::path::Path, i: u32, more: &[&str]) -> Command {
        let mut c = in_ns(
            &format!("h{i}"),
            &[bin.join("weft").to_str().unwrap_or_default(), "--socket", &self.sock(i)],
        );
        c.args(more);
        c
    }

    fn pod(&self, i: u32) -> String {
        format!("{}{i}", self.tag)
    }

    fn start(&self, bin: &std::path::Path) {
        for i in 1..=2u32 {
            let dir = format!("/run/{P}/{}-h{i}", self.tag);
            let range = format!("10.{}.0.0/16", self.net);
            let (port, dport) = (self.port.to_string(), (self.port + 1).to_string());
            let mut args = vec![
                "launch",
                "--state-dir",
                &dir,
                "--status-addr",
                "off",
                "--log-level",
                "warn",
                "--bridge",
                self.tag,
                "--nft-table",
                self.tag,
                "--ipalloc-range",
                &range,
                "--port",
                &port,
                "--datapath-port",
                &dport,
            ];
            args.extend(self.flags.iter().copied());
            let peer = format!("10.99.0.1:{}", self.port);
            if i == 2 {
                args.push(&peer);
            }
            must(&mut self.cli(bin, i, &args));
            must(&mut self.cli(bin, i, &["expose", &format!("10.{}.{i}.1/16", self.net)]));
            add_netns(&ns(&self.pod(i)));
            let netns = format!("/run/netns/{}", ns(&self.pod(i)));
            must(&mut self.cli(
                bin,
                i,
                &[
                    "attach",
                    &format!("10.{}.{i}.2/16", self.net),
                    "--netns",
                    &netns,
                    "--ifname",
                    "eth0",
                ],
            ));
        }
    }

    fn wait(&self, bin: &std::path::Path) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.cli(bin, 1, &["status", "--json"]).output();
            let ok = out
                .ok()
                .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                .is_some_and(|v| {
                    v["overlay"]["links"].as_array().is_some_and(|l| {
                        l.iter().any(|x| {
                            x["mode"] == self.mode
                                && x[self.mode].as_str().is_some_and(|s| s.ends_with("ok"))
                        })
                    })
                });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "weft {} did not settle on {}", self.tag, self.mode);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

struct Path {
    label: &'static str,
    server: String,
    client: String,
    server_ip: String,
    gbps: Vec<f64>,
    busy: u64,
    bytes: f64,
}

fn main() {
    require_root();
    let args: Vec<String> = std::env::args().collect();
    let runs = arg(&args, "--rounds", 5);
    let seconds = arg(&args, "--seconds", 5);
    let mtu = arg(&args, "--mtu", 1500) as u32;
    let bin = bin_dir();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("naive_overlay.py");
    lab(mtu);
    let _ = std::fs::create_dir_all(format!("/run/{P}"));
    hand_built_vxlan(mtu);
    let wefts = [
        Weft { tag: "wfa", flags: vec![], net: 40, port: 6783, mode: "fastdp" },
        Weft { tag: "wsl", flags: vec!["--no-fastdp"], net: 41, port: 6793, mode: "sleeve" },
        Weft {
            tag: "wen",
            flags: vec!["--password", "bench-secret"],
            net: 42,
            port: 6803,
            mode: "sleeve",
        },
    ];
    for w in &wefts {
        w.start(&bin);
    }
    for w in &wefts {
        w.wait(&bin);
    }
    let mut kids = naive_overlay(&script);
    let path = |label, server: &str, client: &str, ip: &str| Path {
        label,
        server: server.into(),
        client: client.into(),
        server_ip: ip.into(),
        gbps: Vec::new(),
        busy: 0,
        bytes: 0.0,
    };
    let mut results = vec![
        path("underlay host->host", "h1", "h2", "10.99.0.1"),
        path("hand-built kernel VXLAN", "vx1", "vx2", "10.47.0.1"),
        path("weft fastdp", "wfa1", "wfa2", "10.40.1.2"),
        path("weft sleeve", "wsl1", "wsl2", "10.41.1.2"),
        path("weft sleeve, encrypted", "wen1", "wen2", "10.42.1.2"),
        path("naive Python TAP/UDP overlay", "nv1", "nv2", "10.48.0.1"),
    ];
    for p in &results {
        wait_reachable(&p.client, &p.server_ip);
    }
    // Rounds over all paths, so that the machine's background noise hits every path alike.
    for _ in 0..runs {
        for p in results.iter_mut() {
            let before = cpu_jiffies();
            if let Some((g, b)) = iperf(&p.server, &p.client, &p.server_ip, seconds) {
                p.gbps.push(g);
                p.bytes += b;
            }
            p.busy += cpu_jiffies().0 - before.0;
        }
    }
    for k in &mut kids {
        let _ = k.kill();
        let _ = k.wait();
    }
    for r in results.iter_mut() {
        r.gbps.sort_by(f64::total_cmp);
    }
    let cpu_per_gb =
        |p: &Path| if p.bytes > 0.0 { p.busy as f64 / 100.0 / (p.bytes / 1e9) } else { f64::NAN };
    let vxlan = median(&results[1].gbps);
    let naive = median(&results[5].gbps);
    println!(
        "pod->pod TCP (iperf3, {runs} interleaved rounds x {seconds} s, underlay MTU {mtu}); ratio = median / hand-built VXLAN median"
    );
    println!(
        "| path                           | median Gbit/s | runs                       | ratio | CPU s/GB |"
    );
    println!(
        "|--------------------------------|--------------:|----------------------------|------:|---------:|"
    );
    for r in &results {
        let runs: Vec<String> = r.gbps.iter().map(|g| format!("{g:.2}")).collect();
        println!(
            "| {:<30} | {:>13.2} | {:<26} | {:>5.2} | {:>8.2} |",
            r.label,
            median(&r.gbps),
            runs.join(" "),
            median(&r.gbps) / vxlan,
            cpu_per_gb(r)
        );
    }
    println!(
        "sleeve / naive overlay: {:.1}x unencrypted, {:.1}x encrypted",
        median(&results[3].gbps) / naive,
        median(&results[4].gbps) / naive
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "dataplane",
            "vxlan_gbps": vxlan,
            "fastdp_ratio": median(&results[2].gbps) / vxlan,
            "sleeve_ratio": median(&results[3].gbps) / vxlan,
            "sleeve_encrypted_ratio": median(&results[4].gbps) / vxlan,
            "naive_gbps": naive,
        })
    );
    cleanup_prefix(P);
    let _ = std::fs::remove_dir_all(format!("/run/{P}"));
}
