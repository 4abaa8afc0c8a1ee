//! Link, address, route and neighbour/FDB work through the `rtnetlink` crate, with typed helpers
//! for what weft manages.
//!
//! The netns rule (design.md §4.10) is kept by construction. [`block_on`] runs one data-plane
//! operation on a new `weft-rtnl` OS thread with a private current-thread runtime; the thread
//! never changes namespace and ends with the operation. Inside it, an [`Rtnl`] connection can
//! only be made by [`Rtnl::host`] (socket opened on that thread, in the agent's namespace) or by
//! [`Rtnl::netns`] (socket opened on a short-lived thread that entered the namespace through
//! [`Netns::run`] and ended right after). A socket stays bound to the namespace it was opened
//! in, so the connection is then driven from the agent's namespace, and no thread that runs
//! tokio ever calls `setns`.
//!
//! The callers of the data plane are blocking (the state thread, `spawn_blocking`, the CLI, a
//! few brief calls from async code), so [`block_on`] is usable from any of them. An operation's
//! requests, its connections and the kernel's work for them all run on the operation's own
//! thread, as with a synchronous socket: concurrent operations do not queue behind one another
//! and a request costs no thread handoff; the operation pays one thread start.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::os::fd::{FromRawFd, IntoRawFd};

use futures_util::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
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
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, TokioSocket};

use super::netns::Netns;

/// A failed netlink exchange.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The kernel refused the request; `errno` is positive (e.g. `libc::EEXIST`).
    #[error("{op}: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { op: &'static str, errno: i32 },
    /// The connection failed or answered something unexpected.
    #[error("{op}: {detail}")]
    Protocol { op: &'static str, detail: String },
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

    fn from_rtnl(op: &'static str, e: rtnetlink::Error) -> NlError {
        match e {
            rtnetlink::Error::NetlinkError(m) => match m.code {
                Some(code) => NlError::Kernel { op, errno: -code.get() },
                None => NlError::Protocol { op, detail: "unexpected acknowledgement".into() },
            },
            other => NlError::Protocol { op, detail: other.to_string() },
        }
    }
}

pub type NlResult<T> = Result<T, NlError>;

thread_local! {
    /// Set while the thread runs [`on_blocking_thread`].
    static MAY_BLOCK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The runtime data-plane operations run on, kept for the thread.
    static RUNTIME: std::cell::RefCell<Option<tokio::runtime::Runtime>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with data-plane operations executed on the calling thread itself, on a runtime
/// kept for the thread, instead of on a new thread each. Only for threads that may block and
/// run no async tasks: `spawn_blocking` closures and plain threads (an async task must never
/// call this: a runtime cannot be entered from inside another).
pub fn on_blocking_thread<R>(f: impl FnOnce() -> R) -> R {
    let before = MAY_BLOCK.replace(true);
    let r = f();
    MAY_BLOCK.set(before);
    r
}

/// Runs `op` on the thread's own runtime, or hands it back if this thread may not (or is
/// already inside that runtime).
fn run_here<T, E, F>(op: F) -> Result<Result<T, E>, F>
where
    F: Future<Output = Result<T, E>>,
    E: From<io::Error>,
{
    if !MAY_BLOCK.get() {
        return Err(op);
    }
    RUNTIME.with(|cell| {
        let Ok(mut slot) = cell.try_borrow_mut() else { return Err(op) };
        if slot.is_none() {
            match tokio::runtime::Builder::new_current_thread().enable_io().build() {
                Ok(rt) => *slot = Some(rt),
                Err(e) => return Ok(Err(E::from(e))),
            }
        }
        match slot.as_ref() {
            Some(rt) => Ok(rt.block_on(op)),
            None => Err(op),
        }
    })
}

/// Runs one data-plane operation and waits for its result: on the calling thread inside
/// [`on_blocking_thread`], otherwise on a `weft-rtnl` thread of its own (see the module docs).
/// Usable from any thread: a plain thread, `spawn_blocking`, or (briefly blocking it) an async
/// task, where a runtime of our own could not be entered.
pub fn block_on<T, E, F>(op: F) -> Result<T, E>
where
    F: Future<Output = Result<T, E>> + Send,
    T: Send,
    E: From<io::Error> + Send,
{
    run_here(op).unwrap_or_else(on_own_thread)
}

fn on_own_thread<T, E, F>(op: F) -> Result<T, E>
where
    F: Future<Output = Result<T, E>> + Send,
    T: Send,
    E: From<io::Error> + Send,
{
    std::thread::scope(|s| {
        let worker =
            std::thread::Builder::new().name("weft-rtnl".into()).spawn_scoped(s, || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
                rt.block_on(op)
            })?;
        worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// An rtnetlink connection to one network namespace, driven by the runtime of the operation
/// that made it (inside [`block_on`]). It closes when dropped.
#[derive(Debug)]
pub struct Rtnl {
    handle: rtnetlink::Handle,
    conn: tokio::task::AbortHandle,
}

impl Drop for Rtnl {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

fn open_socket() -> io::Result<Socket> {
    let sock = Socket::new(NETLINK_ROUTE)?;
    // Extended acks: errors then carry the kernel's explanation when there is one.
    let _ = sock.set_ext_ack(true);
    Ok(sock)
}

impl Rtnl {
    /// A connection to the agent's own namespace, opened on the calling thread: inside
    /// [`block_on`], a thread that never leaves the agent's namespace.
    pub fn host() -> io::Result<Rtnl> {
        Rtnl::from_socket(open_socket()?)
    }

    /// A connection to `netns`: the socket is opened on a short-lived thread inside it, then
    /// driven from the agent's namespace.
    pub fn netns(netns: &Netns) -> io::Result<Rtnl> {
        let sock = netns.run(open_socket)??;
        Rtnl::from_socket(sock)
    }

    fn from_socket(sock: Socket) -> io::Result<Rtnl> {
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| io::Error::other("rtnetlink connections are made inside block_on"))?;
        sock.set_non_blocking(true)?;
        // SAFETY: the descriptor is an open netlink socket whose ownership moves here.
        let sock = unsafe { TokioSocket::from_raw_fd(sock.into_raw_fd()) };
        let (conn, handle, _) = rtnetlink::from_socket(sock);
        let conn = rt.spawn(conn).abort_handle();
        Ok(Rtnl { handle, conn })
    }

    /// Sends `msg` with `flags` and waits for the acknowledgement (for requests the
    /// crate's builders do not express, such as appending an FDB entry).
    async fn ack(&self, op: &'static str, msg: RouteNetlinkMessage, flags: u16) -> NlResult<()> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        let mut answers = self
            .handle
            .clone()
            .request(req)
            .map_err(|e| NlError::Protocol { op, detail: e.to_string() })?;
        while let Some(m) = answers.next().await {
            if let NetlinkPayload::Error(e) = m.payload {
                if let Some(code) = e.code {
                    return Err(NlError::Kernel { op, errno: -code.get() });
                }
            }
        }
        Ok(())
    }

    // ---- links ----

    pub async fn links(&self) -> NlResult<Vec<LinkMessage>> {
        let op = "list links";
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::from_rtnl(op, e))
    }

    async fn get_link(&self, req: rtnetlink::LinkGetRequest) -> NlResult<Option<LinkMessage>> {
        let op = "get link";
        match req.execute().try_collect::<Vec<_>>().await {
            Ok(mut v) => Ok(v.pop()),
            Err(e) => match NlError::from_rtnl(op, e) {
                e if e.is(libc::ENODEV) => Ok(None),
                e => Err(e),
            },
        }
    }

    /// The link called `name`, if any.
    pub async fn link_by_name(&self, name: &str) -> NlResult<Option<LinkMessage>> {
        self.get_link(self.handle.link().get().match_name(name)).await
    }

    pub async fn link_by_index(&self, index: u32) -> NlResult<Option<LinkMessage>> {
        self.get_link(self.handle.link().get().match_index(index)).await
    }

    /// Creates a link; fails with EEXIST if the name is taken.
    pub async fn add_link(&self, msg: LinkMessage) -> NlResult<()> {
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| NlError::from_rtnl("create link", e))
    }

    /// Changes attributes of an existing link (identified by `msg.header.index`).
    pub async fn set_link(&self, msg: LinkMessage) -> NlResult<()> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NlError::from_rtnl("change link", e))
    }

    /// Changes a link through RTM_NEWLINK, which (unlike RTM_SETLINK) also accepts
    /// IFLA_LINKINFO changes such as bridge port options.
    pub async fn modify_link(&self, msg: LinkMessage) -> NlResult<()> {
        self.handle
            .link()
            .change(msg)
            .execute()
            .await
            .map_err(|e| NlError::from_rtnl("change link", e))
    }

    /// Deletes a link; a link that is already gone is not an error.
    pub async fn del_link(&self, index: u32) -> NlResult<()> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) => match NlError::from_rtnl("delete link", e) {
                e if e.is(libc::ENODEV) => Ok(()),
                e => Err(e),
            },
        }
    }

    /// Sets a link administratively up, with an MTU and optionally a controller (bridge).
    pub async fn set_up(
        &self,
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
        self.set_link(msg).await
    }

    /// Sets a link's alias (`IFLA_IFALIAS`).
    pub async fn set_alias(&self, index: u32, alias: &str) -> NlResult<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::IfAlias(alias.to_owned()));
        self.set_link(msg).await
    }

    // ---- addresses ----

    /// Addresses on `index` (all links when `None`).
    pub async fn addresses(&self, index: Option<u32>) -> NlResult<Vec<(u32, IpNet)>> {
        let answers: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::from_rtnl("list addresses", e))?;
        let mut out = Vec::new();
        for a in answers {
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
    pub async fn add_address(&self, index: u32, net: IpNet) -> NlResult<()> {
        let mut req = self.handle.address().add(index, net.addr(), net.prefix_len());
        *req.message_mut() = Self::address_message(index, net);
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) => match NlError::from_rtnl("add address", e) {
                e if e.is(libc::EEXIST) => Ok(()),
                e => Err(e),
            },
        }
    }

    /// Removes an address; an address that is not there is not an error.
    pub async fn del_address(&self, index: u32, net: IpNet) -> NlResult<()> {
        let req = self.handle.address().del(Self::address_message(index, net));
        match req.execute().await {
            Ok(()) => Ok(()),
            Err(e) => match NlError::from_rtnl("delete address", e) {
                e if e.is(libc::EADDRNOTAVAIL) || e.is(libc::ENODEV) => Ok(()),
                e => Err(e),
            },
        }
    }

    // ---- routes ----

    /// Routes of the main table.
    pub async fn routes(&self, family: AddressFamily) -> NlResult<Vec<Route>> {
        let mut req = RouteMessage::default();
        req.header.address_family = family;
        let answers: Vec<RouteMessage> = self
            .handle
            .route()
            .get(req)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::from_rtnl("list routes", e))?;
        Ok(answers.iter().filter_map(Route::from_message).collect())
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
    pub async fn replace_route(&self, route: &Route) -> NlResult<()> {
        self.handle
            .route()
            .add(Self::route_message(route))
            .replace()
            .execute()
            .await
            .map_err(|e| NlError::from_rtnl("set route", e))
    }

    pub async fn del_route(&self, route: &Route) -> NlResult<()> {
        match self.handle.route().del(Self::route_message(route)).execute().await {
            Ok(()) => Ok(()),
            Err(e) => match NlError::from_rtnl("delete route", e) {
                e if e.is(libc::ESRCH) => Ok(()),
                e => Err(e),
            },
        }
    }

    // ---- neighbours and bridge FDB ----

    pub async fn neighbours(&self, family: AddressFamily) -> NlResult<Vec<NeighbourMessage>> {
        self.handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NlError::from_rtnl("list neighbours", e))
    }

    /// Adds or replaces a neighbour / FDB entry (`append` adds another entry for the same key,
    /// as the VXLAN all-zeros flood list needs).
    pub async fn set_neighbour(&self, msg: NeighbourMessage, append: bool) -> NlResult<()> {
        let op = "set neighbour";
        if append {
            // The crate's builder knows only "create" and "replace".
            return self
                .ack(op, RouteNetlinkMessage::NewNeighbour(msg), NLM_F_CREATE | NLM_F_APPEND)
                .await;
        }
        let mut req = self.handle.neighbours().add_bridge(msg.header.ifindex, &[]);
        *req.message_mut() = msg;
        req.replace().execute().await.map_err(|e| NlError::from_rtnl(op, e))
    }

    pub async fn del_neighbour(&self, msg: NeighbourMessage) -> NlResult<()> {
        match self.handle.neighbours().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => match NlError::from_rtnl("delete neighbour", e) {
                e if e.is(libc::ENOENT) => Ok(()),
                e => Err(e),
            },
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
    pub alias: Option<String>,
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
                LinkAttribute::IfAlias(a) => info.alias = Some(a.clone()),
                _ => {}
            }
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> NlResult<Option<LinkInfo>> {
        block_on(async {
            let rtnl = Rtnl::host()?;
            Ok(rtnl.link_by_name("lo").await?.as_ref().map(LinkInfo::from_message))
        })
    }

    #[test]
    fn reads_links_from_a_plain_thread() {
        let lo = loopback().expect("netlink").expect("lo exists");
        assert_eq!(lo.name, "lo");
        let missing = block_on(async { Rtnl::host()?.link_by_name("weft-no-such0").await });
        assert_eq!(missing.expect("a missing link is not an error"), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn usable_from_async_tasks_and_the_blocking_pool() {
        // Directly inside a task (blocks it briefly) and from spawn_blocking, concurrently.
        let blocking: Vec<_> = (0..4).map(|_| tokio::task::spawn_blocking(loopback)).collect();
        assert!(loopback().expect("netlink").is_some());
        for b in blocking {
            assert!(b.await.expect("join").expect("netlink").is_some());
        }
    }

    #[test]
    fn kernel_refusals_carry_the_errno() {
        let r = block_on(async { Rtnl::host()?.set_up(u32::MAX, None, None).await });
        // No such device (or, without CAP_NET_ADMIN, not permitted): a kernel errno either way.
        let e = r.expect_err("the kernel refuses");
        assert!(e.errno().is_some(), "{e:?}");
        assert!(e.to_string().starts_with("change link: "), "{e}");
    }
}
