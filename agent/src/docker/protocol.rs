//! Docker's remote plugin protocol (libnetwork `drivers/remote/api`, `ipams/remote/api`),
//! pure: the calls decoded from (path, body) into weft's types, the answers, and every error
//! turned into the text Docker shows, once. No I/O here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::endpoints::error::EndpointError;
use crate::ipam::IpamError;

/// The media type of every answer.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";
/// The option that marks the gateway's `RequestAddress`.
const GATEWAY_REQUEST: &str = "com.docker.network.gateway";
/// Prefix of our pool ids: `weft:SUBNET`.
const POOL_PREFIX: &str = "weft:";
/// Our (only) address space.
pub const ADDRESS_SPACE: &str = "weft";

/// Which of the two APIs a call belongs to: they report errors under different keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Plugin,
    Network,
    Ipam,
}

/// A decoded call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Activate,
    NetCapabilities,
    CreateNetwork {
        pools: Vec<IpNet>,
    },
    /// Calls weft answers with an empty object (network deletion, discovery, external
    /// connectivity: weft's own routing and masquerading apply).
    NetNothing,
    CreateEndpoint {
        network: String,
        endpoint: String,
        address: IpNet,
    },
    OperInfo,
    Join {
        endpoint: String,
        sandbox: PathBuf,
    },
    Leave {
        endpoint: String,
    },
    IpamCapabilities,
    AddressSpaces,
    RequestPool {
        subnet: Option<IpNet>,
    },
    ReleasePool,
    RequestAddress {
        subnet: IpNet,
        address: Option<IpAddr>,
        gateway: bool,
    },
    ReleaseAddress {
        address: IpAddr,
    },
}

impl Call {
    pub fn api(&self) -> Api {
        match self {
            Call::Activate => Api::Plugin,
            Call::IpamCapabilities
            | Call::AddressSpaces
            | Call::RequestPool { .. }
            | Call::ReleasePool
            | Call::RequestAddress { .. }
            | Call::ReleaseAddress { .. } => Api::Ipam,
            _ => Api::Network,
        }
    }
}

/// Why a call failed, as Docker will show it.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// No such method: answered 404 so that libnetwork treats it as not implemented.
    #[error("unknown method {0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{}", endpoint_message(.0))]
    Endpoint(#[from] EndpointError),
}

fn bad(msg: impl Into<String>) -> DockerError {
    DockerError::BadRequest(msg.into())
}

/// The text of an endpoint error, with what to do about it where the user can do something.
fn endpoint_message(e: &EndpointError) -> String {
    match e {
        EndpointError::Ipam(IpamError::OutsideRange { subnet, range }) => format!(
            "weft: subnet {subnet} is not inside weft's address range {range}; choose a \
             --subnet inside {range} (or start weft with another --ipalloc-range)"
        ),
        EndpointError::Ipam(IpamError::Conflict { addr, owner }) => format!(
            "weft: address {addr} is already in use (by {owner}); choose another --ip or \
             leave --ip out"
        ),
        EndpointError::Ipam(IpamError::Exhausted(subnet)) => format!(
            "weft: no free address left in {subnet}; remove containers or use a larger --subnet"
        ),
        EndpointError::Ipam(IpamError::Reserved(net)) => format!(
            "weft: {} is the network or broadcast address of {}; choose another --ip",
            net.addr(),
            net.trunc()
        ),
        EndpointError::Invalid { field: "address", message } => {
            format!("weft: {message}; choose an --ip inside it")
        }
        other => format!("weft: {other}"),
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct PoolReq {
    pool: String,
    sub_pool: String,
    #[serde(rename = "V6")]
    v6: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct AddressReq {
    #[serde(rename = "PoolID")]
    pool_id: String,
    address: String,
    options: Option<HashMap<String, Value>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct IpData {
    pool: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct NetworkReq {
    #[serde(rename = "IPv4Data")]
    ipv4_data: Option<Vec<IpData>>,
    #[serde(rename = "IPv6Data")]
    ipv6_data: Option<Vec<IpData>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct Interface {
    address: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct EndpointReq {
    #[serde(rename = "NetworkID")]
    network_id: String,
    #[serde(rename = "EndpointID")]
    endpoint_id: String,
    interface: Option<Interface>,
    sandbox_key: String,
}

/// The pool id of a subnet.
pub fn pool_id(subnet: IpNet) -> String {
    format!("{POOL_PREFIX}{subnet}")
}

fn parse_pool_id(id: &str) -> Result<IpNet, DockerError> {
    id.strip_prefix(POOL_PREFIX)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("weft: unknown pool {id:?} (not created by weft's IPAM)")))
}

fn parse_subnet(s: &str) -> Result<IpNet, DockerError> {
    let net: IpNet = s.parse().map_err(|_| bad(format!("weft: {s:?} is not a subnet")))?;
    if net.trunc() != net {
        return Err(bad(format!(
            "weft: {net} is not a network address; did you mean --subnet {}?",
            net.trunc()
        )));
    }
    Ok(net)
}

/// An address with or without a prefix length.
fn parse_addr(s: &str) -> Result<IpAddr, DockerError> {
    let bare = s.split('/').next().unwrap_or(s);
    bare.parse().map_err(|_| bad(format!("weft: {s:?} is not an IP address")))
}

fn decode<T: for<'de> Deserialize<'de> + Default>(body: &[u8]) -> Result<T, DockerError> {
    // Docker sends no body for some calls, and retries a call with an empty body when the
    // plugin hung up on it.
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| bad(format!("weft: cannot decode the request: {e}")))
}

fn need(field: &str, v: String) -> Result<String, DockerError> {
    if v.is_empty() { Err(bad(format!("weft: {field} is missing"))) } else { Ok(v) }
}

/// Decodes one call.
pub fn parse(path: &str, body: &[u8]) -> Result<Call, DockerError> {
    Ok(match path {
        "/Plugin.Activate" => Call::Activate,
        "/NetworkDriver.GetCapabilities" => Call::NetCapabilities,
        "/NetworkDriver.CreateNetwork" => {
            let r: NetworkReq = decode(body)?;
            if r.ipv6_data.is_some_and(|d| !d.is_empty()) {
                return Err(bad(
                    "weft: IPv6 is not supported on Docker networks; leave --ipv6 out",
                ));
            }
            let pools = r
                .ipv4_data
                .unwrap_or_default()
                .iter()
                .filter(|d| !d.pool.is_empty())
                .map(|d| parse_subnet(&d.pool))
                .collect::<Result<_, _>>()?;
            Call::CreateNetwork { pools }
        }
        "/NetworkDriver.DeleteNetwork"
        | "/NetworkDriver.DeleteEndpoint"
        | "/NetworkDriver.AllocateNetwork"
        | "/NetworkDriver.FreeNetwork"
        | "/NetworkDriver.DiscoverNew"
        | "/NetworkDriver.DiscoverDelete"
        | "/NetworkDriver.ProgramExternalConnectivity"
        | "/NetworkDriver.RevokeExternalConnectivity" => Call::NetNothing,
        "/NetworkDriver.CreateEndpoint" => {
            let r: EndpointReq = decode(body)?;
            let address = r.interface.map(|i| i.address).unwrap_or_default();
            if address.is_empty() {
                return Err(bad(
                    "weft: the endpoint has no IPv4 address; create the network with \
                     --ipam-driver weft (or with --subnet)",
                ));
            }
            let address: IpNet = address
                .parse()
                .map_err(|_| bad(format!("weft: {address:?} is not ADDRESS/PREFIX")))?;
            Call::CreateEndpoint {
                network: need("NetworkID", r.network_id)?,
                endpoint: need("EndpointID", r.endpoint_id)?,
                address,
            }
        }
        "/NetworkDriver.EndpointOperInfo" => Call::OperInfo,
        "/NetworkDriver.Join" => {
            let r: EndpointReq = decode(body)?;
            let sandbox = PathBuf::from(need("SandboxKey", r.sandbox_key)?);
            if !sandbox.is_absolute() {
                return Err(bad(format!("weft: SandboxKey {} is not a path", sandbox.display())));
            }
            Call::Join { endpoint: need("EndpointID", r.endpoint_id)?, sandbox }
        }
        "/NetworkDriver.Leave" => {
            let r: EndpointReq = decode(body)?;
            Call::Leave { endpoint: need("EndpointID", r.endpoint_id)? }
        }
        "/IpamDriver.GetCapabilities" => Call::IpamCapabilities,
        "/IpamDriver.GetDefaultAddressSpaces" => Call::AddressSpaces,
        "/IpamDriver.RequestPool" => {
            let r: PoolReq = decode(body)?;
            if r.v6 {
                return Err(bad(
                    "weft: IPv6 is not supported on Docker networks; leave --ipv6 out",
                ));
            }
            if r.pool.is_empty() && !r.sub_pool.is_empty() {
                return Err(bad("weft: --ip-range needs --subnet"));
            }
            if !r.sub_pool.is_empty() && r.sub_pool != r.pool {
                return Err(bad(
                    "weft: --ip-range is not supported (weft allocates in the whole --subnet); \
                     leave it out or give a smaller --subnet",
                ));
            }
            let subnet = (!r.pool.is_empty()).then(|| parse_subnet(&r.pool)).transpose()?;
            Call::RequestPool { subnet }
        }
        "/IpamDriver.ReleasePool" => Call::ReleasePool,
        "/IpamDriver.RequestAddress" => {
            let r: AddressReq = decode(body)?;
            let subnet = parse_pool_id(&r.pool_id)?;
            let gateway = r
                .options
                .as_ref()
                .and_then(|o| o.get("RequestAddressType"))
                .and_then(Value::as_str)
                == Some(GATEWAY_REQUEST);
            let address = (!r.address.is_empty()).then(|| parse_addr(&r.address)).transpose()?;
            Call::RequestAddress { subnet, address, gateway }
        }
        "/IpamDriver.ReleaseAddress" => {
            let r: AddressReq = decode(body)?;
            Call::ReleaseAddress { address: parse_addr(&need("Address", r.address)?)? }
        }
        other => return Err(DockerError::NotFound(other.to_owned())),
    })
}

/// The body of a failed call: the network driver reads `Err`, the IPAM driver `Error`.
pub fn error_body(api: Api, e: &DockerError) -> Value {
    match api {
        Api::Ipam => json!({ "Error": e.to_string() }),
        Api::Network | Api::Plugin => json!({ "Err": e.to_string() }),
    }
}

pub fn activate() -> Value {
    json!({ "Implements": ["NetworkDriver", "IpamDriver"] })
}

pub fn net_capabilities() -> Value {
    // Local scope: no cluster store; weft's own gossip makes the network span hosts.
    json!({ "Scope": "local", "ConnectivityScope": "global" })
}

pub fn ipam_capabilities() -> Value {
    // Addresses are persisted by weft, so Docker need not replay its requests on restart.
    json!({ "RequiresMACAddress": false, "RequiresRequestReplay": false })
}

pub fn address_spaces() -> Value {
    json!({ "LocalDefaultAddressSpace": ADDRESS_SPACE, "GlobalDefaultAddressSpace": ADDRESS_SPACE })
}

pub fn pool(subnet: IpNet) -> Value {
    json!({ "PoolID": pool_id(subnet), "Pool": subnet.to_string(), "Data": {} })
}

pub fn address(net: IpNet) -> Value {
    json!({ "Address": net.to_string(), "Data": {} })
}

pub fn oper_info() -> Value {
    json!({ "Value": {} })
}

/// Join's answer: the inner end of the veth weft created, which Docker moves into the
/// container as `ethweN` with the address from IPAM; the bridge's address as gateway; and no
/// gateway service (that would add docker_gwbridge).
pub fn joined(src_name: &str, gateway: Option<IpAddr>) -> Value {
    let mut v = json!({
        "InterfaceName": { "SrcName": src_name, "DstPrefix": DST_PREFIX },
        "DisableGatewayService": true,
    });
    if let Some(gw) = gateway {
        v["Gateway"] = json!(gw.to_string());
    }
    v
}

/// The prefix Docker names our interfaces with inside the container (`ethwe0`, as Weave).
pub const DST_PREFIX: &str = "ethwe";

pub fn empty() -> Value {
    json!({})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_decode_from_what_dockerd_20_10_sends() {
        assert_eq!(parse("/Plugin.Activate", b"").unwrap(), Call::Activate);
        let pool = parse(
            "/IpamDriver.RequestPool",
            br#"{"AddressSpace":"weft","Pool":"10.2.3.0/24","SubPool":"","Options":{},"V6":false}"#,
        )
        .unwrap();
        assert_eq!(pool, Call::RequestPool { subnet: Some("10.2.3.0/24".parse().unwrap()) });
        let gw = parse(
            "/IpamDriver.RequestAddress",
            br#"{"PoolID":"weft:10.2.3.0/24","Address":"","Options":{"RequestAddressType":"com.docker.network.gateway"}}"#,
        )
        .unwrap();
        assert_eq!(
            gw,
            Call::RequestAddress {
                subnet: "10.2.3.0/24".parse().unwrap(),
                address: None,
                gateway: true
            }
        );
        let ip = parse(
            "/IpamDriver.RequestAddress",
            br#"{"PoolID":"weft:10.2.3.0/24","Address":"10.2.3.9","Options":null}"#,
        )
        .unwrap();
        assert!(matches!(ip, Call::RequestAddress { address: Some(_), gateway: false, .. }));
        let ep = parse(
            "/NetworkDriver.CreateEndpoint",
            br#"{"NetworkID":"n1","EndpointID":"e1","Interface":{"Address":"10.2.3.9/24","AddressIPv6":"","MacAddress":""},"Options":{}}"#,
        )
        .unwrap();
        assert_eq!(
            ep,
            Call::CreateEndpoint {
                network: "n1".into(),
                endpoint: "e1".into(),
                address: "10.2.3.9/24".parse().unwrap()
            }
        );
        let join = parse(
            "/NetworkDriver.Join",
            br#"{"NetworkID":"n1","EndpointID":"e1","SandboxKey":"/var/run/docker/netns/696e5e1f2ee0","Options":{}}"#,
        )
        .unwrap();
        assert_eq!(
            join,
            Call::Join {
                endpoint: "e1".into(),
                sandbox: "/var/run/docker/netns/696e5e1f2ee0".into()
            }
        );
        let rel = parse(
            "/IpamDriver.ReleaseAddress",
            br#"{"PoolID":"weft:10.2.3.0/24","Address":"10.2.3.9"}"#,
        )
        .unwrap();
        assert_eq!(rel, Call::ReleaseAddress { address: "10.2.3.9".parse().unwrap() });
        let net = parse(
            "/NetworkDriver.CreateNetwork",
            br#"{"NetworkID":"n","Options":{},"IPv4Data":[{"AddressSpace":"weft","Gateway":"10.2.3.1/24","Pool":"10.2.3.0/24"}],"IPv6Data":[]}"#,
        )
        .unwrap();
        assert_eq!(net, Call::CreateNetwork { pools: vec!["10.2.3.0/24".parse().unwrap()] });
        assert_eq!(parse("/NetworkDriver.DeleteEndpoint", b"{}").unwrap(), Call::NetNothing);
    }

    #[test]
    fn bad_input_says_what_to_fix() {
        let e = |path: &str, body: &str| parse(path, body.as_bytes()).unwrap_err().to_string();
        assert!(
            e("/IpamDriver.RequestPool", r#"{"Pool":"10.2.3.5/24"}"#)
                .contains("--subnet 10.2.3.0/24")
        );
        assert!(e("/IpamDriver.RequestPool", r#"{"V6":true}"#).contains("IPv6"));
        assert!(
            e("/IpamDriver.RequestPool", r#"{"Pool":"10.2.0.0/16","SubPool":"10.2.3.0/24"}"#)
                .contains("--ip-range")
        );
        assert!(e("/IpamDriver.RequestAddress", r#"{"PoolID":"other"}"#).contains("unknown pool"));
        assert!(
            e("/NetworkDriver.CreateEndpoint", r#"{"NetworkID":"n","EndpointID":"e"}"#)
                .contains("--ipam-driver weft")
        );
        assert!(e("/NetworkDriver.Join", r#"{"EndpointID":"e"}"#).contains("SandboxKey"));
        assert!(e("/NetworkDriver.Join", "{not json").contains("decode"));
        assert!(matches!(parse("/Nope.Call", b""), Err(DockerError::NotFound(_))));
    }

    #[test]
    fn errors_use_each_api_key_and_carry_hints() {
        let conflict = DockerError::from(EndpointError::Ipam(IpamError::Conflict {
            addr: "10.2.3.9".parse().unwrap(),
            owner: "docker:10.2.3.9".into(),
        }));
        assert_eq!(
            error_body(Api::Ipam, &conflict)["Error"].as_str().unwrap(),
            "weft: address 10.2.3.9 is already in use (by docker:10.2.3.9); choose another \
             --ip or leave --ip out"
        );
        let outside = DockerError::from(EndpointError::Ipam(IpamError::OutsideRange {
            subnet: "192.168.0.0/24".parse().unwrap(),
            range: "10.32.0.0/12".parse().unwrap(),
        }));
        let body = error_body(Api::Network, &outside);
        assert!(body["Err"].as_str().unwrap().contains("choose a --subnet inside 10.32.0.0/12"));
        let off = DockerError::from(EndpointError::invalid(
            "address",
            "10.2.4.1 is outside the network's subnet 10.2.3.0/24",
        ));
        assert!(off.to_string().ends_with("choose an --ip inside it"));
    }

    #[test]
    fn answers_have_docker_s_shape() {
        assert_eq!(pool("10.2.3.0/24".parse().unwrap())["PoolID"], "weft:10.2.3.0/24");
        assert_eq!(address("10.2.3.9/24".parse().unwrap())["Address"], "10.2.3.9/24");
        assert_eq!(
            parse_pool_id(&pool_id("10.2.3.0/24".parse().unwrap())).unwrap().to_string(),
            "10.2.3.0/24"
        );
        let j = joined("wfc0123", "10.2.3.1".parse().ok());
        assert_eq!(j["InterfaceName"]["SrcName"], "wfc0123");
        assert_eq!(j["InterfaceName"]["DstPrefix"], "ethwe");
        assert_eq!(j["Gateway"], "10.2.3.1");
        assert!(joined("x", None).get("Gateway").is_none());
        assert_eq!(Call::RequestPool { subnet: None }.api(), Api::Ipam);
        assert_eq!(Call::OperInfo.api(), Api::Network);
    }
}
