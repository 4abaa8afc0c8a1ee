//! The state gauges of `/metrics`, set from the status report when it is scraped, and the
//! counters the sleeve keeps in its own atomics mirrored into the registry.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::report::Report;
use crate::ipam::RingState;
use crate::mesh::report::ConnState;
use crate::metrics::{
    ConnectionLabels, KindLabel, LinkLabels, Metrics, PeerLabels, PeerStateLabels, PodLabels,
    PolicyDeniedLabels, StateLabel, StateMetrics, TrafficLabels, VersionLabel,
};
use crate::overlay::health::Mode;

fn set(f: &Family<StateLabel, Gauge>, state: &str, v: u64) {
    f.get_or_create(&StateLabel { state: state.to_owned() })
        .set(i64::try_from(v).unwrap_or(i64::MAX));
}

/// A counter that mirrors a total counted elsewhere.
fn mirror(f: &Family<KindLabel, Counter>, kind: &str, total: u64) {
    let c = f.get_or_create(&KindLabel { kind: kind.to_owned() });
    c.inc_by(total.saturating_sub(c.get()));
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The text exposition, with the state gauges taken from `report`.
pub fn render(m: &Metrics, report: &Report) -> String {
    let _one_at_a_time = m.scrape.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    set_state(&m.state, report);
    m.ready.set(i64::from(report.ready));
    set(&m.ips, "used", report.ipam.used);
    set(&m.ips, "free", report.ipam.free);
    let ring = &report.ipam.ring;
    let owned = ring.peers.iter().find(|p| p.peer == report.peer.name).map_or(0, |p| p.owned);
    set(&m.ips, "owned", owned);
    set(&m.ips, "unreachable", ring.unreachable);
    m.ring_ready.set(i64::from(ring.state == RingState::Ready));
    m.ring_mismatches.set(i64::try_from(ring.mismatches.len()).unwrap_or(i64::MAX));
    set(&m.endpoints, "cni", u64::from(report.endpoints.cni));
    set(&m.endpoints, "attached", u64::from(report.endpoints.attached));
    set(&m.endpoints, "docker", u64::from(report.endpoints.docker));
    m.pod_addresses.clear();
    for p in &report.endpoints.pods {
        let labels = PodLabels { namespace: p.namespace.clone(), pod: p.name.clone() };
        m.pod_addresses.get_or_create(&labels).set(p.addresses.len() as i64);
    }
    m.policy_denied.clear();
    for d in report.policy.iter().flat_map(|p| &p.denied) {
        let labels =
            PolicyDeniedLabels { direction: d.direction.clone(), policies: d.policies.join(",") };
        m.policy_denied.get_or_create(&labels).set(i64::try_from(d.packets).unwrap_or(i64::MAX));
    }
    m.connections.clear();
    for state in ConnState::ALL {
        for (encryption, enc) in [("yes", true), ("no", false)] {
            let n = report
                .mesh
                .connections
                .iter()
                .filter(|c| c.state == state && c.encrypted == enc)
                .count();
            let labels = ConnectionLabels {
                state: state.name().to_owned(),
                encryption: encryption.to_owned(),
            };
            m.connections.get_or_create(&labels).set(n as i64);
        }
    }
    m.peers.set(report.mesh.peers.len() as i64);
    for mode in Mode::ALL {
        let n = report.overlay.links.iter().filter(|l| l.mode == mode).count();
        set(&m.overlay_links, mode.name(), n as u64);
    }
    let a = &report.mesh.accepts;
    mirror(&m.mesh_refused_accepts, "rate", a.refused_rate);
    mirror(&m.mesh_refused_accepts, "handshakes", a.refused_handshakes);
    let s = &report.overlay.sleeve;
    mirror(&m.sleeve_frames, "sent", s.tx_frames);
    mirror(&m.sleeve_frames, "received", s.rx_frames);
    mirror(&m.sleeve_frames, "frag_needed", s.frag_needed);
    mirror(&m.sleeve_bytes, "sent", s.tx_bytes);
    mirror(&m.sleeve_bytes, "received", s.rx_bytes);
    mirror(&m.sleeve_datagrams, "relayed", s.relayed);
    mirror(&m.sleeve_datagrams, "bad", s.dropped_bad);
    mirror(&m.sleeve_datagrams, "no_route", s.dropped_no_route);
    if let Some(d) = &report.dns {
        m.dns_entries.set(i64::try_from(d.entries.len()).unwrap_or(i64::MAX));
        let q = &d.queries;
        mirror(&m.dns_queries, "answered", q.answered);
        mirror(&m.dns_queries, "nxdomain", q.nxdomain);
        mirror(&m.dns_queries, "forwarded", q.forwarded);
        mirror(&m.dns_queries, "failed", q.failed);
    }
    m.encode()
}

/// Every other figure of the report (docs/status.md lists them all).
fn set_state(s: &StateMetrics, r: &Report) {
    s.build_info.clear();
    s.build_info.get_or_create(&VersionLabel { version: r.version.clone() }).set(1);
    s.bridge_mtu.set(i64::from(r.bridge.mtu));
    s.overlay_mtu.set(i64::from(r.overlay.mtu));
    s.remote_endpoints.set(count(r.overlay.remote.iter().map(|o| o.endpoints.len()).sum()));
    set_ipam(s, r);
    set_mesh(s, r);
    set_links(s, r);
    s.relayed_peers.set(count(
        r.overlay
            .relayed
            .iter()
            .filter(|(d, _)| {
                !r.overlay.links.iter().any(|l| l.peer == *d && l.mode != Mode::Relayed)
            })
            .count(),
    ));
    s.remote_macs.set(count(r.overlay.remote_macs));
    s.fdb_refused.set(count(r.overlay.fdb_refused));
    if let Some(d) = &r.dns {
        let names: std::collections::BTreeSet<String> =
            d.entries.iter().map(|e| e.name.to_ascii_lowercase()).collect();
        s.dns_names.set(count(names.len()));
        s.dns_tombstones.set(int(d.tombstones));
        s.dns_ttl.set(i64::from(d.ttl));
        s.dns_listening.set(count(d.listen.len()));
    }
    if let Some(p) = &r.policy {
        let c = &s.policy_installs;
        c.inc_by(p.installs.saturating_sub(c.get()));
        s.policy_compile.set(p.compile_ms as f64 / 1000.0);
        s.policy_write.set(p.write_ms as f64 / 1000.0);
        let isolated = p.pods.iter().filter(|x| !x.ingress.is_empty() || !x.egress.is_empty());
        let isolated = isolated.count();
        s.policy_pods.get_or_create(&state("isolated")).set(count(isolated));
        s.policy_pods.get_or_create(&state("not_isolated")).set(count(p.pods.len() - isolated));
        s.policy_unlisted.set(count(p.unlisted.len()));
        s.policy_kernel_error.set(i64::from(!p.error.is_empty()));
        s.policy_denied_bytes.clear();
        for d in &p.denied {
            let labels = PolicyDeniedLabels {
                direction: d.direction.clone(),
                policies: d.policies.join(","),
            };
            s.policy_denied_bytes.get_or_create(&labels).set(int(d.bytes));
        }
    }
}

fn state(name: &str) -> StateLabel {
    StateLabel { state: name.to_owned() }
}

fn set_ipam(s: &StateMetrics, r: &Report) {
    let ring = &r.ipam.ring;
    s.ipam_peer_addresses.clear();
    s.ipam_peer_reachable.clear();
    for p in &ring.peers {
        let (peer, nickname) = (p.peer.clone(), p.nickname.clone());
        for (st, v) in [("owned", p.owned), ("free", p.free)] {
            let labels = PeerStateLabels {
                peer: peer.clone(),
                nickname: nickname.clone(),
                state: st.into(),
            };
            s.ipam_peer_addresses.get_or_create(&labels).set(int(v));
        }
        s.ipam_peer_reachable
            .get_or_create(&PeerLabels { peer, nickname })
            .set(i64::from(p.reachable));
    }
    let pending = [("space", ring.pending_space.len()), ("claims", ring.pending_claims.len())];
    for (kind, n) in pending {
        s.ipam_pending.get_or_create(&KindLabel { kind: kind.into() }).set(count(n));
    }
    s.ipam_conflicts.set(count(ring.conflicts.len()));
}

fn set_mesh(s: &StateMetrics, r: &Report) {
    let m = &r.mesh;
    let discovered = m.targets.iter().filter(|t| t.discovered).count();
    s.mesh_targets
        .get_or_create(&KindLabel { kind: "direct".into() })
        .set(count(m.targets.len() - discovered));
    s.mesh_targets.get_or_create(&KindLabel { kind: "discovered".into() }).set(count(discovered));
    let established: usize =
        m.peers.iter().map(|p| p.connections.iter().filter(|c| c.established).count()).sum();
    s.mesh_topology_connections.set(count(established));
    s.mesh_handshakes.set(i64::from(m.accepts.handshakes));
    s.mesh_accept_sources.set(i64::from(m.accepts.sources));
    s.mesh_conn_limit.set(i64::from(m.conn_limit));
}

/// Per link: its overlay, whether it is degraded, its path MTU and its traffic.
fn set_links(s: &StateMetrics, r: &Report) {
    let nickname = |peer: &str| {
        r.mesh.peers.iter().find(|p| p.name == peer).map(|p| p.nickname.clone()).unwrap_or_default()
    };
    s.link_info.clear();
    s.link_degraded.clear();
    s.link_path_mtu.clear();
    // Cleared and set to the totals: a link that went takes its series with it.
    s.overlay_bytes.clear();
    s.overlay_packets.clear();
    for l in &r.overlay.links {
        let (peer, nick) = (l.peer.clone(), nickname(&l.peer));
        let enc = if l.encrypted { "yes" } else { "no" };
        let info = LinkLabels {
            peer: peer.clone(),
            nickname: nick.clone(),
            mode: l.mode.name().into(),
            encrypted: enc.into(),
        };
        s.link_info.get_or_create(&info).set(1);
        let who = PeerLabels { peer: peer.clone(), nickname: nick.clone() };
        s.link_degraded.get_or_create(&who).set(i64::from(!l.degraded.is_empty()));
        s.link_path_mtu.get_or_create(&who).set(i64::from(l.path_mtu));
        for (mode, t) in [(Mode::Sleeve, &l.sleeve_traffic), (Mode::Fastdp, &l.fastdp_traffic)] {
            for (direction, bytes, packets) in
                [("sent", t.tx_bytes, t.tx_packets), ("received", t.rx_bytes, t.rx_packets)]
            {
                let labels = TrafficLabels {
                    peer: peer.clone(),
                    nickname: nick.clone(),
                    mode: mode.name().into(),
                    direction: direction.into(),
                };
                s.overlay_bytes.get_or_create(&labels).inc_by(bytes);
                s.overlay_packets.get_or_create(&labels).inc_by(packets);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_names_with_the_weft_prefix() {
        let m = Metrics::new();
        m.observe_cni("ADD", true, 0.003);
        let text = render(&m, &Report::default());
        assert!(text.contains("weft_cni_request_duration_seconds_bucket{le="), "{text}");
        assert!(
            text.contains("weft_cni_requests_total{command=\"ADD\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("weft_ipam_addresses{state=\"used\"} 0"), "{text}");
    }

    #[test]
    fn pods_are_labelled_by_namespace_and_name() {
        let m = Metrics::new();
        let mut r = Report::default();
        r.endpoints.pods = vec![crate::endpoints::report::PodAddresses {
            namespace: "shop".into(),
            name: "web-1".into(),
            addresses: vec!["10.32.0.5/12".parse().expect("net")],
        }];
        let text = render(&m, &r);
        assert!(text.contains("weft_pod_addresses{namespace=\"shop\",pod=\"web-1\"} 1"), "{text}");
        r.endpoints.pods.clear();
        assert!(!render(&m, &r).contains("web-1"), "a deleted pod's series goes away");
    }

    /// The metric names docs/status.md lists, from its Metrics table.
    fn documented() -> Vec<String> {
        include_str!("../../../docs/status.md")
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .filter(|n| n.starts_with("weft_"))
            .map(str::to_owned)
            .collect()
    }

    /// A report with something in every section, as a Kubernetes node with NetworkPolicy,
    /// DNS and a relayed peer has.
    fn full_report() -> Report {
        let mut r = super::super::simulated::simulated_report(12, 60, 3);
        r.overlay.links[0].sleeve_traffic.tx_bytes = 4096;
        r.policy = Some(crate::netpol::PolicyReport {
            installs: 3,
            compile_ms: 12,
            write_ms: 4,
            pods: vec![crate::netpol::PolicyPodReport {
                pod: "prod/web-0".into(),
                addresses: vec!["10.0.0.2".parse().expect("address")],
                ingress: vec!["prod/deny-all".into()],
                egress: vec![],
            }],
            denied: vec![crate::netpol::DeniedReport {
                direction: "ingress".into(),
                policies: vec!["prod/deny-all".into()],
                packets: 5,
                bytes: 420,
            }],
            ..Default::default()
        });
        r.endpoints.pods = vec![crate::endpoints::report::PodAddresses {
            namespace: "prod".into(),
            name: "web-0".into(),
            addresses: vec!["10.0.0.2/8".parse().expect("net")],
        }];
        r
    }

    #[test]
    fn every_documented_metric_is_exported_and_every_exported_one_documented() {
        let m = Metrics::new();
        m.observe_cni("ADD", true, 0.004);
        m.gossip_bytes("topology", "sent", 100);
        let text = render(&m, &full_report());
        let docs = documented();
        assert!(docs.len() > 40, "the Metrics table of docs/status.md was not found: {docs:?}");
        for name in &docs {
            let sample = text.lines().any(|l| {
                l.strip_prefix(name.as_str())
                    .is_some_and(|rest| rest.starts_with(['{', ' ']) || rest.starts_with("_bucket"))
            });
            assert!(sample, "{name} is documented but not exported:\n{text}");
        }
        for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let mut parts = line.split(' ');
            let (family, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let name =
                if kind == "counter" { format!("{family}_total") } else { family.to_owned() };
            assert!(docs.contains(&name), "{name} is exported but not in docs/status.md");
        }
        // A sample scrape, for the record (cargo test -- --nocapture).
        eprintln!("{text}");
    }

    #[test]
    fn the_grafana_dashboard_queries_only_documented_metrics() {
        let dashboard = include_str!("../../../helm/weft/dashboards/weft.json");
        let json: serde_json::Value =
            serde_json::from_str(dashboard).expect("the dashboard is JSON");
        assert!(json["panels"].as_array().is_some_and(|p| p.len() > 10), "panels");
        let docs = documented();
        let mut used = 0;
        for expr in json["panels"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
            .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        {
            for at in expr.match_indices("weft_").map(|(i, _)| i) {
                let name: String = expr[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let base = name.strip_suffix("_bucket").unwrap_or(&name);
                assert!(
                    docs.iter().any(|d| d == base),
                    "{name} in the dashboard is not documented"
                );
                used += 1;
            }
        }
        assert!(used > 20, "the dashboard queries weft's metrics ({used})");
    }

    #[test]
    fn per_link_series_follow_the_links() {
        let m = Metrics::new();
        let mut r = full_report();
        let peer = r.overlay.links[0].peer.clone();
        let text = render(&m, &r);
        let sent = format!("weft_overlay_bytes_total{{peer=\"{peer}\"");
        let line = text.lines().find(|l| {
            l.starts_with(&sent)
                && l.contains("mode=\"sleeve\"")
                && l.contains("direction=\"sent\"")
        });
        assert!(line.is_some_and(|l| l.ends_with(" 4096")), "{text}");
        r.overlay.links.remove(0);
        assert!(!render(&m, &r).contains(&sent), "a link that went takes its series with it");
    }

    #[test]
    fn sleeve_counters_mirror_the_report() {
        let m = Metrics::new();
        let mut r = Report::default();
        r.overlay.sleeve.tx_bytes = 1000;
        let _ = render(&m, &r);
        r.overlay.sleeve.tx_bytes = 1500;
        let text = render(&m, &r);
        assert!(text.contains("weft_sleeve_bytes_total{kind=\"sent\"} 1500"), "{text}");
        assert!(text.contains("weft_overlay_links{state=\"fastdp\"} 0"), "{text}");
    }
}
