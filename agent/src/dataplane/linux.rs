//! [`Dataplane`] on Linux, through the `rtnetlink` crate and nftables netlink. Host-side
//! operations use a connection opened in the agent's namespace; pod-side operations use one
//! opened inside the pod's namespace by [`Rtnl::netns`]. Each blocking method runs its whole
//! operation on its own rtnetlink thread through [`block_on`].

use ipnet::IpNet;
use netlink_packet_route::link::{
    InfoBridge, InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth,
    LinkAttribute, LinkInfo as NlLinkInfo, LinkMessage,
};
use std::os::fd::AsRawFd;

use super::coexist::{self, Coexistence, DOCKER_USER, DockerUser, FILTER, ForwardAccept};
use super::netlink::{LinkInfo, Route, Rtnl, block_on, family_of};
use super::netns::{Netns, write_sysctl};
use super::nft::{Family, NftSocket, Table};
use super::{
    BridgeReport, BridgeSpec, Dataplane, EndpointSpec, EndpointState, HOST_IFNAME_PREFIX,
    KernelError, Mac, NlContext, RouteSpec,
};

/// The Linux implementation. Stateless: every call opens the connections it needs, so calls
/// from different threads never contend for one socket.
#[derive(Debug, Default)]
pub struct LinuxDataplane;

fn host_socket() -> Result<Rtnl, KernelError> {
    Ok(Rtnl::host()?)
}

fn is_link_local(net: &IpNet) -> bool {
    match net {
        IpNet::V4(n) => n.addr().is_link_local(),
        IpNet::V6(n) => (n.addr().segments()[0] & 0xffc0) == 0xfe80,
    }
}

impl LinuxDataplane {
    async fn create_bridge(sock: &Rtnl, spec: &BridgeSpec) -> Result<(), KernelError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(spec.name.clone()));
        msg.attributes.push(LinkAttribute::Address(spec.mac.0.to_vec()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            NlLinkInfo::Kind(InfoKind::Bridge),
            // Multicast floods like broadcast: with snooping, a group with a local member
            // would stop reaching members behind the overlay ports (no IGMP querier there).
            NlLinkInfo::Data(InfoData::Bridge(vec![InfoBridge::MulticastSnooping(false)])),
        ]));
        match sock.add_link(msg).await {
            Err(e) if e.is(libc::EEXIST) => Ok(()),
            other => other.ctx(|| format!("creating bridge {}", spec.name)),
        }
    }

    async fn create_veth(
        sock: &Rtnl,
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
        match sock.add_link(msg).await {
            // The host name was free (checked by the caller), so the clash is inside the pod.
            Err(e) if e.is(libc::EEXIST) => Err(KernelError::InterfaceExists(spec.ifname.clone())),
            other => other.ctx(|| format!("creating veth {}", spec.host_ifname)),
        }
    }

    async fn set_hairpin(sock: &Rtnl, index: u32, on: bool) -> Result<(), KernelError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            NlLinkInfo::PortKind(InfoPortKind::Bridge),
            NlLinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(on)])),
        ]));
        sock.modify_link(msg).await.ctx(|| "setting hairpin mode".into())
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

    async fn ensure_bridge(spec: BridgeSpec) -> Result<BridgeReport, KernelError> {
        let spec = &spec;
        let sock = host_socket()?;
        let mut repairs = Vec::new();
        let mut link =
            sock.link_by_name(&spec.name).await.ctx(|| format!("looking up {}", spec.name))?;
        if link.is_none() {
            Self::create_bridge(&sock, spec).await?;
            repairs.push("created".to_owned());
            link =
                sock.link_by_name(&spec.name).await.ctx(|| format!("looking up {}", spec.name))?;
        }
        let info =
            LinkInfo::from_message(&link.ok_or_else(|| KernelError::NoBridge(spec.name.clone()))?);
        if info.mac != spec.mac.0 {
            let mut msg = LinkMessage::default();
            msg.header.index = info.index;
            msg.attributes.push(LinkAttribute::Address(spec.mac.0.to_vec()));
            sock.set_link(msg).await.ctx(|| "setting the bridge MAC".into())?;
            repairs.push(format!("mac -> {}", spec.mac));
        }
        if info.mtu != spec.mtu || !info.up {
            sock.set_up(info.index, Some(spec.mtu), None)
                .await
                .ctx(|| "setting the bridge up".into())?;
            if info.mtu != spec.mtu {
                repairs.push(format!("mtu {} -> {}", info.mtu, spec.mtu));
            }
            if !info.up {
                repairs.push("set up".to_owned());
            }
        }
        let present: Vec<IpNet> = sock
            .addresses(Some(info.index))
            .await
            .ctx(|| "listing bridge addresses".into())?
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        for net in &spec.addresses {
            if !present.contains(net) {
                sock.add_address(info.index, *net)
                    .await
                    .ctx(|| format!("adding {net} to the bridge"))?;
                repairs.push(format!("address {net} added"));
            }
        }
        for net in present.iter().filter(|n| !spec.addresses.contains(n) && !is_link_local(n)) {
            sock.del_address(info.index, *net)
                .await
                .ctx(|| format!("removing {net} from the bridge"))?;
            repairs.push(format!("address {net} removed"));
        }
        Ok(BridgeReport { index: info.index, repairs })
    }

    async fn setup_endpoint(spec: EndpointSpec) -> Result<EndpointState, KernelError> {
        let spec = &spec;
        let netns = Netns::open(&spec.netns)?;
        let host = host_socket()?;
        let pod = Rtnl::netns(&netns)?;
        let bridge = host
            .link_by_name(&spec.bridge)
            .await
            .ctx(|| "looking up the bridge".into())?
            .ok_or_else(|| KernelError::NoBridge(spec.bridge.clone()))?;
        let bridge_index = bridge.header.index;
        let existing =
            host.link_by_name(&spec.host_ifname).await.ctx(|| "looking up the veth".into())?;
        let pod_link =
            pod.link_by_name(&spec.ifname).await.ctx(|| "looking up the pod interface".into())?;
        match (&existing, &pod_link) {
            (Some(_), Some(_)) => {}
            (Some(stale), None) => {
                // Our host end survived, its peer did not: start over.
                host.del_link(stale.header.index).await.ctx(|| "removing a stale veth".into())?;
                Self::create_veth(&host, spec, &netns).await?;
            }
            (None, Some(_)) => return Err(KernelError::InterfaceExists(spec.ifname.clone())),
            (None, None) => Self::create_veth(&host, spec, &netns).await?,
        }
        let host_link = LinkInfo::from_message(
            &host
                .link_by_name(&spec.host_ifname)
                .await
                .ctx(|| "looking up the veth".into())?
                .ok_or_else(|| KernelError::Mismatch(format!("{} vanished", spec.host_ifname)))?,
        );
        // Set after creation: the kernel takes IFLA_IFALIAS only when changing a link.
        if host_link.alias.as_deref() != Some(spec.owner.as_str()) {
            host.set_alias(host_link.index, &spec.owner)
                .await
                .ctx(|| format!("labelling {} with its endpoint", spec.host_ifname))?;
        }
        host.set_up(host_link.index, Some(spec.mtu), Some(bridge_index))
            .await
            .ctx(|| format!("attaching {} to {}", spec.host_ifname, spec.bridge))?;
        Self::set_hairpin(&host, host_link.index, spec.hairpin).await?;

        let pod_link = LinkInfo::from_message(
            &pod.link_by_name(&spec.ifname)
                .await
                .ctx(|| "looking up the pod interface".into())?
                .ok_or_else(|| KernelError::Mismatch(format!("{} vanished", spec.ifname)))?,
        );
        if let Some(lo) = pod.link_by_name("lo").await.ctx(|| "looking up lo".into())? {
            pod.set_up(lo.header.index, None, None).await.ctx(|| "setting lo up".into())?;
        }
        pod.set_up(pod_link.index, Some(spec.mtu), None)
            .await
            .ctx(|| format!("setting {} up", spec.ifname))?;
        for net in &spec.addresses {
            pod.add_address(pod_link.index, *net)
                .await
                .ctx(|| format!("adding {net} to {}", spec.ifname))?;
        }
        for route in Self::routes_with_onlink_gateways(spec, pod_link.index) {
            pod.replace_route(&route)
                .await
                .ctx(|| format!("adding route {}", route.destination))?;
        }
        Ok(EndpointState { host_mac: Mac(host_link.mac), container_mac: Mac(pod_link.mac) })
    }

    async fn remove_addresses(
        spec: EndpointSpec,
        addresses: Vec<IpNet>,
    ) -> Result<(), KernelError> {
        let netns = Netns::open(&spec.netns)?;
        let pod = Rtnl::netns(&netns)?;
        let Some(link) =
            pod.link_by_name(&spec.ifname).await.ctx(|| "looking up the pod interface".into())?
        else {
            return Ok(());
        };
        for net in &addresses {
            pod.del_address(link.header.index, *net).await.ctx(|| format!("removing {net}"))?;
        }
        Ok(())
    }

    async fn handover_endpoint(
        spec: EndpointSpec,
        peer: String,
    ) -> Result<EndpointState, KernelError> {
        let host = host_socket()?;
        let bridge = host
            .link_by_name(&spec.bridge)
            .await
            .ctx(|| "looking up the bridge".into())?
            .ok_or_else(|| KernelError::NoBridge(spec.bridge.clone()))?;
        // Either end may be left from an earlier try whose peer went into another sandbox.
        for name in [&spec.host_ifname, &peer] {
            if let Some(old) = host.link_by_name(name).await.ctx(|| "looking up the veth".into())? {
                host.del_link(old.header.index).await.ctx(|| format!("removing stale {name}"))?;
            }
        }
        let mut p = LinkMessage::default();
        p.attributes.push(LinkAttribute::IfName(peer.clone()));
        p.attributes.push(LinkAttribute::Mtu(spec.mtu));
        if let Some(mac) = spec.mac {
            p.attributes.push(LinkAttribute::Address(mac.0.to_vec()));
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(spec.host_ifname.clone()));
        msg.attributes.push(LinkAttribute::Mtu(spec.mtu));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            NlLinkInfo::Kind(InfoKind::Veth),
            NlLinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
        ]));
        host.add_link(msg).await.ctx(|| format!("creating veth {}", spec.host_ifname))?;
        let link = |name: String| {
            let host = &host;
            async move {
                host.link_by_name(&name)
                    .await
                    .ctx(|| "looking up the veth".into())?
                    .map(|m| LinkInfo::from_message(&m))
                    .ok_or_else(|| KernelError::Mismatch(format!("{name} vanished")))
            }
        };
        let host_link = link(spec.host_ifname.clone()).await?;
        host.set_alias(host_link.index, &spec.owner)
            .await
            .ctx(|| format!("labelling {} with its endpoint", spec.host_ifname))?;
        host.set_up(host_link.index, Some(spec.mtu), Some(bridge.header.index))
            .await
            .ctx(|| format!("attaching {} to {}", spec.host_ifname, spec.bridge))?;
        Self::set_hairpin(&host, host_link.index, spec.hairpin).await?;
        let peer_link = link(peer).await?;
        Ok(EndpointState { host_mac: Mac(host_link.mac), container_mac: Mac(peer_link.mac) })
    }

    async fn teardown_endpoint(host_ifname: String) -> Result<(), KernelError> {
        let host_ifname = host_ifname.as_str();
        let host = host_socket()?;
        if let Some(link) =
            host.link_by_name(host_ifname).await.ctx(|| "looking up the veth".into())?
        {
            host.del_link(link.header.index).await.ctx(|| format!("deleting {host_ifname}"))?;
        }
        Ok(())
    }

    async fn teardown_endpoint_of(host_ifname: String, owner: String) -> Result<bool, KernelError> {
        let host = host_socket()?;
        let Some(link) =
            host.link_by_name(&host_ifname).await.ctx(|| "looking up the veth".into())?
        else {
            return Ok(false);
        };
        if LinkInfo::from_message(&link).alias.as_deref() != Some(owner.as_str()) {
            return Ok(false);
        }
        host.del_link(link.header.index).await.ctx(|| format!("deleting {host_ifname}"))?;
        Ok(true)
    }

    async fn check_endpoint(spec: EndpointSpec) -> Result<(), KernelError> {
        let spec = &spec;
        let mismatch = |m: String| Err(KernelError::Mismatch(m));
        let host = host_socket()?;
        let Some(host_link) =
            host.link_by_name(&spec.host_ifname).await.ctx(|| "looking up the veth".into())?
        else {
            return mismatch(format!("host interface {} is missing", spec.host_ifname));
        };
        let host_link = LinkInfo::from_message(&host_link);
        let bridge =
            host.link_by_name(&spec.bridge).await.ctx(|| "looking up the bridge".into())?;
        if bridge.map(|b| b.header.index) != host_link.controller || host_link.controller.is_none()
        {
            return mismatch(format!(
                "{} is not attached to bridge {}",
                spec.host_ifname, spec.bridge
            ));
        }
        let netns = Netns::open(&spec.netns)?;
        let pod = Rtnl::netns(&netns)?;
        let Some(link) =
            pod.link_by_name(&spec.ifname).await.ctx(|| "looking up the pod interface".into())?
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
            .await
            .ctx(|| "listing addresses".into())?
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        if let Some(missing) = spec.addresses.iter().find(|a| !present.contains(a)) {
            return mismatch(format!("address {missing} is missing on {}", spec.ifname));
        }
        for RouteSpec { destination, gateway } in &spec.routes {
            let routes =
                pod.routes(family_of(destination.addr())).await.ctx(|| "listing routes".into())?;
            let found =
                routes.iter().any(|r| r.destination == *destination && r.gateway == *gateway);
            if !found {
                return mismatch(format!("route {destination} is missing on {}", spec.ifname));
            }
        }
        Ok(())
    }

    async fn endpoint_links(bridge: String) -> Result<Vec<String>, KernelError> {
        let bridge = bridge.as_str();
        let host = host_socket()?;
        let Some(br) = host.link_by_name(bridge).await.ctx(|| "looking up the bridge".into())?
        else {
            return Ok(Vec::new());
        };
        let links = host.links().await.ctx(|| "listing links".into())?;
        Ok(links
            .iter()
            .map(LinkInfo::from_message)
            .filter(|l| {
                l.name.starts_with(HOST_IFNAME_PREFIX) && l.controller == Some(br.header.index)
            })
            .map(|l| l.name)
            .collect())
    }

    async fn underlay_mtu(exclude: String) -> Result<Option<u32>, KernelError> {
        let exclude = exclude.as_str();
        let sock = host_socket()?;
        let links: Vec<LinkInfo> = sock
            .links()
            .await
            .ctx(|| "listing links".into())?
            .iter()
            .map(LinkInfo::from_message)
            .collect();
        let usable = |l: &&LinkInfo| {
            l.up && l.name != "lo" && l.name != exclude && !l.name.starts_with(HOST_IFNAME_PREFIX)
        };
        let routes = sock
            .routes(netlink_packet_route::AddressFamily::Inet)
            .await
            .ctx(|| "listing routes".into())?;
        if let Some(default) = routes.iter().find(|r| r.destination.prefix_len() == 0) {
            if let Some(l) = links.iter().filter(usable).find(|l| l.index == default.oif) {
                return Ok(Some(l.mtu));
            }
        }
        let with_addr: Vec<u32> = sock
            .addresses(None)
            .await
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

impl Dataplane for LinuxDataplane {
    fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<BridgeReport, KernelError> {
        block_on(Self::ensure_bridge(spec.clone()))
    }

    fn setup_endpoint(&self, spec: &EndpointSpec) -> Result<EndpointState, KernelError> {
        block_on(Self::setup_endpoint(spec.clone()))
    }

    fn handover_endpoint(
        &self,
        spec: &EndpointSpec,
        peer: &str,
    ) -> Result<EndpointState, KernelError> {
        block_on(Self::handover_endpoint(spec.clone(), peer.to_owned()))
    }

    fn remove_addresses(
        &self,
        spec: &EndpointSpec,
        addresses: &[IpNet],
    ) -> Result<(), KernelError> {
        block_on(Self::remove_addresses(spec.clone(), addresses.to_vec()))
    }

    fn teardown_endpoint_of(&self, host_ifname: &str, owner: &str) -> Result<bool, KernelError> {
        block_on(Self::teardown_endpoint_of(host_ifname.to_owned(), owner.to_owned()))
    }

    fn teardown_endpoint(&self, host_ifname: &str) -> Result<(), KernelError> {
        block_on(Self::teardown_endpoint(host_ifname.to_owned()))
    }

    fn check_endpoint(&self, spec: &EndpointSpec) -> Result<(), KernelError> {
        block_on(Self::check_endpoint(spec.clone()))
    }

    fn endpoint_links(&self, bridge: &str) -> Result<Vec<String>, KernelError> {
        block_on(Self::endpoint_links(bridge.to_owned()))
    }

    fn apply_firewall(&self, table: &Table) -> Result<(), KernelError> {
        NftSocket::open()?.replace_table(table)?;
        Ok(())
    }

    fn remove_firewall(&self, name: &str) -> Result<(), KernelError> {
        let mut sock = NftSocket::open()?;
        // weft's table moved from family `ip` to `inet`: remove whichever is there, so a reset
        // also clears a table left by an older agent.
        for family in [Family::Ip, Family::Inet] {
            if sock.table_exists(family, name)? {
                sock.delete_table(family, name)?;
            }
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

    fn sync_forward_accept(
        &self,
        want: &ForwardAccept,
        rewrite: bool,
    ) -> Result<Coexistence, KernelError> {
        let mut sock = NftSocket::open()?;
        let docker_user = if sock.chain_exists(Family::Ip, FILTER, DOCKER_USER)? {
            let listed = sock.list_rules(Family::Ip, FILTER, DOCKER_USER)?;
            let rules = want.rules();
            let tag = coexist::tag(&want.bridge);
            let plan = if rewrite {
                Some(coexist::stale(&listed, &tag, 0).unwrap_or_default())
            } else {
                coexist::stale(&listed, &tag, rules.len())
            };
            match plan {
                None => DockerUser::Intact,
                Some(delete) => {
                    sock.replace_at_head(Family::Ip, FILTER, DOCKER_USER, &delete, &rules)?;
                    DockerUser::Written
                }
            }
        } else {
            DockerUser::Absent
        };
        let legacy_forward = coexist::legacy_forward_policy()?;
        Ok(Coexistence { docker_user, legacy_forward })
    }

    fn remove_forward_accept(&self, bridge: &str) -> Result<usize, KernelError> {
        let mut sock = NftSocket::open()?;
        if !sock.chain_exists(Family::Ip, FILTER, DOCKER_USER)? {
            return Ok(0);
        }
        let listed = sock.list_rules(Family::Ip, FILTER, DOCKER_USER)?;
        let ours = coexist::stale(&listed, &coexist::tag(bridge), 0).unwrap_or_default();
        sock.replace_at_head(Family::Ip, FILTER, DOCKER_USER, &ours, &[])?;
        Ok(ours.len())
    }

    fn set_sysctl(&self, key: &str, value: &str) -> Result<(), KernelError> {
        Ok(write_sysctl(key, value)?)
    }

    fn load_module(&self, name: &str) -> Result<(), KernelError> {
        Ok(super::module::load(name)?)
    }

    fn underlay_mtu(&self, exclude: &str) -> Result<Option<u32>, KernelError> {
        block_on(Self::underlay_mtu(exclude.to_owned()))
    }
}
