//! [`Dataplane`] on Linux, through rtnetlink and nftables netlink. Host-side operations use a
//! socket opened in the agent's namespace; pod-side operations use a socket opened inside the
//! pod's namespace by [`Netns::route_socket`].

use ipnet::IpNet;
use netlink_packet_route::link::{
    InfoBridge, InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth,
    LinkAttribute, LinkInfo as NlLinkInfo, LinkMessage,
};
use std::os::fd::AsRawFd;

use super::netlink::{LinkInfo, Route, RouteSocket, family_of};
use super::netns::{Netns, write_sysctl};
use super::nft::{NftSocket, Table};
use super::{
    BridgeReport, BridgeSpec, Dataplane, EndpointSpec, EndpointState, HOST_IFNAME_PREFIX,
    KernelError, Mac, NlContext, RouteSpec,
};

/// The Linux implementation. Stateless: every call opens the sockets it needs, so calls from
/// different threads never contend.
#[derive(Debug, Default)]
pub struct LinuxDataplane;

fn host_socket() -> Result<RouteSocket, KernelError> {
    Ok(RouteSocket::open()?)
}

fn is_link_local(net: &IpNet) -> bool {
    match net {
        IpNet::V4(n) => n.addr().is_link_local(),
        IpNet::V6(n) => (n.addr().segments()[0] & 0xffc0) == 0xfe80,
    }
}

impl LinuxDataplane {
    fn create_bridge(sock: &mut RouteSocket, spec: &BridgeSpec) -> Result<(), KernelError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(spec.name.clone()));
        msg.attributes.push(LinkAttribute::Address(spec.mac.0.to_vec()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            NlLinkInfo::Kind(InfoKind::Bridge),
            // Multicast floods like broadcast: with snooping, a group with a local member
            // would stop reaching members behind the overlay ports (no IGMP querier there).
            NlLinkInfo::Data(InfoData::Bridge(vec![InfoBridge::MulticastSnooping(false)])),
        ]));
        match sock.add_link(msg) {
            Err(e) if e.is(libc::EEXIST) => Ok(()),
            other => other.ctx(|| format!("creating bridge {}", spec.name)),
        }
    }

    fn create_veth(
        sock: &mut RouteSocket,
        spec: &EndpointSpec,
        netns: &Netns,
    ) -> Result<(), KernelError> {
        let mut peer = LinkMessage::default();
        peer.attributes.push(LinkAttribute::IfName(spec.ifname.clone()));
        peer.attributes.push(LinkAttribute::NetNsFd(netns.as_raw_fd()));
        peer.attributes.push(LinkAttribute::Mtu(spec.mtu));
        if let Some(mac) = spec.mac {
            peer.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(spec.host_ifname.clone()));
        msg.attributes.push(LinkAttribute::Mtu(spec.mtu));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            NlLinkInfo::Kind(InfoKind::Veth),
            NlLinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        match sock.add_link(msg) {
            // The host name was free (checked by the caller), so the clash is inside the pod.
            Err(e) if e.is(libc::EEXIST) => Err(KernelError::InterfaceExists(spec.ifname.clone())),
            other => other.ctx(|| format!("creating veth {}", spec.host_ifname)),
        }
    }

    fn set_hairpin(sock: &mut RouteSocket, index: u32, on: bool) -> Result<(), KernelError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            NlLinkInfo::PortKind(InfoPortKind::Bridge),
            NlLinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(on)])),
        ]));
        sock.modify_link(msg).ctx(|| "setting hairpin mode".into())
    }

    /// Routes for `spec`, preceded by an on-link route to any gateway outside the endpoint's
    /// subnets (a gateway must be reachable before a route can use it).
    fn routes_with_onlink_gateways(spec: &EndpointSpec, oif: u32) -> Vec<Route> {
        let mut out = Vec::new();
        for r in &spec.routes {
            if let Some(gw) = r.gateway {
                if !spec.addresses.iter().any(|a| a.contains(&gw)) {
                    let host = IpNet::from(gw);
                    out.push(Route { destination: host, gateway: None, oif });
                }
            }
            out.push(Route { destination: r.destination, gateway: r.gateway, oif });
        }
        out
    }
}

impl Dataplane for LinuxDataplane {
    fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<BridgeReport, KernelError> {
        let mut sock = host_socket()?;
        let mut repairs = Vec::new();
        let mut link = sock.link_by_name(&spec.name).ctx(|| format!("looking up {}", spec.name))?;
        if link.is_none() {
            Self::create_bridge(&mut sock, spec)?;
            repairs.push("created".to_owned());
            link = sock.link_by_name(&spec.name).ctx(|| format!("looking up {}", spec.name))?;
        }
        let info =
            LinkInfo::from_message(&link.ok_or_else(|| KernelError::NoBridge(spec.name.clone()))?);
        if info.mac != spec.mac.0 {
            let mut msg = LinkMessage::default();
            msg.header.index = info.index;
            msg.attributes.push(LinkAttribute::Address(spec.mac.0.to_vec()));
            sock.set_link(msg).ctx(|| "setting the bridge MAC".into())?;
            repairs.push(format!("mac -> {}", spec.mac));
        }
        if info.mtu != spec.mtu || !info.up {
            sock.set_up(info.index, Some(spec.mtu), None).ctx(|| "setting the bridge up".into())?;
            if info.mtu != spec.mtu {
                repairs.push(format!("mtu {} -> {}", info.mtu, spec.mtu));
            }
            if !info.up {
                repairs.push("set up".to_owned());
            }
        }
        let present: Vec<IpNet> = sock
            .addresses(Some(info.index))
            .ctx(|| "listing bridge addresses".into())?
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        for net in &spec.addresses {
            if !present.contains(net) {
                sock.add_address(info.index, *net).ctx(|| format!("adding {net} to the bridge"))?;
                repairs.push(format!("address {net} added"));
            }
        }
        for net in present.iter().filter(|n| !spec.addresses.contains(n) && !is_link_local(n)) {
            sock.del_address(info.index, *net).ctx(|| format!("removing {net} from the bridge"))?;
            repairs.push(format!("address {net} removed"));
        }
        Ok(BridgeReport { index: info.index, repairs })
    }

    fn setup_endpoint(&self, spec: &EndpointSpec) -> Result<EndpointState, KernelError> {
        let netns = Netns::open(&spec.netns)?;
        let mut host = host_socket()?;
        let mut pod = netns.route_socket()?;
        let bridge = host
            .link_by_name(&spec.bridge)
            .ctx(|| "looking up the bridge".into())?
            .ok_or_else(|| KernelError::NoBridge(spec.bridge.clone()))?;
        let bridge_index = bridge.header.index;
        let existing = host.link_by_name(&spec.host_ifname).ctx(|| "looking up the veth".into())?;
        let pod_link =
            pod.link_by_name(&spec.ifname).ctx(|| "looking up the pod interface".into())?;
        match (&existing, &pod_link) {
            (Some(_), Some(_)) => {}
            (Some(stale), None) => {
                // Our host end survived, its peer did not: start over.
                host.del_link(stale.header.index).ctx(|| "removing a stale veth".into())?;
                Self::create_veth(&mut host, spec, &netns)?;
            }
            (None, Some(_)) => return Err(KernelError::InterfaceExists(spec.ifname.clone())),
            (None, None) => Self::create_veth(&mut host, spec, &netns)?,
        }
        let host_link = LinkInfo::from_message(
            &host
                .link_by_name(&spec.host_ifname)
                .ctx(|| "looking up the veth".into())?
                .ok_or_else(|| KernelError::Mismatch(format!("{} vanished", spec.host_ifname)))?,
        );
        host.set_up(host_link.index, Some(spec.mtu), Some(bridge_index))
            .ctx(|| format!("attaching {} to {}", spec.host_ifname, spec.bridge))?;
        Self::set_hairpin(&mut host, host_link.index, spec.hairpin)?;

        let pod_link = LinkInfo::from_message(
            &pod.link_by_name(&spec.ifname)
                .ctx(|| "looking up the pod interface".into())?
                .ok_or_else(|| KernelError::Mismatch(format!("{} vanished", spec.ifname)))?,
        );
        if let Some(lo) = pod.link_by_name("lo").ctx(|| "looking up lo".into())? {
            pod.set_up(lo.header.index, None, None).ctx(|| "setting lo up".into())?;
        }
        pod.set_up(pod_link.index, Some(spec.mtu), None)
            .ctx(|| format!("setting {} up", spec.ifname))?;
        for net in &spec.addresses {
            pod.add_address(pod_link.index, *net)
                .ctx(|| format!("adding {net} to {}", spec.ifname))?;
        }
        for route in Self::routes_with_onlink_gateways(spec, pod_link.index) {
            pod.replace_route(&route).ctx(|| format!("adding route {}", route.destination))?;
        }
        Ok(EndpointState { host_mac: Mac(host_link.mac), container_mac: Mac(pod_link.mac) })
    }

    fn remove_addresses(
        &self,
        spec: &EndpointSpec,
        addresses: &[IpNet],
    ) -> Result<(), KernelError> {
        let netns = Netns::open(&spec.netns)?;
        let mut pod = netns.route_socket()?;
        let Some(link) =
            pod.link_by_name(&spec.ifname).ctx(|| "looking up the pod interface".into())?
        else {
            return Ok(());
        };
        for net in addresses {
            pod.del_address(link.header.index, *net).ctx(|| format!("removing {net}"))?;
        }
        Ok(())
    }

    fn teardown_endpoint(&self, host_ifname: &str) -> Result<(), KernelError> {
        let mut host = host_socket()?;
        if let Some(link) = host.link_by_name(host_ifname).ctx(|| "looking up the veth".into())? {
            host.del_link(link.header.index).ctx(|| format!("deleting {host_ifname}"))?;
        }
        Ok(())
    }

    fn check_endpoint(&self, spec: &EndpointSpec) -> Result<(), KernelError> {
        let mismatch = |m: String| Err(KernelError::Mismatch(m));
        let mut host = host_socket()?;
        let Some(host_link) =
            host.link_by_name(&spec.host_ifname).ctx(|| "looking up the veth".into())?
        else {
            return mismatch(format!("host interface {} is missing", spec.host_ifname));
        };
        let host_link = LinkInfo::from_message(&host_link);
        let bridge = host.link_by_name(&spec.bridge).ctx(|| "looking up the bridge".into())?;
        if bridge.map(|b| b.header.index) != host_link.controller || host_link.controller.is_none()
        {
            return mismatch(format!(
                "{} is not attached to bridge {}",
                spec.host_ifname, spec.bridge
            ));
        }
        let netns = Netns::open(&spec.netns)?;
        let mut pod = netns.route_socket()?;
        let Some(link) =
            pod.link_by_name(&spec.ifname).ctx(|| "looking up the pod interface".into())?
        else {
            return mismatch(format!(
                "interface {} is missing in {}",
                spec.ifname,
                spec.netns.display()
            ));
        };
        let link = LinkInfo::from_message(&link);
        if !link.up {
            return mismatch(format!("interface {} is down", spec.ifname));
        }
        let present: Vec<IpNet> = pod
            .addresses(Some(link.index))
            .ctx(|| "listing addresses".into())?
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        if let Some(missing) = spec.addresses.iter().find(|a| !present.contains(a)) {
            return mismatch(format!("address {missing} is missing on {}", spec.ifname));
        }
        for RouteSpec { destination, gateway } in &spec.routes {
            let routes =
                pod.routes(family_of(destination.addr())).ctx(|| "listing routes".into())?;
            let found =
                routes.iter().any(|r| r.destination == *destination && r.gateway == *gateway);
            if !found {
                return mismatch(format!("route {destination} is missing on {}", spec.ifname));
            }
        }
        Ok(())
    }

    fn endpoint_links(&self, bridge: &str) -> Result<Vec<String>, KernelError> {
        let mut host = host_socket()?;
        let Some(br) = host.link_by_name(bridge).ctx(|| "looking up the bridge".into())? else {
            return Ok(Vec::new());
        };
        let links = host.links().ctx(|| "listing links".into())?;
        Ok(links
            .iter()
            .map(LinkInfo::from_message)
            .filter(|l| {
                l.name.starts_with(HOST_IFNAME_PREFIX) && l.controller == Some(br.header.index)
            })
            .map(|l| l.name)
            .collect())
    }

    fn apply_firewall(&self, table: &Table) -> Result<(), KernelError> {
        NftSocket::open()?.replace_table(table)?;
        Ok(())
    }

    fn remove_firewall(&self, name: &str) -> Result<(), KernelError> {
        let mut sock = NftSocket::open()?;
        if sock.table_exists(crate::dataplane::nft::Family::Ip, name)? {
            sock.delete_table(crate::dataplane::nft::Family::Ip, name)?;
        }
        Ok(())
    }

    fn firewall_intact(&self, table: &Table) -> Result<bool, KernelError> {
        let mut sock = NftSocket::open()?;
        if !sock.table_exists(table.family, &table.name)? {
            return Ok(false);
        }
        Ok(sock.rule_count(table.family, &table.name)? == table.rule_count())
    }

    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), KernelError> {
        Ok(write_sysctl(key, value)?)
    }

    fn underlay_mtu(&self, exclude: &str) -> Result<Option<u32>, KernelError> {
        let mut sock = host_socket()?;
        let links: Vec<LinkInfo> = sock
            .links()
            .ctx(|| "listing links".into())?
            .iter()
            .map(LinkInfo::from_message)
            .collect();
        let usable = |l: &&LinkInfo| {
            l.up && l.name != "lo" && l.name != exclude && !l.name.starts_with(HOST_IFNAME_PREFIX)
        };
        let routes = sock
            .routes(netlink_packet_route::AddressFamily::Inet)
            .ctx(|| "listing routes".into())?;
        if let Some(default) = routes.iter().find(|r| r.destination.prefix_len() == 0) {
            if let Some(l) = links.iter().filter(usable).find(|l| l.index == default.oif) {
                return Ok(Some(l.mtu));
            }
        }
        let with_addr: Vec<u32> = sock
            .addresses(None)
            .ctx(|| "listing addresses".into())?
            .iter()
            .filter(|(_, n)| !n.addr().is_loopback() && !is_link_local(n))
            .map(|(i, _)| *i)
            .collect();
        Ok(links
            .iter()
            .filter(usable)
            .filter(|l| with_addr.contains(&l.index))
            .map(|l| l.mtu)
            .min())
    }
}
