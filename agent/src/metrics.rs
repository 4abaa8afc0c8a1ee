//! Prometheus metrics. Counters and histograms are updated where things happen; gauges that
//! describe state are refreshed from the status report when `/metrics` is scraped.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::status::report::Report;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabel {
    pub command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandResult {
    pub command: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelDirection {
    pub channel: String,
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub state: String,
    pub encryption: String,
}

/// All of the agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub cni_duration: Family<CommandLabel, Histogram>,
    pub cni_requests: Family<CommandResult, Counter>,
    ready: Gauge,
    ips: Family<StateLabel, Gauge>,
    ring_ready: Gauge,
    ring_mismatches: Gauge,
    endpoints: Family<StateLabel, Gauge>,
    gossip: Family<ChannelDirection, Counter>,
    connections: Family<ConnectionLabels, Gauge>,
    peers: Gauge,
    overlay_links: Family<StateLabel, Gauge>,
    sleeve_frames: Family<KindLabel, Counter>,
    sleeve_bytes: Family<KindLabel, Counter>,
    sleeve_datagrams: Family<KindLabel, Counter>,
    dns_entries: Gauge,
    dns_queries: Family<KindLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("weft");
        let cni_duration = Family::<CommandLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 14))
        });
        registry.register(
            "cni_request_duration_seconds",
            "Time the agent took to serve a CNI command",
            cni_duration.clone(),
        );
        let cni_requests = Family::<CommandResult, Counter>::default();
        registry.register("cni_requests", "CNI commands served, by result", cni_requests.clone());
        let ready = Gauge::default();
        registry.register("ready", "1 when the agent serves CNI ADD", ready.clone());
        let ips = Family::<StateLabel, Gauge>::default();
        registry.register(
            "ipam_addresses",
            "Addresses by state: used and free in this peer's space, owned by this peer, owned by unreachable peers",
            ips.clone(),
        );
        let ring_ready = Gauge::default();
        registry.register(
            "ipam_ring_ready",
            "1 when the IP allocation ring exists on this peer",
            ring_ready.clone(),
        );
        let ring_mismatches = Gauge::default();
        registry.register(
            "ipam_ring_mismatches",
            "Peers whose ring cannot be merged with ours (different seeds or range)",
            ring_mismatches.clone(),
        );
        let endpoints = Family::<StateLabel, Gauge>::default();
        registry.register("endpoints", "Endpoints on this host, by kind", endpoints.clone());
        let gossip = Family::<ChannelDirection, Counter>::default();
        registry.register(
            "gossip_bytes",
            "Mesh gossip bytes by channel and direction (sent, received)",
            gossip.clone(),
        );
        let connections = Family::<ConnectionLabels, Gauge>::default();
        registry.register(
            "connections",
            "Mesh connections by state (established, connecting, failed) and encryption (yes, no)",
            connections.clone(),
        );
        let peers = Gauge::default();
        registry.register("peers", "Peers in the mesh topology, this one included", peers.clone());
        let overlay_links = Family::<StateLabel, Gauge>::default();
        registry.register(
            "overlay_links",
            "Data-plane links to peers by overlay in use (fastdp, sleeve, relayed)",
            overlay_links.clone(),
        );
        // The sleeve counts in its own atomics (per packet, no locks); these mirror them at
        // scrape time.
        let sleeve_frames = Family::<KindLabel, Counter>::default();
        registry.register(
            "sleeve_frames",
            "Frames carried by sleeve, by kind (sent, received, frag_needed: oversize frames \
             answered with ICMP)",
            sleeve_frames.clone(),
        );
        let sleeve_bytes = Family::<KindLabel, Counter>::default();
        registry.register(
            "sleeve_bytes",
            "Frame bytes carried by sleeve, by kind (sent, received)",
            sleeve_bytes.clone(),
        );
        let sleeve_datagrams = Family::<KindLabel, Counter>::default();
        registry.register(
            "sleeve_datagrams",
            "Sleeve datagrams relayed for other peers or dropped, by kind (relayed, bad: \
             malformed, unauthentic or replayed, no_route)",
            sleeve_datagrams.clone(),
        );
        let dns_entries = Gauge::default();
        registry.register(
            "dns_entries",
            "Live weave.local entries of all peers held by this agent",
            dns_entries.clone(),
        );
        let dns_queries = Family::<KindLabel, Counter>::default();
        registry.register(
            "dns_queries",
            "DNS queries served, by outcome (answered, nxdomain, forwarded, failed)",
            dns_queries.clone(),
        );
        Metrics {
            registry,
            dns_entries,
            dns_queries,
            cni_duration,
            cni_requests,
            ready,
            ips,
            ring_ready,
            ring_mismatches,
            endpoints,
            gossip,
            connections,
            peers,
            overlay_links,
            sleeve_frames,
            sleeve_bytes,
            sleeve_datagrams,
        }
    }

    /// Counts mesh bytes of a gossip channel.
    pub fn gossip_bytes(&self, channel: &str, direction: &str, bytes: u64) {
        self.gossip
            .get_or_create(&ChannelDirection {
                channel: channel.to_owned(),
                direction: direction.to_owned(),
            })
            .inc_by(bytes);
    }

    /// Records one CNI command.
    pub fn observe_cni(&self, command: &str, ok: bool, seconds: f64) {
        self.cni_duration
            .get_or_create(&CommandLabel { command: command.to_owned() })
            .observe(seconds);
        let result = if ok { "ok" } else { "error" }.to_owned();
        self.cni_requests
            .get_or_create(&CommandResult { command: command.to_owned(), result })
            .inc();
    }

    /// The text exposition, with state gauges taken from `report`.
    pub fn render(&self, report: &Report) -> String {
        let set = |f: &Family<StateLabel, Gauge>, state: &str, v: u64| {
            f.get_or_create(&StateLabel { state: state.to_owned() })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        self.ready.set(i64::from(report.ready));
        set(&self.ips, "used", report.ipam.used);
        set(&self.ips, "free", report.ipam.free);
        let ring = &report.ipam.ring;
        let owned = ring.peers.iter().find(|p| p.peer == report.peer.name).map_or(0, |p| p.owned);
        set(&self.ips, "owned", owned);
        set(&self.ips, "unreachable", ring.unreachable);
        self.ring_ready.set(i64::from(ring.state == "ready"));
        self.ring_mismatches.set(i64::try_from(ring.mismatches.len()).unwrap_or(i64::MAX));
        set(&self.endpoints, "cni", u64::from(report.endpoints.cni));
        set(&self.endpoints, "attached", u64::from(report.endpoints.attached));
        self.connections.clear();
        for state in ["established", "connecting", "failed"] {
            for (encryption, enc) in [("yes", true), ("no", false)] {
                let n = report
                    .mesh
                    .connections
                    .iter()
                    .filter(|c| c.state == state && c.encrypted == enc)
                    .count();
                self.connections
                    .get_or_create(&ConnectionLabels {
                        state: state.to_owned(),
                        encryption: encryption.to_owned(),
                    })
                    .set(n as i64);
            }
        }
        self.peers.set(report.mesh.peers.len() as i64);
        for mode in ["fastdp", "sleeve", "relayed"] {
            let n = report.overlay.links.iter().filter(|l| l.mode == mode).count();
            set(&self.overlay_links, mode, n as u64);
        }
        let s = &report.overlay.sleeve;
        let mirror = |f: &Family<KindLabel, Counter>, kind: &str, total: u64| {
            let c = f.get_or_create(&KindLabel { kind: kind.to_owned() });
            c.inc_by(total.saturating_sub(c.get()));
        };
        mirror(&self.sleeve_frames, "sent", s.tx_frames);
        mirror(&self.sleeve_frames, "received", s.rx_frames);
        mirror(&self.sleeve_frames, "frag_needed", s.frag_needed);
        mirror(&self.sleeve_bytes, "sent", s.tx_bytes);
        mirror(&self.sleeve_bytes, "received", s.rx_bytes);
        mirror(&self.sleeve_datagrams, "relayed", s.relayed);
        mirror(&self.sleeve_datagrams, "bad", s.dropped_bad);
        mirror(&self.sleeve_datagrams, "no_route", s.dropped_no_route);
        if let Some(d) = &report.dns {
            self.dns_entries.set(i64::try_from(d.entries.len()).unwrap_or(i64::MAX));
            let q = &d.queries;
            mirror(&self.dns_queries, "answered", q.answered);
            mirror(&self.dns_queries, "nxdomain", q.nxdomain);
            mirror(&self.dns_queries, "forwarded", q.forwarded);
            mirror(&self.dns_queries, "failed", q.failed);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_names_with_the_weft_prefix() {
        let m = Metrics::new();
        m.observe_cni("ADD", true, 0.003);
        let text = m.render(&Report::default());
        assert!(text.contains("weft_cni_request_duration_seconds_bucket{le="), "{text}");
        assert!(
            text.contains("weft_cni_requests_total{command=\"ADD\",result=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("weft_ipam_addresses{state=\"used\"} 0"), "{text}");
    }

    #[test]
    fn sleeve_counters_mirror_the_report() {
        let m = Metrics::new();
        let mut r = Report::default();
        r.overlay.sleeve.tx_bytes = 1000;
        let _ = m.render(&r);
        r.overlay.sleeve.tx_bytes = 1500;
        let text = m.render(&r);
        assert!(text.contains("weft_sleeve_bytes_total{kind=\"sent\"} 1500"), "{text}");
        assert!(text.contains("weft_overlay_links{state=\"fastdp\"} 0"), "{text}");
    }
}
