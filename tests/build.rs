//! Generates a client for the Kubernetes CRI (proto/cri/v1.proto, Apache-2.0, from
//! k8s.io/cri-api) with protox, so the runtime tests drive containerd as kubelet does.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/cri/v1.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto/cri"])?;
    tonic_prost_build::configure().build_server(false).build_transport(false).compile_fds(fds)?;
    Ok(())
}
