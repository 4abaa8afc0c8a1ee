//! The state gauges of `/metrics`, set from the status report when it is scraped, and the
//! counters the sleeve keeps in its own atomics mirrored into the registry.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use super::report::Report;
use crate::ipam::RingState;
use crate::mesh::report::ConnState;
use crate::metrics::{
    ConnectionLabels, KindLabel, Metrics, PodLabels, PolicyDeniedLabels, StateLabel,
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

/// The text exposition, with the state gauges taken from `report`.
pub fn render(m: &Metrics, report: &Report) -> String {
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
