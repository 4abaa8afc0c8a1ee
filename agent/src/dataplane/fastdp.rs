//! fastdp: the kernel's VXLAN device on the bridge, and the forwarding entries that tell it
//! and the bridge where each remote MAC lives. Entries are programmed declaratively: the
//! caller states the full desired set and `sync` adds what is missing and (when allowed)
//! removes what is no longer wanted, leaving entries it does not own alone. The agent is never
//! in the per-packet path: it only programs tables. Also the raw socket that sends and receives
//! the heartbeats that probe each peer's VXLAN path.

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

use super::netlink::{LinkInfo, RouteSocket};
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
}

fn link_index(sock: &mut RouteSocket, name: &str) -> Result<Option<u32>, KernelError> {
    Ok(sock.link_by_name(name).ctx(|| format!("looking up {name}"))?.map(|l| l.header.index))
}

/// Bridge port settings of an overlay port: isolated (frames from one overlay port never go
/// out another, so nothing loops between peers), no MAC learning (the agent programs it), and
/// neighbour suppression (ARP/ND for addresses the bridge knows is answered on this host).
pub fn set_overlay_port(sock: &mut RouteSocket, index: u32) -> Result<(), KernelError> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        NlLinkInfo::PortKind(InfoPortKind::Bridge),
        NlLinkInfo::PortData(InfoPortData::BridgePort(vec![
            InfoBridgePort::Isolated(true),
            InfoBridgePort::Learning(false),
            InfoBridgePort::NeighSupress(true),
        ])),
    ]));
    sock.modify_link(msg).ctx(|| "setting overlay port flags".into())
}

/// Attaches an existing interface (the sleeve TAP) to the bridge as an overlay port, up, with
/// the given MTU.
pub fn attach_port(name: &str, bridge: &str, mtu: u32) -> Result<(), KernelError> {
    let mut sock = RouteSocket::open()?;
    let bridge =
        link_index(&mut sock, bridge)?.ok_or_else(|| KernelError::NoBridge(bridge.to_owned()))?;
    let link = sock
        .link_by_name(name)
        .ctx(|| format!("looking up {name}"))?
        .ok_or_else(|| KernelError::Mismatch(format!("{name} does not exist")))?;
    let info = LinkInfo::from_message(&link);
    if info.mtu != mtu || !info.up || info.controller != Some(bridge) {
        sock.set_up(info.index, Some(mtu), Some(bridge)).ctx(|| format!("attaching {name}"))?;
    }
    set_overlay_port(&mut sock, info.index)
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

/// Creates or repairs the VXLAN device; returns its index and what was repaired.
pub fn ensure_vxlan(spec: &VxlanSpec) -> Result<(u32, Vec<String>), KernelError> {
    let mut sock = RouteSocket::open()?;
    let mut repairs = Vec::new();
    let bridge = link_index(&mut sock, &spec.bridge)?
        .ok_or_else(|| KernelError::NoBridge(spec.bridge.clone()))?;
    let existing = sock.link_by_name(&spec.name).ctx(|| "looking up the VXLAN device".into())?;
    if let Some(l) = &existing {
        if !vxlan_matches(l, spec) {
            sock.del_link(l.header.index).ctx(|| "replacing the VXLAN device".into())?;
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
        match sock.add_link(msg) {
            Err(e) if e.is(libc::EEXIST) => {}
            other => other.ctx(|| format!("creating VXLAN device {}", spec.name))?,
        }
        repairs.push("created".to_owned());
    }
    let link = sock
        .link_by_name(&spec.name)
        .ctx(|| "looking up the VXLAN device".into())?
        .ok_or_else(|| KernelError::Mismatch(format!("{} vanished", spec.name)))?;
    let info = LinkInfo::from_message(&link);
    if info.mtu != spec.mtu || !info.up || info.controller != Some(bridge) {
        sock.set_up(info.index, Some(spec.mtu), Some(bridge))
            .ctx(|| "attaching the VXLAN device".into())?;
        if !repairs.iter().any(|r| r == "created") {
            repairs.push("re-attached".to_owned());
        }
    }
    set_overlay_port(&mut sock, info.index)?;
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

fn dst_of(n: &NeighbourMessage) -> Option<IpAddr> {
    n.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
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

/// weft's neighbour entries on the bridge device.
fn arp_entries(sock: &mut RouteSocket, bridge: u32) -> Result<BTreeMap<IpAddr, Mac>, KernelError> {
    let mut out = BTreeMap::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        for n in sock.neighbours(family).ctx(|| "listing neighbours".into())? {
            let ours = n.attributes.contains(&NeighbourAttribute::Protocol(NEIGH_PROTOCOL));
            if n.header.ifindex == bridge && ours {
                if let (Some(ip), Some(mac)) = (dst_of(&n), mac_of(&n)) {
                    out.insert(ip, mac);
                }
            }
        }
    }
    Ok(out)
}

/// Makes the forwarding entries match `spec`.
pub fn sync(spec: &FdbSpec) -> Result<FdbChanges, KernelError> {
    let mut sock = RouteSocket::open()?;
    let mut changes = FdbChanges::default();
    let Some(vx) = link_index(&mut sock, &spec.vxlan)? else { return Ok(changes) };
    let tap = link_index(&mut sock, &spec.tap)?;
    let bridge = link_index(&mut sock, &spec.bridge)?;

    // What is there now: VXLAN entries (with a destination) and static bridge entries on our
    // two ports. Entries of other kinds (the bridge's own permanent ones) are not ours.
    let fdb = sock.neighbours(AddressFamily::Bridge).ctx(|| "listing forwarding entries".into())?;
    let mut have_vx: BTreeSet<(Mac, IpAddr)> = BTreeSet::new();
    let mut have_br: BTreeMap<Mac, u32> = BTreeMap::new();
    for n in &fdb {
        let Some(mac) = mac_of(n) else { continue };
        let master = n.header.flags.contains(NeighbourFlags::Controller);
        if n.header.ifindex == vx && !master {
            if let Some(dst) = dst_of(n) {
                have_vx.insert((mac, dst));
            }
        } else if master
            && n.header.state == NeighbourState::Noarp
            && (n.header.ifindex == vx || Some(n.header.ifindex) == tap)
        {
            have_br.insert(mac, n.header.ifindex);
        }
    }
    for (mac, dst) in spec.vxlan_entries.difference(&have_vx) {
        // The flood list holds several destinations for one MAC: append, do not replace.
        let append = *mac == Mac([0; 6]);
        sock.set_neighbour(vxlan_entry(vx, *mac, *dst), append)
            .ctx(|| format!("adding VXLAN entry {mac} -> {dst}"))?;
        changes.added += 1;
    }
    for (mac, port) in &spec.bridge_entries {
        let index = match port {
            Port::Vxlan => Some(vx),
            Port::Tap => tap,
        };
        let Some(index) = index else { continue };
        if have_br.get(mac) != Some(&index) {
            sock.set_neighbour(bridge_entry(index, *mac), false)
                .ctx(|| format!("adding bridge entry {mac}"))?;
            changes.added += 1;
        }
    }
    let have_arp = match bridge {
        Some(b) => arp_entries(&mut sock, b)?,
        None => BTreeMap::new(),
    };
    if let Some(b) = bridge {
        for (ip, mac) in &spec.arp {
            if have_arp.get(ip) != Some(mac) {
                sock.set_neighbour(arp_entry(b, *ip, *mac), false)
                    .ctx(|| format!("adding neighbour {ip}"))?;
                changes.added += 1;
            }
        }
    }
    if spec.prune {
        for (mac, dst) in have_vx.difference(&spec.vxlan_entries) {
            sock.del_neighbour(vxlan_entry(vx, *mac, *dst))
                .ctx(|| format!("removing VXLAN entry {mac} -> {dst}"))?;
            changes.removed += 1;
        }
        for (mac, index) in &have_br {
            if !spec.bridge_entries.contains_key(mac) {
                sock.del_neighbour(bridge_entry(*index, *mac))
                    .ctx(|| format!("removing bridge entry {mac}"))?;
                changes.removed += 1;
            }
        }
        for (ip, mac) in have_arp.iter().filter(|(ip, _)| !spec.arp.contains_key(ip)) {
            if let Some(b) = bridge {
                sock.del_neighbour(arp_entry(b, *ip, *mac))
                    .ctx(|| format!("removing neighbour {ip}"))?;
                changes.removed += 1;
            }
        }
    }
    Ok(changes)
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
