//! Prometheus metrics: the registry, and the counters and histograms updated where things
//! happen. A leaf: gauges that describe state are set from the status report at scrape time
//! by `status::gauges`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
pub struct PodLabels {
    pub namespace: String,
    pub pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyDeniedLabels {
    pub direction: String,
    /// The policies isolating the pods, `namespace/name`, comma-separated.
    pub policies: String,
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
    pub ready: Gauge,
    pub ips: Family<StateLabel, Gauge>,
    pub ring_ready: Gauge,
    pub ring_mismatches: Gauge,
    pub endpoints: Family<StateLabel, Gauge>,
    pub gossip: Family<ChannelDirection, Counter>,
    pub connections: Family<ConnectionLabels, Gauge>,
    pub peers: Gauge,
    pub overlay_links: Family<StateLabel, Gauge>,
    pub sleeve_frames: Family<KindLabel, Counter>,
    pub sleeve_bytes: Family<KindLabel, Counter>,
    pub sleeve_datagrams: Family<KindLabel, Counter>,
    pub dns_entries: Gauge,
    pub dns_queries: Family<KindLabel, Counter>,
    pub mesh_refused_accepts: Family<KindLabel, Counter>,
    pub pod_addresses: Family<PodLabels, Gauge>,
    pub policy_denied: Family<PolicyDeniedLabels, Gauge>,
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
        let pod_addresses = Family::<PodLabels, Gauge>::default();
        registry.register(
            "pod_addresses",
            "Addresses held by each Kubernetes pod on this host",
            pod_addresses.clone(),
        );
        let policy_denied = Family::<PolicyDeniedLabels, Gauge>::default();
        registry.register(
            "policy_denied_packets",
            "Packets NetworkPolicy dropped on this host, by direction and the policies isolating \
             the pod; starts again from 0 when the policy table is written whole",
            policy_denied.clone(),
        );
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
        let mesh_refused_accepts = Family::<KindLabel, Counter>::default();
        registry.register(
            "mesh_refused_accepts",
            "Inbound mesh connections closed before their handshake, by kind (rate: the \
             source's rate exceeded, handshakes: too many handshakes in progress)",
            mesh_refused_accepts.clone(),
        );
        Metrics {
            registry,
            mesh_refused_accepts,
            dns_entries,
            dns_queries,
            cni_duration,
            cni_requests,
            ready,
            ips,
            ring_ready,
            ring_mismatches,
            endpoints,
            pod_addresses,
            policy_denied,
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

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
