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
