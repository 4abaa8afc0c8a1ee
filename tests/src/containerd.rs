//! A private containerd with its CRI plugin, as a kubelet stand-in: its own root, state and
//! socket, CNI configuration and plugin directories given by the test. It never touches a
//! system containerd.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{must, unique, wait_until};

/// A running containerd, stopped and cleaned up on drop.
#[derive(Debug)]
pub struct Containerd {
    pub socket: PathBuf,
    pub root: PathBuf,
    pub state: PathBuf,
    child: Child,
}

impl Containerd {
    /// Starts containerd with the CRI plugin using `conf_dir` and `bin_dir` for CNI, and imports
    /// the pause and busybox images.
    pub fn start(conf_dir: &Path, bin_dir: &Path) -> Containerd {
        for tool in ["containerd", "ctr", "runc"] {
            assert!(
                Command::new("sh")
                    .arg("-c")
                    .arg(format!("command -v {tool}"))
                    .status()
                    .is_ok_and(|s| s.success()),
                "{tool} is not installed; the test command (scripts/test.sh) installs it"
            );
        }
        let name = unique("ctd");
        let root = PathBuf::from("/var/lib").join(&name);
        let state = PathBuf::from("/run").join(&name);
        std::fs::create_dir_all(&state).expect("containerd state dir");
        let socket = state.join("containerd.sock");
        // restrict_oom_score_adj: this VM lacks CAP_SYS_RESOURCE and runc would fail with the
        // sandbox's default oom_score_adj of -998.
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/wte/pause:1"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{state}/runc"
"#,
            root = root.display(),
            state = state.display(),
            sock = socket.display(),
            bin = bin_dir.display(),
            conf = conf_dir.display()
        );
        let cfg = state.join("config.toml");
        std::fs::write(&cfg, config).expect("containerd config");
        let log = std::fs::File::create(state.join("containerd.log")).expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let c = Containerd { socket, root, state, child };
        wait_until(Duration::from_secs(30), "containerd's socket", || c.socket.exists());
        let images = c.state.join("images");
        let pause = crate::oci::busybox_image(
            &images,
            "localhost/wte/pause:1",
            &["/bin/sleep", "2147483647"],
        );
        let busybox = crate::oci::busybox_image(&images, "localhost/wte/busybox:1", &[]);
        for img in [pause, busybox] {
            must(
                Command::new("ctr")
                    .arg("-a")
                    .arg(&c.socket)
                    .args(["-n", "k8s.io", "image", "import"])
                    .arg(img),
            );
        }
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Shims and containers of this instance, then its mounts, then its directories.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "for p in $(pgrep -f 'containerd-shim.*{s}'); do kill -9 $p; done; \
                 awk '$2 ~ \"^{r}\" {{print $2}}' /proc/mounts | sort -r | xargs -r umount -l",
                s = self.state.display(),
                r = self.root.display()
            ))
            .status();
        let _ = std::fs::remove_dir_all(&self.state);
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all("/run/wte-pods");
    }
}
