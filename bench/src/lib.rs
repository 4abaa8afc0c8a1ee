//! Shared pieces of the benchmarks: namespaces, process timing, percentiles, RSS. Benchmarks
//! print their figures next to a reference measured in the same run, and a ratio.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The value of `--name VALUE` in `args`, or `default` when absent or unparsable.
pub fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Fails unless root.
pub fn require_root() {
    // SAFETY: no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "benchmarks create network namespaces: run as root");
}

/// Runs a command and requires success.
pub fn must(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates a named network namespace (deleted by [`cleanup_prefix`]).
pub fn add_netns(name: &str) -> PathBuf {
    must(Command::new("ip").args(["netns", "add", name]));
    must(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]));
    PathBuf::from("/run/netns").join(name)
}

/// Moves the calling process (its only thread, before any other is started) into `path`, so
/// that every process it spawns runs there.
pub fn enter_netns(path: &Path) {
    let f = std::fs::File::open(path).expect("open netns");
    use std::os::fd::AsRawFd;
    // SAFETY: a valid nsfs descriptor; the process is single-threaded at this point.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
}

/// Deletes every namespace whose name starts with `prefix`, killing what runs in them.
pub fn cleanup_prefix(prefix: &str) {
    let list = must(Command::new("ip").args(["netns", "list"]));
    for name in
        list.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with(prefix))
    {
        let pids = must(Command::new("ip").args(["netns", "pids", name]));
        let me = std::process::id().to_string();
        for pid in pids.split_whitespace().filter(|p| *p != me) {
            let _ = Command::new("kill").args(["-9", pid]).stderr(Stdio::null()).status();
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
}

/// A shared underlay: namespace `{prefix}-ul` with bridge `br0`, and hosts `{prefix}-h1`..`hN`
/// whose `eth0` (10.99.0.I/24, MTU `mtu`) is plugged into it. Earlier namespaces of the same
/// prefix are removed first.
pub fn underlay_lab(prefix: &str, hosts: u32, mtu: u32) {
    let ip = |args: &[&str]| must(Command::new("ip").args(args));
    cleanup_prefix(prefix);
    let ul = format!("{prefix}-ul");
    add_netns(&ul);
    ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &ul, "link", "set", "br0", "up"]);
    let m = mtu.to_string();
    for i in 1..=hosts {
        let h = format!("{prefix}-h{i}");
        let port = format!("h{i}");
        add_netns(&h);
        ip(&[
            "link", "add", "eth0", "netns", &h, "mtu", &m, "type", "veth", "peer", "name", &port,
            "netns", &ul,
        ]);
        ip(&["-n", &ul, "link", "set", &port, "mtu", &m, "master", "br0", "up"]);
        ip(&["-n", &h, "addr", "add", &format!("10.99.0.{i}/24"), "dev", "eth0"]);
        ip(&["-n", &h, "link", "set", "eth0", "up"]);
    }
}

/// Runs a CNI plugin once; returns the wall time from spawn to exit.
pub fn time_plugin(plugin: &Path, env: &[(&str, String)], stdin: &str) -> Duration {
    let start = Instant::now();
    let mut child = Command::new(plugin)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", plugin.display()));
    child.stdin.take().map(|mut s| s.write_all(stdin.as_bytes()));
    let out = child.wait_with_output().expect("plugin output");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{} {:?} failed: {}{}",
        plugin.display(),
        env.first(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// The p-th percentile (0..=100) of `samples`, nearest rank.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut s = samples.to_vec();
    s.sort();
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Directory of the binaries built with this benchmark (target/<profile>).
pub fn bin_dir() -> PathBuf {
    std::env::var_os("WEFT_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("current exe");
        exe.parent().expect("target/<profile>").to_path_buf()
    })
}

/// Starts `weft agent` in namespace `ns` with its files under `dir`.
// The caller kills and waits for the returned child.
#[allow(clippy::zombie_processes)]
pub fn spawn_agent(bin: &Path, ns: &str, dir: &Path, extra: &[&str]) -> Child {
    std::fs::create_dir_all(dir).expect("agent dir");
    let log = std::fs::File::create(dir.join("agent.log")).expect("log");
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(bin.join("weft"))
        .arg("--socket")
        .arg(dir.join("weft.sock"))
        .args(["agent", "--status-addr", "off", "--log-level", "warn", "--state-dir"])
        .arg(dir.join("state"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("starting the agent")
}

/// A client of the agent's local API.
pub type Client = weft_api::AgentClient<tonic::transport::Channel>;

/// Connects to the agent's socket, retrying until it answers (bounded).
pub async fn client(socket: &Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(c) = weft_api::connect(socket).await {
            return c;
        }
        assert!(Instant::now() < deadline, "no agent on {}", socket.display());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let s: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&s, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&s[..1], 99.0), Duration::from_millis(1));
    }
}
