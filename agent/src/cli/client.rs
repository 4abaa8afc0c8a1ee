//! The client verbs: each opens the agent's socket, makes one call, and prints the answer
//! (a table for people, JSON with --json). Errors say what to do; their exit codes are
//! assigned once, in `main`.

use std::io::Write;
use std::path::Path;

use ipnet::IpNet;
use weft_api::v1;
use weft_api::{AgentClient, ConnectError};

use super::container::{self, ContainerError};
use super::{StatusView, render};
use crate::addr::AddrRequest;
use crate::docker::names::UnixDockerApi;
use crate::status::report::Report;

type Client = AgentClient<tonic::transport::Channel>;

/// Why a verb failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    AgentDown(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    /// The process exit code: 1 failure, 2 usage, 3 agent not running.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Failed(_) => 1,
            CliError::Usage(_) => 2,
            CliError::AgentDown(_) => 3,
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> CliError {
        CliError::Failed(s.message().to_owned())
    }
}

impl From<ContainerError> for CliError {
    fn from(e: ContainerError) -> CliError {
        match e {
            ContainerError::TwoContainers(_)
            | ContainerError::NotAnAddress { .. }
            | ContainerError::BadAddress(_) => CliError::Usage(e.to_string()),
            ContainerError::NoSuch(_) | ContainerError::NotRunning(_) | ContainerError::Api(_) => {
                CliError::Failed(e.to_string())
            }
        }
    }
}

fn io_err(e: std::io::Error) -> CliError {
    CliError::Failed(format!("writing output: {e}"))
}

pub async fn connect(socket: &Path) -> Result<Client, CliError> {
    weft_api::connect(socket).await.map_err(|e| match e {
        ConnectError::AgentDown { path, .. } => CliError::AgentDown(format!(
            "the weft agent is not running (nothing listens on {}); start it with `weft launch`",
            path.display()
        )),
        other => CliError::Failed(other.to_string()),
    })
}

fn to_wire(reqs: &[AddrRequest]) -> Vec<v1::AddressRequest> {
    use v1::address_request::Kind;
    reqs.iter()
        .map(|r| v1::AddressRequest {
            kind: Some(match r {
                AddrRequest::Default => Kind::DefaultSubnet(v1::Empty {}),
                AddrRequest::Subnet(n) => Kind::Subnet((*n).into()),
                AddrRequest::Static(n) => Kind::StaticAddress((*n).into()),
            }),
        })
        .collect()
}

fn nets(ns: &[v1::IpNetwork]) -> Vec<IpNet> {
    ns.iter().filter_map(|n| IpNet::try_from(n).ok()).collect()
}

fn print_json(v: &impl serde::Serialize) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v).map_err(|e| CliError::Failed(e.to_string()))?;
    writeln!(out).map_err(io_err)
}

fn print_lines(lines: impl IntoIterator<Item = String>) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    for l in lines {
        writeln!(out, "{l}").map_err(io_err)?;
    }
    Ok(())
}

pub async fn report(socket: &Path) -> Result<Report, CliError> {
    let mut c = connect(socket).await?;
    let reply = c.status(v1::StatusRequest {}).await?.into_inner();
    serde_json::from_slice(&reply.report_json)
        .map_err(|e| CliError::Failed(format!("the agent sent an unreadable report: {e}")))
}

pub async fn status(socket: &Path, what: Option<StatusView>, json: bool) -> Result<(), CliError> {
    let r = report(socket).await?;
    match (what, json) {
        (None, true) => print_json(&r),
        (None, false) => {
            let colour = super::table::colour_wanted();
            let mut lines = render::status(&r);
            lines.push(String::new());
            lines.extend(render::peer_table(&r, colour));
            print_lines(lines)
        }
        (Some(StatusView::Peers), true) => print_json(&r.mesh.peers),
        (Some(StatusView::Peers), false) => print_lines(render::peers(&r.mesh)),
        (Some(StatusView::Connections), true) => print_json(&r.mesh.connections),
        (Some(StatusView::Connections), false) => {
            print_lines(render::connections(&r.mesh, &r.overlay))
        }
        (Some(StatusView::Ipam), true) => print_json(&r.ipam),
        (Some(StatusView::Ipam), false) => print_lines(render::ipam(&r)),
        (Some(StatusView::Dns), true) => print_json(&r.dns),
        (Some(StatusView::Dns), false) => print_lines(render::dns(&r)),
        (Some(StatusView::Policy), true) => print_json(&r.policy),
        (Some(StatusView::Policy), false) => print_lines(render::policy(&r)),
        (Some(StatusView::Targets), true) => print_json(&r.mesh.targets),
        (Some(StatusView::Targets), false) => print_lines(render::targets(&r.mesh.targets)),
    }
}

pub async fn connect_peers(
    socket: &Path,
    peers: Vec<String>,
    replace: bool,
) -> Result<(), CliError> {
    let mut c = connect(socket).await?;
    c.connect(v1::ConnectRequest { peers, replace }).await?;
    Ok(())
}

pub async fn forget_peers(socket: &Path, peers: Vec<String>) -> Result<(), CliError> {
    let mut c = connect(socket).await?;
    c.forget(v1::ForgetRequest { peers }).await?;
    Ok(())
}

/// `weft rmpeer PEER`: takes over the address space of a peer that is gone for good.
pub async fn rmpeer(socket: &Path, peer: String) -> Result<(), CliError> {
    let mut c = connect(socket).await?;
    let reply = c.rm_peer(v1::RmPeerRequest { peer: peer.clone() }).await?.into_inner();
    print_lines([format!("{} addresses taken over from {peer}", reply.addresses_taken_over)])
}

/// `weft prime`: returns once the allocation ring exists.
pub async fn prime(socket: &Path, timeout: std::time::Duration) -> Result<(), CliError> {
    let mut c = connect(socket).await?;
    let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    c.prime(v1::PrimeRequest { timeout_ms }).await?;
    Ok(())
}

/// `weft ps [CONTAINER...]`.
pub async fn ps(
    socket: &Path,
    containers: &[String],
    docker_socket: &Path,
    json: bool,
) -> Result<(), CliError> {
    let mut wanted = Vec::new();
    if !containers.is_empty() {
        let api = UnixDockerApi::new(docker_socket);
        for c in containers {
            wanted.push(container::lookup(&api, c).await?);
        }
    }
    let mut c = connect(socket).await?;
    let list = c.list_endpoints(v1::ListEndpointsRequest {}).await?.into_inner().endpoints;
    let rows: Vec<render::EndpointRow> = list
        .iter()
        .map(|e| {
            let kind = v1::EndpointKind::try_from(e.kind).unwrap_or_default();
            let docker = kind == v1::EndpointKind::Docker;
            let by_name = e.id.starts_with(container::ATTACH_PREFIX);
            let row = render::EndpointRow {
                id: e.id.clone(),
                kind: match kind {
                    v1::EndpointKind::Cni => "cni",
                    v1::EndpointKind::Attach => "attach",
                    v1::EndpointKind::Expose => "expose",
                    v1::EndpointKind::Reservation => "reservation",
                    v1::EndpointKind::Docker => "docker",
                    v1::EndpointKind::Unspecified => "unknown",
                }
                .to_owned(),
                mac: e.mac.clone(),
                addresses: nets(&e.addresses),
                netns: e.netns.clone(),
                pod: e.pod.as_ref().map(|p| format!("{}/{}", p.namespace, p.name)),
                container: ((docker || by_name) && !e.hostname.is_empty())
                    .then(|| e.hostname.clone()),
            };
            (row, docker)
        })
        .filter(|(r, docker)| {
            wanted.is_empty()
                || wanted.iter().any(|c| {
                    container::belongs_to(&r.id, *docker, r.container.as_deref().unwrap_or(""), c)
                })
        })
        .map(|(r, _)| r)
        .collect();
    if json {
        print_json(&rows)
    } else {
        print_lines(render::ps(&rows, super::table::colour_wanted()))
    }
}

/// `weft attach [CONTAINER] [ADDR...] [--netns PATH]`.
#[derive(Debug)]
pub struct AttachArgs<'a> {
    pub operands: &'a [String],
    pub netns: Option<&'a Path>,
    pub ifname: &'a str,
    pub id: Option<&'a str>,
    pub name: Option<&'a str>,
    pub multicast_route: bool,
    pub json: bool,
    pub docker_socket: &'a Path,
}

pub async fn attach(socket: &Path, a: AttachArgs<'_>) -> Result<(), CliError> {
    let ops = container::split_operands(a.operands, a.netns.map(|_| "--netns"))?;
    let (netns, id, name) = match (a.netns, &ops.container) {
        (Some(p), _) => (p.to_owned(), a.id.map(str::to_owned), a.name.map(str::to_owned)),
        (None, Some(given)) => {
            let api = UnixDockerApi::new(a.docker_socket);
            let found = container::attachment(given, &container::lookup(&api, given).await?)?;
            (
                found.netns,
                Some(a.id.map_or(found.id, str::to_owned)),
                Some(a.name.map_or(found.name, str::to_owned)),
            )
        }
        (None, None) => {
            return Err(CliError::Usage("give a container (name or id) or --netns PATH".into()));
        }
    };
    let netns = std::path::absolute(netns).map_err(|e| CliError::Usage(format!("--netns: {e}")))?;
    let mut c = connect(socket).await?;
    let reply = c
        .attach(v1::AttachRequest {
            netns: netns.display().to_string(),
            id: id.unwrap_or_default(),
            ifname: a.ifname.to_owned(),
            addresses: to_wire(&ops.addrs),
            hostname: name.unwrap_or_default(),
            multicast_route: a.multicast_route,
        })
        .await?
        .into_inner();
    let ep = reply.endpoint.unwrap_or_default();
    let addrs = nets(&ep.addresses);
    if a.json {
        print_json(&addrs)
    } else {
        print_lines([addrs.iter().map(IpNet::to_string).collect::<Vec<_>>().join(" ")])
    }
}

/// `weft detach [CONTAINER] [ADDR...] [--netns PATH | --id ID]`.
pub async fn detach_verb(
    socket: &Path,
    operands: &[String],
    netns: Option<&Path>,
    id: Option<String>,
    docker_socket: &Path,
) -> Result<(), CliError> {
    let flag = match (&netns, &id) {
        (Some(_), _) => Some("--netns"),
        (None, Some(_)) => Some("--id"),
        (None, None) => None,
    };
    let ops = container::split_operands(operands, flag)?;
    let id = match (id, netns, ops.container) {
        (Some(id), _, _) => id,
        (None, Some(p), _) => std::path::absolute(p)
            .map_err(|e| CliError::Usage(format!("--netns: {e}")))?
            .display()
            .to_string(),
        (None, None, Some(given)) => {
            let api = UnixDockerApi::new(docker_socket);
            container::endpoint_id(&container::lookup(&api, &given).await?.id)
        }
        (None, None, None) => {
            return Err(CliError::Usage(
                "give a container (name or id), --netns PATH or --id ID".into(),
            ));
        }
    };
    detach(socket, id, &ops.addrs).await
}

pub async fn detach(socket: &Path, id: String, addrs: &[AddrRequest]) -> Result<(), CliError> {
    let mut c = connect(socket).await?;
    let reply = c
        .detach(v1::DetachRequest { id: id.clone(), addresses: to_wire(addrs) })
        .await?
        .into_inner();
    if !reply.found {
        return Err(CliError::Failed(format!("nothing is attached as {id}")));
    }
    print_lines(nets(&reply.removed).iter().map(IpNet::to_string))
}

pub async fn expose(
    socket: &Path,
    addrs: &[AddrRequest],
    hostname: Option<String>,
    json: bool,
) -> Result<(), CliError> {
    let mut c = connect(socket).await?;
    let reply = c
        .expose(v1::ExposeRequest {
            addresses: to_wire(addrs),
            hostname: hostname.unwrap_or_default(),
            skip_masquerade: false,
        })
        .await?
        .into_inner();
    let exposed = nets(&reply.addresses);
    if json { print_json(&exposed) } else { print_lines(exposed.iter().map(IpNet::to_string)) }
}

pub async fn hide(socket: &Path, addrs: &[AddrRequest]) -> Result<(), CliError> {
    let mut c = connect(socket).await?;
    let reply = c.hide(v1::HideRequest { addresses: to_wire(addrs) }).await?.into_inner();
    print_lines(nets(&reply.removed).iter().map(IpNet::to_string))
}

pub async fn version(socket: &Path, json: bool) -> Result<(), CliError> {
    let agent = match connect(socket).await {
        Ok(mut c) => c.hello(v1::HelloRequest {}).await.ok().map(|r| r.into_inner()),
        Err(_) => None,
    };
    let ours = env!("CARGO_PKG_VERSION");
    if json {
        let v = serde_json::json!({
            "cli": ours,
            "api_revision": weft_api::API_REVISION,
            "agent": agent.as_ref().map(|a| a.agent_version.clone()),
        });
        return print_json(&v);
    }
    let mut lines = vec![format!("weft {ours} (local API revision {})", weft_api::API_REVISION)];
    lines.push(match agent {
        Some(a) => format!("agent {} (pid {}, peer {})", a.agent_version, a.pid, a.peer_name),
        None => "agent not running".to_owned(),
    });
    print_lines(lines)
}

/// The operands of dns-add / dns-remove: addresses, and at most one endpoint (id or
/// namespace path).
fn dns_targets(targets: &[String]) -> Result<(Vec<v1::IpAddress>, String), CliError> {
    let mut addrs = Vec::new();
    let mut endpoint = None;
    for t in targets {
        match t.parse::<std::net::IpAddr>() {
            Ok(a) => addrs.push(a.into()),
            Err(_) if endpoint.is_none() => endpoint = Some(t.clone()),
            Err(_) => {
                return Err(CliError::Usage(format!(
                    "{t:?} is neither an IP address nor the only endpoint (already have {:?})",
                    endpoint.unwrap_or_default()
                )));
            }
        }
    }
    Ok((addrs, endpoint.unwrap_or_default()))
}

/// `weft dns-add [IP...] [ENDPOINT] -h NAME`.
pub async fn dns_add(socket: &Path, targets: &[String], name: String) -> Result<(), CliError> {
    let (addresses, endpoint_id) = dns_targets(targets)?;
    if addresses.is_empty() && endpoint_id.is_empty() {
        return Err(CliError::Usage("give the addresses and/or the endpoint to name".into()));
    }
    let mut c = connect(socket).await?;
    let reply = c.dns_add(v1::DnsAddRequest { name, addresses, endpoint_id }).await?.into_inner();
    print_lines(reply.records.iter().map(|r| {
        let addr = r.address.as_ref().and_then(|a| std::net::IpAddr::try_from(a).ok());
        format!("{} {}", r.name, addr.map(|a| a.to_string()).unwrap_or_default())
    }))
}

/// `weft dns-remove [IP...] [ENDPOINT] [-h NAME]`.
pub async fn dns_remove(
    socket: &Path,
    targets: &[String],
    name: Option<String>,
) -> Result<(), CliError> {
    let (addresses, endpoint_id) = dns_targets(targets)?;
    let name = name.unwrap_or_default();
    if addresses.is_empty() && endpoint_id.is_empty() && name.is_empty() {
        return Err(CliError::Usage("give a name (-h), addresses or an endpoint".into()));
    }
    let mut c = connect(socket).await?;
    let reply =
        c.dns_remove(v1::DnsRemoveRequest { name, addresses, endpoint_id }).await?.into_inner();
    print_lines([format!("{} records removed", reply.removed)])
}

/// `weft dns-lookup NAME`: the addresses weft DNS has for a name, one per line.
pub async fn dns_lookup(socket: &Path, name: String, json: bool) -> Result<(), CliError> {
    let mut c = connect(socket).await?;
    let reply = c.dns_lookup(v1::DnsLookupRequest { name: name.clone() }).await?.into_inner();
    let addrs: Vec<std::net::IpAddr> =
        reply.addresses.iter().filter_map(|a| std::net::IpAddr::try_from(a).ok()).collect();
    if json {
        return print_json(&addrs);
    }
    if addrs.is_empty() {
        return Err(CliError::Failed(format!("{name}: no such name in weft DNS")));
    }
    print_lines(addrs.iter().map(ToString::to_string))
}
