//! A Docker lab host: a lab host's network namespace plus a mount namespace of its own, in
//! which `/run/docker/plugins` is a private directory (dockerd finds plugins only there, by
//! name, so every host's dockerd must see its own agent's `weft.sock`), and a real `dockerd`
//! with its own data root, exec root, socket and pid file. The agent runs in the same mount
//! namespace (`Agent::start_in_mount`), because the sandbox namespaces dockerd bind-mounts
//! under its exec root are visible only there. Everything is removed on drop; no dockerd is
//! left running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{Netns, must, run, sh, wait_until};

/// Where the mount namespaces are pinned: a private bind mount (a mount namespace can only be
/// pinned on a mount that does not propagate).
const MNT_DIR: &str = "/run/wte-mnt";
pub const IMAGE: &str = "localhost/wte/busybox:1";

/// Fails unless dockerd is installed (scripts/deps.sh installs docker.io).
pub fn require_docker() {
    for tool in ["dockerd", "docker", "containerd", "runc", "nsenter", "unshare"] {
        assert!(
            sh(&format!("command -v {tool}")).status.success(),
            "{tool} is not installed; scripts/deps.sh installs docker.io"
        );
    }
}

/// Creates the mount namespace of host `ns`, with `plugins` mounted on /run/docker/plugins.
pub fn mount_namespace(ns: &Netns, plugins: &Path) -> PathBuf {
    std::fs::create_dir_all(MNT_DIR).expect("mount ns dir");
    std::fs::create_dir_all(plugins).expect("plugins dir");
    std::fs::create_dir_all("/run/docker/plugins").expect("/run/docker/plugins");
    let pinned = sh(&format!("grep -q ' {MNT_DIR} ' /proc/self/mountinfo")).status.success();
    if !pinned {
        must(Command::new("mount").args(["--bind", MNT_DIR, MNT_DIR]));
        must(Command::new("mount").args(["--make-private", MNT_DIR]));
    }
    let file = Path::new(MNT_DIR).join(&ns.name);
    std::fs::write(&file, b"").expect("mount ns file");
    must(
        Command::new("unshare")
            .arg(format!("--mount={}", file.display()))
            .args(["--propagation", "slave", "mount", "--bind"])
            .arg(plugins)
            .arg("/run/docker/plugins"),
    );
    file
}

/// A dockerd in a lab host.
#[derive(Debug)]
pub struct DockerHost {
    pub netns_path: PathBuf,
    pub mount_ns: PathBuf,
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// A directory put first on dockerd's PATH (e.g. [`legacy_iptables`]).
    path_first: Option<PathBuf>,
    child: Option<Child>,
}

/// A directory in which `iptables`, `iptables-save`, `iptables-restore` and their IPv6
/// versions are iptables-legacy, for a dockerd that must use the legacy backend.
pub fn legacy_iptables(dir: &Path) -> PathBuf {
    let bin = dir.join("legacy-bin");
    std::fs::create_dir_all(&bin).expect("legacy bin dir");
    for v in ["iptables", "ip6tables"] {
        for suffix in ["", "-save", "-restore"] {
            let link = bin.join(format!("{v}{suffix}"));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(format!("/usr/sbin/{v}-legacy{suffix}"), &link)
                .expect("legacy iptables link");
        }
    }
    bin
}

impl DockerHost {
    /// Starts dockerd in `ns` (network) and `mount_ns`, with its state under `dir`, and loads
    /// the busybox image.
    pub fn start(netns_path: &Path, mount_ns: &Path, dir: &Path) -> DockerHost {
        DockerHost::start_with_path(netns_path, mount_ns, dir, None)
    }

    /// [`Self::start`] with `path_first` first on dockerd's PATH.
    pub fn start_with_path(
        netns_path: &Path,
        mount_ns: &Path,
        dir: &Path,
        path_first: Option<PathBuf>,
    ) -> DockerHost {
        require_docker();
        std::fs::create_dir_all(dir).expect("dockerd dir");
        let mut d = DockerHost {
            netns_path: netns_path.to_owned(),
            mount_ns: mount_ns.to_owned(),
            dir: dir.to_owned(),
            socket: dir.join("docker.sock"),
            path_first,
            child: None,
        };
        d.spawn();
        let image = crate::oci::busybox_image(&dir.join("images"), IMAGE, &[]);
        must(d.docker().arg("load").arg("-i").arg(image));
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .expect("dockerd log");
        let mut cmd = Command::new("nsenter");
        if let Some(first) = &self.path_first {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", first.display()));
        }
        let child = cmd
            .arg(format!("--mount={}", self.mount_ns.display()))
            .arg(format!("--net={}", self.netns_path.display()))
            .arg("dockerd")
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--pidfile")
            .arg(self.dir.join("docker.pid"))
            // Containers keep running across a dockerd restart (the restart test).
            .arg("--live-restore")
            .arg("--userland-proxy=false")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting dockerd");
        self.child = Some(child);
        wait_until(Duration::from_secs(60), "dockerd to answer", || {
            run(self.docker().arg("version")).status.success()
        });
    }

    /// A `docker` command against this host's dockerd.
    pub fn docker(&self) -> Command {
        let mut c = Command::new("docker");
        c.arg("-H").arg(format!("unix://{}", self.socket.display()));
        c
    }

    /// Runs docker; returns (success, stdout, stderr).
    pub fn try_docker(&self, args: &[&str]) -> (bool, String, String) {
        let out = run(self.docker().args(args));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )
    }

    /// Runs docker and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.try_docker(args);
        assert!(ok, "docker {args:?} failed: {out}\n{err}\n{}", self.log_tail());
        out
    }

    /// Stops dockerd (SIGTERM; running containers stay, --live-restore) and starts it again.
    pub fn restart(&mut self) {
        self.stop_daemon();
        self.spawn();
    }

    fn stop_daemon(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill with a pid we started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for DockerHost {
    fn drop(&mut self) {
        if self.child.is_some() {
            let ids = run(self.docker().args(["ps", "-aq"]));
            let ids = String::from_utf8_lossy(&ids.stdout).to_string();
            if !ids.trim().is_empty() {
                let _ = run(self.docker().args(["rm", "-f"]).args(ids.split_whitespace()));
            }
        }
        self.stop_daemon();
        // What --live-restore kept: the shims and containers of this dockerd's containerd.
        let exec = self.dir.join("exec");
        let _ = sh(&format!(
            "for p in $(pgrep -f 'containerd.*{e}'); do kill -9 $p; done; \
             nsenter --mount={m} sh -c \"awk '\\$2 ~ \\\"^{d}\\\" {{print \\$2}}' /proc/mounts | sort -r | xargs -r umount -l\"",
            e = exec.display(),
            m = self.mount_ns.display(),
            d = self.dir.display()
        ));
        let _ = Command::new("umount").arg(&self.mount_ns).status();
        let _ = std::fs::remove_file(&self.mount_ns);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
