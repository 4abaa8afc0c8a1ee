//! The map page (`GET /` on the status listener) with a simulated mesh: the agent's page and
//! a report of `--peers` peers holding `--endpoints` endpoints (`status::simulated`, fed by
//! the mesh simulation), loaded `--loads` times in headless chromium. Prints, as measured in
//! the browser, the time from navigation start to the end of the first full render, and the
//! time a search takes to redraw. Needs node and tests/ui's packages (`npm ci --prefix
//! tests/ui`) and /usr/bin/chromium.
//!
//! usage: map-bench [--peers 1000] [--endpoints 10000] [--loads 5] [--screenshot FILE]

// Printing the report on stdout is what this program is for.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use weft::status::http::serve_fixed;
use weft::status::simulated::simulated_report;
use weft_bench::arg;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let peers: usize = arg(&args, "--peers", 1000);
    let endpoints: usize = arg(&args, "--endpoints", 10_000);
    let loads: usize = arg(&args, "--loads", 5);
    let screenshot: String = arg(&args, "--screenshot", String::new());
    let started = Instant::now();
    let report = simulated_report(peers, endpoints, 1);
    println!(
        "map page: {peers} simulated peers, {endpoints} endpoints (report built in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/", listener.local_addr()?);
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve_fixed(listener, report, stop.clone()));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/ui/map-load.mjs");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .args([url, loads.to_string(), peers.to_string(), endpoints.to_string(), screenshot])
            .output()
    })
    .await??;
    stop.cancel();
    let _ = server.await;
    if !out.status.success() {
        anyhow::bail!(
            "the browser run failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut times: Vec<f64> =
        v["loads_ms"].as_array().into_iter().flatten().filter_map(|t| t.as_f64()).collect();
    let all = times.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>().join(", ");
    let max = times.iter().copied().fold(0.0, f64::max);
    println!(
        "  /status document: {:.2} MiB",
        v["status_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
    );
    println!(
        "  navigation start -> first full render: median {:.0} ms, max {max:.0} ms ({all})",
        median(&mut times)
    );
    println!(
        "  search redraw (keystroke -> render, {} ms debounce included): {:.0} ms",
        v["search_debounce_ms"],
        v["search_ms"].as_f64().unwrap_or(f64::NAN)
    );
    println!("  target: under 1000 ms -> ratio {:.2} of the target (max)", max / 1000.0);
    Ok(())
}
