//! Container names in weave.local: Docker's plugin calls name no container, so the name of a
//! joined endpoint's container is asked from the Docker API (`GET /networks/ID`, which maps
//! endpoint ids to container names) and set as the endpoint's DNS name; DNS registers it from
//! the endpoint feed on every host and drops it when the endpoint leaves (Leave clears it).
//! The API sits behind [`DockerApi`]; the choice of what to ask is pure ([`unnamed`],
//! [`name_in_network`]).

use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tracing::{debug, warn};

use crate::endpoints::Endpoints;
use crate::endpoints::record::{EndpointRecord, Kind};

/// How often unnamed Docker endpoints are looked up again (a container shows in its
/// network only once it has started).
const RETRY: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Docker API at {path}: {message}")]
    Failed { path: String, message: String },
}

/// What weft asks Docker.
#[async_trait::async_trait]
pub trait DockerApi: Send + Sync + 'static {
    /// `GET /networks/ID` as JSON.
    async fn network(&self, id: &str) -> Result<Value, ApiError>;
    /// Creates the network `name` with weft's drivers unless it exists (`weft launch`).
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

/// The Docker API on a unix socket (`--docker-socket`).
#[derive(Clone, Debug)]
pub struct UnixDockerApi {
    pub socket: PathBuf,
}

#[async_trait::async_trait]
impl DockerApi for UnixDockerApi {
    async fn network(&self, id: &str) -> Result<Value, ApiError> {
        let (status, body) =
            self.call(hyper::Method::GET, &format!("/networks/{id}"), None).await?;
        if !status.is_success() {
            return Err(ApiError::Failed {
                path: format!("/networks/{id}"),
                message: status.to_string(),
            });
        }
        Ok(body)
    }

    async fn ensure_network(&self, name: &str) -> Result<bool, ApiError> {
        let (status, _) = self.call(hyper::Method::GET, &format!("/networks/{name}"), None).await?;
        if status.is_success() {
            return Ok(false);
        }
        let create = serde_json::json!({
            "Name": name, "Driver": "weft", "IPAM": { "Driver": "weft" }, "CheckDuplicate": true,
        });
        let (status, body) =
            self.call(hyper::Method::POST, "/networks/create", Some(create)).await?;
        if status.is_success() {
            Ok(true)
        } else {
            Err(ApiError::Failed {
                path: "/networks/create".into(),
                message: format!("{status}: {body}"),
            })
        }
    }

    async fn weft_endpoints(&self) -> Result<Vec<DockerEndpoint>, ApiError> {
        let failed = |path: &str, status: hyper::StatusCode| ApiError::Failed {
            path: path.to_owned(),
            message: status.to_string(),
        };
        let (status, list) = self.call(hyper::Method::GET, "/networks", None).await?;
        if !status.is_success() {
            return Err(failed("/networks", status));
        }
        let weft = |n: &&Value| n["Driver"] == "weft" || n["IPAM"]["Driver"] == "weft";
        let ids: Vec<String> = list
            .as_array()
            .map(|a| a.iter().filter(weft).filter_map(|n| n["Id"].as_str().map(str::to_owned)))
            .into_iter()
            .flatten()
            .collect();
        let mut out = Vec::new();
        for id in ids {
            let path = format!("/networks/{id}");
            let (status, net) = self.call(hyper::Method::GET, &path, None).await?;
            if status == hyper::StatusCode::NOT_FOUND {
                continue;
            }
            if !status.is_success() {
                return Err(failed(&path, status));
            }
            let Some(containers) = net["Containers"].as_object() else { continue };
            out.extend(containers.values().filter_map(|c| {
                Some(DockerEndpoint {
                    network: id.clone(),
                    endpoint: c["EndpointID"].as_str()?.to_owned(),
                    address: c["IPv4Address"]
                        .as_str()
                        .and_then(|a| a.parse::<ipnet::IpNet>().ok())
                        .map(|n| n.addr()),
                })
            }));
        }
        Ok(out)
    }
}

impl UnixDockerApi {
    /// One request on a fresh connection; the status and the JSON body (null if none).
    async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(hyper::StatusCode, Value), ApiError> {
        let fail = |m: String| ApiError::Failed { path: path.to_owned(), message: m };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| fail(format!("{}: {e}", self.socket.display())))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(e.to_string()))?;
        tokio::spawn(conn);
        let data = body.map(|b| b.to_string()).unwrap_or_default();
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("Host", "docker")
            .header("Content-Type", "application/json")
            .body(Full::new(Bytes::from(data)))
            .map_err(|e| fail(e.to_string()))?;
        let resp = send.send_request(req).await.map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| fail(e.to_string()))?.to_bytes();
        let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((status, json))
    }
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

/// The name of the container whose endpoint in `network` (Docker's inspect output) is
/// `endpoint`, without Docker's leading slash.
pub fn name_in_network(network: &Value, endpoint: &str) -> Option<String> {
    network["Containers"].as_object()?.values().find_map(|c| {
        (c["EndpointID"].as_str() == Some(endpoint))
            .then(|| c["Name"].as_str().map(|n| n.trim_start_matches('/').to_owned()))?
    })
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
            match api.network(network).await {
                Ok(net) => {
                    if let Some(name) = name_in_network(&net, endpoint) {
                        debug!(endpoint = %id, name = %name, "naming a Docker endpoint");
                        if let Err(e) = endpoints.docker_name(endpoint, name).await {
                            warn!(endpoint = %id, error = %e, "cannot name the endpoint");
                        }
                    }
                }
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

    #[test]
    fn the_container_is_found_by_its_endpoint() {
        let net: Value = serde_json::from_str(
            r#"{"Name":"net1","Containers":{
                "c0ffee":{"Name":"web","EndpointID":"e1","IPv4Address":"10.2.3.2/24"},
                "beef":{"Name":"/db","EndpointID":"e2"}}}"#,
        )
        .unwrap();
        assert_eq!(name_in_network(&net, "e1").as_deref(), Some("web"));
        assert_eq!(name_in_network(&net, "e2").as_deref(), Some("db"));
        assert_eq!(name_in_network(&net, "e3"), None);
        assert_eq!(name_in_network(&serde_json::json!({"Containers": null}), "e1"), None);
    }
}
