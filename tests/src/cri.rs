//! A CRI client (what kubelet speaks to containerd), generated from the CRI's v1.proto.

use std::path::Path;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

#[allow(missing_docs, missing_debug_implementations, unused_qualifications, clippy::all)]
pub mod v1 {
    tonic::include_proto!("runtime.v1");
}

pub use v1::runtime_service_client::RuntimeServiceClient;

/// Connects to a runtime's CRI socket.
pub async fn connect(socket: &Path) -> RuntimeServiceClient<Channel> {
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://cri.sock")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move { tokio::net::UnixStream::connect(p).await.map(TokioIo::new) }
        }))
        .await
        .expect("connecting to the CRI socket");
    RuntimeServiceClient::new(channel)
}

/// A pod sandbox config as kubelet sends it, with an optional hostPort mapping.
pub fn sandbox_config(name: &str, host_port: Option<(i32, i32)>) -> v1::PodSandboxConfig {
    v1::PodSandboxConfig {
        metadata: Some(v1::PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            namespace: "default".to_owned(),
            attempt: 0,
        }),
        hostname: name.to_owned(),
        log_directory: format!("/run/wte-pods/{name}"),
        port_mappings: host_port
            .map(|(host, container)| {
                vec![v1::PortMapping {
                    protocol: v1::Protocol::Tcp as i32,
                    container_port: container,
                    host_port: host,
                    host_ip: String::new(),
                }]
            })
            .unwrap_or_default(),
        linux: Some(v1::LinuxPodSandboxConfig {
            security_context: Some(v1::LinuxSandboxSecurityContext {
                namespace_options: Some(v1::NamespaceOption {
                    network: v1::NamespaceMode::Pod as i32,
                    pid: v1::NamespaceMode::Container as i32,
                    ipc: v1::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The network namespace path of a sandbox, from containerd's verbose status.
pub fn netns_of(info: &std::collections::HashMap<String, String>) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    let namespaces = v["runtimeSpec"]["linux"]["namespaces"].as_array()?;
    namespaces
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .map(str::to_owned)
}
