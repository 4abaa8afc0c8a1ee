//! IP allocation through the local API, against the reference `host-local` IPAM plugin in the
//! same run. Prints:
//! - allocations+releases per second on one agent (`Reserve` + `Unreserve` over one gRPC
//!   connection, sequential and from several concurrent clients), next to `host-local` ADD+DEL
//!   on the same range (one process per call, which is how runtimes use it);
//! - the time from three fresh agents starting (each told about the other two, so the ring
//!   needs consensus) to the first allocation, over several trials.
//!
//! usage: ipam-bench [--ops N] [--clients C] [--trials T]   (as root)

// Printing the report on stdout is what this program is for.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weft_api::v1;
use weft_bench::*;

const P: &str = "wbi";
const HOST_LOCAL: &str = "/usr/lib/cni/host-local";

fn default_request() -> Vec<v1::AddressRequest> {
    vec![v1::AddressRequest { kind: Some(v1::address_request::Kind::DefaultSubnet(v1::Empty {})) }]
}

async fn reserve_release(c: &mut Client, id: String) {
    let got = c
        .reserve(v1::ReserveRequest { id: id.clone(), addresses: default_request(), wait_ms: 0 })
        .await
        .expect("reserve")
        .into_inner();
    assert_eq!(got.addresses.len(), 1);
    let gone = c.unreserve(v1::UnreserveRequest { id }).await.expect("unreserve").into_inner();
    assert!(gone.found);
}

/// `ops` Reserve+Unreserve pairs split over `clients` connections; returns pairs per second.
async fn weft_rate(socket: &Path, ops: usize, clients: usize, tag: &str) -> f64 {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(client(socket).await);
    }
    let per = ops / clients;
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(w, mut c)| {
            let tag = tag.to_owned();
            tokio::spawn(async move {
                for i in 0..per {
                    reserve_release(&mut c, format!("{tag}-{w}-{i}")).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("worker");
    }
    (per * clients) as f64 / start.elapsed().as_secs_f64()
}

/// `host-local` ADD+DEL pairs per second (sequential, one process per call).
fn host_local_rate(ops: usize, dir: &Path, netns: &Path) -> f64 {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "bench", "type": "host-local",
        "ipam": { "type": "host-local", "dataDir": dir,
                  "ranges": [[{ "subnet": "10.32.0.0/12" }]] }
    })
    .to_string();
    let env = |cmd: &str, id: &str| {
        vec![
            ("CNI_COMMAND", cmd.to_owned()),
            ("CNI_CONTAINERID", id.to_owned()),
            ("CNI_NETNS", netns.display().to_string()),
            ("CNI_IFNAME", "eth0".to_owned()),
            ("CNI_PATH", "/usr/lib/cni".to_owned()),
        ]
    };
    let plugin = PathBuf::from(HOST_LOCAL);
    let start = Instant::now();
    for i in 0..ops {
        let id = format!("hl{i}");
        time_plugin(&plugin, &env("ADD", &id), &conf);
        time_plugin(&plugin, &env("DEL", &id), &conf);
    }
    ops as f64 / start.elapsed().as_secs_f64()
}

/// One trial: three agents start at once; the time until agent 1 hands out an address.
async fn first_allocation(bin: &Path, trial: usize) -> Duration {
    underlay_lab(P, 3, 1500);
    let dirs: Vec<PathBuf> =
        (1..=3).map(|i| PathBuf::from(format!("/run/{P}/t{trial}-h{i}"))).collect();
    let start = Instant::now();
    let mut agents = Vec::new();
    for i in 1..=3usize {
        let peers: Vec<String> =
            (1..=3).filter(|j| *j != i).map(|j| format!("10.99.0.{j}")).collect();
        let peers: Vec<&str> = peers.iter().map(String::as_str).collect();
        agents.push(spawn_agent(bin, &format!("{P}-h{i}"), &dirs[i - 1], &peers));
    }
    let mut c = client(&dirs[0].join("weft.sock")).await;
    let got = loop {
        let r = c
            .reserve(v1::ReserveRequest {
                id: "first".into(),
                addresses: default_request(),
                wait_ms: 30_000,
            })
            .await;
        match r {
            Ok(r) => break r.into_inner(),
            // Still starting (not ready to serve): ask again.
            Err(st) if st.code() == tonic::Code::Unavailable => {
                assert!(start.elapsed() < Duration::from_secs(60), "no allocation: {st}");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(st) => panic!("reserve failed: {st}"),
        }
    };
    let took = start.elapsed();
    assert_eq!(got.addresses.len(), 1);
    for mut a in agents {
        let _ = a.kill();
        let _ = a.wait();
    }
    for d in &dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    took
}

fn main() {
    require_root();
    let args: Vec<String> = std::env::args().collect();
    let ops = arg(&args, "--ops", 2000);
    let clients = arg(&args, "--clients", 4).max(1);
    let trials = arg(&args, "--trials", 5).max(1);
    let bin = bin_dir();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // One agent, one host.
    cleanup_prefix(P);
    let host = add_netns(&format!("{P}-one"));
    let dir = PathBuf::from(format!("/run/{P}/one"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut agent = spawn_agent(&bin, &format!("{P}-one"), &dir, &[]);
    let socket = dir.join("weft.sock");
    let (seq, conc) = rt.block_on(async {
        // The first allocation forms the ring; it is not part of the rate.
        let mut c = client(&socket).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while c
            .reserve(v1::ReserveRequest {
                id: "warm".into(),
                addresses: default_request(),
                wait_ms: 0,
            })
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the agent never allocated");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let seq = weft_rate(&socket, ops, 1, "s").await;
        let conc = weft_rate(&socket, ops, clients, "c").await;
        (seq, conc)
    });
    let rss = rss_kib(agent.id());
    let _ = agent.kill();
    let _ = agent.wait();
    let hl_dir = dir.join("host-local");
    let hl_ops = (ops / 4).max(50);
    let hl = host_local_rate(hl_ops, &hl_dir, &host);

    println!("## IP allocation (ipam-bench: {ops} ops, {clients} clients, {trials} trials)");
    println!();
    println!("| allocation + release | pairs/s | vs host-local |");
    println!("|---|---:|---:|");
    println!("| weft Reserve+Unreserve, 1 client | {seq:.0} | {:.1}x |", seq / hl);
    println!("| weft Reserve+Unreserve, {clients} clients | {conc:.0} | {:.1}x |", conc / hl);
    println!("| host-local ADD+DEL ({hl_ops}, one process per call) | {hl:.0} | 1.0x |");
    println!();
    println!("agent RSS after {} allocations: {rss} KiB", 2 * ops + 1);
    println!();

    let mut firsts: Vec<Duration> = Vec::new();
    for t in 0..trials {
        firsts.push(rt.block_on(first_allocation(&bin, t)));
    }
    let shown: Vec<String> = firsts.iter().map(|d| format!("{:.0}", ms(*d))).collect();
    println!(
        "three fresh agents (consensus=3) -> first allocation: median {:.0} ms (trials: {} ms)",
        ms(percentile(&firsts, 50.0)),
        shown.join(", ")
    );
    cleanup_prefix(P);
    let _ = std::fs::remove_dir_all(format!("/run/{P}"));
}
