//! The host's kernel state for the overlay: the bridge, the endpoints' veth pairs with their
//! addresses and routes, and weft's nftables table. Callers describe the desired state with the
//! types below and the [`Dataplane`] trait makes the kernel match it; every operation is
//! idempotent ("ensure"), so the same calls serve first setup, retries and repair after restart.
//! The trait names only weft's own types; [`linux::LinuxDataplane`] implements it with netlink.

pub mod coexist;
#[cfg(test)]
pub mod fake;
pub mod fastdp;
pub mod linux;
pub mod module;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod sleeve;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use self::netns::NetnsError;

pub use self::netlink::on_blocking_thread;
pub use crate::addr::Mac;

/// The desired bridge.
/// Datagrams and their bytes exchanged with one peer, each way: sleeve's per-hop counters and
/// the kernel's per-peer fastdp counters alike.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

impl std::ops::Add for Traffic {
    type Output = Traffic;
    fn add(self, o: Traffic) -> Traffic {
        Traffic {
            tx_packets: self.tx_packets + o.tx_packets,
            tx_bytes: self.tx_bytes + o.tx_bytes,
            rx_packets: self.rx_packets + o.rx_packets,
            rx_bytes: self.rx_bytes + o.rx_bytes,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeSpec {
    pub name: String,
    pub mtu: u32,
    pub mac: Mac,
    /// The host's own addresses on the bridge (exposed subnets).
    pub addresses: Vec<IpNet>,
}

/// What the bridge looks like after `ensure_bridge`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeReport {
    pub index: u32,
    /// What had to be fixed ("created", "set up", "mtu 1500 -> 1450", ...); empty if nothing.
    pub repairs: Vec<String>,
}

/// A route inside an endpoint's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
}

/// The desired state of one endpoint: a veth pair between the bridge and a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// The endpoint's id, kept on the host-side veth as its alias (`ip link` shows it), so
    /// that a DEL without a record removes only an interface made for that id.
    pub owner: String,
    pub bridge: String,
    pub host_ifname: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub mtu: u32,
    pub mac: Option<Mac>,
    pub addresses: Vec<IpNet>,
    pub routes: Vec<RouteSpec>,
    pub hairpin: bool,
}

/// What `setup_endpoint` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointState {
    pub host_mac: Mac,
    pub container_mac: Mac,
}

/// Kernel failures, by what the caller can do about them. Each message says everything once:
/// variants that print an inner error do not also expose it as their `source`.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("network namespace: {0}")]
    Netns(NetnsError),
    #[error("interface {0} already exists in the namespace and is not weft's")]
    InterfaceExists(String),
    #[error("the bridge {0} does not exist")]
    NoBridge(String),
    #[error("{what}: {error}")]
    Netlink { what: String, error: netlink::NlError },
    #[error("nftables: {0}")]
    Nft(nft::NftError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// CHECK: the kernel state differs from the desired state.
    #[error("{0}")]
    Mismatch(String),
}

impl KernelError {
    /// Whether this error shows that an endpoint's namespace no longer exists (as opposed to
    /// a failure that says nothing about it, such as running out of file descriptors).
    pub fn netns_gone(&self) -> bool {
        matches!(self, KernelError::Netns(e) if e.means_gone())
    }
}

impl From<NetnsError> for KernelError {
    fn from(e: NetnsError) -> KernelError {
        KernelError::Netns(e)
    }
}

impl From<nft::NftError> for KernelError {
    fn from(e: nft::NftError) -> KernelError {
        KernelError::Nft(e)
    }
}

/// Adds context to netlink errors.
pub(crate) trait NlContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, KernelError>;
}

impl<T> NlContext<T> for Result<T, netlink::NlError> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, KernelError> {
        self.map_err(|error| KernelError::Netlink { what: what(), error })
    }
}

/// The kernel operations weft needs. Implementations block; async callers use
/// `spawn_blocking`.
pub trait Dataplane: Send + Sync + 'static {
    /// Creates or repairs the bridge (existence, MAC, MTU, up, addresses).
    fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<BridgeReport, KernelError>;
    /// Creates or repairs an endpoint. On error the caller tears it down.
    fn setup_endpoint(&self, spec: &EndpointSpec) -> Result<EndpointState, KernelError>;
    /// Creates an endpoint's veth pair with the inner end left in the agent's namespace as
    /// `peer` (with the spec's MAC and MTU, no addresses), for a runtime that moves it into the
    /// container itself (Docker's Join). Starts over if either end exists.
    fn handover_endpoint(
        &self,
        spec: &EndpointSpec,
        peer: &str,
    ) -> Result<EndpointState, KernelError>;
    /// Removes addresses from an endpoint's interface (detach of some addresses).
    fn remove_addresses(&self, spec: &EndpointSpec, addresses: &[IpNet])
    -> Result<(), KernelError>;
    /// Removes an endpoint's veth pair. Succeeds when it is already gone.
    fn teardown_endpoint(&self, host_ifname: &str) -> Result<(), KernelError>;
    /// Removes the veth pair `host_ifname` only if it was made for the endpoint `owner` (see
    /// [`EndpointSpec::owner`]); `Ok(false)` when it is gone or belongs to something else.
    fn teardown_endpoint_of(&self, host_ifname: &str, owner: &str) -> Result<bool, KernelError>;
    /// Verifies an endpoint against its spec; `Mismatch` says what differs.
    fn check_endpoint(&self, spec: &EndpointSpec) -> Result<(), KernelError>;
    /// Names of endpoint interfaces attached to `bridge` (for leak detection; other agents'
    /// endpoints on other bridges of the same host are not ours).
    fn endpoint_links(&self, bridge: &str) -> Result<Vec<String>, KernelError>;
    /// Installs or replaces weft's nftables table.
    fn apply_firewall(&self, table: &nft::Table) -> Result<(), KernelError>;
    /// Whether weft's nftables table is present with the expected number of rules.
    fn firewall_intact(&self, table: &nft::Table) -> Result<bool, KernelError>;
    /// Sets a sysctl in the agent's namespace (e.g. net/ipv4/ip_forward).
    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), KernelError>;
    /// Loads a kernel module (and its dependencies) unless it is loaded or built in.
    fn load_module(&self, name: &str) -> Result<(), KernelError>;

    /// Makes weft's accept rules head Docker's `DOCKER-USER` chain if it exists
    /// (iptables-nft), rewriting them when `rewrite` or when they are not intact; reports the
    /// legacy FORWARD policy (see [`coexist`]).
    fn sync_forward_accept(
        &self,
        want: &coexist::ForwardAccept,
        rewrite: bool,
    ) -> Result<coexist::Coexistence, KernelError>;
    /// Removes the rules [`Self::sync_forward_accept`] added for `bridge`; returns how many.
    fn remove_forward_accept(&self, bridge: &str) -> Result<usize, KernelError>;

    /// Removes weft's firewall table `name` if it exists (`weft reset`).
    fn remove_firewall(&self, name: &str) -> Result<(), KernelError>;
    /// MTU of the underlay: the default route's interface, else the smallest MTU among
    /// interfaces with a global address (never `exclude`, the bridge, or weft's veths).
    fn underlay_mtu(&self, exclude: &str) -> Result<Option<u32>, KernelError>;
    /// Fails unless `path` is a network namespace weft can enter and not the agent's own
    /// ([`KernelError::netns_gone`] tells whether the failure means the namespace is gone).
    fn check_netns(&self, path: &Path) -> Result<(), KernelError> {
        netns::check_foreign(path).map_err(KernelError::from)
    }
}

/// Bytes the kernel's VXLAN encapsulation adds over IPv4 (outer IP 20, UDP 8, VXLAN 8,
/// inner Ethernet 14).
pub const VXLAN_OVERHEAD: u32 = 50;

impl std::fmt::Debug for dyn Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dataplane")
    }
}

/// Host-side veth names: `PREFIX` + 12 hex digits of a hash of the endpoint id, so the name is
/// stable (found again after a restart) and fits IFNAMSIZ.
pub const HOST_IFNAME_PREFIX: &str = "vwf";

pub fn host_ifname_for(endpoint_id: &str) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's SipHash keys.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in endpoint_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{HOST_IFNAME_PREFIX}{:012x}", h & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifnames_are_stable_and_short() {
        let a = host_ifname_for("c1/eth0");
        assert_eq!(a, host_ifname_for("c1/eth0"));
        assert_ne!(a, host_ifname_for("c1/eth1"));
        assert_eq!(a.len(), 16 - 1, "IFNAMSIZ - 1");
    }
}
