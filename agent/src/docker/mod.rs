//! Docker's remote network driver and IPAM driver (a "legacy" plugin on a unix socket, by
//! default `/run/docker/plugins/weft.sock`): HTTP/1.1 POSTs of JSON decoded in `protocol`,
//! carried out as endpoint operations (`endpoints::docker`: the same records, rollback and
//! reconciliation as CNI); `reconcile` releases what Docker no longer has. See docs/docker.md.

pub mod api;
pub mod names;
pub mod protocol;
pub mod reconcile;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tracing::{debug, info, warn};

use self::protocol::{Api, Call, DockerError};
use crate::endpoints::Endpoints;
use crate::subsystem::{Hub, Tasks};

/// How long an address request may wait for the ring or for space (dockerd's own plugin
/// call timeout is longer).
const ALLOC_BUDGET: Duration = Duration::from_secs(20);

/// `--docker-plugin`.
#[derive(Clone, Debug)]
pub struct DockerConfig {
    pub socket: PathBuf,
    /// The Docker API, asked for container names.
    pub api_socket: PathBuf,
    /// A network made to exist at start (`weft launch`: `weft`).
    pub network: Option<String>,
}

/// The plugin socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("--docker-plugin-socket {}: {source}", path.display())]
pub struct BindError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

fn bind(path: &Path) -> Result<tokio::net::UnixListener, BindError> {
    let fail = |source| BindError { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    // Another agent's plugin is not taken over (it would keep serving calls for endpoints
    // this agent does not know).
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process serves this socket; stop it first",
        )));
    }
    // A socket left by an earlier run; dockerd reconnects on its next call.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(e)),
    }
    tokio::net::UnixListener::bind(path).map_err(fail)
}

/// Serves the plugin until the agent stops; the socket is removed then.
pub fn start(cfg: DockerConfig, hub: &Hub, tasks: &mut Tasks) -> Result<(), BindError> {
    let listener = bind(&cfg.socket)?;
    info!(socket = %cfg.socket.display(), "serving Docker's network and IPAM driver");
    let app = Router::new().fallback(dispatch).with_state(Arc::new(hub.endpoints.clone()));
    let shutdown = tasks.shutdown().clone();
    let api = names::UnixDockerApi { socket: cfg.api_socket.clone() };
    if let Some(net) = cfg.network.clone() {
        tasks.spawn("docker-network", names::ensure_network(api.clone(), net, shutdown.clone()));
    }
    tasks.spawn(
        "docker-reconcile",
        reconcile::run(api.clone(), hub.endpoints.clone(), shutdown.clone()),
    );
    tasks.spawn("docker-names", names::run(api, hub.endpoints.clone(), shutdown.clone()));
    tasks.spawn("docker-plugin", async move {
        if let Err(e) =
            axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await
        {
            warn!(error = %e, "the Docker plugin listener failed");
        }
        let _ = std::fs::remove_file(&cfg.socket);
    });
    Ok(())
}

async fn dispatch(State(eps): State<Arc<Endpoints>>, uri: Uri, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let call = match protocol::parse(&path, &body) {
        Ok(c) => c,
        Err(e @ DockerError::NotFound(_)) => {
            return (StatusCode::NOT_FOUND, e.to_string()).into_response();
        }
        Err(e) => {
            let api = if path.starts_with("/IpamDriver.") { Api::Ipam } else { Api::Network };
            warn!(call = %path, error = %e, "Docker plugin call refused");
            return answer(protocol::error_body(api, &e));
        }
    };
    let api = call.api();
    match execute(call, &eps).await {
        Ok(v) => {
            debug!(call = %path, answer = %v, "Docker plugin call");
            answer(v)
        }
        Err(e) => {
            warn!(call = %path, error = %e, "Docker plugin call failed");
            answer(protocol::error_body(api, &e))
        }
    }
}

/// Docker reads the error from the body, whatever the status; 200 it is.
fn answer(v: Value) -> Response {
    ([(header::CONTENT_TYPE, protocol::CONTENT_TYPE)], v.to_string()).into_response()
}

async fn execute(call: Call, eps: &Endpoints) -> Result<Value, DockerError> {
    Ok(match call {
        Call::Activate => protocol::activate(),
        Call::NetCapabilities => protocol::net_capabilities(),
        Call::IpamCapabilities => protocol::ipam_capabilities(),
        Call::AddressSpaces => protocol::address_spaces(),
        Call::NetNothing | Call::ReleasePool => protocol::empty(),
        Call::OperInfo => protocol::oper_info(),
        Call::CreateNetwork { pools } => {
            // A network of Docker's own IPAM must still be inside weft's range: weft claims
            // its addresses at CreateEndpoint.
            for p in pools {
                eps.docker_pool(Some(p)).await?;
            }
            protocol::empty()
        }
        Call::RequestPool { subnet } => protocol::pool(eps.docker_pool(subnet).await?),
        Call::RequestAddress { subnet, address, gateway: true } => {
            let gw = eps.docker_gateway(subnet, ALLOC_BUDGET).await?;
            if address.is_some_and(|a| a != gw.addr()) {
                return Err(DockerError::BadRequest(format!(
                    "weft: the gateway of {subnet} is the bridge's address {}; leave --gateway out",
                    gw.addr()
                )));
            }
            protocol::address(gw)
        }
        Call::RequestAddress { subnet, address, gateway: false } => {
            protocol::address(eps.docker_request(subnet, address, ALLOC_BUDGET).await?)
        }
        Call::ReleaseAddress { address } => {
            eps.docker_release(address).await?;
            protocol::empty()
        }
        Call::CreateEndpoint { network, endpoint, address } => {
            eps.docker_bind(address, endpoint, network).await?;
            // Docker sent the interface's address, so the answer must not name one.
            protocol::empty()
        }
        Call::Join { endpoint, sandbox } => {
            let (rec, peer) = eps.docker_join(&endpoint, sandbox).await?;
            let gateway = rec.routes.iter().find(|r| r.destination.prefix_len() == 0);
            protocol::joined(&peer, gateway.and_then(|r| r.gateway))
        }
        Call::Leave { endpoint } => {
            eps.docker_leave(&endpoint).await?;
            protocol::empty()
        }
    })
}
