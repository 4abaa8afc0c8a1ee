//! Real container runtimes calling `weft-cni`: containerd's CRI plugin (as kubelet drives it)
//! chained with the reference `portmap` plugin, and podman with its CNI backend.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use weft_e2e::containerd::Containerd;
use weft_e2e::cri::{self, v1};
use weft_e2e::oci;
use weft_e2e::*;

/// The runtimes share runc and the root namespace: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// A CNI plugin directory with weft-cni and the reference plugins the runtimes need.
fn plugin_dir(dir: &Path, weft_cni: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("plugin dir");
    for p in ["portmap", "loopback"] {
        let src = Path::new(REFERENCE_PLUGINS).join(p);
        assert!(
            src.exists(),
            "{} is missing; install containernetworking-plugins (scripts/test.sh does)",
            src.display()
        );
        std::os::unix::fs::symlink(src, bin.join(p)).expect("symlink");
    }
    std::os::unix::fs::symlink(weft_cni, bin.join("weft-cni")).expect("symlink");
    bin
}

fn conflist(socket: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "weft",
        "plugins": [
            {"type": "weft-cni", "socket": socket, "hairpinMode": true},
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
        ]
    })
    .to_string()
}

fn ping_from(netns_path: &str, ip: &str) -> bool {
    let name = Path::new(netns_path).file_name().and_then(|n| n.to_str()).unwrap_or_default();
    run(Command::new("ip").args(["netns", "exec", name, "ping", "-c1", "-W2", ip])).status.success()
}

struct Sandbox {
    id: String,
    ip: String,
    netns: String,
}

#[test]
fn containerd_cri_runs_ten_pods_through_weft_cni_and_portmap() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let agent = Agent::start_in_root(AgentOpts {
        range: "10.77.0.0/16".into(),
        extra: ["--bridge", "wtecri0", "--nft-table", "wtecri"].map(String::from).to_vec(),
    });
    let dir = agent.dir.join("cni");
    let bin = plugin_dir(&dir, &agent.bins.cni);
    let conf_dir = dir.join("net.d");
    std::fs::create_dir_all(&conf_dir).expect("conf dir");
    std::fs::write(conf_dir.join("10-weft.conflist"), conflist(&agent.socket)).expect("conflist");
    let ctd = Containerd::start(&conf_dir, &bin);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut client = cri::connect(&ctd.socket).await;
        let mut pods = Vec::new();
        for i in 0..10 {
            let port = (i == 0).then_some((18080, 80));
            let req = v1::RunPodSandboxRequest {
                config: Some(cri::sandbox_config(&format!("pod{i}"), port)),
                runtime_handler: String::new(),
            };
            let id = match client.run_pod_sandbox(req).await {
                Ok(r) => r.into_inner().pod_sandbox_id,
                Err(e) => panic!("RunPodSandbox pod{i}: {e}\ncontainerd log:\n{}", ctd.log()),
            };
            let st = client
                .pod_sandbox_status(v1::PodSandboxStatusRequest {
                    pod_sandbox_id: id.clone(),
                    verbose: true,
                })
                .await
                .expect("PodSandboxStatus")
                .into_inner();
            let ip = st.status.and_then(|s| s.network).map(|n| n.ip).unwrap_or_default();
            let netns = cri::netns_of(&st.info).expect("sandbox netns path");
            pods.push(Sandbox { id, ip, netns });
        }
        let ips: std::collections::HashSet<&str> = pods.iter().map(|p| p.ip.as_str()).collect();
        assert_eq!(ips.len(), 10, "addresses must be distinct");
        assert!(
            pods.iter().all(|p| p.ip.starts_with("10.77.")),
            "addresses come from weft's range"
        );
        for p in &pods[1..] {
            assert!(ping_from(&pods[0].netns, &p.ip), "pod0 cannot reach {}", p.ip);
        }
        assert!(ping_from(&pods[9].netns, &pods[0].ip), "pod9 cannot reach pod0");

        // hostPort 18080 on the host -> port 80 of pod0, through portmap's DNAT.
        let ccfg = v1::ContainerConfig {
            metadata: Some(v1::ContainerMetadata { name: "listener".into(), attempt: 0 }),
            image: Some(v1::ImageSpec {
                image: "localhost/wte/busybox:1".into(),
                ..Default::default()
            }),
            command: ["nc", "-ll", "-p", "80", "-e", "echo", "weft-hostport"]
                .map(String::from)
                .to_vec(),
            log_path: "listener.log".into(),
            ..Default::default()
        };
        let created = client
            .create_container(v1::CreateContainerRequest {
                pod_sandbox_id: pods[0].id.clone(),
                config: Some(ccfg),
                sandbox_config: Some(cri::sandbox_config("pod0", Some((18080, 80)))),
            })
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        client
            .start_container(v1::StartContainerRequest { container_id: created })
            .await
            .expect("StartContainer");
        let host_addr = agent.status().expect("status")["bridge"]["addresses"][0]
            .as_str()
            .expect("bridge address")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let mut answer = String::new();
        wait_until(Duration::from_secs(20), "the hostPort to answer", || {
            answer.clear();
            TcpStream::connect((host_addr.as_str(), 18080))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.read_to_string(&mut answer)
                })
                .is_ok()
                && answer.contains("weft-hostport")
        });

        for p in &pods {
            client
                .stop_pod_sandbox(v1::StopPodSandboxRequest { pod_sandbox_id: p.id.clone() })
                .await
                .expect("StopPodSandbox");
            client
                .remove_pod_sandbox(v1::RemovePodSandboxRequest { pod_sandbox_id: p.id.clone() })
                .await
                .expect("RemovePodSandbox");
        }
    });
    let left: Vec<Value> = agent.endpoints().into_iter().filter(|e| e["kind"] == "cni").collect();
    assert!(left.is_empty(), "removing the sandboxes must release every address: {left:?}");
    assert_eq!(
        agent.status().expect("status")["ipam"]["used"],
        1,
        "only the bridge address remains"
    );
}

#[test]
fn podman_runs_a_container_on_the_weft_network() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    assert!(
        run(Command::new("sh").args(["-c", "command -v podman"])).status.success(),
        "podman is not installed; scripts/test.sh installs it"
    );
    let agent = Agent::start(AgentOpts::default());
    let dir = agent.dir.join("podman");
    let bin = plugin_dir(&dir, &agent.bins.cni);
    let net_dir = dir.join("net.d");
    std::fs::create_dir_all(&net_dir).expect("net dir");
    std::fs::write(net_dir.join("weft.conflist"), conflist(&agent.socket)).expect("conflist");
    let storage = PathBuf::from("/var/lib").join(unique("pdm"));
    // This VM has no CAP_SYS_RESOURCE: podman's default rlimits would make runc fail.
    let containers_conf = format!(
        "[containers]\ndefault_ulimits = [\"nofile=16384:16384\", \"nproc=16384:16384\"]\n\
         [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\n\
         [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\ndefault_network = \"weft\"\n",
        bin.display(),
        net_dir.display()
    );
    let storage_conf = format!(
        "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
        storage.join("graph").display(),
        dir.join("run").display()
    );
    std::fs::write(dir.join("containers.conf"), containers_conf).expect("containers.conf");
    std::fs::write(dir.join("storage.conf"), storage_conf).expect("storage.conf");
    let podman = || {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", dir.join("storage.conf"));
        c
    };
    let image = oci::busybox_image(&dir, "localhost/wte/busybox:1", &[]);
    must(podman().args(["load", "-q", "-i"]).arg(&image));
    let out = run(podman().args([
        "run",
        "--rm",
        "--network",
        "weft",
        "localhost/wte/busybox:1",
        "sh",
        "-c",
        "ip -4 -o addr show eth0 && ping -c1 -W2 10.32.0.1",
    ]));
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = podman().args(["system", "reset", "-f"]).output();
    let _ = std::fs::remove_dir_all(&storage);
    assert!(out.status.success(), "podman run failed:\n{text}");
    assert!(text.contains("inet 10.32."), "the container has no weft address:\n{text}");
    assert!(text.contains("1 packets received"), "the container cannot reach the bridge:\n{text}");
    let left: Vec<Value> = agent.endpoints().into_iter().filter(|e| e["kind"] == "cni").collect();
    assert!(left.is_empty(), "podman's DEL must release the address: {left:?}");
}
