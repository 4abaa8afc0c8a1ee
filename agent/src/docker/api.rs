//! The Docker API (`--docker-socket`, a unix socket) through the `bollard` crate: the
//! implementation of [`DockerApi`] (`names`), whose questions are answered in weft's own
//! types so that the name logic and the CLI (`cli::container`) are tested against fakes. The API
//! version is negotiated with dockerd on every connection (Debian's docker.io 20.10 speaks
//! 1.41; newer dockerds refuse versions below their minimum).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerInspectResponse, Ipam, NetworkCreateRequest};
use bollard::query_parameters::{
    InspectContainerOptions, InspectNetworkOptions, ListNetworksOptions,
};

use super::names::{ApiError, Container, DockerApi, DockerEndpoint};

/// Seconds a request to dockerd may take.
const TIMEOUT_SECS: u64 = 30;

/// The Docker API on a unix socket (`--docker-socket`), through bollard.
#[derive(Clone, Debug)]
pub struct UnixDockerApi {
    pub socket: PathBuf,
}

impl UnixDockerApi {
    pub fn new(socket: &Path) -> UnixDockerApi {
        UnixDockerApi { socket: socket.to_owned() }
    }

    fn fail(&self, e: impl std::fmt::Display) -> ApiError {
        ApiError::Failed { path: self.socket.display().to_string(), message: e.to_string() }
    }

    /// A client speaking the version this dockerd supports.
    async fn client(&self) -> Result<Docker, ApiError> {
        let path = self.socket.to_str().ok_or_else(|| self.fail("the path is not UTF-8"))?;
        let docker = Docker::connect_with_unix(path, TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
            .map_err(|e| match e {
                BollardError::SocketNotFoundError(_) => {
                    self.fail("no such socket (is dockerd running? see --docker-socket)")
                }
                e => self.fail(e),
            })?;
        docker.negotiate_version().await.map_err(|e| self.fail(e))
    }

    async fn inspect(&self, docker: &Docker, name: &str) -> Result<Option<Container>, ApiError> {
        match docker.inspect_container(name, None::<InspectContainerOptions>).await {
            Ok(c) => Ok(Some(container(c))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(self.fail(e)),
        }
    }
}

fn not_found(e: &BollardError) -> bool {
    matches!(e, BollardError::DockerResponseServerError { status_code: 404, .. })
}

/// bollard's inspect answer in our type.
fn container(c: ContainerInspectResponse) -> Container {
    let running = c.state.as_ref().and_then(|s| s.running).unwrap_or(false);
    let pid = c.state.as_ref().and_then(|s| s.pid).and_then(|p| u32::try_from(p).ok());
    let settings = c.network_settings.unwrap_or_default();
    let sandbox = settings.sandbox_key.filter(|k| !k.is_empty()).map(PathBuf::from);
    let aliases = settings
        .networks
        .map(|nets| nets.into_values().flat_map(|e| e.aliases.unwrap_or_default()).collect())
        .unwrap_or_default();
    Container {
        id: c.id.unwrap_or_default(),
        name: c.name.unwrap_or_default().trim_start_matches('/').to_owned(),
        hostname: c.config.and_then(|c| c.hostname).unwrap_or_default(),
        aliases,
        pid: pid.filter(|p| running && *p > 0),
        sandbox,
    }
}

#[async_trait::async_trait]
impl DockerApi for UnixDockerApi {
    async fn endpoint_container(
        &self,
        network: &str,
        endpoint: &str,
    ) -> Result<Option<Container>, ApiError> {
        let docker = self.client().await?;
        let net = match docker.inspect_network(network, None::<InspectNetworkOptions>).await {
            Ok(n) => n,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(self.fail(e)),
        };
        let containers = net.containers.unwrap_or_default();
        let Some(id) = container_of_endpoint(&containers, endpoint) else { return Ok(None) };
        self.inspect(&docker, &id).await
    }

    async fn container(&self, name: &str) -> Result<Option<Container>, ApiError> {
        let docker = self.client().await?;
        self.inspect(&docker, name).await
    }

    async fn ensure_network(&self, name: &str) -> Result<bool, ApiError> {
        let docker = self.client().await?;
        match docker.inspect_network(name, None::<InspectNetworkOptions>).await {
            Ok(_) => return Ok(false),
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(self.fail(e)),
        }
        let create = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("weft".into()),
            ipam: Some(Ipam { driver: Some("weft".into()), ..Ipam::default() }),
            ..NetworkCreateRequest::default()
        };
        docker.create_network(create).await.map_err(|e| self.fail(e))?;
        Ok(true)
    }

    async fn weft_endpoints(&self) -> Result<Vec<DockerEndpoint>, ApiError> {
        let docker = self.client().await?;
        let list = docker.list_networks(None::<ListNetworksOptions>).await;
        let ids: Vec<String> = list
            .map_err(|e| self.fail(e))?
            .into_iter()
            .filter(|n| {
                let ipam = n.ipam.as_ref().and_then(|i| i.driver.as_deref());
                n.driver.as_deref() == Some("weft") || ipam == Some("weft")
            })
            .filter_map(|n| n.id)
            .collect();
        let mut out = Vec::new();
        // The list leaves out the endpoints: each network is inspected.
        for id in ids {
            let net = match docker.inspect_network(&id, None::<InspectNetworkOptions>).await {
                Ok(n) => n,
                Err(e) if not_found(&e) => continue,
                Err(e) => return Err(self.fail(e)),
            };
            out.extend(endpoints_of(&id, net.containers.unwrap_or_default()));
        }
        Ok(out)
    }
}

/// The endpoints of network `id` from its `Containers` map.
fn endpoints_of(
    id: &str,
    containers: HashMap<String, bollard::models::EndpointResource>,
) -> Vec<DockerEndpoint> {
    containers
        .into_values()
        .filter_map(|c| {
            Some(DockerEndpoint {
                network: id.to_owned(),
                endpoint: c.endpoint_id?,
                address: c
                    .ipv4_address
                    .and_then(|a| a.parse::<ipnet::IpNet>().ok())
                    .map(|n| n.addr()),
            })
        })
        .collect()
}

/// The id of the container whose endpoint is `endpoint`, in a network's `Containers` map
/// (container id → its endpoint).
fn container_of_endpoint(
    containers: &HashMap<String, bollard::models::EndpointResource>,
    endpoint: &str,
) -> Option<String> {
    containers
        .iter()
        .find(|(_, e)| e.endpoint_id.as_deref() == Some(endpoint))
        .map(|(id, _)| id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerConfig, ContainerState, EndpointResource, EndpointSettings};

    #[test]
    fn the_container_is_found_by_its_endpoint() {
        let mut m = HashMap::new();
        let ep = |e: &str| EndpointResource {
            endpoint_id: Some(e.into()),
            ..EndpointResource::default()
        };
        m.insert("c0ffee".to_owned(), ep("e1"));
        m.insert("beef".to_owned(), ep("e2"));
        assert_eq!(container_of_endpoint(&m, "e1").as_deref(), Some("c0ffee"));
        assert_eq!(container_of_endpoint(&m, "e3"), None);
    }

    #[test]
    fn a_networks_containers_are_its_endpoints() {
        let mut m = HashMap::new();
        let ep = EndpointResource {
            endpoint_id: Some("e1".into()),
            ipv4_address: Some("10.2.1.5/24".into()),
            ..EndpointResource::default()
        };
        m.insert("c0ffee".to_owned(), ep);
        m.insert("nameless".to_owned(), EndpointResource::default());
        let want = DockerEndpoint {
            network: "n1".into(),
            endpoint: "e1".into(),
            address: Some("10.2.1.5".parse().unwrap()),
        };
        assert_eq!(endpoints_of("n1", m), vec![want]);
    }

    #[test]
    fn inspect_answers_become_containers() {
        let mut nets = HashMap::new();
        nets.insert(
            "weft".to_owned(),
            EndpointSettings {
                aliases: Some(vec!["db".into(), "c0ffee".into()]),
                ..EndpointSettings::default()
            },
        );
        let c = container(ContainerInspectResponse {
            id: Some("c0ffee00".into()),
            name: Some("/web".into()),
            state: Some(ContainerState {
                running: Some(true),
                pid: Some(42),
                ..ContainerState::default()
            }),
            config: Some(ContainerConfig {
                hostname: Some("www".into()),
                ..ContainerConfig::default()
            }),
            network_settings: Some(bollard::models::NetworkSettings {
                networks: Some(nets),
                sandbox_key: Some("/var/run/docker/netns/ed2af6095a83".into()),
                ..Default::default()
            }),
            ..ContainerInspectResponse::default()
        });
        assert_eq!(c.name, "web");
        assert_eq!(c.hostname, "www");
        assert_eq!(c.aliases, vec!["db", "c0ffee"]);
        assert_eq!(c.pid, Some(42));
        assert_eq!(c.sandbox, Some(PathBuf::from("/var/run/docker/netns/ed2af6095a83")));
        let stopped = container(ContainerInspectResponse {
            state: Some(ContainerState {
                running: Some(false),
                pid: Some(0),
                ..ContainerState::default()
            }),
            ..ContainerInspectResponse::default()
        });
        assert_eq!(stopped.pid, None);
    }
}
