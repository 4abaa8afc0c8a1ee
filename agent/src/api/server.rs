//! The local gRPC API on the agent's unix socket. This is the edge where wire messages are
//! parsed into weft's types and [`EndpointError`]s become gRPC statuses with an error reason.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use tracing::{debug, error};
use weft_api::v1::{self, agent_server::AgentServer};

use crate::addr::AddrRequest;
use crate::dns::DnsError;
use crate::endpoints::error::EndpointError;
use crate::endpoints::record::{EndpointRecord, Kind, PodRef};
use crate::endpoints::state::{AttachReserve, CniReserve};
use crate::endpoints::{CniAdd, CniAdded, Readiness};
use crate::netpol::{GateError, PolicyHandle};
use crate::policy::model::PodKey;
use crate::services::Services;
use crate::status::report::collect;

/// How long a leaving agent waits for the heir of its address space to confirm.
const LEAVE_WAIT: Duration = Duration::from_secs(10);
/// How long CNI ADD waits for NetworkPolicy to account for the new pod (k8s-wave §2.2): what
/// is left of the plugin's wait (`ready_timeout_seconds`), within these bounds.
const POLICY_WAIT: Duration = Duration::from_secs(10);
const POLICY_WAIT_MIN: Duration = Duration::from_secs(2);

/// Serves the API until the agent shuts down.
pub async fn serve(svc: Arc<Services>, listener: UnixListener) {
    let shutdown = svc.hub.shutdown.clone();
    let svc = AgentServer::new(Service { svc }).max_decoding_message_size(4 << 20);
    let result = tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown.cancelled())
        .await;
    if let Err(e) = result {
        error!(error = %e, "local API server failed");
        shutdown.cancel();
    }
}

#[derive(Debug)]
struct Service {
    svc: Arc<Services>,
}

fn bad(field: &'static str, e: impl std::fmt::Display) -> EndpointError {
    EndpointError::invalid(field, e.to_string())
}

fn parse_request(r: &v1::AddressRequest) -> Result<AddrRequest, EndpointError> {
    use v1::address_request::Kind as K;
    match &r.kind {
        None | Some(K::DefaultSubnet(_)) => Ok(AddrRequest::Default),
        Some(K::Subnet(n)) => {
            Ok(AddrRequest::Subnet(IpNet::try_from(n).map_err(|e| bad("addresses", e))?))
        }
        Some(K::StaticAddress(n)) => {
            // Prefix 0 means "the prefix of its subnet"; IpNet allows /0 so the conversion works.
            Ok(AddrRequest::Static(IpNet::try_from(n).map_err(|e| bad("addresses", e))?))
        }
    }
}

fn parse_requests(rs: &[v1::AddressRequest]) -> Result<Vec<AddrRequest>, EndpointError> {
    rs.iter().map(parse_request).collect()
}

fn path(field: &'static str, s: &str) -> Result<PathBuf, EndpointError> {
    if s.is_empty() {
        return Err(bad(field, "is empty"));
    }
    let p = PathBuf::from(s);
    if !p.is_absolute() {
        return Err(bad(field, format!("{s} is not an absolute path")));
    }
    Ok(p)
}

fn endpoint_to_wire(r: &EndpointRecord) -> v1::Endpoint {
    v1::Endpoint {
        id: r.id.clone(),
        kind: match r.kind {
            Kind::Cni => v1::EndpointKind::Cni,
            Kind::Attach => v1::EndpointKind::Attach,
            Kind::Expose => v1::EndpointKind::Expose,
            Kind::Reservation => v1::EndpointKind::Reservation,
            Kind::Docker => v1::EndpointKind::Docker,
        } as i32,
        netns: r.netns.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        ifname: r.ifname.clone(),
        host_ifname: r.host_ifname.clone(),
        mac: r.mac.map(|m| m.to_string()).unwrap_or_default(),
        addresses: r.addresses.iter().map(|a| (*a).into()).collect(),
        network: r.network.clone().unwrap_or_default(),
        pod: r.pod.as_ref().map(|p| v1::PodRef {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            uid: p.uid.clone(),
        }),
        hostname: r.hostname.clone().unwrap_or_default(),
    }
}

fn add_reply(a: &CniAdded) -> v1::CniAddReply {
    let rec = &a.record;
    let gateway_for = |net: &IpNet| -> Option<IpAddr> {
        rec.routes.iter().filter_map(|r| r.gateway).find(|gw| gw.is_ipv4() == net.addr().is_ipv4())
    };
    v1::CniAddReply {
        host_ifname: rec.host_ifname.clone(),
        host_mac: a.kernel.host_mac.to_string(),
        container_ifname: rec.ifname.clone(),
        container_mac: a.kernel.container_mac.to_string(),
        mtu: rec.mtu,
        ips: rec
            .addresses
            .iter()
            .map(|n| v1::IpConfig {
                address: Some((*n).into()),
                gateway: gateway_for(n).map(Into::into),
            })
            .collect(),
        routes: rec
            .routes
            .iter()
            .map(|r| v1::Route {
                destination: Some(r.destination.into()),
                gateway: r.gateway.map(Into::into),
            })
            .collect(),
    }
}

fn parse_addrs(addrs: &[v1::IpAddress]) -> Result<Vec<IpAddr>, EndpointError> {
    addrs.iter().map(|a| IpAddr::try_from(a).map_err(|e| bad("addresses", e))).collect()
}

impl Service {
    /// The DNS service, unless the agent runs with --no-dns.
    fn dns(&self) -> Result<&crate::dns::Dns, DnsError> {
        self.svc.dns.as_ref().ok_or(DnsError::Disabled)
    }

    /// Times a CNI command and counts its result.
    async fn timed<T>(
        &self,
        command: &str,
        f: impl Future<Output = Result<T, EndpointError>>,
    ) -> Result<T, Status> {
        let start = Instant::now();
        let r = f.await;
        self.svc.hub.metrics.observe_cni(command, r.is_ok(), start.elapsed().as_secs_f64());
        if let Err(e) = &r {
            debug!(command, error = %e, "CNI command failed");
        }
        r.map_err(Status::from)
    }
}

impl Service {
    async fn policy_in_place(
        &self,
        rec: &EndpointRecord,
        wait: Duration,
    ) -> Result<(), EndpointError> {
        policy_in_place(self.svc.policy.as_ref(), rec, wait.clamp(POLICY_WAIT_MIN, POLICY_WAIT))
            .await
    }
}

/// With NetworkPolicy on, a pod starts only once the kernel enforces the policies that concern
/// it: otherwise its first packets would pass unfiltered, and packets from it would be dropped
/// by policies that allow it but do not list its address yet. Not in place within `wait`: a
/// retryable error (the runtime tries the ADD again) saying what to check.
async fn policy_in_place(
    gate: Option<&PolicyHandle>,
    rec: &EndpointRecord,
    wait: Duration,
) -> Result<(), EndpointError> {
    let (Some(gate), Some(pod)) = (gate, &rec.pod) else { return Ok(()) };
    if pod.namespace.is_empty() || pod.name.is_empty() {
        return Ok(());
    }
    let key = PodKey::new(&pod.namespace, &pod.name);
    let deadline = Instant::now() + wait;
    for ip in rec.addresses.iter().map(IpNet::addr) {
        let left = deadline.saturating_duration_since(Instant::now());
        gate.wait_programmed(&key, ip, left).await.map_err(|e| match e {
            GateError::Stopped => EndpointError::Stopped,
            e @ GateError::Timeout { .. } => EndpointError::NotReady(e.to_string()),
        })?;
    }
    Ok(())
}

#[tonic::async_trait]
impl v1::agent_server::Agent for Service {
    async fn hello(
        &self,
        _: Request<v1::HelloRequest>,
    ) -> Result<Response<v1::HelloReply>, Status> {
        let r = self.svc.ready.borrow().clone();
        Ok(Response::new(v1::HelloReply {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            api_revision: weft_api::API_REVISION,
            ready: r.ready,
            not_ready_reason: r.reason,
            peer_name: self.svc.hub.identity.name.to_string(),
            nickname: self.svc.hub.identity.nickname.clone(),
            pid: std::process::id(),
        }))
    }

    async fn cni_add(
        &self,
        req: Request<v1::CniAddRequest>,
    ) -> Result<Response<v1::CniAddReply>, Status> {
        let req = req.into_inner();
        let work = async {
            let options = req.options.unwrap_or_default();
            let reserve = CniReserve {
                container_id: req.container_id.clone(),
                ifname: req.ifname.clone(),
                netns: path("netns", &req.netns)?,
                network: req.network.clone(),
                mtu: (options.mtu > 0).then_some(options.mtu),
                hairpin: options.hairpin,
                pod: req.pod.map(|p| PodRef { namespace: p.namespace, name: p.name, uid: p.uid }),
                requests: parse_requests(&req.addresses)?,
            };
            if reserve.container_id.is_empty() {
                return Err(bad("container_id", "is empty"));
            }
            let wait_ready = Duration::from_millis(u64::from(req.wait_ready_ms));
            let started = Instant::now();
            let added = self.svc.hub.endpoints.cni_add(CniAdd { reserve, wait_ready }).await?;
            self.policy_in_place(&added.record, wait_ready.saturating_sub(started.elapsed()))
                .await?;
            Ok(added)
        };
        let added = self.timed("ADD", work).await?;
        Ok(Response::new(add_reply(&added)))
    }

    async fn cni_del(
        &self,
        req: Request<v1::CniDelRequest>,
    ) -> Result<Response<v1::CniDelReply>, Status> {
        let req = req.into_inner();
        let found = self
            .timed("DEL", self.svc.hub.endpoints.cni_del(&req.container_id, &req.ifname))
            .await?;
        Ok(Response::new(v1::CniDelReply { found }))
    }

    async fn cni_check(
        &self,
        req: Request<v1::CniCheckRequest>,
    ) -> Result<Response<v1::CniCheckReply>, Status> {
        let req = req.into_inner();
        let work = async {
            let netns = path("netns", &req.netns)?;
            let expected = req
                .expected
                .iter()
                .map(IpNet::try_from)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("expected", e))?;
            self.svc.hub.endpoints.cni_check(&req.container_id, &req.ifname, &netns, expected).await
        };
        self.timed("CHECK", work).await?;
        Ok(Response::new(v1::CniCheckReply {}))
    }

    async fn cni_status(
        &self,
        _: Request<v1::CniStatusRequest>,
    ) -> Result<Response<v1::CniStatusReply>, Status> {
        let mut r = self.svc.ready.borrow().clone();
        if r.ready {
            // Address space is part of readiness; asking also starts forming the ring, so a
            // runtime polling STATUS before the first pod does not wait for that pod.
            if let Err(wait) = self.svc.hub.ipam.try_prime().await? {
                r = Readiness::starting(wait.to_string());
            }
        }
        self.svc.hub.metrics.observe_cni("STATUS", r.ready, 0.0);
        Ok(Response::new(v1::CniStatusReply { ready: r.ready, reason: r.reason }))
    }

    async fn cni_gc(
        &self,
        req: Request<v1::CniGcRequest>,
    ) -> Result<Response<v1::CniGcReply>, Status> {
        let req = req.into_inner();
        let valid: Vec<(String, String)> =
            req.valid.into_iter().map(|a| (a.container_id, a.ifname)).collect();
        let released =
            self.timed("GC", self.svc.hub.endpoints.cni_gc(&req.network, &valid)).await?;
        Ok(Response::new(v1::CniGcReply { released }))
    }

    async fn attach(
        &self,
        req: Request<v1::AttachRequest>,
    ) -> Result<Response<v1::AttachReply>, Status> {
        let req = req.into_inner();
        let netns = path("netns", &req.netns).map_err(Status::from)?;
        let reserve = AttachReserve {
            id: if req.id.is_empty() { req.netns.clone() } else { req.id },
            netns,
            ifname: if req.ifname.is_empty() { "ethwe".to_owned() } else { req.ifname },
            requests: parse_requests(&req.addresses).map_err(Status::from)?,
            hostname: (!req.hostname.is_empty()).then_some(req.hostname),
            multicast_route: req.multicast_route,
        };
        let (rec, added) = self.svc.hub.endpoints.attach(reserve).await?;
        Ok(Response::new(v1::AttachReply {
            endpoint: Some(endpoint_to_wire(&rec)),
            added: added.into_iter().map(Into::into).collect(),
        }))
    }

    async fn detach(
        &self,
        req: Request<v1::DetachRequest>,
    ) -> Result<Response<v1::DetachReply>, Status> {
        let req = req.into_inner();
        let reqs = parse_requests(&req.addresses).map_err(Status::from)?;
        let removed = self.svc.hub.endpoints.detach(&req.id, reqs).await?;
        Ok(Response::new(v1::DetachReply {
            found: removed.is_some(),
            removed: removed.unwrap_or_default().into_iter().map(Into::into).collect(),
        }))
    }

    async fn list_endpoints(
        &self,
        _: Request<v1::ListEndpointsRequest>,
    ) -> Result<Response<v1::ListEndpointsReply>, Status> {
        let list = self.svc.hub.endpoints.list().await?;
        Ok(Response::new(v1::ListEndpointsReply {
            endpoints: list.iter().map(endpoint_to_wire).collect(),
        }))
    }

    async fn expose(
        &self,
        req: Request<v1::ExposeRequest>,
    ) -> Result<Response<v1::ExposeReply>, Status> {
        let req = req.into_inner();
        let reqs = parse_requests(&req.addresses).map_err(Status::from)?;
        let hostname = (!req.hostname.is_empty()).then_some(req.hostname);
        let addrs = self.svc.hub.endpoints.expose(reqs, hostname).await?;
        Ok(Response::new(v1::ExposeReply {
            addresses: addrs.into_iter().map(Into::into).collect(),
        }))
    }

    async fn hide(&self, req: Request<v1::HideRequest>) -> Result<Response<v1::HideReply>, Status> {
        let reqs = parse_requests(&req.into_inner().addresses).map_err(Status::from)?;
        let removed = self.svc.hub.endpoints.hide(reqs).await?;
        Ok(Response::new(v1::HideReply { removed: removed.into_iter().map(Into::into).collect() }))
    }

    async fn connect(
        &self,
        req: Request<v1::ConnectRequest>,
    ) -> Result<Response<v1::ConnectReply>, Status> {
        let req = req.into_inner();
        if let Some(bad) =
            req.peers.iter().find(|p| p.trim().is_empty() || p.contains(char::is_whitespace))
        {
            return Err(EndpointError::invalid(
                "peers",
                format!("{bad:?} is not HOST or HOST:PORT"),
            )
            .into());
        }
        let targets = self.svc.hub.mesh.connect(req.peers, req.replace).await;
        Ok(Response::new(v1::ConnectReply { targets }))
    }

    async fn forget(
        &self,
        req: Request<v1::ForgetRequest>,
    ) -> Result<Response<v1::ForgetReply>, Status> {
        let targets = self.svc.hub.mesh.forget(req.into_inner().peers).await;
        Ok(Response::new(v1::ForgetReply { targets }))
    }

    async fn reserve(
        &self,
        req: Request<v1::ReserveRequest>,
    ) -> Result<Response<v1::ReserveReply>, Status> {
        let req = req.into_inner();
        let reqs = parse_requests(&req.addresses).map_err(Status::from)?;
        let budget = (req.wait_ms > 0).then(|| Duration::from_millis(u64::from(req.wait_ms)));
        let addresses = self.svc.hub.endpoints.reserve(req.id, reqs, budget).await?;
        Ok(Response::new(v1::ReserveReply {
            addresses: addresses.into_iter().map(Into::into).collect(),
        }))
    }

    async fn unreserve(
        &self,
        req: Request<v1::UnreserveRequest>,
    ) -> Result<Response<v1::UnreserveReply>, Status> {
        let found = self.svc.hub.endpoints.unreserve(&req.into_inner().id).await?;
        Ok(Response::new(v1::UnreserveReply { found }))
    }

    async fn rm_peer(
        &self,
        req: Request<v1::RmPeerRequest>,
    ) -> Result<Response<v1::RmPeerReply>, Status> {
        let name = req.into_inner().peer.trim().to_owned();
        let view = self.svc.hub.mesh.view().borrow().clone();
        let moved = self.svc.hub.ipam.rmpeer(&name, &view).await?;
        Ok(Response::new(v1::RmPeerReply {
            addresses_taken_over: u64::try_from(moved).unwrap_or(u64::MAX),
        }))
    }

    async fn prime(
        &self,
        req: Request<v1::PrimeRequest>,
    ) -> Result<Response<v1::PrimeReply>, Status> {
        let ms = req.into_inner().timeout_ms;
        let budget = Duration::from_millis(if ms == 0 { 60_000 } else { u64::from(ms) });
        self.svc.hub.endpoints.prime(budget).await?;
        Ok(Response::new(v1::PrimeReply {}))
    }

    async fn dns_add(
        &self,
        req: Request<v1::DnsAddRequest>,
    ) -> Result<Response<v1::DnsAddReply>, Status> {
        let dns = self.dns()?;
        let req = req.into_inner();
        let addrs = parse_addrs(&req.addresses)?;
        let endpoint = (!req.endpoint_id.is_empty()).then_some(req.endpoint_id);
        let added = dns.add(req.name, addrs, endpoint).await?;
        Ok(Response::new(v1::DnsAddReply {
            records: added
                .into_iter()
                .map(|e| v1::DnsRecord {
                    name: e.name,
                    address: Some(e.addr.into()),
                    endpoint_id: e.endpoint,
                    origin: e.origin.to_string(),
                })
                .collect(),
        }))
    }

    async fn dns_remove(
        &self,
        req: Request<v1::DnsRemoveRequest>,
    ) -> Result<Response<v1::DnsRemoveReply>, Status> {
        let dns = self.dns()?;
        let req = req.into_inner();
        let removal = crate::dns::Removal {
            name: (!req.name.is_empty()).then_some(req.name),
            addrs: parse_addrs(&req.addresses)?,
            endpoint: (!req.endpoint_id.is_empty()).then_some(req.endpoint_id),
        };
        let removed = dns.remove(removal).await?;
        for id in &removed.unnamed {
            self.svc.hub.endpoints.set_hostname(id, None).await?;
        }
        Ok(Response::new(v1::DnsRemoveReply { removed: removed.pairs }))
    }

    async fn dns_lookup(
        &self,
        req: Request<v1::DnsLookupRequest>,
    ) -> Result<Response<v1::DnsLookupReply>, Status> {
        let addrs = self.dns()?.lookup(&req.into_inner().name)?;
        Ok(Response::new(v1::DnsLookupReply {
            addresses: addrs.into_iter().map(Into::into).collect(),
        }))
    }

    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        let report = collect(&self.svc).await;
        let json = serde_json::to_vec(&report).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(v1::StatusReply { report_json: json }))
    }

    async fn stop(&self, req: Request<v1::StopRequest>) -> Result<Response<v1::StopReply>, Status> {
        tracing::info!(leave = req.get_ref().leave, "stop requested through the API");
        if req.get_ref().leave {
            self.svc.hub.endpoints.leave(LEAVE_WAIT).await?;
        }
        // The server shuts down gracefully: this reply, already in flight, is still sent.
        self.svc.hub.shutdown.cancel();
        Ok(Response::new(v1::StopReply {}))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use tokio::sync::watch;

    use super::*;
    use crate::netpol::Programmed;
    use crate::policy::state::LocalPod;

    fn pod_record(addr: &str) -> EndpointRecord {
        EndpointRecord {
            id: "cni:c1/eth0".into(),
            kind: Kind::Cni,
            netns: Some(PathBuf::from("/run/netns/p1")),
            ifname: "eth0".into(),
            host_ifname: "vethwe1".into(),
            addresses: vec![addr.parse().expect("a prefix")],
            routes: Vec::new(),
            mtu: 1376,
            hairpin: false,
            network: Some("weft".into()),
            container_id: Some("c1".into()),
            pod: Some(PodRef { namespace: "ns".into(), name: "web".into(), uid: String::new() }),
            hostname: None,
            aliases: Vec::new(),
            mac: None,
            host_mac: None,
            created: 0,
        }
    }

    fn programmed_with(ip: &str) -> Programmed {
        let key = PodKey::new("ns", "web");
        let pod = LocalPod {
            key: key.clone(),
            ips: vec![ip.parse().expect("an address")],
            ingress: Vec::new(),
            egress: Vec::new(),
        };
        Programmed { installs: 1, pods: BTreeMap::from([(key, pod)]), ..Programmed::default() }
    }

    #[tokio::test]
    async fn cni_add_waits_for_policy_and_fails_retryably_naming_what_to_check() {
        let (tx, rx) = watch::channel(Arc::new(Programmed::default()));
        let gate = PolicyHandle::from_receiver(rx);
        let rec = pod_record("10.32.0.9/12");
        let wait = Duration::from_secs(10);

        // Without policy enforcement, or for a non-pod endpoint, nothing is waited for.
        policy_in_place(None, &rec, wait).await.expect("no gate");
        let no_pod = EndpointRecord { pod: None, ..rec.clone() };
        policy_in_place(Some(&gate), &no_pod, Duration::ZERO).await.expect("not a pod");

        // The ADD returns once the program accounts for the pod at its address.
        let waiting = {
            let (gate, rec) = (gate.clone(), rec.clone());
            tokio::spawn(async move { policy_in_place(Some(&gate), &rec, wait).await })
        };
        tx.send_replace(Arc::new(programmed_with("10.32.0.9")));
        waiting.await.expect("no panic").expect("in place");

        // The pod at another address only: a retryable error that says what to check.
        tx.send_replace(Arc::new(programmed_with("10.32.0.8")));
        let e = policy_in_place(Some(&gate), &rec, Duration::from_millis(100))
            .await
            .expect_err("not this address");
        assert!(matches!(e, EndpointError::NotReady(_)), "{e:?}");
        let status = Status::from(e);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let msg = status.message();
        assert!(msg.contains("NetworkPolicy for pod ns/web (10.32.0.9)"), "{msg}");
        assert!(msg.contains("not at this address"), "{msg}");
        assert!(msg.contains("RBAC"), "{msg}");
    }
}
