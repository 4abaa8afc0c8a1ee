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
pub struct VersionLabel {
    pub version: String,
}

/// A peer, by name and nickname.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
    pub nickname: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerStateLabels {
    pub peer: String,
    pub nickname: String,
    pub state: String,
}

/// A data-plane link: the overlay in use, and whether traffic on it is encrypted.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    pub peer: String,
    pub nickname: String,
    pub mode: String,
    pub encrypted: String,
}

/// Traffic of one overlay on the link to a peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub peer: String,
    pub nickname: String,
    pub mode: String,
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
    /// The gauges below are set from the status report at each scrape (`status::gauges`).
    pub state: StateMetrics,
    /// One scrape sets the state gauges at a time (they are cleared and set again).
    pub scrape: std::sync::Mutex<()>,
}

/// The figures of the status report that the metrics above do not already carry: every number
/// `weft status` and the map page show is also a metric.
#[derive(Debug, Default)]
pub struct StateMetrics {
    pub build_info: Family<VersionLabel, Gauge>,
    pub bridge_mtu: Gauge,
    pub overlay_mtu: Gauge,
    pub remote_endpoints: Gauge,
    pub ipam_peer_addresses: Family<PeerStateLabels, Gauge>,
    pub ipam_peer_reachable: Family<PeerLabels, Gauge>,
    pub ipam_pending: Family<KindLabel, Gauge>,
    pub ipam_conflicts: Gauge,
    pub mesh_targets: Family<KindLabel, Gauge>,
    pub mesh_topology_connections: Gauge,
    pub mesh_handshakes: Gauge,
    pub mesh_accept_sources: Gauge,
    pub mesh_conn_limit: Gauge,
    pub link_info: Family<LinkLabels, Gauge>,
    pub link_degraded: Family<PeerLabels, Gauge>,
    pub link_path_mtu: Family<PeerLabels, Gauge>,
    pub overlay_bytes: Family<TrafficLabels, Counter>,
    pub overlay_packets: Family<TrafficLabels, Counter>,
    pub relayed_peers: Gauge,
    pub remote_macs: Gauge,
    pub fdb_refused: Gauge,
    pub dns_names: Gauge,
    pub dns_tombstones: Gauge,
    pub dns_ttl: Gauge,
    pub dns_listening: Gauge,
    pub policy_installs: Counter,
    pub policy_compile: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub policy_write: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub policy_pods: Family<StateLabel, Gauge>,
    pub policy_unlisted: Gauge,
    pub policy_kernel_error: Gauge,
    pub policy_denied_bytes: Family<PolicyDeniedLabels, Gauge>,
}

impl StateMetrics {
    fn register(&self, r: &mut Registry) {
        r.register("build_info", "1, labelled with the agent's version", self.build_info.clone());
        r.register("bridge_mtu_bytes", "MTU of the weft bridge", self.bridge_mtu.clone());
        r.register(
            "overlay_mtu_bytes",
            "MTU the overlay gives endpoints",
            self.overlay_mtu.clone(),
        );
        r.register(
            "remote_endpoints",
            "Endpoints of other peers known here (MACs with addresses, from gossip)",
            self.remote_endpoints.clone(),
        );
        r.register(
            "ipam_peer_addresses",
            "Addresses of the range each peer owns (state=owned) and last reported free \
             (state=free)",
            self.ipam_peer_addresses.clone(),
        );
        r.register(
            "ipam_peer_reachable",
            "1 when the owner of ring space is reachable from this peer",
            self.ipam_peer_reachable.clone(),
        );
        r.register(
            "ipam_pending_requests",
            "Open requests to other peers, by kind (space: for space in a subnet, claims: for \
             a static address they own)",
            self.ipam_pending.clone(),
        );
        r.register(
            "ipam_ring_conflicts",
            "Ranges a peer's ring gave away while addresses were in use here (kept)",
            self.ipam_conflicts.clone(),
        );
        r.register(
            "mesh_targets",
            "Addresses the mesh keeps connecting to, by kind (direct, discovered)",
            self.mesh_targets.clone(),
        );
        r.register(
            "mesh_topology_connections",
            "Established connections every peer of the topology reports, counted once per end",
            self.mesh_topology_connections.clone(),
        );
        r.register(
            "mesh_handshakes_in_progress",
            "Inbound mesh handshakes in progress",
            self.mesh_handshakes.clone(),
        );
        r.register(
            "mesh_accept_sources",
            "Source addresses the inbound rate limit tracks",
            self.mesh_accept_sources.clone(),
        );
        r.register(
            "mesh_connection_limit",
            "Connections this peer accepts and makes at most (--conn-limit)",
            self.mesh_conn_limit.clone(),
        );
        r.register(
            "overlay_link_info",
            "1 per data-plane link, labelled with the overlay in use (fastdp, sleeve, relayed) \
             and whether its traffic is encrypted",
            self.link_info.clone(),
        );
        r.register(
            "overlay_link_degraded",
            "1 when the link to the peer is not at its best (the reason is in /status)",
            self.link_degraded.clone(),
        );
        r.register(
            "overlay_path_mtu_bytes",
            "Largest underlay packet sleeve's probes got through to the peer (0: none yet)",
            self.link_path_mtu.clone(),
        );
        r.register(
            "overlay_bytes",
            "Bytes the overlay exchanged with each directly linked peer, by mode and direction \
             (fastdp: VXLAN datagrams with their outer headers; sleeve: datagram payloads, \
             relayed ones included); from 0 with each new connection",
            self.overlay_bytes.clone(),
        );
        r.register(
            "overlay_packets",
            "Datagrams (VXLAN for fastdp, sleeve's for sleeve) the overlay exchanged with each \
             directly linked peer, by mode and direction; from 0 with each new connection",
            self.overlay_packets.clone(),
        );
        r.register(
            "overlay_relayed_peers",
            "Peers reached only through others",
            self.relayed_peers.clone(),
        );
        r.register(
            "overlay_remote_macs",
            "MAC addresses of other peers' endpoints the overlay forwards to",
            self.remote_macs.clone(),
        );
        r.register(
            "overlay_fdb_refused_entries",
            "Forwarding entries the kernel refused at the last sync (retried every second)",
            self.fdb_refused.clone(),
        );
        r.register("dns_names", "Distinct weave.local names", self.dns_names.clone());
        r.register(
            "dns_tombstones",
            "Deleted weave.local entries still remembered (30 min)",
            self.dns_tombstones.clone(),
        );
        r.register("dns_ttl_seconds", "TTL of weave.local answers", self.dns_ttl.clone());
        r.register(
            "dns_listen_addresses",
            "Addresses the DNS server answers on now (0: not listening, see /status)",
            self.dns_listening.clone(),
        );
        r.register(
            "policy_installs",
            "NetworkPolicy programs the kernel took since the agent started",
            self.policy_installs.clone(),
        );
        r.register(
            "policy_compile_seconds",
            "Time the last NetworkPolicy program took to compile",
            self.policy_compile.clone(),
        );
        r.register(
            "policy_write_seconds",
            "Time the last NetworkPolicy program took to write into the kernel",
            self.policy_write.clone(),
        );
        r.register(
            "policy_pods",
            "This node's pods in the installed program, by state (isolated, not_isolated)",
            self.policy_pods.clone(),
        );
        r.register(
            "policy_unlisted_kinds",
            "Kinds (namespaces, pods, networkpolicies) not yet listed from the API; nothing is \
             enforced before all are",
            self.policy_unlisted.clone(),
        );
        r.register(
            "policy_kernel_refused",
            "1 while the kernel refuses the NetworkPolicy program (the reason is in /status)",
            self.policy_kernel_error.clone(),
        );
        r.register(
            "policy_denied_bytes",
            "Bytes NetworkPolicy dropped on this host, as weft_policy_denied_packets",
            self.policy_denied_bytes.clone(),
        );
    }
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
        // Every CNI command's series exist from the start, at 0, so that rates and quantiles
        // are defined before the first pod.
        for command in ["ADD", "DEL", "CHECK", "GC", "STATUS"] {
            let _ = cni_duration.get_or_create(&CommandLabel { command: command.into() });
            for result in ["ok", "error"] {
                let labels = CommandResult { command: command.into(), result: result.into() };
                let _ = cni_requests.get_or_create(&labels);
            }
        }
        let state = StateMetrics::default();
        state.register(&mut registry);
        Metrics {
            registry,
            state,
            scrape: std::sync::Mutex::new(()),
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
