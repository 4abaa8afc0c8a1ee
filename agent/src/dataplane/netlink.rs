//! A small synchronous rtnetlink client: one socket, request/acknowledge and dumps, with typed
//! helpers for the links, addresses, routes and neighbour/FDB entries weft manages. The socket
//! belongs to the network namespace it was opened in (see [`super::netns`]), so the same client
//! serves the host and, opened from inside one, a pod's namespace.

use std::io;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkHeader,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::NeighbourMessage;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// A failed netlink exchange.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    /// The kernel refused the request; `errno` is positive (e.g. `libc::EEXIST`).
    #[error("{op}: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { op: &'static str, errno: i32 },
    #[error("undecodable netlink message: {0}")]
    Decode(String),
}

impl NlError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            NlError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    pub fn is(&self, errno: i32) -> bool {
        self.errno() == Some(errno)
    }
}

pub type NlResult<T> = Result<T, NlError>;

/// An rtnetlink socket in one network namespace.
#[derive(Debug)]
pub struct RouteSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// Large enough for one datagram of a dump; the kernel caps them at 32 KiB by default.
const RECV_BUF: usize = 64 * 1024;

impl RouteSocket {
    /// Opens a socket in the calling thread's current network namespace.
    pub fn open() -> io::Result<RouteSocket> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Ask for extended acks: errors then carry the kernel's explanation when there is one.
        let _ = sock.set_ext_ack(true);
        Ok(RouteSocket { sock, seq: 0, buf: vec![0; RECV_BUF] })
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> NlResult<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags | NLM_F_REQUEST;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nl.finalize();
        let mut out = vec![0; nl.buffer_len()];
        nl.serialize(&mut out);
        self.sock.send(&out, 0)?;
        Ok(self.seq)
    }

    /// Sends a request and collects the answers until the acknowledgement or end of dump.
    fn exchange(
        &mut self,
        op: &'static str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> NlResult<Vec<RouteNetlinkMessage>> {
        let seq = self.send(msg, flags | NLM_F_ACK)?;
        let mut out = Vec::new();
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..n])
                    .map_err(|e| NlError::Decode(e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(NlError::Decode("zero-length message".into()));
                }
                offset += len;
                if msg.header.sequence_number != seq {
                    continue; // a late answer to an earlier request
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(NlError::Kernel { op, errno: -code.get() }),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    _ => {}
                }
            }
        }
    }

    fn dump(
        &mut self,
        op: &'static str,
        msg: RouteNetlinkMessage,
    ) -> NlResult<Vec<RouteNetlinkMessage>> {
        self.exchange(op, msg, NLM_F_DUMP)
    }

    // ---- links ----

    pub fn links(&mut self) -> NlResult<Vec<LinkMessage>> {
        let answers =
            self.dump("list links", RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// The link called `name`, if any.
    pub fn link_by_name(&mut self, name: &str) -> NlResult<Option<LinkMessage>> {
        let mut req = LinkMessage::default();
        req.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.exchange("get link", RouteNetlinkMessage::GetLink(req), 0) {
            Ok(mut v) => Ok(v.pop().and_then(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })),
            Err(e) if e.is(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn link_by_index(&mut self, index: u32) -> NlResult<Option<LinkMessage>> {
        let mut req = LinkMessage::default();
        req.header.index = index;
        match self.exchange("get link", RouteNetlinkMessage::GetLink(req), 0) {
            Ok(mut v) => Ok(v.pop().and_then(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })),
            Err(e) if e.is(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a link; fails with EEXIST if the name is taken.
    pub fn add_link(&mut self, msg: LinkMessage) -> NlResult<()> {
        self.exchange("create link", RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
            .map(drop)
    }

    /// Changes attributes of an existing link (identified by `msg.header.index`).
    pub fn set_link(&mut self, msg: LinkMessage) -> NlResult<()> {
        self.exchange("change link", RouteNetlinkMessage::SetLink(msg), 0).map(drop)
    }

    /// Changes a link through RTM_NEWLINK, which (unlike RTM_SETLINK) also accepts
    /// IFLA_LINKINFO changes such as bridge port options.
    pub fn modify_link(&mut self, msg: LinkMessage) -> NlResult<()> {
        self.exchange("change link", RouteNetlinkMessage::NewLink(msg), 0).map(drop)
    }

    /// Deletes a link; a link that is already gone is not an error.
    pub fn del_link(&mut self, index: u32) -> NlResult<()> {
        let mut req = LinkMessage::default();
        req.header.index = index;
        match self.exchange("delete link", RouteNetlinkMessage::DelLink(req), 0) {
            Err(e) if e.is(libc::ENODEV) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Sets a link administratively up, with an MTU and optionally a controller (bridge).
    pub fn set_up(
        &mut self,
        index: u32,
        mtu: Option<u32>,
        controller: Option<u32>,
    ) -> NlResult<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        if let Some(mtu) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(c) = controller {
            msg.attributes.push(LinkAttribute::Controller(c));
        }
        self.set_link(msg)
    }

    // ---- addresses ----

    /// Addresses on `index` (all links when `None`).
    pub fn addresses(&mut self, index: Option<u32>) -> NlResult<Vec<(u32, IpNet)>> {
        let answers = self
            .dump("list addresses", RouteNetlinkMessage::GetAddress(AddressMessage::default()))?;
        let mut out = Vec::new();
        for m in answers {
            let RouteNetlinkMessage::NewAddress(a) = m else { continue };
            if index.is_some_and(|i| i != a.header.index) {
                continue;
            }
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on p2p links.
            let local = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                a.attributes.iter().find_map(|at| match at {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr {
                if let Ok(net) = IpNet::new(ip, a.header.prefix_len) {
                    out.push((a.header.index, net));
                }
            }
        }
        Ok(out)
    }

    fn address_message(index: u32, net: IpNet) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = family_of(net.addr());
        m.header.prefix_len = net.prefix_len();
        m.header.index = index;
        m.header.scope = AddressScope::Universe;
        if net.addr().is_ipv6() {
            // No duplicate address detection: the address must be usable at once.
            m.header.flags = AddressHeaderFlags::Nodad;
        }
        m.attributes.push(AddressAttribute::Local(net.addr()));
        m.attributes.push(AddressAttribute::Address(net.addr()));
        if let IpNet::V4(v4) = net {
            if v4.prefix_len() < 31 {
                m.attributes.push(AddressAttribute::Broadcast(v4.broadcast()));
            }
        }
        m
    }

    /// Adds an address; an address that is already there is not an error.
    pub fn add_address(&mut self, index: u32, net: IpNet) -> NlResult<()> {
        let msg = RouteNetlinkMessage::NewAddress(Self::address_message(index, net));
        match self.exchange("add address", msg, NLM_F_CREATE | NLM_F_EXCL) {
            Err(e) if e.is(libc::EEXIST) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Removes an address; an address that is not there is not an error.
    pub fn del_address(&mut self, index: u32, net: IpNet) -> NlResult<()> {
        let msg = RouteNetlinkMessage::DelAddress(Self::address_message(index, net));
        match self.exchange("delete address", msg, 0) {
            Err(e) if e.is(libc::EADDRNOTAVAIL) || e.is(libc::ENODEV) => Ok(()),
            other => other.map(drop),
        }
    }

    // ---- routes ----

    /// Routes of the main table.
    pub fn routes(&mut self, family: AddressFamily) -> NlResult<Vec<Route>> {
        let mut req = RouteMessage::default();
        req.header.address_family = family;
        let answers = self.dump("list routes", RouteNetlinkMessage::GetRoute(req))?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Route::from_message(&r),
                _ => None,
            })
            .collect())
    }

    fn route_message(route: &Route) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = family_of(route.destination.addr());
        m.header.destination_prefix_length = route.destination.prefix_len();
        m.header.table = RouteHeaderTable::MAIN;
        m.header.protocol = RouteProtocol::Static;
        m.header.kind = RouteType::Unicast;
        m.header.scope =
            if route.gateway.is_some() { RouteScope::Universe } else { RouteScope::Link };
        if route.destination.prefix_len() > 0 {
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(route.destination.addr())));
        }
        if let Some(gw) = route.gateway {
            m.attributes.push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        m.attributes.push(RouteAttribute::Oif(route.oif));
        m
    }

    /// Adds or replaces a route.
    pub fn replace_route(&mut self, route: &Route) -> NlResult<()> {
        let msg = RouteNetlinkMessage::NewRoute(Self::route_message(route));
        self.exchange("set route", msg, NLM_F_CREATE | NLM_F_REPLACE).map(drop)
    }

    pub fn del_route(&mut self, route: &Route) -> NlResult<()> {
        let msg = RouteNetlinkMessage::DelRoute(Self::route_message(route));
        match self.exchange("delete route", msg, 0) {
            Err(e) if e.is(libc::ESRCH) => Ok(()),
            other => other.map(drop),
        }
    }

    // ---- neighbours and bridge FDB ----

    pub fn neighbours(&mut self, family: AddressFamily) -> NlResult<Vec<NeighbourMessage>> {
        let mut req = NeighbourMessage::default();
        req.header.family = family;
        let answers = self.dump("list neighbours", RouteNetlinkMessage::GetNeighbour(req))?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => Some(n),
                _ => None,
            })
            .collect())
    }

    /// Adds or replaces a neighbour / FDB entry (`append` adds another entry for the same key,
    /// as the VXLAN all-zeros flood list needs).
    pub fn set_neighbour(&mut self, msg: NeighbourMessage, append: bool) -> NlResult<()> {
        let mode = if append { netlink_packet_core::NLM_F_APPEND } else { NLM_F_REPLACE };
        self.exchange("set neighbour", RouteNetlinkMessage::NewNeighbour(msg), NLM_F_CREATE | mode)
            .map(drop)
    }

    pub fn del_neighbour(&mut self, msg: NeighbourMessage) -> NlResult<()> {
        match self.exchange("delete neighbour", RouteNetlinkMessage::DelNeighbour(msg), 0) {
            Err(e) if e.is(libc::ENOENT) => Ok(()),
            other => other.map(drop),
        }
    }
}

/// Named table numbers (the crate has them only as loose constants).
struct RouteHeaderTable;
impl RouteHeaderTable {
    const MAIN: u8 = 254;
}

/// A route of the main table, reduced to what weft sets and checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
}

impl Route {
    fn from_message(m: &RouteMessage) -> Option<Route> {
        if m.header.table != RouteHeaderTable::MAIN && m.header.table != 0 {
            return None;
        }
        let mut dst = None;
        let mut gateway = None;
        let mut oif = 0;
        let mut table = u32::from(m.header.table);
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(addr) => dst = route_ip(addr),
                RouteAttribute::Gateway(addr) => gateway = route_ip(addr),
                RouteAttribute::Oif(i) => oif = *i,
                RouteAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        if table != u32::from(RouteHeaderTable::MAIN) {
            return None;
        }
        let any = match m.header.address_family {
            AddressFamily::Inet6 => IpAddr::from([0u16; 8]),
            _ => IpAddr::from([0u8; 4]),
        };
        let destination =
            IpNet::new(dst.unwrap_or(any), m.header.destination_prefix_length).ok()?;
        Some(Route { destination, gateway, oif })
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

pub fn family_of(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 }
}

/// Reads the attributes weft cares about from a link message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub mac: [u8; 6],
    pub up: bool,
    pub controller: Option<u32>,
}

impl LinkInfo {
    pub fn from_message(m: &LinkMessage) -> LinkInfo {
        let mut info = LinkInfo {
            index: m.header.index,
            up: m.header.flags.contains(LinkFlags::Up),
            ..LinkInfo::default()
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => info.name.clone_from(n),
                LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
                LinkAttribute::Address(mac) if mac.len() == 6 => info.mac.copy_from_slice(mac),
                LinkAttribute::Controller(c) => info.controller = Some(*c),
                _ => {}
            }
        }
        info
    }
}
