//! The persisted description of an endpoint: enough to set it up again, check it, release it
//! and show it, after any restart.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::dataplane::{EndpointSpec, Mac, RouteSpec};

/// The id of the host's own bridge addresses (Weave's `weave:expose`).
pub const EXPOSE_ID: &str = "weft:expose";

/// How the endpoint came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A pod set up through CNI ADD.
    Cni,
    /// A namespace attached with `weft attach`.
    Attach,
    /// The host's own addresses on the bridge (`weft expose`).
    Expose,
    /// Addresses held without an interface (the `Reserve` API).
    Reservation,
    /// A container joined to a weft network by Docker's remote driver (docs/docker.md).
    /// Between Docker's IPAM request and its Join, and after its Leave, the record is a
    /// `Reservation` with the same id.
    Docker,
}

/// Kubernetes identity of a pod endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub destination: IpNet,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
}

/// One endpoint, as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub id: String,
    pub kind: Kind,
    /// Namespace path; `None` for the expose pseudo-endpoint.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    #[serde(default)]
    pub ifname: String,
    #[serde(default)]
    pub host_ifname: String,
    pub addresses: Vec<IpNet>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub mtu: u32,
    #[serde(default)]
    pub hairpin: bool,
    /// CNI network name (GC scope).
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub container_id: Option<String>,
    #[serde(default)]
    pub pod: Option<PodRef>,
    /// DNS name registered for the endpoint.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Further DNS names of the endpoint, registered and removed with it (a Docker
    /// container's `--hostname` and `--network-alias` values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    #[serde(default, with = "mac_opt")]
    pub mac: Option<Mac>,
    #[serde(default, with = "mac_opt")]
    pub host_mac: Option<Mac>,
    /// Unix time of creation; for `docker:` records, of the last Docker call that changed
    /// the record (RequestAddress, CreateEndpoint, Join, Leave), which the reconciliations
    /// measure their grace periods from.
    #[serde(default)]
    pub created: u64,
}

impl EndpointRecord {
    /// The kernel state this record asks for (endpoints with a namespace only).
    pub fn spec(&self, bridge: &str) -> Option<EndpointSpec> {
        Some(EndpointSpec {
            owner: self.id.clone(),
            bridge: bridge.to_owned(),
            host_ifname: self.host_ifname.clone(),
            netns: self.netns.clone()?,
            ifname: self.ifname.clone(),
            mtu: self.mtu,
            mac: self.mac,
            addresses: self.addresses.clone(),
            routes: self
                .routes
                .iter()
                .map(|r| RouteSpec { destination: r.destination, gateway: r.gateway })
                .collect(),
            hairpin: self.hairpin,
        })
    }
}

mod mac_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::dataplane::Mac;

    pub fn serialize<S: Serializer>(m: &Option<Mac>, s: S) -> Result<S::Ok, S::Error> {
        match m {
            Some(m) => s.serialize_some(&m.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Mac>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| s.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// One endpoint as other subsystems (DNS, the overlay, later policy and the map) see it: the
/// endpoint feed, published by the state owner after every change. Reservations (addresses
/// without an interface) are not endpoints and are not in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSummary {
    pub id: String,
    /// How it came to be: a CNI pod, an attached namespace, the host's own addresses.
    pub kind: Kind,
    pub netns: Option<PathBuf>,
    /// The DNS name given to the endpoint, as given.
    pub hostname: Option<String>,
    /// Further DNS names of the endpoint (Docker's `--hostname`, `--network-alias`).
    pub aliases: Vec<String>,
    pub addrs: Vec<IpAddr>,
    /// The MAC of its interface (for the host's own addresses: none, the bridge's is known).
    pub mac: Option<Mac>,
    /// The Kubernetes pod, when the runtime said which.
    pub pod: Option<PodRef>,
}

impl EndpointSummary {
    pub fn of(r: &EndpointRecord) -> EndpointSummary {
        EndpointSummary {
            id: r.id.clone(),
            kind: r.kind,
            netns: r.netns.clone(),
            hostname: r.hostname.clone(),
            aliases: r.aliases.clone(),
            addrs: r.addresses.iter().map(IpNet::addr).collect(),
            mac: if r.kind == Kind::Expose { None } else { r.mac },
            pod: r.pod.clone(),
        }
    }

    /// The host's own addresses on the bridge (`weft expose`).
    pub fn is_exposed(&self) -> bool {
        self.kind == Kind::Expose
    }
}

/// The endpoint feed: every endpoint, after every change.
pub type EndpointFeed = tokio::sync::watch::Receiver<std::sync::Arc<Vec<EndpointSummary>>>;

/// The id of an address Docker's IPAM asked for, and of the endpoint that later uses it:
/// Docker names addresses, not endpoints, in its IPAM calls (docs/docker.md).
pub fn docker_id(addr: IpAddr) -> String {
    format!("{DOCKER_PREFIX}{addr}")
}

/// The prefix of [`docker_id`].
pub const DOCKER_PREFIX: &str = "docker:";

/// The CNI attachment id: container id and interface name (the pair CNI identifies attachments by).
pub fn cni_id(container_id: &str, ifname: &str) -> String {
    format!("{container_id}/{ifname}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_tolerate_missing_fields() {
        let r = EndpointRecord {
            id: cni_id("c1", "eth0"),
            kind: Kind::Cni,
            netns: Some("/run/netns/x".into()),
            ifname: "eth0".into(),
            host_ifname: "vweft0".into(),
            addresses: vec!["10.32.0.2/12".parse().unwrap()],
            routes: vec![Route {
                destination: "0.0.0.0/0".parse().unwrap(),
                gateway: "10.32.0.1".parse().ok(),
            }],
            mtu: 1450,
            hairpin: true,
            network: Some("weft".into()),
            container_id: Some("c1".into()),
            pod: Some(PodRef {
                namespace: "default".into(),
                name: "web".into(),
                uid: String::new(),
            }),
            hostname: None,
            aliases: vec!["www".into()],
            mac: Some("0a:58:0a:20:00:02".parse().unwrap()),
            host_mac: None,
            created: 1,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<EndpointRecord>(&json).unwrap(), r);
        let minimal: EndpointRecord = serde_json::from_str(
            r#"{"id":"weft:expose","kind":"expose","addresses":["10.32.0.1/12"]}"#,
        )
        .unwrap();
        assert_eq!(minimal.kind, Kind::Expose);
        assert!(minimal.spec("weft").is_none());
    }
}
