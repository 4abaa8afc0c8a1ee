//! The local API between the weft agent and its clients (the CLI and `weft-cni`): the generated
//! gRPC types, conversions between wire addresses and `IpAddr`/`IpNet`, the error detail that
//! carries a machine-readable reason, and a client that connects over the agent's unix socket.
//! The protocol is specified in `docs/local-api.md`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use prost::Message;
use tonic::transport::{Channel, Endpoint, Uri};

/// Generated messages and services of package `weft.v1`.
#[allow(missing_docs, missing_debug_implementations, unused_qualifications, clippy::all)]
pub mod v1 {
    tonic::include_proto!("weft.v1");
}

pub use v1::agent_client::AgentClient;

/// Revision of the API this crate speaks. Additions (new RPCs, new fields) bump it; a
/// breaking change would be a new package (`weft.v2`) served next to `weft.v1`.
pub const API_REVISION: u32 = 3;

/// Default path of the agent's socket.
pub const DEFAULT_SOCKET: &str = "/run/weft/weft.sock";

/// Whether `name` is a valid Linux interface name: 1-15 bytes, not "." or "..", no '/', ':'
/// or whitespace. Checked by the plugin (CNI_IFNAME) and again by the agent.
pub fn is_valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Where `weft-cni` queues DEL requests that it could not deliver because the agent was down:
/// a directory next to the socket. Each file holds one encoded [`v1::CniDelRequest`]; the
/// agent carries them out when it starts (and keeps checking while it runs).
pub fn del_queue_dir(socket: &Path) -> PathBuf {
    socket.parent().unwrap_or_else(|| Path::new("/")).join("cni-del-queue")
}

/// The queue file name for one attachment. Container ids and interface names are validated
/// by the plugin (no '/'), so the name is a plain file name.
pub fn del_queue_file_name(container_id: &str, ifname: &str) -> String {
    format!("{container_id}@{ifname}.del")
}

/// An address on the wire that is not 4 or 16 bytes long, or a prefix that does not fit.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("address of {0} bytes (expected 4 or 16)")]
    AddressLength(usize),
    #[error("prefix length {0} too long for the address")]
    Prefix(u32),
    #[error("missing field {0}")]
    Missing(&'static str),
}

impl From<IpAddr> for v1::IpAddress {
    fn from(ip: IpAddr) -> Self {
        let octets = match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        v1::IpAddress { octets }
    }
}

impl TryFrom<&v1::IpAddress> for IpAddr {
    type Error = WireError;
    fn try_from(a: &v1::IpAddress) -> Result<Self, WireError> {
        match a.octets.len() {
            4 => {
                let b: [u8; 4] =
                    a.octets[..].try_into().map_err(|_| WireError::AddressLength(4))?;
                Ok(IpAddr::V4(Ipv4Addr::from(b)))
            }
            16 => {
                let b: [u8; 16] =
                    a.octets[..].try_into().map_err(|_| WireError::AddressLength(16))?;
                Ok(IpAddr::V6(Ipv6Addr::from(b)))
            }
            n => Err(WireError::AddressLength(n)),
        }
    }
}

impl From<IpNet> for v1::IpNetwork {
    fn from(net: IpNet) -> Self {
        v1::IpNetwork { address: Some(net.addr().into()), prefix_len: u32::from(net.prefix_len()) }
    }
}

impl TryFrom<&v1::IpNetwork> for IpNet {
    type Error = WireError;
    fn try_from(n: &v1::IpNetwork) -> Result<Self, WireError> {
        let addr = IpAddr::try_from(n.address.as_ref().ok_or(WireError::Missing("address"))?)?;
        let len = u8::try_from(n.prefix_len).map_err(|_| WireError::Prefix(n.prefix_len))?;
        IpNet::new(addr, len).map_err(|_| WireError::Prefix(n.prefix_len))
    }
}

/// Encodes the machine-readable reason of an error into a status.
pub fn status_with_reason(
    code: tonic::Code,
    message: impl Into<String>,
    reason: v1::ErrorReason,
    field: &str,
) -> tonic::Status {
    let detail = v1::ErrorDetail { reason: reason as i32, field: field.to_owned() };
    tonic::Status::with_details(code, message, detail.encode_to_vec().into())
}

/// The reason carried by a status, `Unspecified` when there is none or it does not decode.
pub fn reason_of(status: &tonic::Status) -> (v1::ErrorReason, String) {
    match v1::ErrorDetail::decode(status.details()) {
        Ok(d) => (v1::ErrorReason::try_from(d.reason).unwrap_or_default(), d.field),
        Err(_) => (v1::ErrorReason::Unspecified, String::new()),
    }
}

/// Why connecting to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing listens on the socket (no file, connection refused), or the connection was cut
    /// while being made: the agent is down or going down.
    #[error("the weft agent is not running (no listener on {path}): {source}")]
    AgentDown { path: PathBuf, source: std::io::Error },
    #[error("cannot connect to the weft agent on {path}: {source}")]
    Other { path: PathBuf, source: std::io::Error },
}

/// Connects to the agent's unix socket. The connection is made eagerly so that a missing agent
/// is reported here rather than on the first call.
pub async fn connect(socket: &Path) -> Result<AgentClient<Channel>, ConnectError> {
    // Probe first: tonic reports connection failures as an opaque transport error, and callers
    // need to tell "agent down" (retry, or queue a DEL) from other failures.
    match tokio::net::UnixStream::connect(socket).await {
        Ok(_) => {}
        Err(e) => return Err(classify(socket, e)),
    }
    let path = socket.to_path_buf();
    // The URI is required by the API but unused: the connector below dials the socket.
    let channel = Endpoint::from_static("http://weft.sock")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        // The probe got through, so the agent was listening a moment ago: a handshake that
        // fails now is an agent going down (killed or restarting), and callers must treat it
        // as such (retry, or queue a DEL), not as a failure of the request.
        .map_err(|e| ConnectError::AgentDown {
            path: socket.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(AgentClient::new(channel).max_decoding_message_size(64 << 20))
}

fn classify(path: &Path, e: std::io::Error) -> ConnectError {
    use std::io::ErrorKind::{
        BrokenPipe, ConnectionAborted, ConnectionRefused, ConnectionReset, NotFound,
    };
    let path = path.to_path_buf();
    match e.kind() {
        // Reset or aborted: the agent was killed while the connection sat in its backlog.
        NotFound | ConnectionRefused | ConnectionReset | ConnectionAborted | BrokenPipe => {
            ConnectError::AgentDown { path, source: e }
        }
        _ => ConnectError::Other { path, source: e },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent killed between the plugin's probe and the gRPC handshake: the socket accepts,
    /// then the connection is reset. Callers must see "agent down" (retry, or queue a DEL).
    #[tokio::test]
    async fn a_handshake_cut_after_the_probe_means_the_agent_is_down() {
        let dir = std::env::temp_dir().join(format!("weft-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let accepts = tokio::spawn(async move {
            let mut n = 0u32;
            // Two connections: the probe and the handshake; each is closed at once.
            while n < 2 {
                let (conn, _) = listener.accept().await.unwrap();
                drop(conn);
                n += 1;
            }
        });
        let err = connect(&socket).await.expect_err("a cut handshake must not connect");
        assert!(matches!(err, ConnectError::AgentDown { .. }), "got {err:?}");
        accepts.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_connection_cut_by_a_dying_agent_means_it_is_down() {
        use std::io::{Error, ErrorKind};
        let p = Path::new("/run/weft/weft.sock");
        for kind in [ErrorKind::ConnectionReset, ErrorKind::ConnectionAborted, ErrorKind::NotFound]
        {
            assert!(matches!(classify(p, Error::from(kind)), ConnectError::AgentDown { .. }));
        }
        let denied = classify(p, Error::from(ErrorKind::PermissionDenied));
        assert!(matches!(denied, ConnectError::Other { .. }), "a fault to report, not to wait out");
    }

    #[test]
    fn network_round_trips() {
        for s in ["10.32.0.5/12", "fd00::1/64", "0.0.0.0/0"] {
            let net: IpNet = s.parse().unwrap();
            let wire = v1::IpNetwork::from(net);
            assert_eq!(IpNet::try_from(&wire).unwrap(), net);
        }
    }

    #[test]
    fn bad_wire_addresses_are_rejected() {
        let bad =
            v1::IpNetwork { address: Some(v1::IpAddress { octets: vec![1, 2, 3] }), prefix_len: 8 };
        assert!(matches!(IpNet::try_from(&bad), Err(WireError::AddressLength(3))));
        let long =
            v1::IpNetwork { address: Some(IpAddr::from([1, 2, 3, 4]).into()), prefix_len: 33 };
        assert!(matches!(IpNet::try_from(&long), Err(WireError::Prefix(33))));
    }

    #[test]
    fn reasons_round_trip_through_status() {
        let st = status_with_reason(
            tonic::Code::InvalidArgument,
            "x",
            v1::ErrorReason::NetnsInvalid,
            "netns",
        );
        assert_eq!(reason_of(&st), (v1::ErrorReason::NetnsInvalid, "netns".to_owned()));
        assert_eq!(reason_of(&tonic::Status::internal("y")).0, v1::ErrorReason::Unspecified);
    }
}
