//! Container names in weave.local: Docker's plugin calls name no container, so the container
//! of a joined endpoint is asked from the Docker API ([`DockerApi::endpoint_container`]) and
//! its names are set on the endpoint record: the container name as the endpoint's DNS name,
//! its `--hostname` and `--network-alias` values as the endpoint's aliases (persisted with the
//! record). DNS registers them from the endpoint feed on every host and drops them when the
//! endpoint leaves (Leave clears them). Which endpoints to ask about ([`unnamed`]) and which
//! names a container asked for ([`container_names`]) are pure.

use std::path::PathBuf;
use std::time::Duration;

use tracing::{debug, warn};

pub use super::api::UnixDockerApi;
use crate::endpoints::Endpoints;
use crate::endpoints::record::{EndpointRecord, Kind};

/// How often unnamed Docker endpoints are looked up again (a container shows in its
/// network only once it has started).
const RETRY: Duration = Duration::from_millis(500);

/// Docker's short container id, which it uses as the default hostname and adds as an alias.
const SHORT_ID: usize = 12;

/// The DNS names of a container: its name, and the further names it asked for
/// (`--hostname`, `--network-alias`), without Docker's defaults (the short id), duplicates or
/// the name itself.
pub fn container_names(c: &Container) -> (String, Vec<String>) {
    let short = c.id.get(..SHORT_ID).unwrap_or(&c.id);
    let mut extra: Vec<String> = Vec::new();
    for n in std::iter::once(&c.hostname).chain(&c.aliases) {
        let n = n.trim();
        let default = n.is_empty() || n == short || n == c.id;
        if !default && !n.eq_ignore_ascii_case(&c.name) && !extra.iter().any(|e| e == n) {
            extra.push(n.to_owned());
        }
    }
    (c.name.clone(), extra)
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Docker API at {path}: {message}")]
    Failed { path: String, message: String },
}

/// A container as weft needs it: who it is, the names it asked for, and its process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Container {
    /// The full id.
    pub id: String,
    /// Its name, without Docker's leading slash.
    pub name: String,
    /// `Config.Hostname` (Docker sets the short id unless `--hostname` was given).
    pub hostname: String,
    /// `--network-alias` values, of every network it is on (Docker adds the short id).
    pub aliases: Vec<String>,
    /// The main process while it runs (`State.Pid`); `None` when it is not running.
    pub pid: Option<u32>,
    /// Its network namespace as dockerd bind-mounts it (`NetworkSettings.SandboxKey`; empty
    /// for `--network container:…`).
    pub sandbox: Option<PathBuf>,
}

/// What weft asks Docker: one method per question.
#[async_trait::async_trait]
pub trait DockerApi: Send + Sync + 'static {
    /// The container whose endpoint in network `network` (id) is `endpoint`; `None` if the
    /// network or the endpoint is unknown (yet: a container shows in its network only once it
    /// has started).
    async fn endpoint_container(
        &self,
        network: &str,
        endpoint: &str,
    ) -> Result<Option<Container>, ApiError>;
    /// The container named or with id (or unique id prefix) `name`; `None` if there is none.
    async fn container(&self, name: &str) -> Result<Option<Container>, ApiError>;
    /// Creates the network `name` with weft's drivers unless it exists (`weft launch`); true
    /// if it was created.
    async fn ensure_network(&self, name: &str) -> Result<bool, ApiError>;
    /// Every endpoint Docker has in a network whose network or IPAM driver is weft (joined
    /// or only created). A network removed while it is listed has none.
    async fn weft_endpoints(&self) -> Result<Vec<DockerEndpoint>, ApiError>;
}

/// An endpoint as Docker reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerEndpoint {
    pub network: String,
    pub endpoint: String,
    pub address: Option<std::net::IpAddr>,
}

/// Makes the network `name` exist, retrying while dockerd is not up yet.
pub async fn ensure_network(
    api: impl DockerApi,
    name: String,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        match api.ensure_network(&name).await {
            Ok(created) => {
                tracing::info!(network = %name, created, "the Docker network exists");
                return;
            }
            Err(e) => debug!(network = %name, error = %e, "cannot make the Docker network yet"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Docker endpoints that have no DNS name yet: (record id, Docker network, Docker endpoint).
pub fn unnamed(records: &[EndpointRecord]) -> Vec<(String, String, String)> {
    records
        .iter()
        .filter(|r| r.kind == Kind::Docker && r.hostname.is_none())
        .filter_map(|r| Some((r.id.clone(), r.network.clone()?, r.container_id.clone()?)))
        .collect()
}

/// Names Docker endpoints until the agent stops.
pub async fn run(
    api: impl DockerApi,
    endpoints: Endpoints,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut feed = endpoints.feed();
    loop {
        let records = match endpoints.list().await {
            Ok(r) => r,
            Err(_) => return,
        };
        let todo = unnamed(&records);
        for (id, network, endpoint) in &todo {
            match api.endpoint_container(network, endpoint).await {
                Ok(Some(c)) => {
                    let (name, aliases) = container_names(&c);
                    debug!(endpoint = %id, name = %name, ?aliases, "naming a Docker endpoint");
                    if let Err(e) = endpoints.docker_name(endpoint, name, aliases).await {
                        warn!(endpoint = %id, error = %e, "cannot name the endpoint");
                    }
                }
                Ok(None) => debug!(endpoint = %id, "the endpoint's container is not known yet"),
                Err(e) => debug!(endpoint = %id, error = %e, "container name not known yet"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = feed.changed() => {}
            _ = tokio::time::sleep(RETRY), if !todo.is_empty() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(hostname: &str, aliases: &[&str]) -> Container {
        Container {
            id: "0123456789abcdef0123".into(),
            name: "web".into(),
            hostname: hostname.into(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            pid: Some(7),
            sandbox: None,
        }
    }

    #[test]
    fn docker_defaults_are_not_names() {
        // No --hostname, no alias: Docker's short id in both places.
        assert_eq!(container_names(&c("0123456789ab", &["0123456789ab"])), ("web".into(), vec![]));
        assert_eq!(container_names(&c("", &[])), ("web".into(), vec![]));
    }

    #[test]
    fn hostname_and_aliases_are_extra_names_once_each() {
        let (name, extra) =
            container_names(&c("www", &["db", "0123456789ab", "www", "Web", "cache", "db"]));
        assert_eq!(name, "web");
        assert_eq!(extra, vec!["www", "db", "cache"]);
    }
}
