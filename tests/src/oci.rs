//! A minimal container image built from the host's busybox: one layer, written as a tar that is
//! both an OCI image layout and a docker-archive, so `ctr image import` and `podman load` both
//! take it. No registry involved.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

fn digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// The rootfs layer: /bin/busybox, a link per applet, /etc/passwd, empty mount points.
fn busybox_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (install busybox-static)");
    let list =
        std::process::Command::new("/bin/busybox").arg("--list").output().expect("busybox --list");
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = |path: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        tar.append_data(&mut h, path, std::io::empty()).expect("tar dir");
    };
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "var"] {
        dir(d);
    }
    let mut file = |path: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, path, data).expect("tar file");
    };
    file("bin/busybox", &busybox, 0o755);
    file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644);
    file("etc/group", b"root:x:0:\n", 0o644);
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet == "busybox" {
            continue;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox").expect("tar link");
    }
    tar.into_inner().expect("layer tar")
}

/// Writes `OUT_DIR/NAME.tar` for image reference `reference` with `entrypoint` (empty: /bin/sh).
pub fn busybox_image(out_dir: &Path, reference: &str, entrypoint: &[&str]) -> PathBuf {
    let layer = busybox_layer();
    let layer_digest = digest(&layer);
    let exec = if entrypoint.is_empty() {
        json!({"Cmd": ["/bin/sh"]})
    } else {
        json!({"Entrypoint": entrypoint})
    };
    let mut cfg = json!({"Env": ["PATH=/bin"], "WorkingDir": "/"});
    if let (Some(c), Some(e)) = (cfg.as_object_mut(), exec.as_object()) {
        c.extend(e.clone());
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))
    .expect("config");
    let config_digest = digest(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
    }))
    .expect("manifest");
    let manifest_digest = digest(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest.len(),
            "annotations": {"io.containerd.image.name": reference, "org.opencontainers.image.ref.name": reference},
        }],
    }))
    .expect("index");
    let blob = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
    let docker = serde_json::to_vec(&json!([{
        "Config": blob(&config_digest), "RepoTags": [reference], "Layers": [blob(&layer_digest)],
    }]))
    .expect("docker manifest");

    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, path, data).expect("image tar");
    };
    add(&blob(&layer_digest), &layer);
    add(&blob(&config_digest), &config);
    add(&blob(&manifest_digest), &manifest);
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index);
    add("manifest.json", &docker);
    let bytes = tar.into_inner().expect("image tar");
    std::fs::create_dir_all(out_dir).expect("image dir");
    let name = reference.rsplit('/').next().unwrap_or("image").replace(':', "-");
    let path = out_dir.join(format!("{name}.tar"));
    std::fs::File::create(&path).and_then(|mut f| f.write_all(&bytes)).expect("writing the image");
    path
}
