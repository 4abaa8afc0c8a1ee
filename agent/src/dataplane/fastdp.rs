//! fastdp: the kernel's VXLAN device on the bridge, and the forwarding entries that tell it
//! and the bridge where each remote MAC lives. Entries are programmed declaratively: the
//! caller states the full desired set and `sync` reads what the kernel has ([`read_state`]),
//! computes the changes with the pure [`diff`] (adding what is missing and, when allowed,
//! removing what is no longer wanted, leaving entries it does not own alone) and applies them
//! ([`apply`]). The agent is never in the per-packet path: it only programs tables. Also the raw
//! socket that sends and receives the heartbeats that probe each peer's VXLAN path.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use netlink_packet_route::AddressFamily;
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVxlan, LinkAttribute,
    LinkInfo as NlLinkInfo, LinkMessage, VxlanDf,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteProtocol;

use super::netlink::{LinkInfo, Rtnl, block_on};
use super::{KernelError, Mac, NlContext};

/// Ethertype of heartbeat frames (IEEE 802 local experimental ethertype 1).
pub const HEARTBEAT_ETHERTYPE: u16 = 0x88b5;

/// The desired VXLAN device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub mtu: u32,
    pub bridge: String,
    /// Whether the bridge may flood broadcast, multicast and unknown unicast out of the VXLAN
    /// port. Off with a password: such a frame may be for a peer that must only get it
    /// encrypted, so floods go through sleeve, which encrypts them.
    pub flood: bool,
}

/// Where the bridge sends a remote MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Port {
    Vxlan,
    Tap,
}

/// The desired forwarding state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FdbSpec {
    pub bridge: String,
    pub vxlan: String,
    pub tap: String,
    /// VXLAN entries: MAC -> remote VTEPs (the all-zeros MAC is the flood list).
    pub vxlan_entries: BTreeSet<(Mac, IpAddr)>,
    /// Static bridge entries for remote MACs.
    pub bridge_entries: BTreeMap<Mac, Port>,
    /// Neighbour entries on the bridge device for remote endpoints: with `neigh_suppress` on
    /// the overlay ports the bridge answers ARP/ND for them locally; requests for addresses
    /// not listed still flood across hosts.
    pub arp: BTreeMap<IpAddr, Mac>,
    /// Remove entries that are not wanted (off right after start, while peers reconnect).
    pub prune: bool,
}

/// What `sync` changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FdbChanges {
    pub added: usize,
    pub removed: usize,
    /// Entries the kernel refused. Each entry is tried on its own, so one refusal (say, a MAC
    /// the bridge will not take) does not keep the others out.
    pub failed: usize,
    /// What the kernel said about the first refused entry.
    pub first_error: Option<String>,
}

/// The forwarding entries weft owns, as the kernel has them now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FdbState {
    /// Entries of the VXLAN device: MAC -> remote VTEP.
    pub vxlan: BTreeSet<(Mac, IpAddr)>,
    /// Static bridge entries on the two overlay ports: MAC -> port index.
    pub bridge: BTreeMap<Mac, u32>,
    /// weft's neighbour entries on the bridge device.
    pub arp: BTreeMap<IpAddr, Mac>,
}

/// Interface indexes of the devices the entries live on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortIndexes {
    pub vxlan: u32,
    pub tap: Option<u32>,
    pub bridge: Option<u32>,
}

/// One change to the forwarding entries; each names the interface it applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdbOp {
    /// A VXLAN entry; `append` adds one more destination for the MAC (the flood list) instead
    /// of replacing the existing one.
    AddVxlan {
        dev: u32,
        mac: Mac,
        dst: IpAddr,
        append: bool,
    },
    DelVxlan {
        dev: u32,
        mac: Mac,
        dst: IpAddr,
    },
    /// A static bridge entry on `port` (replacing one on the other port: the entry moves).
    SetBridge {
        port: u32,
        mac: Mac,
    },
    DelBridge {
        port: u32,
        mac: Mac,
    },
    /// A neighbour entry on the bridge device.
    SetArp {
        bridge: u32,
        ip: IpAddr,
        mac: Mac,
    },
    DelArp {
        bridge: u32,
        ip: IpAddr,
        mac: Mac,
    },
}

impl FdbOp {
    fn is_removal(&self) -> bool {
        matches!(self, FdbOp::DelVxlan { .. } | FdbOp::DelBridge { .. } | FdbOp::DelArp { .. })
    }
}

async fn link_index(sock: &Rtnl, name: &str) -> Result<Option<u32>, KernelError> {
    Ok(sock.link_by_name(name).await.ctx(|| format!("looking up {name}"))?.map(|l| l.header.index))
}

/// Bridge port settings of an overlay port: isolated (frames from one overlay port never go
/// out another, so nothing loops between peers), no MAC learning (the agent programs it),
/// neighbour suppression (ARP/ND for addresses the bridge knows is answered on this host), and
/// whether broadcast, multicast and unknown unicast are flooded out of it.
async fn set_overlay_port(sock: &Rtnl, index: u32, flood: bool) -> Result<(), KernelError> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        NlLinkInfo::PortKind(InfoPortKind::Bridge),
        NlLinkInfo::PortData(InfoPortData::BridgePort(vec![
            InfoBridgePort::Isolated(true),
            InfoBridgePort::Learning(false),
            InfoBridgePort::NeighSupress(true),
            InfoBridgePort::UnicastFlood(flood),
            InfoBridgePort::MulticastFlood(flood),
            InfoBridgePort::BroadcastFlood(flood),
        ])),
    ]));
    sock.modify_link(msg).await.ctx(|| "setting overlay port flags".into())
}

/// Attaches an existing interface (the sleeve TAP) to the bridge as an overlay port, up, with
/// the given MTU, receiving every flood.
pub fn attach_port(name: &str, bridge: &str, mtu: u32) -> Result<(), KernelError> {
    let (name, bridge) = (name.to_owned(), bridge.to_owned());
    block_on(async move {
        let sock = Rtnl::host()?;
        let bridge = link_index(&sock, &bridge).await?.ok_or(KernelError::NoBridge(bridge))?;
        let link = sock
            .link_by_name(&name)
            .await
            .ctx(|| format!("looking up {name}"))?
            .ok_or_else(|| KernelError::Mismatch(format!("{name} does not exist")))?;
        let info = LinkInfo::from_message(&link);
        if info.mtu != mtu || !info.up || info.controller != Some(bridge) {
            sock.set_up(info.index, Some(mtu), Some(bridge))
                .await
                .ctx(|| format!("attaching {name}"))?;
        }
        set_overlay_port(&sock, info.index, true).await
    })
}

fn vxlan_matches(link: &LinkMessage, spec: &VxlanSpec) -> bool {
    let mut id = None;
    let mut port = None;
    let (mut learning, mut proxy) = (true, true);
    for a in &link.attributes {
        if let LinkAttribute::LinkInfo(infos) = a {
            for i in infos {
                if let NlLinkInfo::Data(InfoData::Vxlan(v)) = i {
                    for x in v {
                        match x {
                            InfoVxlan::Id(v) => id = Some(*v),
                            InfoVxlan::Port(p) => port = Some(*p),
                            InfoVxlan::Learning(l) => learning = *l,
                            InfoVxlan::Proxy(p) => proxy = *p,
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    id == Some(spec.vni) && port == Some(spec.port) && !learning && !proxy
}

/// Deletes the VXLAN device `name` if there is one (a run with fastdp left it: with its port
/// and forwarding entries on the bridge, frames would keep going out through it); whether
/// there was. A link of that name of another kind is left alone.
pub fn remove_vxlan(name: &str) -> Result<bool, KernelError> {
    let name = name.to_owned();
    block_on(async move {
        let sock = Rtnl::host()?;
        let link = sock.link_by_name(&name).await.ctx(|| format!("looking up {name}"))?;
        let Some(link) = link.filter(is_vxlan) else { return Ok(false) };
        sock.del_link(link.header.index).await.ctx(|| format!("deleting {name}"))?;
        Ok(true)
    })
}

fn is_vxlan(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => {
            infos.iter().any(|i| matches!(i, NlLinkInfo::Kind(InfoKind::Vxlan)))
        }
        _ => false,
    })
}

/// Creates or repairs the VXLAN device; returns its index and what was repaired.
pub fn ensure_vxlan(spec: &VxlanSpec) -> Result<(u32, Vec<String>), KernelError> {
    let spec = spec.clone();
    block_on(async move { ensure_vxlan_on(&Rtnl::host()?, &spec).await })
}

async fn ensure_vxlan_on(sock: &Rtnl, spec: &VxlanSpec) -> Result<(u32, Vec<String>), KernelError> {
    let mut repairs = Vec::new();
    let bridge = link_index(sock, &spec.bridge)
        .await?
        .ok_or_else(|| KernelError::NoBridge(spec.bridge.clone()))?;
    let existing =
        sock.link_by_name(&spec.name).await.ctx(|| "looking up the VXLAN device".into())?;
    if let Some(l) = &existing {
        if !vxlan_matches(l, spec) {
            sock.del_link(l.header.index).await.ctx(|| "replacing the VXLAN device".into())?;
            repairs.push("recreated with new settings".to_owned());
        }
    }
    if existing.as_ref().is_none_or(|l| !vxlan_matches(l, spec)) {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(spec.name.clone()));
        msg.attributes.push(LinkAttribute::Mtu(spec.mtu));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            NlLinkInfo::Kind(InfoKind::Vxlan),
            NlLinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::Id(spec.vni),
                InfoVxlan::Port(spec.port),
                InfoVxlan::Learning(false),
                // ARP crosses hosts like any broadcast: a proxy answering from programmed
                // entries would drop requests for addresses it does not know (the host's
                // exposed addresses, manually configured ones), breaking the flat L2.
                InfoVxlan::Proxy(false),
                // Outer packets may be fragmented: a too-small path degrades, it does not
                // black-hole (heartbeats detect it and move the peer to sleeve).
                InfoVxlan::Df(VxlanDf::Unset),
                InfoVxlan::Ttl(64),
                // No outer UDP checksum (the inner frame has its own), as `ip link` defaults
                // to for IPv4: computing it costs a pass over every byte.
                InfoVxlan::UDPCsum(false),
            ])),
        ]));
        match sock.add_link(msg).await {
            Err(e) if e.is(libc::EEXIST) => {}
            other => other.ctx(|| format!("creating VXLAN device {}", spec.name))?,
        }
        repairs.push("created".to_owned());
    }
    let link = sock
        .link_by_name(&spec.name)
        .await
        .ctx(|| "looking up the VXLAN device".into())?
        .ok_or_else(|| KernelError::Mismatch(format!("{} vanished", spec.name)))?;
    let info = LinkInfo::from_message(&link);
    if info.mtu != spec.mtu || !info.up || info.controller != Some(bridge) {
        sock.set_up(info.index, Some(spec.mtu), Some(bridge))
            .await
            .ctx(|| "attaching the VXLAN device".into())?;
        if !repairs.iter().any(|r| r == "created") {
            repairs.push("re-attached".to_owned());
        }
    }
    set_overlay_port(sock, info.index, spec.flood).await?;
    Ok((info.index, repairs))
}

fn mac_of(n: &NeighbourMessage) -> Option<Mac> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) if b.len() == 6 => {
            let mut m = [0u8; 6];
            m.copy_from_slice(b);
            Some(Mac(m))
        }
        _ => None,
    })
}

/// The destination of a neighbour or FDB entry. netlink-packet-route decodes the address by
/// the message's family, so an AF_BRIDGE (FDB) entry's destination arrives as raw bytes.
fn dst_of(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    })
}

fn vxlan_entry(index: u32, mac: Mac, dst: IpAddr) -> NeighbourMessage {
    let mut n = NeighbourMessage::default();
    n.header.family = AddressFamily::Bridge;
    n.header.ifindex = index;
    n.header.state = NeighbourState::Permanent;
    n.header.flags = NeighbourFlags::Own;
    n.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    n.attributes.push(NeighbourAttribute::Destination(match dst {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }));
    n
}

fn bridge_entry(port: u32, mac: Mac) -> NeighbourMessage {
    let mut n = NeighbourMessage::default();
    n.header.family = AddressFamily::Bridge;
    n.header.ifindex = port;
    n.header.state = NeighbourState::Noarp;
    n.header.flags = NeighbourFlags::Controller;
    n.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    n
}

/// Marks the neighbour entries weft owns on the bridge device, so pruning leaves others alone.
const NEIGH_PROTOCOL: RouteProtocol = RouteProtocol::Other(0x77);

fn arp_entry(bridge: u32, ip: IpAddr, mac: Mac) -> NeighbourMessage {
    let mut n = NeighbourMessage::default();
    n.header.family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    n.header.ifindex = bridge;
    n.header.state = NeighbourState::Permanent;
    n.attributes.push(NeighbourAttribute::Destination(match ip {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    }));
    n.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    n.attributes.push(NeighbourAttribute::Protocol(NEIGH_PROTOCOL));
    n
}

/// Picks weft's entries out of the kernel's forwarding entries (`fdb`, family AF_BRIDGE) and
/// neighbour entries (`neigh`, IPv4 and IPv6): VXLAN entries with a destination, static bridge
/// entries on the two overlay ports, and neighbour entries on the bridge marked with weft's
/// protocol. Entries of other kinds (the bridge's own permanent ones, learned ones, other
/// programs' neighbours) are not ours.
pub fn classify(
    fdb: &[NeighbourMessage],
    neigh: &[NeighbourMessage],
    ports: &PortIndexes,
) -> FdbState {
    let mut state = FdbState::default();
    for n in fdb {
        let Some(mac) = mac_of(n) else { continue };
        let master = n.header.flags.contains(NeighbourFlags::Controller);
        if n.header.ifindex == ports.vxlan && !master {
            if let Some(dst) = dst_of(n) {
                state.vxlan.insert((mac, dst));
            }
        } else if master
            && n.header.state == NeighbourState::Noarp
            && (n.header.ifindex == ports.vxlan || Some(n.header.ifindex) == ports.tap)
        {
            state.bridge.insert(mac, n.header.ifindex);
        }
    }
    if let Some(bridge) = ports.bridge {
        for n in neigh {
            let ours = n.attributes.contains(&NeighbourAttribute::Protocol(NEIGH_PROTOCOL));
            if n.header.ifindex == bridge && ours {
                if let (Some(ip), Some(mac)) = (dst_of(n), mac_of(n)) {
                    state.arp.insert(ip, mac);
                }
            }
        }
    }
    state
}

/// Reads weft's forwarding entries from the kernel.
pub async fn read_state(sock: &Rtnl, ports: &PortIndexes) -> Result<FdbState, KernelError> {
    let fdb =
        sock.neighbours(AddressFamily::Bridge).await.ctx(|| "listing forwarding entries".into())?;
    let mut neigh = Vec::new();
    if ports.bridge.is_some() {
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            neigh.extend(sock.neighbours(family).await.ctx(|| "listing neighbours".into())?);
        }
    }
    Ok(classify(&fdb, &neigh, ports))
}

/// The changes that make `have` match `want`: additions first, then (only when `want.prune`)
/// removals. I/O-free.
pub fn diff(have: &FdbState, want: &FdbSpec, ports: &PortIndexes) -> Vec<FdbOp> {
    let mut ops = Vec::new();
    for &(mac, dst) in want.vxlan_entries.difference(&have.vxlan) {
        // The flood list holds several destinations for one MAC: append, do not replace.
        let append = mac == Mac([0; 6]);
        ops.push(FdbOp::AddVxlan { dev: ports.vxlan, mac, dst, append });
    }
    for (&mac, port) in &want.bridge_entries {
        let index = match port {
            Port::Vxlan => Some(ports.vxlan),
            Port::Tap => ports.tap,
        };
        let Some(port) = index else { continue };
        if have.bridge.get(&mac) != Some(&port) {
            ops.push(FdbOp::SetBridge { port, mac });
        }
    }
    if let Some(bridge) = ports.bridge {
        for (&ip, &mac) in &want.arp {
            if have.arp.get(&ip) != Some(&mac) {
                ops.push(FdbOp::SetArp { bridge, ip, mac });
            }
        }
    }
    if want.prune {
        for &(mac, dst) in have.vxlan.difference(&want.vxlan_entries) {
            ops.push(FdbOp::DelVxlan { dev: ports.vxlan, mac, dst });
        }
        for (&mac, &port) in &have.bridge {
            if !want.bridge_entries.contains_key(&mac) {
                ops.push(FdbOp::DelBridge { port, mac });
            }
        }
        if let Some(bridge) = ports.bridge {
            for (&ip, &mac) in &have.arp {
                if !want.arp.contains_key(&ip) {
                    ops.push(FdbOp::DelArp { bridge, ip, mac });
                }
            }
        }
    }
    ops
}

/// Carries out `ops` in order, each on its own: a refused entry is counted and the rest still
/// go in.
pub async fn apply(sock: &Rtnl, ops: &[FdbOp]) -> FdbChanges {
    let mut changes = FdbChanges::default();
    for op in ops {
        match apply_one(sock, op).await {
            Ok(()) if op.is_removal() => changes.removed += 1,
            Ok(()) => changes.added += 1,
            Err(e) => {
                changes.failed += 1;
                changes.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    changes
}

async fn apply_one(sock: &Rtnl, op: &FdbOp) -> Result<(), KernelError> {
    match *op {
        FdbOp::AddVxlan { dev, mac, dst, append } => sock
            .set_neighbour(vxlan_entry(dev, mac, dst), append)
            .await
            .ctx(|| format!("adding VXLAN entry {mac} -> {dst}")),
        FdbOp::DelVxlan { dev, mac, dst } => sock
            .del_neighbour(vxlan_entry(dev, mac, dst))
            .await
            .ctx(|| format!("removing VXLAN entry {mac} -> {dst}")),
        FdbOp::SetBridge { port, mac } => sock
            .set_neighbour(bridge_entry(port, mac), false)
            .await
            .ctx(|| format!("adding bridge entry {mac}")),
        FdbOp::DelBridge { port, mac } => sock
            .del_neighbour(bridge_entry(port, mac))
            .await
            .ctx(|| format!("removing bridge entry {mac}")),
        FdbOp::SetArp { bridge, ip, mac } => sock
            .set_neighbour(arp_entry(bridge, ip, mac), false)
            .await
            .ctx(|| format!("adding neighbour {ip}")),
        FdbOp::DelArp { bridge, ip, mac } => sock
            .del_neighbour(arp_entry(bridge, ip, mac))
            .await
            .ctx(|| format!("removing neighbour {ip}")),
    }
}

/// Interface indexes for `spec`; `None` when the VXLAN device does not exist.
async fn port_indexes(sock: &Rtnl, spec: &FdbSpec) -> Result<Option<PortIndexes>, KernelError> {
    let Some(vxlan) = link_index(sock, &spec.vxlan).await? else { return Ok(None) };
    let tap = link_index(sock, &spec.tap).await?;
    let bridge = link_index(sock, &spec.bridge).await?;
    Ok(Some(PortIndexes { vxlan, tap, bridge }))
}

/// Makes the forwarding entries match `spec`: [`read_state`], [`diff`], [`apply`].
pub fn sync(spec: &FdbSpec) -> Result<FdbChanges, KernelError> {
    let spec = spec.clone();
    block_on(async move {
        let sock = Rtnl::host()?;
        let Some(ports) = port_indexes(&sock, &spec).await? else {
            return Ok(FdbChanges::default());
        };
        let have = read_state(&sock, &ports).await?;
        Ok(apply(&sock, &diff(&have, &spec, &ports)).await)
    })
}

/// Raw packet sockets for heartbeats: one that sends frames out of the VXLAN device, one that
/// receives heartbeat frames delivered to the bridge. Neither taps other traffic: the receiving
/// socket is bound to the heartbeat ethertype only, so data packets never reach the agent or
/// cost the kernel a copy.
#[derive(Debug)]
pub struct FrameSocket {
    fd: OwnedFd,
}

fn if_index(ifname: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(ifname).map_err(|_| io::Error::other("bad interface name"))?;
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 { Err(io::Error::last_os_error()) } else { Ok(i) }
}

impl FrameSocket {
    /// A socket bound to `ifname` that receives frames of `ethertype` (0: receives nothing,
    /// for sending only).
    pub fn open(ifname: &str, ethertype: u16) -> io::Result<FrameSocket> {
        let index = if_index(ifname)?;
        let proto = ethertype.to_be();
        // SAFETY: plain socket creation; the descriptor is owned below.
        let raw = unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto))
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_ll is valid; the fields set below make it a bind address.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: `sll` is a properly initialised sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        // SAFETY: a valid descriptor and timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(FrameSocket { fd })
    }

    /// Sends a complete Ethernet frame out of the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is a valid buffer for the duration of the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Receives one frame arriving on the interface (not our own outgoing ones); `None` after
    /// the socket's receive timeout.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: zeroed sockaddr_ll is valid as an out-parameter.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` and `from` are valid out-parameters of the sizes given.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            return Ok(None);
        }
        Ok(Some(n as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORTS: PortIndexes = PortIndexes { vxlan: 10, tap: Some(11), bridge: Some(3) };
    const FLOOD: Mac = Mac([0; 6]);

    fn mac(last: u8) -> Mac {
        Mac([0x0a, 0x58, 0, 0, 0, last])
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn spec(prune: bool) -> FdbSpec {
        FdbSpec { prune, ..FdbSpec::default() }
    }

    #[test]
    fn adds_missing_entries() {
        let mut want = spec(false);
        want.vxlan_entries.insert((mac(1), ip("192.168.0.2")));
        want.bridge_entries.insert(mac(1), Port::Vxlan);
        want.bridge_entries.insert(mac(2), Port::Tap);
        let ops = diff(&FdbState::default(), &want, &PORTS);
        assert_eq!(
            ops,
            vec![
                FdbOp::AddVxlan { dev: 10, mac: mac(1), dst: ip("192.168.0.2"), append: false },
                FdbOp::SetBridge { port: 10, mac: mac(1) },
                FdbOp::SetBridge { port: 11, mac: mac(2) },
            ]
        );
    }

    #[test]
    fn nothing_to_do_when_the_kernel_matches() {
        let mut want = spec(true);
        want.vxlan_entries.insert((mac(1), ip("192.168.0.2")));
        want.bridge_entries.insert(mac(1), Port::Vxlan);
        want.arp.insert(ip("10.32.0.5"), mac(1));
        let have = FdbState {
            vxlan: want.vxlan_entries.clone(),
            bridge: [(mac(1), 10)].into(),
            arp: want.arp.clone(),
        };
        assert!(diff(&have, &want, &PORTS).is_empty());
    }

    #[test]
    fn flood_list_is_appended_not_replaced() {
        let mut want = spec(false);
        for peer in ["192.168.0.2", "192.168.0.3", "192.168.0.4"] {
            want.vxlan_entries.insert((FLOOD, ip(peer)));
        }
        let have = FdbState { vxlan: [(FLOOD, ip("192.168.0.2"))].into(), ..FdbState::default() };
        let ops = diff(&have, &want, &PORTS);
        assert_eq!(
            ops,
            vec![
                FdbOp::AddVxlan { dev: 10, mac: FLOOD, dst: ip("192.168.0.3"), append: true },
                FdbOp::AddVxlan { dev: 10, mac: FLOOD, dst: ip("192.168.0.4"), append: true },
            ]
        );
    }

    fn stale() -> FdbState {
        FdbState {
            vxlan: [(mac(9), ip("192.168.0.9")), (FLOOD, ip("192.168.0.9"))].into(),
            bridge: [(mac(9), 10), (mac(8), 11)].into(),
            arp: [(ip("10.32.0.9"), mac(9))].into(),
        }
    }

    #[test]
    fn nothing_is_removed_without_prune() {
        assert!(diff(&stale(), &spec(false), &PORTS).is_empty());
    }

    #[test]
    fn stale_entries_are_removed_with_prune() {
        let ops = diff(&stale(), &spec(true), &PORTS);
        assert_eq!(
            ops,
            vec![
                FdbOp::DelVxlan { dev: 10, mac: FLOOD, dst: ip("192.168.0.9") },
                FdbOp::DelVxlan { dev: 10, mac: mac(9), dst: ip("192.168.0.9") },
                FdbOp::DelBridge { port: 11, mac: mac(8) },
                FdbOp::DelBridge { port: 10, mac: mac(9) },
                FdbOp::DelArp { bridge: 3, ip: ip("10.32.0.9"), mac: mac(9) },
            ]
        );
    }

    #[test]
    fn one_flood_destination_is_removed_and_the_rest_kept() {
        let mut want = spec(true);
        want.vxlan_entries.insert((FLOOD, ip("192.168.0.2")));
        let have = FdbState {
            vxlan: [(FLOOD, ip("192.168.0.2")), (FLOOD, ip("192.168.0.3"))].into(),
            ..FdbState::default()
        };
        assert_eq!(
            diff(&have, &want, &PORTS),
            vec![FdbOp::DelVxlan { dev: 10, mac: FLOOD, dst: ip("192.168.0.3") }]
        );
    }

    #[test]
    fn bridge_entries_move_between_ports() {
        let mut want = spec(true);
        want.bridge_entries.insert(mac(1), Port::Tap);
        want.bridge_entries.insert(mac(2), Port::Vxlan);
        let have = FdbState { bridge: [(mac(1), 10), (mac(2), 11)].into(), ..FdbState::default() };
        // A replace on the new port moves the entry: nothing to delete on the old one.
        assert_eq!(
            diff(&have, &want, &PORTS),
            vec![
                FdbOp::SetBridge { port: 11, mac: mac(1) },
                FdbOp::SetBridge { port: 10, mac: mac(2) }
            ]
        );
    }

    #[test]
    fn tap_entries_wait_for_the_tap() {
        let mut want = spec(true);
        want.bridge_entries.insert(mac(1), Port::Tap);
        let ports = PortIndexes { tap: None, ..PORTS };
        let have = FdbState { bridge: [(mac(1), 10)].into(), ..FdbState::default() };
        // Still wanted, so not pruned either.
        assert!(diff(&have, &want, &ports).is_empty());
    }

    #[test]
    fn arp_entries_are_added_changed_and_removed() {
        let mut want = spec(true);
        want.arp.insert(ip("10.32.0.5"), mac(5));
        want.arp.insert(ip("10.32.0.6"), mac(6));
        want.arp.insert(ip("fd00::7"), mac(7));
        let have = FdbState {
            arp: [(ip("10.32.0.6"), mac(1)), (ip("10.32.0.8"), mac(8))].into(),
            ..FdbState::default()
        };
        assert_eq!(
            diff(&have, &want, &PORTS),
            vec![
                FdbOp::SetArp { bridge: 3, ip: ip("10.32.0.5"), mac: mac(5) },
                FdbOp::SetArp { bridge: 3, ip: ip("10.32.0.6"), mac: mac(6) },
                FdbOp::SetArp { bridge: 3, ip: ip("fd00::7"), mac: mac(7) },
                FdbOp::DelArp { bridge: 3, ip: ip("10.32.0.8"), mac: mac(8) },
            ]
        );
        // Without the bridge there is nowhere to put them.
        let ports = PortIndexes { bridge: None, ..PORTS };
        assert!(diff(&FdbState::default(), &want, &ports).is_empty());
    }

    /// An FDB entry as the kernel dumps it: the destination of an AF_BRIDGE message is decoded
    /// as raw bytes.
    fn dumped(n: &NeighbourMessage) -> NeighbourMessage {
        use netlink_packet_core::{Emitable, Parseable};
        let mut buf = vec![0; n.buffer_len()];
        n.emit(&mut buf);
        NeighbourMessage::parse(buf.as_slice()).expect("parse")
    }

    #[test]
    fn fdb_destinations_decoded_as_raw_bytes_are_read() {
        for dst in [ip("192.168.0.2"), ip("fd00::2")] {
            let n = dumped(&vxlan_entry(10, mac(1), dst));
            assert!(
                n.attributes.iter().any(|a| matches!(
                    a,
                    NeighbourAttribute::Destination(NeighbourAddress::Other(_))
                )),
                "the crate decodes AF_BRIDGE destinations as Other: {n:?}"
            );
            assert_eq!(dst_of(&n), Some(dst));
        }
        let odd = {
            let mut n = NeighbourMessage::default();
            n.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Other(vec![1; 6])));
            n
        };
        assert_eq!(dst_of(&odd), None);
    }

    #[test]
    fn classify_keeps_only_weft_entries() {
        let mut learned = bridge_entry(10, mac(4));
        learned.header.state = NeighbourState::Reachable;
        let mut foreign_arp = arp_entry(3, ip("10.32.0.7"), mac(7));
        foreign_arp.attributes.retain(|a| !matches!(a, NeighbourAttribute::Protocol(_)));
        let fdb = vec![
            dumped(&vxlan_entry(10, mac(1), ip("192.168.0.2"))),
            dumped(&vxlan_entry(10, FLOOD, ip("192.168.0.3"))),
            dumped(&bridge_entry(10, mac(1))),
            dumped(&bridge_entry(11, mac(2))),
            // Not ours: another port's static entry, a learned entry, another device's entry.
            dumped(&bridge_entry(12, mac(3))),
            dumped(&learned),
            dumped(&vxlan_entry(20, mac(5), ip("192.168.0.5"))),
        ];
        let neigh = vec![
            dumped(&arp_entry(3, ip("10.32.0.5"), mac(5))),
            dumped(&arp_entry(3, ip("fd00::6"), mac(6))),
            // Not ours: no weft protocol mark, or on another device.
            dumped(&foreign_arp),
            dumped(&arp_entry(4, ip("10.32.0.8"), mac(8))),
        ];
        let state = classify(&fdb, &neigh, &PORTS);
        assert_eq!(
            state,
            FdbState {
                vxlan: [(mac(1), ip("192.168.0.2")), (FLOOD, ip("192.168.0.3"))].into(),
                bridge: [(mac(1), 10), (mac(2), 11)].into(),
                arp: [(ip("10.32.0.5"), mac(5)), (ip("fd00::6"), mac(6))].into(),
            }
        );
        // Pruning against an empty spec touches only these entries.
        let ops = diff(&state, &spec(true), &PORTS);
        assert_eq!(ops.len(), 6);
        assert!(ops.iter().all(FdbOp::is_removal));
    }
}
