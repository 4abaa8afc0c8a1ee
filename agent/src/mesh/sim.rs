//! A discrete-event simulation of many peers running the mesh's topology dissemination, in one
//! process and without sockets: the same merge, garbage collection and gossip rules as the
//! router (pending changes passed on once per tick to `gossip_fanout` random neighbours, a full
//! copy to a new neighbour, anti-entropy with one neighbour every 30 s). Messages take a fixed
//! latency; sizes are the encoded protocol messages. Used by the convergence tests and by the
//! `mesh-sim` benchmark. Deterministic for a seed.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::time::{Duration, Instant};

use prost::Message;
use rand::rngs::StdRng;
use rand::seq::IteratorRandom;
use rand::{Rng, SeedableRng};

use super::router::{ANTI_ENTROPY, TICK, entries_to_wire, gossip_fanout};
use super::topology::{ConnInfo, Entries, Topology};
use crate::identity::PeerName;

/// Simulation parameters.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub peers: usize,
    /// Connections each peer opens to random others at start.
    pub degree: usize,
    pub latency: Duration,
    pub seed: u64,
}

#[derive(Debug)]
struct Peer {
    topo: Topology,
    conns: BTreeSet<usize>,
    pending: BTreeSet<PeerName>,
    dirty: bool,
    alive: bool,
    next_anti_entropy: u64,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Tick(usize),
    Deliver { to: usize, from: usize, payload: Vec<u8> },
}

/// Figures of one phase.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Phase {
    /// Simulated time until every live peer held the same, complete topology.
    pub converged_after: Option<Duration>,
    pub bytes: u64,
    pub messages: u64,
    /// Wall-clock time spent merging and collecting, summed over peers.
    pub cpu: Duration,
}

/// The simulation.
#[derive(Debug)]
pub struct Sim {
    cfg: SimConfig,
    now: u64,
    seq: u64,
    peers: Vec<Peer>,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    rng: StdRng,
    bytes: u64,
    messages: u64,
    cpu: Duration,
}

fn name(i: usize) -> PeerName {
    PeerName::new(i as u64 + 1).unwrap_or_else(PeerName::random)
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Sim {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let peers = (0..cfg.peers)
            .map(|i| Peer {
                topo: Topology::new(name(i), format!("p{i}"), rng.random_range(1..u64::MAX), 1),
                conns: BTreeSet::new(),
                pending: BTreeSet::from([name(i)]),
                dirty: false,
                alive: true,
                next_anti_entropy: rng.random_range(0..micros(ANTI_ENTROPY)),
            })
            .collect();
        let mut sim = Sim {
            cfg,
            now: 0,
            seq: 0,
            peers,
            queue: BinaryHeap::new(),
            rng,
            bytes: 0,
            messages: 0,
            cpu: Duration::ZERO,
        };
        for i in 0..sim.peers.len() {
            // Peers tick out of phase, as independent machines do.
            let offset = sim.rng.random_range(0..micros(TICK));
            sim.schedule(offset, Event::Tick(i));
        }
        sim
    }

    fn schedule(&mut self, at: u64, ev: Event) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, ev)));
    }

    fn send(&mut self, from: usize, to: usize, entries: &Entries) {
        let payload = entries_to_wire(entries).encode_to_vec();
        self.send_encoded(from, to, payload);
    }

    fn send_encoded(&mut self, from: usize, to: usize, payload: Vec<u8>) {
        // Frame: 4-byte length, plus the gossip envelope (channel name, source).
        self.bytes += payload.len() as u64 + 24;
        self.messages += 1;
        let at = self.now + micros(self.cfg.latency);
        self.schedule(at, Event::Deliver { to, from, payload });
    }

    /// Connects two peers, as a handshake completing would.
    pub fn connect(&mut self, a: usize, b: usize) {
        if a == b
            || self.peers[a].conns.contains(&b)
            || !self.peers[a].alive
            || !self.peers[b].alive
        {
            return;
        }
        for (x, y, outbound) in [(a, b, true), (b, a, false)] {
            let p = &mut self.peers[x];
            p.conns.insert(y);
            let info = ConnInfo {
                address: format!("10.0.{}.{}:6783", y / 250, y % 250),
                outbound,
                established: true,
            };
            if p.topo.set_connection(name(y), info) {
                p.pending.insert(name(x));
                p.dirty = true;
            }
        }
        for (x, y) in [(a, b), (b, a)] {
            let full = self.peers[x].topo.entries().clone();
            self.send(x, y, &full);
        }
    }

    pub fn disconnect(&mut self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            let p = &mut self.peers[x];
            p.conns.remove(&y);
            if p.topo.remove_connection(name(y)) {
                p.pending.insert(name(x));
                p.dirty = true;
            }
        }
    }

    /// Peer `a` stops: its neighbours notice their connections close.
    pub fn leave(&mut self, a: usize) {
        let neighbours: Vec<usize> = self.peers[a].conns.iter().copied().collect();
        for n in neighbours {
            self.disconnect(a, n);
        }
        self.peers[a].alive = false;
    }

    /// Each peer connects to `degree` random others (the initial mesh).
    pub fn random_mesh(&mut self) {
        let n = self.peers.len();
        for a in 0..n {
            for _ in 0..self.cfg.degree {
                let b = self.rng.random_range(0..n);
                self.connect(a, b);
            }
        }
    }

    fn step(&mut self, ev: Event) {
        match ev {
            Event::Tick(i) => {
                let next = self.now + micros(TICK);
                self.schedule(next, Event::Tick(i));
                if !self.peers[i].alive {
                    return;
                }
                let started = Instant::now();
                let fanout = gossip_fanout(self.peers[i].topo.peers().count());
                let mut out: Vec<(usize, Vec<u8>)> = Vec::new();
                let p = &mut self.peers[i];
                if !p.pending.is_empty() {
                    let names: Vec<PeerName> = std::mem::take(&mut p.pending).into_iter().collect();
                    let delta = entries_to_wire(&p.topo.entries().subset(&names)).encode_to_vec();
                    for n in p.conns.iter().copied().choose_multiple(&mut self.rng, fanout) {
                        out.push((n, delta.clone()));
                    }
                }
                if std::mem::take(&mut p.dirty) {
                    p.topo.garbage_collect();
                }
                if self.now >= p.next_anti_entropy {
                    p.next_anti_entropy = self.now + micros(ANTI_ENTROPY);
                    if let Some(n) = p.conns.iter().copied().choose(&mut self.rng) {
                        out.push((n, entries_to_wire(p.topo.entries()).encode_to_vec()));
                    }
                }
                self.cpu += started.elapsed();
                for (to, payload) in out {
                    self.send_encoded(i, to, payload);
                }
            }
            Event::Deliver { to, from, payload } => {
                let p = &mut self.peers[to];
                if !p.alive || !p.conns.contains(&from) {
                    return;
                }
                let started = Instant::now();
                if let Ok(t) = super::proto::Topology::decode(payload.as_slice()) {
                    let changed = p.topo.merge_wire(&t);
                    if !changed.is_empty() {
                        p.pending.extend(changed);
                        p.dirty = true;
                    }
                }
                self.cpu += started.elapsed();
            }
        }
    }

    /// Whether every live peer holds exactly the live peers, with identical entries.
    pub fn converged(&self) -> bool {
        let live: BTreeSet<PeerName> =
            self.peers.iter().enumerate().filter(|(_, p)| p.alive).map(|(i, _)| name(i)).collect();
        let mut reference: Option<&Entries> = None;
        for p in self.peers.iter().filter(|p| p.alive) {
            let e = p.topo.entries();
            if e.0.len() != live.len() || !e.0.keys().all(|k| live.contains(k)) {
                return false;
            }
            match reference {
                None => reference = Some(e),
                Some(r) if r != e => return false,
                Some(_) => {}
            }
        }
        true
    }

    /// Runs until convergence (checked every `check`) or `limit` of simulated time.
    pub fn run_until_converged(&mut self, limit: Duration, check: Duration) -> Phase {
        let (start, bytes, messages, cpu) = (self.now, self.bytes, self.messages, self.cpu);
        let end = start + micros(limit);
        let mut next_check = start;
        let mut converged_after = None;
        while self.now < end {
            if self.now >= next_check {
                next_check = self.now + micros(check);
                if self.converged() {
                    converged_after = Some(Duration::from_micros(self.now - start));
                    break;
                }
            }
            let Some(Reverse((at, _, ev))) = self.queue.pop() else { break };
            self.now = at;
            self.step(ev);
        }
        Phase {
            converged_after,
            bytes: self.bytes - bytes,
            messages: self.messages - messages,
            cpu: self.cpu - cpu,
        }
    }

    /// Runs for `d` of simulated time (steady state), returning what was sent.
    pub fn run_for(&mut self, d: Duration) -> Phase {
        let (start, bytes, messages, cpu) = (self.now, self.bytes, self.messages, self.cpu);
        let end = start + micros(d);
        while let Some(Reverse((at, _, _))) = self.queue.peek() {
            if *at > end {
                break;
            }
            let Some(Reverse((at, _, ev))) = self.queue.pop() else { break };
            self.now = at;
            self.step(ev);
        }
        self.now = end;
        Phase {
            converged_after: None,
            bytes: self.bytes - bytes,
            messages: self.messages - messages,
            cpu: self.cpu - cpu,
        }
    }

    pub fn live(&self) -> usize {
        self.peers.iter().filter(|p| p.alive).count()
    }

    /// A random live peer.
    pub fn random_live(&mut self) -> Option<usize> {
        let live: Vec<usize> = (0..self.peers.len()).filter(|i| self.peers[*i].alive).collect();
        live.into_iter().choose(&mut self.rng)
    }

    /// The peers `i` is connected to.
    pub fn neighbours(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        self.peers[i].conns.iter().copied()
    }

    /// The name peer `i` has in the simulation.
    pub fn name(i: usize) -> PeerName {
        name(i)
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_hundred_peers_converge_and_forget_those_who_left() {
        let mut sim = Sim::new(SimConfig {
            peers: 200,
            degree: 4,
            latency: Duration::from_millis(1),
            seed: 7,
        });
        sim.random_mesh();
        let formed = sim.run_until_converged(Duration::from_secs(60), Duration::from_millis(50));
        let t = formed.converged_after.expect("the mesh converges");
        assert!(t <= Duration::from_secs(5), "converged after {t:?}");
        for _ in 0..20 {
            let p = sim.random_live().expect("a live peer");
            sim.leave(p);
        }
        let after = sim.run_until_converged(Duration::from_secs(60), Duration::from_millis(50));
        assert!(after.converged_after.is_some(), "departed peers are forgotten everywhere");
    }

    #[test]
    fn random_connect_disconnect_sequences_converge() {
        for seed in 0..5 {
            let mut sim = Sim::new(SimConfig {
                peers: 40,
                degree: 3,
                latency: Duration::from_millis(2),
                seed,
            });
            sim.random_mesh();
            for _ in 0..200 {
                let (a, b) = (sim.rng().random_range(0..40), sim.rng().random_range(0..40));
                if sim.rng().random_bool(0.5) {
                    sim.connect(a, b);
                } else {
                    sim.disconnect(a, b);
                }
                let pause = Duration::from_millis(sim.rng().random_range(0..50));
                sim.run_for(pause);
            }
            // Keep the graph connected so that every peer can hear from every other.
            for i in 1..40 {
                sim.connect(i - 1, i);
            }
            let phase =
                sim.run_until_converged(Duration::from_secs(120), Duration::from_millis(50));
            assert!(phase.converged_after.is_some(), "seed {seed} did not converge");
        }
    }
}
