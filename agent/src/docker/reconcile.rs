//! Docker endpoints weft holds but Docker no longer has: a container removed while the agent
//! was down (dockerd's Leave, DeleteEndpoint and ReleaseAddress found no plugin, retried for
//! ≈15 s each and gave up), or an address Docker asked for and never used (dockerd died
//! between RequestAddress and Join). The `docker:` records are compared with the endpoints
//! Docker reports in the networks weft drives ([`DockerApi::weft_endpoints`]); the choice is
//! pure ([`stale`]). Nothing is released while Docker still reports the endpoint or the
//! address, nor when Docker cannot be asked. See docs/docker.md, "Reconciliation with Docker".

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::names::{ApiError, DockerApi, DockerEndpoint};
use crate::endpoints::Endpoints;
use crate::endpoints::error::EndpointError;
use crate::endpoints::record::{DOCKER_PREFIX, EndpointRecord, Kind};

/// How long after Docker's last call a record that Docker does not show yet may still be on
/// its way: Docker stores an endpoint only after CreateEndpoint's answer, calls
/// CreateEndpoint after RequestAddress, and retries a call to an absent plugin for ≈15 s.
pub const IN_FLIGHT_SECS: u64 = 30;
/// How often Docker is asked while it answers.
const PERIOD: Duration = Duration::from_secs(10);
/// How often while it does not (dockerd coming back is noticed within this).
const RETRY: Duration = Duration::from_secs(1);

/// What Docker reported, taken after the records it is compared with were read.
#[derive(Debug, Default)]
pub struct DockerView {
    endpoints: HashSet<String>,
    addresses: HashSet<IpAddr>,
}

impl DockerView {
    pub fn new(eps: &[DockerEndpoint]) -> DockerView {
        DockerView {
            endpoints: eps.iter().map(|e| e.endpoint.clone()).collect(),
            addresses: eps.iter().filter_map(|e| e.address).collect(),
        }
    }
}

/// The `docker:` records of `records` (read before `view` was taken) that Docker no longer
/// has, at Unix time `now`. A joined record is stale as soon as its endpoint is missing:
/// Docker stored the endpoint before it called Join, and deletes it only after its Leave
/// (which then failed). A reservation (before Join, or after Leave) is stale only once
/// [`IN_FLIGHT_SECS`] passed since Docker's last call on it, since its endpoint may not be
/// stored yet (RequestAddress → CreateEndpoint → Join in flight) or its ReleaseAddress may
/// be on its way. Never one whose endpoint or address Docker still reports.
pub fn stale<'a>(
    records: &'a [EndpointRecord],
    view: &DockerView,
    now: u64,
) -> Vec<&'a EndpointRecord> {
    records
        .iter()
        .filter(|r| r.id.starts_with(DOCKER_PREFIX))
        .filter(|r| match r.kind {
            Kind::Docker => true,
            Kind::Reservation => now.saturating_sub(r.created) >= IN_FLIGHT_SECS,
            _ => false,
        })
        .filter(|r| !r.container_id.as_ref().is_some_and(|e| view.endpoints.contains(e)))
        .filter(|r| !r.addresses.iter().any(|a| view.addresses.contains(&a.addr())))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Endpoints(#[from] EndpointError),
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One pass: releases what Docker no longer has; how many were released.
pub async fn once(api: &impl DockerApi, endpoints: &Endpoints) -> Result<usize, ReconcileError> {
    // The records first: one made after Docker answered is not in its answer.
    let records = endpoints.list().await?;
    if !records.iter().any(|r| r.id.starts_with(DOCKER_PREFIX)) {
        return Ok(0);
    }
    let view = DockerView::new(&api.weft_endpoints().await?);
    let mut released = 0;
    for rec in stale(&records, &view, now_secs()) {
        let (addresses, endpoint) = (&rec.addresses, rec.container_id.as_deref().unwrap_or("-"));
        match endpoints.docker_forget(rec).await {
            Ok(true) => {
                info!(endpoint = %rec.id, docker = %endpoint, ?addresses, kind = ?rec.kind,
                    "Docker no longer has this endpoint; released its address");
                released += 1;
            }
            Ok(false) => debug!(endpoint = %rec.id, "changed meanwhile; kept"),
            Err(e) => warn!(endpoint = %rec.id, error = %e, "could not release"),
        }
    }
    Ok(released)
}

/// Reconciles at start, whenever Docker answers again, and every [`PERIOD`].
pub async fn run(
    api: impl DockerApi,
    endpoints: Endpoints,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut unreachable = false;
    loop {
        let wait = match once(&api, &endpoints).await {
            Ok(_) => {
                if std::mem::take(&mut unreachable) {
                    info!("the Docker API answers again; Docker endpoints reconciled");
                }
                PERIOD
            }
            Err(ReconcileError::Endpoints(EndpointError::Stopped)) => return,
            Err(e) => {
                if !std::mem::replace(&mut unreachable, true) {
                    warn!(error = %e, "cannot ask Docker which endpoints it has; releasing none \
                        until it answers");
                }
                RETRY
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn rec(addr: &str, kind: Kind, endpoint: Option<&str>, created: u64) -> EndpointRecord {
        EndpointRecord {
            id: format!("{DOCKER_PREFIX}{addr}"),
            kind,
            netns: (kind == Kind::Docker).then(|| PathBuf::from("/run/docker/netns/x")),
            ifname: String::new(),
            host_ifname: String::new(),
            addresses: vec![format!("{addr}/24").parse().unwrap()],
            routes: vec![],
            mtu: 1376,
            hairpin: false,
            network: endpoint.map(|_| "n1".to_owned()),
            container_id: endpoint.map(str::to_owned),
            pod: None,
            hostname: None,
            aliases: Vec::new(),
            mac: None,
            host_mac: None,
            created,
        }
    }

    fn ep(endpoint: &str, addr: &str) -> DockerEndpoint {
        DockerEndpoint {
            network: "n1".into(),
            endpoint: endpoint.into(),
            address: Some(addr.parse().unwrap()),
        }
    }

    fn ids(v: Vec<&EndpointRecord>) -> Vec<&str> {
        v.into_iter().map(|r| r.id.as_str()).collect()
    }

    const NOW: u64 = 1_000_000;

    #[test]
    fn a_joined_endpoint_docker_deleted_is_released_at_once() {
        let recs = [
            rec("10.2.3.2", Kind::Docker, Some("e1"), NOW),
            rec("10.2.3.3", Kind::Docker, Some("e2"), NOW - 3600),
        ];
        let view = DockerView::new(&[ep("e2", "10.2.3.3")]);
        assert_eq!(ids(stale(&recs, &view, NOW)), ["docker:10.2.3.2"]);
    }

    #[test]
    fn an_address_docker_still_reports_is_kept_whoever_holds_it() {
        // A record whose endpoint id is unknown but whose address Docker shows on another
        // endpoint: Docker still uses it.
        let recs = [rec("10.2.3.2", Kind::Docker, Some("e1"), 0)];
        let view = DockerView::new(&[ep("e9", "10.2.3.2")]);
        assert!(stale(&recs, &view, NOW).is_empty());
        // An endpoint reported without an address still keeps its record.
        let view = DockerView::new(&[DockerEndpoint {
            network: "n1".into(),
            endpoint: "e1".into(),
            address: None,
        }]);
        assert!(stale(&recs, &view, NOW).is_empty());
    }

    #[test]
    fn a_request_in_flight_is_kept_until_docker_could_have_stored_it() {
        // RequestAddress answered, CreateEndpoint not yet (or answered and Docker not yet
        // done storing it): nothing in Docker's view yet.
        let fresh = [
            rec("10.2.3.2", Kind::Reservation, None, NOW - 1),
            rec("10.2.3.3", Kind::Reservation, Some("e3"), NOW - (IN_FLIGHT_SECS - 1)),
        ];
        assert!(stale(&fresh, &DockerView::default(), NOW).is_empty());
        // Docker gave up (dockerd died before Join): collected once the window passed.
        let old = [
            rec("10.2.3.2", Kind::Reservation, None, NOW - IN_FLIGHT_SECS),
            rec("10.2.3.3", Kind::Reservation, Some("e3"), NOW - 600),
        ];
        assert_eq!(
            ids(stale(&old, &DockerView::default(), NOW)),
            ["docker:10.2.3.2", "docker:10.2.3.3"]
        );
        // ... unless Docker did store the endpoint.
        let view = DockerView::new(&[ep("e3", "10.2.3.3")]);
        assert_eq!(ids(stale(&old, &view, NOW)), ["docker:10.2.3.2"]);
    }

    #[test]
    fn only_docker_records_are_considered() {
        let mut cni = rec("10.2.3.2", Kind::Cni, None, 0);
        cni.id = "cni:abc:eth0".into();
        let mut other = rec("10.2.3.3", Kind::Reservation, None, 0);
        other.id = "mine".into();
        assert!(stale(&[cni, other], &DockerView::default(), NOW).is_empty());
    }
}

/// [`once`] over the real endpoint service and a fake Docker API.
#[cfg(test)]
mod with_endpoints {
    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::once;
    use crate::dataplane::fake::Op;
    use crate::dataplane::host_ifname_for;
    use crate::docker::names::{ApiError, Container, DockerApi, DockerEndpoint};
    use crate::endpoints::Endpoints;
    use crate::endpoints::tests::rig;

    /// Answers with `answer`; first runs `during` (Docker's calls arriving while it is asked).
    #[derive(Default)]
    struct FakeApi {
        answer: Mutex<Option<Vec<DockerEndpoint>>>,
        during: Mutex<Option<Endpoints>>,
    }

    #[async_trait::async_trait]
    impl DockerApi for FakeApi {
        async fn endpoint_container(
            &self,
            _: &str,
            _: &str,
        ) -> Result<Option<Container>, ApiError> {
            Ok(None)
        }
        async fn container(&self, _: &str) -> Result<Option<Container>, ApiError> {
            Ok(None)
        }
        async fn ensure_network(&self, _: &str) -> Result<bool, ApiError> {
            Ok(false)
        }
        async fn weft_endpoints(&self) -> Result<Vec<DockerEndpoint>, ApiError> {
            let during = self.during.lock().unwrap().take();
            if let Some(e) = during {
                container(&e, "e9", "/run/docker/netns/late").await;
                e.docker_leave("e1").await.unwrap();
            }
            self.answer.lock().unwrap().clone().ok_or(ApiError::Failed {
                path: "/networks".into(),
                message: "connection refused".into(),
            })
        }
    }

    const SUBNET: &str = "10.32.3.0/24";

    /// RequestAddress, CreateEndpoint and Join, as Docker sends them.
    async fn container(e: &Endpoints, endpoint: &str, sandbox: &str) -> std::net::IpAddr {
        let addr = e.docker_request(SUBNET.parse().unwrap(), None, Duration::from_secs(2)).await;
        let addr = addr.unwrap();
        e.docker_bind(addr, endpoint.into(), "n1".into()).await.unwrap();
        e.docker_join(endpoint, PathBuf::from(sandbox)).await.unwrap();
        addr.addr()
    }

    fn reported(endpoint: &str, addr: std::net::IpAddr) -> DockerEndpoint {
        DockerEndpoint { network: "n1".into(), endpoint: endpoint.into(), address: Some(addr) }
    }

    async fn ids(e: &Endpoints) -> Vec<String> {
        let mut v: Vec<String> = e.list().await.unwrap().into_iter().map(|r| r.id).collect();
        v.retain(|id| id.starts_with("docker:"));
        v.sort();
        v
    }

    #[tokio::test]
    async fn releases_what_docker_no_longer_has_and_nothing_it_cannot_confirm() {
        let rig = rig();
        let e = &rig.endpoints;
        let a1 = container(e, "e1", "/run/docker/netns/a").await;
        let a2 = container(e, "e2", "/run/docker/netns/b").await;
        // RequestAddress answered, CreateEndpoint still to come.
        let pending =
            e.docker_request(SUBNET.parse().unwrap(), None, Duration::from_secs(2)).await.unwrap();
        let before = ids(e).await;
        assert_eq!(before.len(), 3);

        // Docker cannot be asked: nothing is released.
        let api = FakeApi::default();
        assert!(once(&api, e).await.is_err());
        assert_eq!(ids(e).await, before);

        // Docker removed e1's container while we were not listening; e2 runs; the pending
        // request is in flight and kept.
        *api.answer.lock().unwrap() = Some(vec![reported("e2", a2)]);
        assert_eq!(once(&api, e).await.unwrap(), 1);
        let now = ids(e).await;
        assert!(!now.contains(&format!("docker:{a1}")), "{now:?}");
        assert!(
            now.contains(&format!("docker:{a2}"))
                && now.contains(&format!("docker:{}", pending.addr()))
        );
        let host = host_ifname_for(&format!("docker:{a1}"));
        assert!(rig.dp.calls().iter().any(|c| c.op == Op::TeardownEndpoint && c.subject == host));
        // The address is free again, for whoever names it; a request without --ip gets
        // another while dockerd may still be retrying a ReleaseAddress for it.
        let next = container(e, "e3", "/run/docker/netns/c").await;
        assert_ne!(next, a1);
        assert!(!e.docker_release(a1).await.unwrap(), "a late ReleaseAddress finds nothing");
        assert!(ids(e).await.contains(&format!("docker:{next}")));
        let a1net = ipnet::IpNet::new(a1, 24).unwrap();
        let again = e.docker_request(SUBNET.parse().unwrap(), Some(a1), Duration::from_secs(2));
        assert_eq!(again.await.unwrap(), a1net);
    }

    #[tokio::test]
    async fn calls_docker_makes_while_it_is_asked_are_not_undone() {
        let rig = rig();
        let e = &rig.endpoints;
        container(e, "e1", "/run/docker/netns/a").await;
        // While Docker answers: a new container joins (its record is newer than the records
        // compared) and e1 leaves (its record changed since it was read). Docker's answer
        // has neither.
        let api = FakeApi::default();
        *api.answer.lock().unwrap() = Some(vec![]);
        *api.during.lock().unwrap() = Some(e.clone());
        assert_eq!(once(&api, e).await.unwrap(), 0);
        assert_eq!(ids(e).await.len(), 2, "e9's endpoint and e1's reservation stay");
    }

    #[tokio::test]
    async fn a_docker_interface_docker_removed_is_not_put_back() {
        let rig = rig();
        let e = &rig.endpoints;
        let a = container(e, "e1", "/run/docker/netns/a").await;
        // Docker disconnected the container while the agent was down: the interface is gone,
        // the sandbox is not.
        rig.dp.lose_link(&host_ifname_for(&format!("docker:{a}")));
        let joined = rig.dp.count(Op::SetupEndpoint);
        e.reconcile(false).await.unwrap();
        assert_eq!(rig.dp.count(Op::SetupEndpoint), joined);
        assert!(!rig.dp.links().contains_key(&host_ifname_for(&format!("docker:{a}"))));
        assert_eq!(ids(e).await.len(), 1, "kept for Docker's view to decide");
    }
}
