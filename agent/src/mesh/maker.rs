//! Which peers to dial and when: the direct targets, each tagged with the sources that want
//! it (the user through `weft launch PEER...` and `weft connect`, or a peer source such as the
//! Kubernetes Node list), and, with discovery, the peers of our peers — only known peers, at
//! addresses inside the [`DiscoveryScope`], and at most as many as the connection limit.
//! Failed attempts back off exponentially with jitter; a target that turned out to be
//! ourselves is not retried. Pure: time and randomness are passed in.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::topology::Topology;
use crate::identity::PeerName;

/// First retry delay; each failure multiplies it by 1.5, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Cap of the retry delay: a healed partition reconnects within this (plus a connect timeout).
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Who wants a direct target. A source replaces only its own targets, so a Node-list resync
/// never drops what the user typed, and `weft connect --replace` never drops the Node list.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The command line, `weft connect`, and what was persisted from them.
    User,
    /// The InternalIPs of the other Nodes of a Kubernetes cluster.
    Kubernetes,
}

/// A target: a direct one as the user wrote it (`host` or `host:port`), or a discovered peer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetKey {
    Direct(String),
    Discovered(PeerName),
}

impl TargetKey {
    /// The peer a target leads to: known in advance for a discovered one, learnt on
    /// connecting for a direct one.
    pub fn peer(&self, state: &TargetState) -> Option<PeerName> {
        match self {
            TargetKey::Direct(_) => state.peer,
            TargetKey::Discovered(p) => Some(*p),
        }
    }
}

impl std::fmt::Display for TargetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetKey::Direct(s) => f.write_str(s),
            TargetKey::Discovered(p) => write!(f, "{p} (discovered)"),
        }
    }
}

/// What we know about dialling one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetState {
    /// Where to dial: the spec for direct targets, the learned address for discovered ones.
    pub address: String,
    pub attempts: u32,
    pub next_try: Instant,
    pub dialing: bool,
    pub last_error: Option<String>,
    /// The peer this target led to, once connected.
    pub peer: Option<PeerName>,
    /// Set for errors that retrying cannot fix (the target is ourselves).
    pub give_up: bool,
    /// The sources that want a direct target (empty for discovered ones).
    pub sources: BTreeSet<Source>,
}

impl TargetState {
    fn new(address: String, now: Instant) -> TargetState {
        TargetState {
            address,
            attempts: 0,
            next_try: now,
            dialing: false,
            last_error: None,
            peer: None,
            give_up: false,
            sources: BTreeSet::new(),
        }
    }
}

/// The outcome of a dial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DialOutcome {
    Connected(PeerName),
    Failed { error: String, give_up: bool },
}

/// The connection maker's state.
#[derive(Clone, Debug)]
pub struct Maker {
    pub targets: BTreeMap<TargetKey, TargetState>,
    pub discovery: bool,
}

/// Adds jitter: a delay drawn uniformly from [d/2, 3d/2).
pub fn jittered(d: Duration, unit: f64) -> Duration {
    d.mul_f64(0.5 + unit.clamp(0.0, 1.0))
}

impl Maker {
    pub fn new(discovery: bool) -> Maker {
        Maker { targets: BTreeMap::new(), discovery }
    }

    /// The direct targets the user wants (the ones persisted), in order.
    pub fn direct(&self) -> Vec<String> {
        self.of_source(Source::User)
    }

    /// The direct targets `source` wants, in order.
    pub fn of_source(&self, source: Source) -> Vec<String> {
        self.targets
            .iter()
            .filter_map(|(k, t)| match k {
                TargetKey::Direct(s) if t.sources.contains(&source) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// Adds the user's direct targets (or replaces all of the user's).
    pub fn add_direct(&mut self, specs: &[String], replace: bool, now: Instant) {
        let mut want: BTreeSet<String> =
            if replace { BTreeSet::new() } else { self.direct().into_iter().collect() };
        want.extend(specs.iter().cloned());
        self.set_source(Source::User, &want, now);
    }

    /// Makes `specs` the direct targets of `source`: adds the new ones, and drops the ones no
    /// source wants any more.
    pub fn set_source(&mut self, source: Source, specs: &BTreeSet<String>, now: Instant) {
        for (k, t) in self.targets.iter_mut() {
            if let TargetKey::Direct(s) = k {
                if !specs.contains(s) {
                    t.sources.remove(&source);
                }
            }
        }
        self.targets.retain(|k, t| matches!(k, TargetKey::Discovered(_)) || !t.sources.is_empty());
        for s in specs {
            self.targets
                .entry(TargetKey::Direct(s.clone()))
                .or_insert_with(|| TargetState::new(s.clone(), now))
                .sources
                .insert(source);
        }
    }

    /// `weft forget`: the user no longer wants these (another source may still).
    pub fn forget(&mut self, specs: &[String]) {
        let want: BTreeSet<String> =
            self.direct().into_iter().filter(|d| !specs.contains(d)).collect();
        self.set_source(Source::User, &want, Instant::now());
    }

    /// Replaces the discovered targets with `candidates` (peer, address), keeping the state of
    /// those that stay. Peers that a direct target already leads to need no discovered target.
    /// A discovered peer we are connected to stays a target (it is not dialled while
    /// connected, and is dialled again if the connection ends), so status lists every
    /// address the mesh keeps connecting to.
    pub fn set_discovered(&mut self, candidates: &BTreeMap<PeerName, SocketAddr>, now: Instant) {
        let direct_peers: Vec<PeerName> = self
            .targets
            .iter()
            .filter(|(k, _)| matches!(k, TargetKey::Direct(_)))
            .filter_map(|(_, s)| s.peer)
            .collect();
        let wanted: BTreeMap<PeerName, SocketAddr> = if self.discovery {
            candidates
                .iter()
                .filter(|(p, _)| !direct_peers.contains(p))
                .map(|(p, a)| (*p, *a))
                .collect()
        } else {
            BTreeMap::new()
        };
        self.targets.retain(|k, s| match k {
            TargetKey::Discovered(p) => wanted.contains_key(p) || s.dialing,
            TargetKey::Direct(_) => true,
        });
        for (p, addr) in wanted {
            let st = self
                .targets
                .entry(TargetKey::Discovered(p))
                .or_insert_with(|| TargetState::new(addr.to_string(), now));
            if !st.dialing {
                st.address = addr.to_string();
            }
        }
    }

    /// Targets to dial now: not connected, not being dialled, due, and within the connection
    /// limit (counting connections and dials in progress).
    pub fn due(
        &mut self,
        now: Instant,
        connected: &[PeerName],
        live: usize,
        limit: usize,
    ) -> Vec<(TargetKey, String)> {
        let mut busy = live + self.targets.values().filter(|s| s.dialing).count();
        let mut out = Vec::new();
        for (k, s) in self.targets.iter_mut() {
            if busy >= limit {
                break;
            }
            let connected_already = k.peer(s).is_some_and(|p| connected.contains(&p));
            if s.dialing || s.give_up || connected_already || s.next_try > now {
                continue;
            }
            s.dialing = true;
            busy += 1;
            out.push((k.clone(), s.address.clone()));
        }
        out
    }

    /// Records the result of a dial. `unit` in [0, 1) supplies the jitter.
    pub fn on_result(&mut self, key: &TargetKey, outcome: DialOutcome, now: Instant, unit: f64) {
        let Some(s) = self.targets.get_mut(key) else { return };
        s.dialing = false;
        match outcome {
            DialOutcome::Connected(peer) => {
                s.peer = Some(peer);
                s.attempts = 0;
                s.last_error = None;
            }
            DialOutcome::Failed { error, give_up } => {
                s.attempts = s.attempts.saturating_add(1);
                s.last_error = Some(error);
                s.give_up = give_up;
                let base = FIRST_BACKOFF
                    .mul_f64(1.5f64.powi(s.attempts.min(30) as i32 - 1))
                    .min(MAX_BACKOFF);
                s.next_try = now + jittered(base, unit);
            }
        }
    }

    /// A connection that a target led to ended: retry soon (after the first back-off).
    pub fn on_disconnect(&mut self, peer: PeerName, now: Instant, unit: f64) {
        for (_, s) in self.targets.iter_mut().filter(|(k, s)| k.peer(s) == Some(peer)) {
            s.next_try = now + jittered(FIRST_BACKOFF, unit);
        }
    }
}

/// Where discovered peers may be dialled: gossip can name any address, and without a password
/// anyone can gossip, so discovery only dials inside these networks (by default the networks
/// of this host's underlay addresses, see `--discovery-subnets`) and the /24 (IPv4) or /64
/// (IPv6) of each direct target given as an address. Loopback, unspecified, link-local,
/// multicast and broadcast addresses are never dialled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DiscoveryScope {
    pub subnets: Vec<IpNet>,
}

impl DiscoveryScope {
    /// The scope `subnets` widened by the networks of direct targets given as addresses.
    pub fn with_targets(subnets: &[IpNet], targets: &[String]) -> DiscoveryScope {
        let mut subnets = subnets.to_vec();
        for t in targets {
            let ip = t
                .parse::<SocketAddr>()
                .map(|a| a.ip())
                .or_else(|_| t.parse::<IpAddr>())
                .or_else(|_| t.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>());
            let net = match ip {
                Ok(IpAddr::V4(v4)) => IpNet::new(IpAddr::V4(v4), 24),
                Ok(IpAddr::V6(v6)) => IpNet::new(IpAddr::V6(v6), 64),
                Err(_) => continue,
            };
            if let Ok(n) = net {
                subnets.push(n.trunc());
            }
        }
        DiscoveryScope { subnets }
    }

    /// Whether discovery may dial `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let special = match ip {
            IpAddr::V4(a) => {
                a.is_loopback()
                    || a.is_unspecified()
                    || a.is_link_local()
                    || a.is_multicast()
                    || a.is_broadcast()
            }
            IpAddr::V6(a) => {
                a.is_loopback()
                    || a.is_unspecified()
                    || a.is_multicast()
                    || a.is_unicast_link_local()
            }
        };
        !special && self.subnets.iter().any(|n| n.contains(&ip))
    }
}

/// Peers of our peers worth dialling, and where: the address a peer dialled them at, or the
/// address they came from with our mesh `port`. Only peers in the topology (not names that
/// merely appear in someone's list), only at addresses `scope` permits, and at most `max` of
/// them (the first by name, the same every time).
pub fn discovery_candidates(
    topology: &Topology,
    port: u16,
    scope: &DiscoveryScope,
    max: usize,
) -> BTreeMap<PeerName, SocketAddr> {
    let me = topology.me();
    let mut out: BTreeMap<PeerName, SocketAddr> = BTreeMap::new();
    for (owner, entry) in topology.peers() {
        if *owner == me {
            continue;
        }
        for (peer, c) in &entry.connections {
            if *peer == me || topology.get(*peer).is_none() {
                continue;
            }
            let Ok(addr) = c.address.parse::<SocketAddr>() else { continue };
            if !scope.permits(addr.ip()) {
                continue;
            }
            if c.outbound {
                out.insert(*peer, addr);
            } else {
                out.entry(*peer).or_insert_with(|| SocketAddr::new(addr.ip(), port));
            }
        }
    }
    out.into_iter().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: u64) -> PeerName {
        PeerName::new(i).unwrap()
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let t0 = Instant::now();
        let mut m = Maker::new(true);
        m.add_direct(&["10.0.0.2".into()], false, t0);
        let key = TargetKey::Direct("10.0.0.2".into());
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..12 {
            assert_eq!(m.due(now, &[], 0, 10).len(), 1);
            m.on_result(
                &key,
                DialOutcome::Failed { error: "refused".into(), give_up: false },
                now,
                0.5,
            );
            let next = m.targets[&key].next_try;
            delays.push(next - now);
            assert!(m.due(now, &[], 0, 10).is_empty(), "not due before its time");
            now = next;
        }
        assert_eq!(delays[0], FIRST_BACKOFF);
        assert!(delays.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*delays.last().unwrap(), MAX_BACKOFF);
        assert_eq!(jittered(Duration::from_secs(2), 0.0), Duration::from_secs(1));
    }

    #[test]
    fn self_is_never_retried_and_the_limit_holds() {
        let t0 = Instant::now();
        let mut m = Maker::new(true);
        m.add_direct(&["a".into(), "b".into(), "c".into()], false, t0);
        let due = m.due(t0, &[], 1, 3);
        assert_eq!(due.len(), 2, "limit 3 with one live connection");
        m.on_result(
            &due[0].0,
            DialOutcome::Failed { error: "that is us".into(), give_up: true },
            t0,
            0.0,
        );
        assert!(m.due(t0 + MAX_BACKOFF * 2, &[], 0, 10).iter().all(|(k, _)| *k != due[0].0));
    }

    #[test]
    fn discovery_adds_and_drops_peers_of_peers() {
        let t0 = Instant::now();
        let mut m = Maker::new(true);
        let cands = BTreeMap::from([
            (p(3), "10.0.0.3:6783".parse().unwrap()),
            (p(4), "10.0.0.4:6783".parse().unwrap()),
        ]);
        m.set_discovered(&cands, t0);
        assert_eq!(
            m.targets.keys().cloned().collect::<Vec<_>>(),
            vec![TargetKey::Discovered(p(3)), TargetKey::Discovered(p(4))]
        );
        m.set_discovered(&BTreeMap::new(), t0);
        assert!(m.targets.is_empty());
        let mut off = Maker::new(false);
        off.set_discovered(&cands, t0);
        assert!(off.targets.is_empty(), "--no-discovery");
    }

    #[test]
    fn connected_discovered_peers_stay_targets_and_are_not_dialled() {
        let t0 = Instant::now();
        let mut m = Maker::new(true);
        m.add_direct(&["10.0.0.2".into()], false, t0);
        let direct = TargetKey::Direct("10.0.0.2".into());
        assert_eq!(m.due(t0, &[], 0, 10).len(), 1);
        m.on_result(&direct, DialOutcome::Connected(p(2)), t0, 0.0);
        let cands = BTreeMap::from([
            (p(2), "10.0.0.2:6783".parse().unwrap()),
            (p(3), "10.0.0.3:6783".parse().unwrap()),
        ]);
        m.set_discovered(&cands, t0);
        let found = TargetKey::Discovered(p(3));
        assert!(
            !m.targets.contains_key(&TargetKey::Discovered(p(2))),
            "a direct target leads there"
        );
        assert_eq!(m.due(t0, &[p(2)], 1, 10), vec![(found.clone(), "10.0.0.3:6783".to_owned())]);
        m.on_result(&found, DialOutcome::Connected(p(3)), t0, 0.0);
        // Connected: still listed, but not dialled again while the connection lasts.
        m.set_discovered(&cands, t0);
        assert!(m.targets.contains_key(&found));
        assert!(m.due(t0 + MAX_BACKOFF, &[p(2), p(3)], 2, 10).is_empty());
        // Connected the other way (it dialled us): not dialled either.
        let mut inbound = Maker::new(true);
        inbound.set_discovered(&cands, t0);
        assert!(inbound.due(t0, &[p(2), p(3)], 2, 10).is_empty());
        // The connection ends: dialled again after the first back-off.
        m.on_disconnect(p(3), t0, 0.5);
        assert_eq!(m.due(t0 + FIRST_BACKOFF, &[p(2)], 1, 10).len(), 1);
    }

    #[test]
    fn replace_and_forget() {
        let t0 = Instant::now();
        let mut m = Maker::new(true);
        m.add_direct(&["a".into(), "b".into()], false, t0);
        m.add_direct(&["c".into()], true, t0);
        assert_eq!(m.direct(), vec!["c".to_owned()]);
        m.forget(&["c".into()]);
        assert!(m.direct().is_empty());
    }

    #[test]
    fn sources_replace_only_their_own_targets() {
        let t0 = Instant::now();
        let mut m = Maker::new(true);
        m.add_direct(&["a".into(), "shared".into()], false, t0);
        let kube: BTreeSet<String> = ["shared".to_owned(), "n2".to_owned()].into();
        m.set_source(Source::Kubernetes, &kube, t0);
        assert_eq!(m.targets.len(), 3);
        // A Node-list resync without n2 keeps the user's targets.
        m.set_source(Source::Kubernetes, &BTreeSet::new(), t0);
        assert_eq!(m.direct(), vec!["a".to_owned(), "shared".to_owned()]);
        assert_eq!(m.targets.len(), 2);
        // The user's --replace keeps the Node list's.
        m.set_source(Source::Kubernetes, &kube, t0);
        m.add_direct(&["b".into()], true, t0);
        assert_eq!(m.direct(), vec!["b".to_owned()]);
        assert_eq!(m.of_source(Source::Kubernetes), vec!["n2".to_owned(), "shared".to_owned()]);
        m.forget(&["shared".into()]);
        assert!(m.targets.contains_key(&TargetKey::Direct("shared".into())), "still wanted");
    }

    /// A peer advertising 10 000 made-up peers (each listing the next, so all of them are
    /// reachable), half of them at addresses outside our networks and some at special ones.
    #[test]
    fn a_peer_advertising_ten_thousand_fakes_gets_few_bounded_dials() {
        use crate::mesh::proto;
        use crate::mesh::topology::MAX_PEERS;
        let me = p(1);
        let attacker = p(2);
        let mut t = Topology::new(me, "me".into(), 1, 1);
        let conn = |addr: String| crate::mesh::topology::ConnInfo {
            address: addr,
            outbound: true,
            established: true,
        };
        t.set_connection(attacker, conn("10.0.0.2:6783".into()));
        let fake = |i: u64| p(1000 + i);
        let address = |i: u64| match i % 4 {
            0 => format!("10.0.{}.{}:6783", (i / 250) % 250, i % 250 + 1),
            1 => format!("192.0.2.{}:22", i % 250 + 1),
            2 => "127.0.0.1:6783".to_owned(),
            _ => format!("[fe80::{i:x}]:6783"),
        };
        let entry = |name: PeerName, next: Option<u64>| proto::PeerEntry {
            name: name.get(),
            nickname: "fake".into(),
            uid: 1,
            version: 1,
            connections: next
                .map(|n| proto::ConnectionEntry {
                    peer: fake(n).get(),
                    address: address(n),
                    outbound: true,
                    established: true,
                })
                .into_iter()
                .collect(),
        };
        let mut wire = proto::Topology { peers: vec![entry(attacker, Some(0))] };
        wire.peers.extend((0..10_000).map(|i| entry(fake(i), (i + 1 < 10_000).then_some(i + 1))));
        t.merge_wire(&wire);
        t.garbage_collect();
        let peers = t.peers().count();
        assert!(peers <= MAX_PEERS, "{peers} peers held (at most {MAX_PEERS})");
        let scope = DiscoveryScope { subnets: vec!["10.0.0.0/16".parse().unwrap()] };
        let limit = 200;
        let cands = discovery_candidates(&t, 6783, &scope, limit);
        assert!(cands.len() <= limit, "{} candidates", cands.len());
        assert!(cands.values().all(|a| scope.permits(a.ip())), "only inside the scope");
        assert!(!cands.is_empty(), "fakes inside our networks are still tried (bounded)");
        let mut m = Maker::new(true);
        let t0 = Instant::now();
        m.set_discovered(&cands, t0);
        let dials = m.due(t0, &[attacker], 1, limit);
        assert!(dials.len() < limit);
        assert!(dials.iter().all(|(_, a)| a.starts_with("10.0.")), "{dials:?}");
    }

    #[test]
    fn the_scope_is_our_networks_and_direct_targets() {
        let scope = DiscoveryScope::with_targets(
            &["10.0.0.0/16".parse().unwrap()],
            &["192.168.7.9".into(), "[fd00::1]:6783".into(), "node-3.example".into()],
        );
        for ok in ["10.0.3.4", "192.168.7.200", "fd00::99", "::ffff:10.0.9.9"] {
            assert!(scope.permits(ok.parse().unwrap()), "{ok}");
        }
        for no in ["10.1.0.1", "192.168.8.1", "fd00:0:0:1::1", "169.254.169.254", "8.8.8.8"] {
            assert!(!scope.permits(no.parse().unwrap()), "{no}");
        }
        let everything =
            DiscoveryScope { subnets: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()] };
        for no in ["127.0.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "fe80::1"] {
            assert!(!everything.permits(no.parse().unwrap()), "{no}");
        }
    }
}
