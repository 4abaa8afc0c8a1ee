//! A bounded fuzzing run of the decoders that read bytes from other peers, on stable Rust, as
//! part of the test suite: valid inputs made by the real encoders are mutated (bit flips,
//! truncation, splicing, random bytes) for a fixed time. The coverage-guided targets in
//! `fuzz/` (cargo-fuzz, nightly) exercise the same entry points for longer runs.

use std::time::{Duration, Instant};

use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use weft::mesh::frame::{Preamble, encode_frame, frame_of};
use weft::mesh::{fuzz, proto};

fn seeds() -> Vec<Vec<u8>> {
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

fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..rng.random_range(1..8) {
        match rng.random_range(0..5) {
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
            _ => d.extend_from_slice(seed),
        }
    }
    d
}

#[test]
fn mesh_decoders_survive_mutated_input() {
    let budget = Duration::from_secs(
        std::env::var("WEFT_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10),
    );
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let seeds = seeds();
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < budget {
        let input = mutate(&mut rng, &seeds[runs as usize % seeds.len()]);
        fuzz::frames(&input);
        fuzz::handshake(&input);
        runs += 1;
    }
    eprintln!("fuzzed the mesh decoders with {runs} inputs in {:?}", start.elapsed());
    assert!(runs > 1000, "the fuzz loop barely ran ({runs} inputs)");
}
