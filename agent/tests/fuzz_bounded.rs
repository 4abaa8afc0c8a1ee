//! A bounded fuzzing run of the decoders that read bytes from other hosts, on stable Rust, as
//! part of the test suite (scripts/test.sh runs it as its own step): the mesh frame reader and
//! handshake, sleeve datagrams and reassembly, and the `dns`, `macs` and `ipam` gossip
//! payloads with their merges. Valid inputs made by the real encoders are mutated (bit flips,
//! truncation, splicing, boundary bytes, random bytes) for a fixed time per decoder.
//!
//! Each decoder runs in a child process (this test binary again, one test) started by
//! `prlimit --as` under a 256 MiB address-space cap, the stand-in for libFuzzer's
//! `-rss_limit_mb=256`: an allocation sized from remote input (a reservation of gigabytes that
//! would never be touched, so never seen in RSS) fails there and aborts the child, which fails
//! the test. The child also checks its peak RSS (VmHWM) against the cap. The coverage-guided
//! targets in `fuzz/` (cargo-fuzz, nightly: ./scripts/fuzz.sh) call the same entry points.
//!
//! `WEFT_FUZZ_SECONDS` sets the time per decoder (default 8).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use weft::addr::Mac;
use weft::dataplane::sleeve::codec::{Header, Kind, chunk_into};
use weft::dns::table::Entry;
use weft::identity::PeerName;
use weft::ipam::ring::Ring;
use weft::ipam::wire::{self as ipam_wire, IpamMsg};
use weft::mesh::frame::{Preamble, encode_frame, frame_of};
use weft::mesh::{fuzz as mesh_fuzz, proto};
use weft::overlay::macs::MacTable;

/// The address-space cap of each child.
const CAP_MIB: u64 = 256;
const CHILD: &str = "WEFT_FUZZ_CHILD";

fn p(n: u64) -> PeerName {
    PeerName::new(n).expect("a valid peer name")
}

fn mesh_seeds() -> Vec<Vec<u8>> {
    let topo = proto::Topology {
        peers: (1..5)
            .map(|i| proto::PeerEntry {
                name: i,
                nickname: format!("p{i}"),
                uid: 7,
                version: 3,
                connections: vec![proto::ConnectionEntry {
                    peer: i + 1,
                    address: "10.0.0.1:6783".into(),
                    outbound: true,
                    established: true,
                }],
            })
            .collect(),
    };
    let gossip = proto::Frame {
        kind: Some(proto::frame::Kind::Gossip(proto::GossipMessage {
            channel: "topology".into(),
            src: 1,
            dst: 0,
            payload: topo.encode_to_vec(),
        })),
    };
    let hb = proto::Frame { kind: Some(proto::frame::Kind::Heartbeat(proto::Heartbeat {})) };
    let mut stream = frame_of(&gossip);
    stream.extend(frame_of(&hb));
    let mut hello = Preamble::ours(true).encode().to_vec();
    let h = proto::Hello {
        peer_name: 9,
        nickname: "x".into(),
        uid: 1,
        conn_id: 2,
        listen_port: 6783,
        ..Default::default()
    };
    encode_frame(&h.encode_to_vec(), &mut hello);
    vec![stream, hello, Preamble::ours(false).encode().to_vec()]
}

/// Length-prefixed datagrams (see `weft::fuzz::datagrams`): a 3000-byte frame in 1400-byte
/// chunks, in order and out of order, and a heartbeat.
fn sleeve_seeds() -> Vec<Vec<u8>> {
    let header = Header {
        kind: Kind::Data,
        ttl: 4,
        hop: p(2),
        origin: p(2),
        dst: p(1),
        seq: 0,
        frame: 7,
        chunk: 0,
        chunks: 0,
    };
    let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let mut out = Vec::new();
    let ranges = chunk_into(&mut out, &payload, 1400, header, 1, false);
    let stream = |order: &mut dyn Iterator<Item = &std::ops::Range<usize>>| {
        let mut s = Vec::new();
        for r in order {
            s.extend_from_slice(&(r.len() as u16).to_be_bytes());
            s.extend_from_slice(&out[r.clone()]);
        }
        s
    };
    let in_order = stream(&mut ranges.iter());
    let reversed = stream(&mut ranges.iter().rev());
    let mut hb = vec![0u8; weft::dataplane::sleeve::codec::HEADER];
    Header { kind: Kind::Heartbeat, chunks: 1, ..header }.write(&mut hb);
    let mut heartbeat = (hb.len() as u16).to_be_bytes().to_vec();
    heartbeat.extend(hb);
    vec![in_order, reversed, heartbeat]
}

fn dns_seeds() -> Vec<Vec<u8>> {
    let e = Entry {
        name: "SeeOne.weave.local.".into(),
        addr: "10.32.0.1".parse().expect("address"),
        endpoint: "c1".into(),
        origin: p(0x0a0b_0c0d_0e0f),
        version: 3,
        tombstone: 0,
    };
    let own = Entry { origin: p(1), version: 9, ..e.clone() };
    let gone = Entry { addr: "fd00::1".parse().expect("address"), tombstone: 99, ..e.clone() };
    vec![weft::dns::wire::encode([&e, &own, &gone])]
}

fn mac_seeds() -> Vec<Vec<u8>> {
    let mut t = MacTable::new(p(2));
    let ip = "10.32.0.2".parse().expect("address");
    let macs = BTreeMap::from([
        (Mac([2, 0, 0, 0, 0, 1]), BTreeSet::from([ip])),
        (Mac([2, 0, 0, 0, 0, 2]), BTreeSet::new()),
    ]);
    t.set_local(macs, 100).into_iter().collect()
}

fn ipam_seeds() -> Vec<Vec<u8>> {
    let mut ring = Ring::new(100..1124);
    ring.seed(&[p(1), p(2)]);
    let _ = ring.grant(p(1), 200..300, p(3));
    [
        IpamMsg::Ring { ring, reply: true },
        IpamMsg::SpaceRequest { range: 5..9, exact: true },
        IpamMsg::RingRequest,
    ]
    .iter()
    .map(ipam_wire::encode)
    .collect()
}

fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..rng.random_range(1..8) {
        match rng.random_range(0..6) {
            0 if !d.is_empty() => {
                let i = rng.random_range(0..d.len());
                d[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !d.is_empty() => d.truncate(rng.random_range(0..d.len())),
            2 => {
                let at = rng.random_range(0..=d.len());
                let n = rng.random_range(1..64);
                let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                d.splice(at..at, junk);
            }
            3 if !d.is_empty() => {
                let i = rng.random_range(0..d.len());
                d[i] = [0, 0xff, 0x7f, 0x80][rng.random_range(0..4)];
            }
            4 => d = (0..rng.random_range(0..512)).map(|_| rng.random()).collect(),
            _ => d.extend_from_slice(seed),
        }
    }
    d
}

/// Feeds mutated seeds to `target` for the time budget; returns the number of inputs.
fn fuzz(seeds: &[Vec<u8>], target: impl Fn(&[u8])) -> u64 {
    let budget = Duration::from_secs(
        std::env::var("WEFT_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(8),
    );
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < budget {
        target(&mutate(&mut rng, &seeds[runs as usize % seeds.len()]));
        runs += 1;
    }
    runs
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/self/status")
}

/// In the child (`WEFT_FUZZ_CHILD` = `test`), runs the fuzz loop; otherwise starts this test
/// again as that child under the cap and requires that it ran and passed.
fn capped(test: &str, seeds: fn() -> Vec<Vec<u8>>, target: fn(&[u8])) {
    if std::env::var(CHILD).as_deref() == Ok(test) {
        let start = Instant::now();
        let runs = fuzz(&seeds(), target);
        let peak = peak_rss_kib();
        eprintln!(
            "{test}: {runs} inputs in {:.1?}, peak RSS {peak} KiB (cap {CAP_MIB} MiB)",
            start.elapsed()
        );
        assert!(runs > 1000, "the fuzz loop barely ran ({runs} inputs)");
        assert!(peak <= CAP_MIB * 1024, "peak RSS {peak} KiB over the cap");
        return;
    }
    let exe = std::env::current_exe().expect("the test executable");
    let out = Command::new("prlimit")
        .arg(format!("--as={}", CAP_MIB << 20))
        .arg("--")
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, test)
        // Fewer malloc arenas: each reserves 64 MiB of address space.
        .env("MALLOC_ARENA_MAX", "2")
        .output()
        .expect("running prlimit (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    assert!(
        out.status.success(),
        "{test} failed under a {CAP_MIB} MiB address-space cap ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("1 passed"), "the capped child ran no test:\n{stdout}");
}

#[test]
fn capped_fuzz_mesh_frames_and_handshake() {
    capped("capped_fuzz_mesh_frames_and_handshake", mesh_seeds, |d| {
        mesh_fuzz::frames(d);
        mesh_fuzz::handshake(d);
    });
}

#[test]
fn capped_fuzz_sleeve_reassembly() {
    capped("capped_fuzz_sleeve_reassembly", sleeve_seeds, weft::fuzz::sleeve);
}

#[test]
fn capped_fuzz_dns_gossip() {
    capped("capped_fuzz_dns_gossip", dns_seeds, weft::fuzz::dns_gossip);
}

#[test]
fn capped_fuzz_mac_gossip() {
    capped("capped_fuzz_mac_gossip", mac_seeds, weft::fuzz::mac_gossip);
}

#[test]
fn capped_fuzz_ipam_gossip() {
    capped("capped_fuzz_ipam_gossip", ipam_seeds, weft::fuzz::ipam_gossip);
}
