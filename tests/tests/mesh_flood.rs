//! A hostile mesh peer (no password: the handshake is a plaintext Hello, docs/mesh-protocol.md)
//! floods gossip on 10 000 distinct channel names: /metrics stays valid Prometheus text of
//! bounded size, a channel name that would break it ends the connection, and the mesh keeps
//! working. A host flooding the mesh port with idle connections does not keep a real peer out.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use prost::Message;
use weft_e2e::*;

/// The flood's size.
const CHANNELS: usize = 10_000;
/// /metrics of an agent with two peers is about 6 KiB; 10 000 label sets would be ~700 KiB.
const METRICS_BOUND: usize = 32 * 1024;
/// Gossip byte counters: (ipam, dns, macs, topology, other) × (sent, received).
const GOSSIP_SERIES_BOUND: usize = 10;

#[derive(Clone, PartialEq, Message)]
struct Hello {
    #[prost(uint64, tag = "1")]
    peer_name: u64,
    #[prost(string, tag = "2")]
    nickname: String,
    #[prost(uint64, tag = "3")]
    uid: u64,
    #[prost(uint64, tag = "4")]
    conn_id: u64,
    #[prost(uint32, tag = "5")]
    listen_port: u32,
}

#[derive(Clone, PartialEq, Message)]
struct GossipMessage {
    #[prost(string, tag = "1")]
    channel: String,
    #[prost(uint64, tag = "2")]
    src: u64,
    #[prost(uint64, tag = "3")]
    dst: u64,
    #[prost(bytes = "vec", tag = "4")]
    payload: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct Heartbeat {}

/// `Frame` with two of its `oneof kind` members (same wire format).
#[derive(Clone, PartialEq, Message)]
struct Frame {
    #[prost(message, optional, tag = "1")]
    heartbeat: Option<Heartbeat>,
    #[prost(message, optional, tag = "2")]
    gossip: Option<GossipMessage>,
}

fn framed(m: &impl Message) -> Vec<u8> {
    let body = m.encode_to_vec();
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// Runs `f` on a thread inside the network namespace at `ns` (sockets it opens live there).
fn in_netns<T: Send + 'static>(
    ns: std::path::PathBuf,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).expect("opening the namespace");
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the namespace thread panicked")
}

fn get_metrics(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connecting to the status listener");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: weft\r\n\r\n").expect("request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("response");
    let text = String::from_utf8(raw).expect("/metrics is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "{head}");
    body.to_owned()
}

/// Checks one sample line `name{label="value",...} number`; returns its metric name.
fn sample(line: &str) -> Result<&str, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    let name_ok = name.chars().enumerate().all(|(i, c)| {
        c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
    });
    if name.is_empty() || !name_ok {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    if let Some(labels) = rest.strip_prefix('{') {
        let mut chars = labels.char_indices();
        let end = loop {
            // label name
            let mut key = String::new();
            let mut next = chars.next();
            while let Some((_, c)) = next {
                if c == '=' || c == '}' {
                    break;
                }
                key.push(c);
                next = chars.next();
            }
            match next {
                Some((i, '}')) if key.is_empty() => break i,
                Some((_, '=')) => {}
                _ => return Err("label without a value".into()),
            }
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("bad label name {key:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err("label value not quoted".into());
            }
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\' | '"' | 'n')) => {}
                        _ => return Err("bad escape in a label value".into()),
                    },
                    Some((_, '"')) => break,
                    Some((_, '\n')) | None => return Err("unterminated label value".into()),
                    Some(_) => {}
                }
            }
            match chars.next() {
                Some((_, ',')) => {}
                Some((i, '}')) => break i,
                _ => return Err("junk after a label".into()),
            }
        };
        rest = &labels[end + 1..];
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value = value.split(' ').next().unwrap_or_default();
    if value.parse::<f64>().is_err() && !["+Inf", "-Inf", "NaN"].contains(&value) {
        return Err(format!("bad value {value:?}"));
    }
    Ok(name)
}

/// Parses Prometheus/OpenMetrics text; returns the sample count per metric name.
fn parse_metrics(text: &str) -> Result<std::collections::BTreeMap<String, usize>, String> {
    let mut counts = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.split(' ').next().unwrap_or_default();
            if !["HELP", "TYPE", "UNIT", "EOF"].contains(&kind) {
                return Err(format!("bad comment line {line:?}"));
            }
            continue;
        }
        let name = sample(line).map_err(|e| format!("{e}: {line:?}"))?;
        *counts.entry(name.to_owned()).or_insert(0) += 1;
    }
    Ok(counts)
}

fn value_of(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().split(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_peer_flooding_distinct_channel_names_leaves_metrics_valid_and_bounded() {
    let (lab, mut hosts) = Lab::new(3, 1500);
    let attacker = hosts.pop().expect("h3");
    let h2 = Agent::start_in(hosts.pop().expect("h2"), AgentOpts::nick("h2", &[lab.ip(1)]));
    let status_addr = format!("{}:6782", lab.ip(1));
    let h1 = Agent::start_in(
        hosts.pop().expect("h1"),
        AgentOpts::nick("h1", &["--status-addr", &status_addr]),
    );
    let n2 = h2.peer_name();
    let established = |a: &Agent, peer: &str| {
        a.status().is_some_and(|s| {
            s["mesh"]["connections"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| c["peer"] == peer && c["state"] == "established")
            })
        })
    };
    wait_until(Duration::from_secs(20), "h1 and h2 to connect", || established(&h1, &n2));

    let mesh_addr = format!("{}:6783", lab.ip(1));
    let (before, after, closed) = in_netns(attacker.path(), move || {
        let before = get_metrics(&status_addr);
        let mut s = TcpStream::connect(&mesh_addr).expect("connecting to h1's mesh port");
        s.write_all(&[0x77, 0x65, 0x66, 0x74, 1, 1, 0]).expect("preamble");
        let me: u64 = 0x02_00_00_00_00_00 | u64::from(std::process::id() & 0xffff);
        let hello = Hello {
            peer_name: me,
            nickname: "flooder".into(),
            uid: 7,
            conn_id: 1,
            listen_port: 6783,
        };
        s.write_all(&framed(&hello)).expect("hello");
        // Drain whatever h1 sends; the channel reports when h1 closes the connection.
        let (eof_tx, eof_rx) = std::sync::mpsc::channel();
        let mut reader = s.try_clone().expect("clone");
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
            let _ = eof_tx.send(());
        });
        let mut sent_bytes = 0usize;
        let mut flood = Vec::new();
        for i in 0..CHANNELS {
            let gossip = GossipMessage {
                channel: format!("flood-{i}"),
                src: me,
                dst: 0,
                payload: i.to_be_bytes().to_vec(),
            };
            let f = Frame { heartbeat: None, gossip: Some(gossip) };
            sent_bytes += f.encoded_len();
            flood.extend_from_slice(&framed(&f));
        }
        s.write_all(&flood).expect("the flood");
        // Until h1 has counted it all (under whichever labels).
        let deadline = Instant::now() + Duration::from_secs(20);
        let heartbeat = framed(&Frame { heartbeat: Some(Heartbeat {}), gossip: None });
        let after = loop {
            s.write_all(&heartbeat).expect("heartbeat");
            let m = get_metrics(&status_addr);
            let other =
                value_of(&m, "weft_gossip_bytes_total{channel=\"other\",direction=\"received\"}");
            if m.contains(&format!("flood-{}", CHANNELS - 1)) || other >= sent_bytes as f64 {
                break m;
            }
            assert!(Instant::now() < deadline, "h1 did not count the flood in 20 s");
            std::thread::sleep(Duration::from_millis(100));
        };
        // A name that would inject a sample ends the connection.
        let evil = GossipMessage {
            channel: "x\"} 1\nweft_forged 1\n#".into(),
            src: me,
            dst: 0,
            payload: vec![1],
        };
        s.write_all(&framed(&Frame { heartbeat: None, gossip: Some(evil) })).expect("evil frame");
        let closed = eof_rx.recv_timeout(Duration::from_secs(5)).is_ok();
        (before, after, closed)
    });

    let counts = parse_metrics(&after).unwrap_or_else(|e| panic!("/metrics is invalid: {e}"));
    let gossip_series = counts.get("weft_gossip_bytes_total").copied().unwrap_or(0);
    eprintln!(
        "/metrics before: {} bytes, after the flood: {} bytes, gossip series: {gossip_series}",
        before.len(),
        after.len()
    );
    assert!(
        gossip_series <= GOSSIP_SERIES_BOUND,
        "{gossip_series} gossip series (at most {GOSSIP_SERIES_BOUND})"
    );
    assert!(
        after.len() <= METRICS_BOUND,
        "/metrics is {} bytes (at most {METRICS_BOUND})",
        after.len()
    );
    assert!(closed, "h1 kept a connection that sent an invalid channel name");
    let last = in_netns(attacker.path(), {
        let addr = format!("{}:6782", lab.ip(1));
        move || get_metrics(&addr)
    });
    parse_metrics(&last).unwrap_or_else(|e| panic!("/metrics is invalid: {e}"));
    assert!(!last.contains("weft_forged"), "a peer forged a sample");
    // The mesh keeps working: h1 and h2 still connected, and h1 still serves status.
    assert!(established(&h1, &n2), "h1 lost h2:\n{}", h1.log());
    assert!(established(&h2, &h1.peer_name()), "h2 lost h1:\n{}", h2.log());
    drop(attacker);
}

/// Runs `f` on a thread inside the network namespace at `ns`, in the background.
fn spawn_in_netns<T: Send + 'static>(
    ns: std::path::PathBuf,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).expect("opening the namespace");
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Connections per second of the flood.
const FLOOD_RATE: u64 = 50;

#[test]
fn a_connection_flood_from_one_address_does_not_keep_a_real_peer_out() {
    let (lab, mut hosts) = Lab::new(3, 1500);
    let flooder = hosts.pop().expect("h3");
    let h2 = Agent::start_in(hosts.pop().expect("h2"), AgentOpts::nick("h2", &[]));
    let h1 = Agent::start_in(hosts.pop().expect("h1"), AgentOpts::nick("h1", &[]));
    let mesh_addr: std::net::SocketAddr =
        format!("{}:6783", lab.ip(1)).parse().expect("an address");
    // h3 opens 50 connections a second to h1's mesh port and never says a word on them.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = spawn_in_netns(flooder.path(), {
        let stop = stop.clone();
        move || {
            let mut idle = Vec::new();
            let start = Instant::now();
            let mut n: u64 = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let due = start + Duration::from_millis(n * 1000 / FLOOD_RATE);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait); // pacing the flood, not synchronisation
                }
                if let Ok(s) = TcpStream::connect_timeout(&mesh_addr, Duration::from_millis(500)) {
                    idle.push(s);
                }
                n += 1;
            }
            n
        }
    });
    let accepts = |a: &Agent| a.status().map(|s| s["mesh"]["accepts"].clone());
    let refused = |a: &Agent| {
        accepts(a).map_or(0, |v| {
            v["refused_rate"].as_u64().unwrap_or(0) + v["refused_handshakes"].as_u64().unwrap_or(0)
        })
    };
    // The flood is in full swing: h1 has refused a few seconds' worth of it.
    wait_until(Duration::from_secs(15), "h1 to refuse 100 of the flood's connections", || {
        refused(&h1) >= 100
    });
    let established = |a: &Agent, peer: &str| {
        a.status().is_some_and(|s| {
            s["mesh"]["connections"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| c["peer"] == peer && c["state"] == "established")
            })
        })
    };
    let t0 = Instant::now();
    must(h2.weft().args(["connect", lab.ip(1)]));
    let n1 = h1.peer_name();
    let deadline = t0 + Duration::from_secs(2);
    let connected = loop {
        if established(&h2, &n1) {
            break Some(t0.elapsed());
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let report = accepts(&h1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let attempts = flood.join().expect("the flood thread");
    eprintln!(
        "flood: {attempts} connections; h2 connected after {connected:?}; h1 accepts: {report:?}"
    );
    let connected = connected.unwrap_or_else(|| {
        panic!(
            "h2 did not connect to h1 within 2 s of a flood of {FLOOD_RATE}/s from another \
             address\nh1:\n{}\nh2:\n{}",
            h1.log(),
            h2.log()
        )
    });
    assert!(connected <= Duration::from_secs(2));
    let report = report.expect("h1's status");
    assert!(report["refused_handshakes"].as_u64().unwrap_or(0) > 0, "{report}");
    let handshakes = report["handshakes"].as_u64().unwrap_or(u64::MAX);
    assert!(handshakes <= 8 + 1, "handshakes in progress during the flood: {handshakes}");
    drop(flooder);
}
