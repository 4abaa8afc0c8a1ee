//! Human-readable output: the status summary and the endpoint table. Pure functions of the
//! data, so their layout is tested without an agent.

use ipnet::IpNet;
use serde::Serialize;

use super::table::{self, Cell, Colour};
use crate::mesh::report::{ConnState, MeshReport, TargetReport};
use crate::overlay::health::Mode;
use crate::overlay::{LinkReport, OverlayReport};
use crate::status::report::Report;

/// One line of `weft ps`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointRow {
    pub id: String,
    pub kind: String,
    pub mac: String,
    pub addresses: Vec<IpNet>,
    pub netns: String,
    pub pod: Option<String>,
    /// The Docker container's name, for Docker endpoints (driver-made or attached by name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

fn field(name: &str, value: impl std::fmt::Display) -> String {
    format!("{name:>15}: {value}")
}

fn join(nets: &[IpNet]) -> String {
    if nets.is_empty() {
        "none".to_owned()
    } else {
        nets.iter().map(IpNet::to_string).collect::<Vec<_>>().join(", ")
    }
}

/// `weft status`.
pub fn status(r: &Report) -> Vec<String> {
    let state =
        if r.ready { "ready".to_owned() } else { format!("not ready ({})", r.not_ready_reason) };
    let mut lines = vec![
        field("Version", &r.version),
        field("Peer", format!("{} ({})", r.peer.name, r.peer.nickname)),
        field("Status", state),
        String::new(),
        field("Bridge", format!("{} mtu {} mac {}", r.bridge.name, r.bridge.mtu, r.bridge.mac)),
        field("Host addresses", join(&r.bridge.addresses)),
        String::new(),
        field("Range", r.ipam.range),
        field("Default subnet", r.ipam.default_subnet),
        field("IP allocation", format!("{} ({})", r.ipam.ring.state, r.ipam.ring.mode)),
        field("Addresses", format!("{} used, {} free", r.ipam.used, r.ipam.free)),
        field(
            "Endpoints",
            format!(
                "{} pods, {} attached, {} docker",
                r.endpoints.cni, r.endpoints.attached, r.endpoints.docker
            ),
        ),
        field("Kubernetes pods", kube_pods(&r.endpoints.pods)),
        String::new(),
        field("Encryption", if r.mesh.encryption { "enabled" } else { "disabled" }),
        field("Peer discovery", if r.mesh.discovery { "enabled" } else { "disabled" }),
        field("Targets", r.mesh.targets.iter().filter(|t| !t.discovered).count()),
        field("Connections", connection_summary(&r.mesh)),
        field("Peers", peer_summary(&r.mesh)),
        field("Trusted subnets", join(&r.mesh.trusted_subnets)),
        field("Overlay MTU", r.overlay.mtu),
        field("fastdp", &r.overlay.fastdp),
        String::new(),
        field("DNS", dns_summary(r)),
        field("NetworkPolicy", policy_summary(r)),
    ];
    if !r.endpoints.quarantined.is_empty() {
        let at = lines.iter().position(|l| l.contains("Kubernetes pods")).map_or(0, |i| i + 1);
        let keys = r.endpoints.quarantined.join(", ");
        lines.insert(at, field("Quarantined", format!("{keys} (undecodable records, set aside)")));
    }
    if r.overlay.fdb_refused > 0 {
        let at = lines.iter().position(|l| l.trim_start().starts_with("fastdp:"));
        let at = at.map_or(lines.len(), |i| i + 1);
        let what = format!(
            "{} entries refused by the kernel: {}",
            r.overlay.fdb_refused, r.overlay.fdb_error
        );
        lines.insert(at, field("Forwarding", what));
    }
    if !r.bridge.last_repairs.is_empty() {
        lines.insert(6, field("Last change", r.bridge.last_repairs.join(", ")));
    }
    if let Some(w) = &r.bridge.forward_warning {
        lines.insert(0, field("WARNING", w));
    }
    lines
}

/// `weft status ipam`: every peer's share of the range, as Weave printed it, then problems.
pub fn ipam(r: &Report) -> Vec<String> {
    let ring = &r.ipam.ring;
    let total: u64 = ring.peers.iter().map(|p| p.owned).sum();
    let mut out = vec![
        field("Range", r.ipam.range),
        field("Default subnet", r.ipam.default_subnet),
        field("Mode", &ring.mode),
        field("State", &ring.state),
        field("Used here", format!("{} addresses", r.ipam.used)),
        String::new(),
    ];
    for p in &ring.peers {
        let pct = if total == 0 { 0.0 } else { 100.0 * p.owned as f64 / total as f64 };
        let name = nick(&p.peer, &p.nickname);
        let reach = if p.reachable { "" } else { " - unreachable!" };
        out.push(format!(
            "{name:<40} {:>10} IPs ({pct:>5.1}% of total) ({} available){reach}",
            p.owned, p.free
        ));
    }
    if ring.peers.is_empty() {
        out.push("no peer owns any space yet".into());
    }
    if ring.unreachable > 0 {
        out.push(format!(
            "{} addresses belong to unreachable peers; `weft rmpeer PEER` reclaims a dead peer's space",
            ring.unreachable
        ));
    }
    for (peer, why) in &ring.mismatches {
        out.push(format!("cannot merge the ring of {peer}: {why}"));
    }
    for c in &ring.conflicts {
        out.push(format!("conflict: {c}"));
    }
    for s in &ring.pending_space {
        out.push(format!("asking for space in {s}"));
    }
    for a in &ring.pending_claims {
        out.push(format!("claiming {a} from its owner"));
    }
    out
}

fn dns_summary(r: &Report) -> String {
    let Some(d) = &r.dns else { return "disabled (--no-dns)".to_owned() };
    let names: std::collections::BTreeSet<&str> =
        d.entries.iter().map(|e| e.name.as_str()).collect();
    let place = if d.listen.is_empty() { d.listen_problem.clone() } else { d.listen.join(", ") };
    format!("{} ({} names, {} entries), {place}", d.domain, names.len(), d.entries.len())
}

fn policy_summary(r: &Report) -> String {
    let Some(p) = &r.policy else {
        return "not enforced (Kubernetes mode only; off with --no-network-policy)".to_owned();
    };
    if !p.unlisted.is_empty() {
        return format!("waiting for the API's {}", p.unlisted.join(", "));
    }
    let isolated = p.pods.iter().filter(|x| !x.ingress.is_empty() || !x.egress.is_empty());
    let mut out = format!(
        "enforced: {} local pods, {} isolated; {} programs installed, the last compiled in {} ms \
         and written in {} ms",
        p.pods.len(),
        isolated.count(),
        p.installs,
        p.compile_ms,
        p.write_ms
    );
    if !p.error.is_empty() {
        out.push_str(&format!("; the kernel refused the last one: {}", p.error));
    }
    out
}

/// `weft status policy`: this node's pods in the installed program and the policies that
/// isolate each, per direction.
pub fn policy(r: &Report) -> Vec<String> {
    let Some(p) = &r.policy else {
        return vec![
            "NetworkPolicy is not enforced by this agent (Kubernetes mode only; off with \
             --no-network-policy)"
                .into(),
        ];
    };
    let mut out = vec![field("NetworkPolicy", policy_summary(r)), String::new()];
    out.push(format!("{:<40} {:<24} {:<32} {}", "POD", "ADDRESSES", "INGRESS", "EGRESS"));
    let list = |v: &[String]| if v.is_empty() { "-".to_owned() } else { v.join(",") };
    for pod in &p.pods {
        let addrs: Vec<String> = pod.addresses.iter().map(ToString::to_string).collect();
        out.push(format!(
            "{:<40} {:<24} {:<32} {}",
            pod.pod,
            addrs.join(","),
            list(&pod.ingress),
            list(&pod.egress)
        ));
    }
    if !p.denied.is_empty() {
        out.push(String::new());
        out.push(format!("{:<8} {:>12}  {}", "DENIED", "PACKETS", "POLICIES ISOLATING THE POD"));
        for d in &p.denied {
            out.push(format!("{:<8} {:>12}  {}", d.direction, d.packets, d.policies.join(",")));
        }
    }
    out
}

/// `weft status dns`: where the server listens, its upstreams, and every live entry (name,
/// address, endpoint, origin peer), sorted by name.
pub fn dns(r: &Report) -> Vec<String> {
    let Some(d) = &r.dns else { return vec!["DNS is disabled on this agent (--no-dns)".into()] };
    let listen = if d.listen.is_empty() { d.listen_problem.clone() } else { d.listen.join(", ") };
    let upstream = if d.upstream.is_empty() { "none".to_owned() } else { d.upstream.join(", ") };
    let q = &d.queries;
    let mut out = vec![
        field("Domain", &d.domain),
        field("Listen", listen),
        field("Upstream", upstream),
        field("TTL", format!("{} s", d.ttl)),
        field(
            "Queries",
            format!(
                "{} answered, {} NXDOMAIN, {} forwarded, {} failed",
                q.answered, q.nxdomain, q.forwarded, q.failed
            ),
        ),
        field(
            "Entries",
            format!("{} live, {} deleted (kept 30 min)", d.entries.len(), d.tombstones),
        ),
        String::new(),
    ];
    let mut entries: Vec<_> = d.entries.iter().collect();
    entries.sort_by(|a, b| {
        (a.name.to_ascii_lowercase(), a.address).cmp(&(b.name.to_ascii_lowercase(), b.address))
    });
    for e in entries {
        out.push(format!(
            "{:<32} {:<16} {:<24} {}",
            e.name,
            e.address,
            e.endpoint,
            nick(&e.origin, &e.nickname)
        ));
    }
    out
}

fn connection_summary(m: &MeshReport) -> String {
    let total = m.connections.len();
    let parts: Vec<String> = ConnState::ALL
        .iter()
        .map(|s| (s, m.connections.iter().filter(|c| c.state == *s).count()))
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    let mut out =
        if parts.is_empty() { "0".into() } else { format!("{total} ({})", parts.join(", ")) };
    let refused = m.accepts.refused_rate + m.accepts.refused_handshakes;
    if refused > 0 {
        out.push_str(&format!("; {refused} inbound refused before the handshake"));
    }
    out
}

fn peer_summary(m: &MeshReport) -> String {
    let established: usize =
        m.peers.iter().map(|p| p.connections.iter().filter(|c| c.established).count()).sum();
    format!("{} (with {} established connections)", m.peers.len(), established)
}

fn nick(name: &str, nickname: &str) -> String {
    if nickname.is_empty() { name.to_owned() } else { format!("{name}({nickname})") }
}

/// `weft status peers`: each peer and the connections it reports.
pub fn peers(m: &MeshReport) -> Vec<String> {
    let nicknames: std::collections::HashMap<&str, &str> =
        m.peers.iter().map(|p| (p.name.as_str(), p.nickname.as_str())).collect();
    let mut out = Vec::new();
    for p in &m.peers {
        out.push(nick(&p.name, &p.nickname));
        for c in &p.connections {
            let dir = if c.outbound { "->" } else { "<-" };
            let state = if c.established { "established" } else { "pending" };
            let other = nick(&c.peer, nicknames.get(c.peer.as_str()).copied().unwrap_or(""));
            out.push(format!("   {dir} {:<22} {other:<32} {state}", c.address));
        }
    }
    out
}

/// `weft status connections`: one line per peer, as Weave prints connections, with the
/// overlay each one uses and, only when it is not at its best, why. Peers reached only
/// through others follow, with their next hop.
pub fn connections(m: &MeshReport, o: &OverlayReport) -> Vec<String> {
    let mut out: Vec<String> = m
        .connections
        .iter()
        .map(|c| {
            let dir = if c.outbound { "->" } else { "<-" };
            let info = match c.state {
                ConnState::Failed => c.info.clone(),
                _ => {
                    let enc = if c.data_encrypted {
                        "encrypted"
                    } else if c.encrypted {
                        "encrypted control, data in the clear (trusted subnet)"
                    } else {
                        "unencrypted"
                    };
                    let link = o.links.iter().find(|l| l.peer == c.peer);
                    let overlay = link.map_or_else(String::new, |l| overlay(l, &o.relayed));
                    // Last, as Weave printed its `mtu=`: the path MTU sleeve measured.
                    let mtu = link
                        .filter(|l| l.path_mtu > 0 && l.mode != Mode::Relayed)
                        .map_or_else(String::new, |l| format!(" path-mtu={}", l.path_mtu));
                    format!("{overlay} {enc} {}{mtu}", nick(&c.peer, &c.nickname))
                }
            };
            format!("{dir} {:<22} {:<12} {info}", c.address, c.state).trim_end().to_owned()
        })
        .collect();
    let direct =
        |p: &str| m.connections.iter().any(|c| c.state == ConnState::Established && c.peer == p);
    for (dst, via) in o.relayed.iter().filter(|(dst, _)| !direct(dst)) {
        out.push(format!("   {dst:<22} relayed      via {via}"));
    }
    out
}

/// The overlay of a link: the one in use (with the next hop when relayed) and, when the
/// link is degraded, why.
fn overlay(l: &LinkReport, relayed: &[(String, String)]) -> String {
    let via = relayed.iter().find(|(dst, _)| *dst == l.peer).map(|(_, via)| via);
    let mode = match (l.mode, via) {
        (Mode::Relayed, Some(via)) => format!("relayed via {via}"),
        (mode, _) => mode.to_string(),
    };
    if l.degraded.is_empty() { mode } else { format!("{mode} ({})", l.degraded) }
}

/// `weft status targets`: the addresses the mesh keeps connecting to, as given; discovered
/// ones (learnt from peers, kept while connected) are marked.
pub fn targets(targets: &[TargetReport]) -> Vec<String> {
    targets
        .iter()
        .map(|t| if t.discovered { format!("{} (discovered)", t.target) } else { t.target.clone() })
        .collect()
}

/// "N (namespace: n, ...)" for the pods the runtime named, or "none".
fn kube_pods(pods: &[crate::endpoints::report::PodAddresses]) -> String {
    if pods.is_empty() {
        return "none".to_owned();
    }
    let mut by_ns: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for p in pods {
        *by_ns.entry(p.namespace.as_str()).or_default() += 1;
    }
    let parts: Vec<String> = by_ns.iter().map(|(ns, n)| format!("{ns}: {n}")).collect();
    format!("{} ({})", pods.len(), parts.join(", "))
}

/// `weft ps`: `ID MAC ADDRESS...` like Weave, plus the pod, the Docker container's name or
/// the kind, in aligned columns (no header: scripts read it line by line, as Weave's).
pub fn ps(rows: &[EndpointRow], colour: bool) -> Vec<String> {
    let cells: Vec<Vec<Cell>> = rows
        .iter()
        .map(|r| {
            let addrs = r.addresses.iter().map(IpNet::to_string).collect::<Vec<_>>().join(" ");
            let mac = if r.mac.is_empty() { "-" } else { &r.mac };
            let who =
                r.pod.clone().or_else(|| r.container.clone()).unwrap_or_else(|| r.kind.clone());
            vec![
                Cell::new(r.id.clone(), Some(Colour::Dim)),
                mac.into(),
                Cell::new(addrs, Some(Colour::Green)),
                Cell::new(who, Some(Colour::Bold)),
            ]
        })
        .collect();
    table::render(None, &cells, colour)
}

/// Peers listed in full by `weft status`; beyond, the problems first and a pointer.
const STATUS_PEERS: usize = 50;

/// The peer table of `weft status`: one line per peer with the overlay this host reaches it
/// by, the link's encryption, path MTU and traffic (fastdp and sleeve), its endpoints, and why
/// a link is not at its best. Problems (failures, degraded and relayed links) come first.
pub fn peer_table(r: &Report, colour: bool) -> Vec<String> {
    let mut rows: Vec<(u8, String, Vec<Cell>)> = Vec::new();
    let endpoints_of = |peer: &str| -> usize {
        if peer == r.peer.name {
            r.endpoints.list.iter().filter(|e| !e.addresses.is_empty()).count()
        } else {
            r.overlay.remote.iter().find(|o| o.peer == peer).map_or(0, |o| o.endpoints.len())
        }
    };
    for p in &r.mesh.peers {
        let (rank, row) = peer_row(r, &p.name, &p.nickname, endpoints_of(&p.name));
        rows.push((rank, p.nickname.clone(), row));
    }
    let known = |peer: &str| r.mesh.peers.iter().any(|p| p.name == peer);
    for c in r.mesh.connections.iter().filter(|c| c.state == ConnState::Failed && !known(&c.peer)) {
        let who = if c.peer.is_empty() { c.address.clone() } else { c.peer.clone() };
        let failed = Cell::new("failed", Some(Colour::Red));
        let mut row = vec![who.clone().into(), failed];
        row.extend(std::iter::repeat_with(Cell::default).take(5));
        row.push(c.info.clone().into());
        rows.push((1, who, row));
    }
    rows.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let total = rows.len();
    let shown: Vec<Vec<Cell>> = rows.into_iter().take(STATUS_PEERS).map(|(_, _, r)| r).collect();
    let header =
        ["PEER", "LINK", "ENCRYPTION", "PATH-MTU", "SENT", "RECEIVED", "ENDPOINTS", "NOTE"];
    let mut out = table::render(Some(&header), &shown, colour);
    if total > STATUS_PEERS {
        out.push(format!(
            "... {} more peers (`weft status connections` and `weft status peers` list them all)",
            total - STATUS_PEERS
        ));
    }
    out
}

/// One peer's line and its rank: this host, then failures, degraded or relayed links, the rest.
fn peer_row(r: &Report, name: &str, nickname: &str, endpoints: usize) -> (u8, Vec<Cell>) {
    let who = nick(name, nickname);
    let blank = || Cell::from("");
    if name == r.peer.name {
        let me = Cell::new("this host", Some(Colour::Bold));
        let enc = if r.mesh.encryption { "password set" } else { "" };
        return (
            0,
            vec![
                who.into(),
                me,
                enc.into(),
                blank(),
                blank(),
                blank(),
                endpoints.to_string().into(),
                blank(),
            ],
        );
    }
    let o = &r.overlay;
    let link = o.links.iter().find(|l| l.peer == name);
    let via = o.relayed.iter().find(|(d, _)| d == name).map(|(_, v)| v.as_str());
    let failed = r.mesh.connections.iter().find(|c| c.peer == name && c.state == ConnState::Failed);
    let via_nick = |v: &str| {
        r.mesh.peers.iter().find(|p| p.name == v).map_or(v.to_owned(), |p| p.nickname.clone())
    };
    let (rank, mode, note) = match (link, via, failed) {
        (Some(l), v, _) if l.mode == Mode::Relayed => {
            let text = v.map_or("relayed".to_owned(), |v| format!("relayed via {}", via_nick(v)));
            (2, Cell::new(text, Some(Colour::Magenta)), l.degraded.clone())
        }
        (Some(l), _, _) => {
            let c = if l.mode == Mode::Fastdp { Colour::Green } else { Colour::Yellow };
            (
                if l.degraded.is_empty() { 3 } else { 2 },
                Cell::new(l.mode.to_string(), Some(c)),
                l.degraded.clone(),
            )
        }
        (None, Some(v), _) => (
            2,
            Cell::new(format!("relayed via {}", via_nick(v)), Some(Colour::Magenta)),
            String::new(),
        ),
        (None, None, Some(c)) => (1, Cell::new("failed", Some(Colour::Red)), c.info.clone()),
        (None, None, None) => (3, "-".into(), String::new()),
    };
    let (enc, mtu, tx, rx) = match link {
        Some(l) => (
            if l.encrypted { "encrypted" } else { "clear" }.to_owned(),
            if l.path_mtu > 0 { l.path_mtu.to_string() } else { String::new() },
            bytes(l.sleeve_traffic.tx_bytes + l.fastdp_traffic.tx_bytes),
            bytes(l.sleeve_traffic.rx_bytes + l.fastdp_traffic.rx_bytes),
        ),
        None => Default::default(),
    };
    let note = Cell::new(note, Some(Colour::Yellow));
    (
        rank,
        vec![
            who.into(),
            mode,
            enc.into(),
            mtu.into(),
            tx.into(),
            rx.into(),
            endpoints.to_string().into(),
            note,
        ],
    )
}

/// A byte count for people: B, KiB, MiB, GiB.
fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{n} B") } else { format!("{v:.1} {}", units[i]) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::report::ConnectionReport;

    #[test]
    fn status_shows_the_essentials() {
        let mut r = Report { ready: true, ..Report::default() };
        r.peer.name = "8a:3e:3e:3e:3e:3e".into();
        r.bridge.addresses = vec!["10.32.0.1/12".parse().unwrap()];
        let text = status(&r).join("\n");
        assert!(text.contains("Status: ready"));
        assert!(text.contains("8a:3e:3e:3e:3e:3e"));
        assert!(text.contains("10.32.0.1/12"));
    }

    fn established(peer: &str, address: &str) -> ConnectionReport {
        ConnectionReport {
            peer: peer.into(),
            nickname: format!("n{peer}"),
            address: address.into(),
            outbound: true,
            state: ConnState::Established,
            ..ConnectionReport::default()
        }
    }

    fn link(peer: &str, mode: Mode, degraded: &str) -> LinkReport {
        LinkReport {
            peer: peer.into(),
            mode,
            fastdp: "fastdp probing".into(),
            sleeve: "sleeve probing".into(),
            encrypted: false,
            degraded: degraded.into(),
            path_mtu: 0,
            sleeve_traffic: Default::default(),
            fastdp_traffic: Default::default(),
        }
    }

    #[test]
    fn connections_are_one_line_per_peer_with_a_reason_only_when_degraded() {
        let m = MeshReport {
            connections: vec![
                established("a", "10.99.0.2:6783"),
                established("b", "10.99.0.3:6783"),
                established("c", "10.99.0.4:6783"),
            ],
            ..MeshReport::default()
        };
        let o = OverlayReport {
            links: vec![
                link("a", Mode::Fastdp, ""),
                LinkReport {
                    path_mtu: 720,
                    ..link("b", Mode::Sleeve, "fastdp down: no heartbeat acknowledged")
                },
                link("c", Mode::Relayed, "fastdp down: x; sleeve down: y"),
            ],
            relayed: vec![("c".into(), "a".into()), ("d".into(), "a".into())],
            ..OverlayReport::default()
        };
        let lines = connections(&m, &o);
        assert_eq!(
            lines,
            vec![
                "-> 10.99.0.2:6783         established  fastdp unencrypted a(na)",
                "-> 10.99.0.3:6783         established  sleeve (fastdp down: no heartbeat acknowledged) unencrypted b(nb) path-mtu=720",
                "-> 10.99.0.4:6783         established  relayed via a (fastdp down: x; sleeve down: y) unencrypted c(nc)",
                "   d                      relayed      via a",
            ]
        );
        assert!(lines.iter().all(|l| !l.contains("probing")), "{lines:?}");
    }

    #[test]
    fn targets_list_discovered_ones_too() {
        let t = |target: &str, discovered: bool| TargetReport {
            target: target.into(),
            discovered,
            connected: true,
            ..TargetReport::default()
        };
        assert_eq!(
            targets(&[t("10.99.0.2", false), t("10.99.0.3:6783", true)]),
            vec!["10.99.0.2", "10.99.0.3:6783 (discovered)"]
        );
    }

    #[test]
    fn the_peer_table_has_one_aligned_line_per_peer_problems_first() {
        let mut r = crate::status::simulated::simulated_report(12, 24, 5);
        r.mesh.connections.push(ConnectionReport {
            address: "10.99.0.9:6783".into(),
            state: ConnState::Failed,
            info: "wrong password".into(),
            ..ConnectionReport::default()
        });
        let lines = peer_table(&r, false);
        assert!(lines[0].starts_with("PEER") && lines[0].contains("LINK"), "{lines:?}");
        assert_eq!(lines.len(), 1 + 12 + 1, "a header, a line per peer, the failure: {lines:?}");
        assert!(lines[1].contains("this host"), "{lines:?}");
        assert!(lines[2].contains("failed") && lines[2].ends_with("wrong password"), "{lines:?}");
        let link = lines[0].find("LINK").expect("LINK column");
        assert!(lines[1..].iter().all(|l| l.len() > link && l.is_char_boundary(link)), "{lines:?}");
        let relayed = lines.iter().filter(|l| l.contains("relayed via")).count();
        assert_eq!(relayed, r.overlay.relayed.len(), "every relayed peer says through whom");
        let fastdp = lines.iter().position(|l| l.contains(" fastdp ")).expect("a fastdp line");
        let last_relayed = lines.iter().rposition(|l| l.contains("relayed via")).unwrap_or(0);
        assert!(last_relayed < fastdp, "relayed links come before healthy ones: {lines:?}");
        let coloured = peer_table(&r, true);
        assert!(coloured.iter().any(|l| l.contains("\x1b[")), "colour when asked");
        assert!(lines.iter().all(|l| !l.contains('\x1b')), "none otherwise");
    }

    #[test]
    fn ps_lines() {
        let rows = vec![EndpointRow {
            id: "c1/eth0".into(),
            kind: "cni".into(),
            mac: "0a:58:0a:20:00:02".into(),
            addresses: vec!["10.32.0.2/12".parse().unwrap()],
            netns: "/run/netns/x".into(),
            pod: Some("default/web".into()),
            container: None,
        }];
        assert_eq!(ps(&rows, false), vec!["c1/eth0  0a:58:0a:20:00:02  10.32.0.2/12  default/web"]);
        let docker = EndpointRow {
            id: "docker-cli:c0ffee".into(),
            kind: "attach".into(),
            pod: None,
            container: Some("plain".into()),
            ..rows[0].clone()
        };
        let both = ps(&[rows[0].clone(), docker], false);
        assert_eq!(
            both,
            vec![
                "c1/eth0            0a:58:0a:20:00:02  10.32.0.2/12  default/web",
                "docker-cli:c0ffee  0a:58:0a:20:00:02  10.32.0.2/12  plain",
            ],
            "aligned"
        );
    }

    #[test]
    fn policy_lists_local_pods_and_what_isolates_them() {
        use crate::netpol::{DeniedReport, PolicyPodReport, PolicyReport};
        let mut r = Report::default();
        assert!(policy(&r)[0].contains("not enforced"));
        r.policy = Some(PolicyReport { unlisted: vec!["pods".into()], ..PolicyReport::default() });
        assert!(status(&r).join("\n").contains("NetworkPolicy: waiting for the API's pods"));
        r.policy = Some(PolicyReport {
            unlisted: Vec::new(),
            installs: 3,
            error: String::new(),
            pods: vec![
                PolicyPodReport {
                    pod: "ns/web".into(),
                    addresses: vec!["10.32.0.2".parse().unwrap()],
                    ingress: vec!["ns/deny-web".into(), "ns/allow-db".into()],
                    egress: Vec::new(),
                },
                PolicyPodReport {
                    pod: "ns/db".into(),
                    addresses: vec!["10.32.0.3".parse().unwrap()],
                    ..PolicyPodReport::default()
                },
            ],
            denied: vec![DeniedReport {
                direction: "ingress".into(),
                policies: vec!["ns/deny-web".into(), "ns/allow-db".into()],
                packets: 53,
                bytes: 3180,
            }],
            compile_ms: 12,
            write_ms: 4,
        });
        let lines = policy(&r);
        assert!(lines[0].contains(
            "enforced: 2 local pods, 1 isolated; 3 programs installed, the last compiled in 12 ms \
             and written in 4 ms"
        ));
        let web = lines.iter().find(|l| l.starts_with("ns/web")).expect("web's line");
        let cells: Vec<&str> = web.split_whitespace().collect();
        assert_eq!(cells, vec!["ns/web", "10.32.0.2", "ns/deny-web,ns/allow-db", "-"]);
        let db = lines.iter().find(|l| l.starts_with("ns/db")).expect("db's line");
        assert_eq!(db.split_whitespace().collect::<Vec<_>>(), vec!["ns/db", "10.32.0.3", "-", "-"]);
        let denied = lines.iter().find(|l| l.starts_with("ingress")).expect("the drop counter");
        assert_eq!(
            denied.split_whitespace().collect::<Vec<_>>(),
            vec!["ingress", "53", "ns/deny-web,ns/allow-db"]
        );
    }
}
