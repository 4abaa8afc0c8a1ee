//! Mesh topology dissemination with many in-process peers (no kernel, no sockets): the time
//! and bytes until every peer holds the full topology, the steady-state gossip traffic, and
//! the time until peers that left are forgotten everywhere.
//!
//! usage: mesh-sim [--peers N] [--degree D] [--latency-ms L] [--seed S]

// Printing the report on stdout is what this program is for.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use weft::mesh::sim::{Phase, Sim, SimConfig};
use weft_bench::arg;

fn show(label: &str, p: &Phase, peers: usize) {
    let t = p
        .converged_after
        .map(|t| format!("{:.3} s", t.as_secs_f64()))
        .unwrap_or_else(|| "NOT CONVERGED".into());
    println!(
        "{label:<34} converged after {t:>12} | {:>10.1} KiB sent in {:>8} messages, {:>7.1} KiB per peer | CPU {:>6.1} ms per peer",
        p.bytes as f64 / 1024.0,
        p.messages,
        p.bytes as f64 / 1024.0 / peers as f64,
        p.cpu.as_secs_f64() * 1e3 / peers as f64
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let peers: usize = arg(&args, "--peers", 1000);
    let cfg = SimConfig {
        peers,
        degree: arg(&args, "--degree", 5),
        latency: Duration::from_millis(arg(&args, "--latency-ms", 1)),
        seed: arg(&args, "--seed", 1),
    };
    println!(
        "mesh simulation: {} peers, {} random connections each, {:?} per message",
        cfg.peers, cfg.degree, cfg.latency
    );
    let wall = Instant::now();
    let mut sim = Sim::new(cfg);
    sim.random_mesh();
    let formed = sim.run_until_converged(Duration::from_secs(120), Duration::from_millis(20));
    show("formation (all start at once)", &formed, peers);
    let steady = sim.run_for(Duration::from_secs(120));
    println!(
        "{:<34} {:.1} bytes/s per peer ({} messages in 120 s of anti-entropy)",
        "steady state",
        steady.bytes as f64 / 120.0 / peers as f64,
        steady.messages
    );
    let leaving = peers / 10;
    for _ in 0..leaving {
        if let Some(p) = sim.random_live() {
            sim.leave(p);
        }
    }
    let left = sim.run_until_converged(Duration::from_secs(120), Duration::from_millis(20));
    show(&format!("{leaving} peers ({}%) leave", leaving * 100 / peers.max(1)), &left, sim.live());
    println!("(simulated in {:.1} s of wall-clock time)", wall.elapsed().as_secs_f64());
    println!(
        "{}",
        serde_json::json!({
            "bench": "mesh-sim", "peers": peers,
            "formation_s": formed.converged_after.map(|d| d.as_secs_f64()),
            "formation_bytes": formed.bytes,
            "steady_bytes_per_s_per_peer": steady.bytes as f64 / 120.0 / peers as f64,
            "leave_s": left.converged_after.map(|d| d.as_secs_f64()),
        })
    );
}
