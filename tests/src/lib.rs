//! End-to-end test harness: network namespaces as hosts and pods, real `weft` agents and the
//! real `weft-cni` binary. Everything a test creates is named with a per-process prefix and
//! removed when its owner is dropped, also when the test fails.
//!
//! These tests need root. Without it they fail with a message saying so; they never pass
//! without having run.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use serde_json::Value;

pub mod containerd;
pub mod cri;
pub mod docker;
pub mod oci;

/// Fails the test unless it runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test creates network namespaces and must run as root (try: sudo -E cargo test)"
    );
}

/// The binaries under test.
#[derive(Clone, Debug)]
pub struct Bins {
    pub weft: PathBuf,
    pub cni: PathBuf,
}

/// Finds `weft` and `weft-cni` next to the test executable (target/<profile>/), or in
/// `WEFT_BIN_DIR`.
pub fn bins() -> Bins {
    let dir = std::env::var_os("WEFT_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("test executable path");
        exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf()
    });
    let b = Bins { weft: dir.join("weft"), cni: dir.join("weft-cni") };
    for p in [&b.weft, &b.cni] {
        assert!(
            p.exists(),
            "{} is missing: build the binaries first (cargo build --bins, same profile)",
            p.display()
        );
    }
    b
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for interface names when suffixed.
pub fn unique(tag: &str) -> String {
    format!("wte{}{}{}", std::process::id() % 100_000, tag, COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Runs a command; panics with its output if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and requires success.
pub fn must(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sh(script: &str) -> Output {
    run(Command::new("sh").arg("-c").arg(script))
}

/// Polls `cond` until it holds or `timeout` passes; panics naming `what` on timeout.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = unique(tag);
        must(Command::new("ip").args(["netns", "add", &name]));
        must(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Netns { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that runs inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn sh(&self, script: &str) -> Output {
        run(self.cmd("sh").arg("-c").arg(script))
    }

    /// Whether `ping -c1` to `ip` succeeds within 2 s.
    pub fn ping(&self, ip: &str) -> bool {
        run(self.cmd("ping").args(["-c1", "-W2", ip])).status.success()
    }

    /// Interface names in the namespace.
    pub fn links(&self) -> Vec<String> {
        let out = must(Command::new("ip").args(["-n", &self.name, "-o", "link", "show"]));
        out.lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "pids", &self.name]).output().map(|o| {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        });
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// How to start an agent.
#[derive(Clone, Debug)]
pub struct AgentOpts {
    pub range: String,
    pub extra: Vec<String>,
}

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts { range: "10.32.0.0/12".into(), extra: Vec::new() }
    }
}

impl AgentOpts {
    /// The default range, a nickname, and more flags.
    pub fn nick(nick: &str, extra: &[&str]) -> AgentOpts {
        let mut e = vec!["--nickname".to_owned(), nick.to_owned()];
        e.extend(extra.iter().map(|s| s.to_string()));
        AgentOpts { extra: e, ..AgentOpts::default() }
    }
}

/// A `weft agent` running in a host namespace (or the root namespace), with its own socket
/// and state directory.
#[derive(Debug)]
pub struct Agent {
    pub bins: Bins,
    /// The host namespace; `None` for an agent in the root namespace (runtime tests).
    pub netns: Option<Netns>,
    pub name: String,
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// A mount namespace the agent runs in besides its network namespace (a Docker lab
    /// host, see `docker::DockerHost`).
    pub mount_ns: Option<PathBuf>,
    opts: AgentOpts,
    child: Option<Child>,
}

impl Agent {
    /// Starts an agent in a new host namespace and waits until it is ready.
    pub fn start(opts: AgentOpts) -> Agent {
        require_root();
        let netns = Netns::new("h");
        let name = netns.name.clone();
        Agent::launch(Some(netns), name, opts)
    }

    /// Starts an agent in a given host namespace (e.g. a lab host).
    pub fn start_in(netns: Netns, opts: AgentOpts) -> Agent {
        require_root();
        let name = netns.name.clone();
        Agent::launch(Some(netns), name, opts)
    }

    /// Starts an agent in the root namespace (where container runtimes run). Give it its own
    /// bridge and nftables table names in `opts.extra`.
    pub fn start_in_root(opts: AgentOpts) -> Agent {
        require_root();
        Agent::launch(None, unique("root"), opts)
    }

    /// Starts an agent in a lab host's network and mount namespaces.
    pub fn start_in_mount(netns: Netns, mount_ns: PathBuf, opts: AgentOpts) -> Agent {
        require_root();
        let name = netns.name.clone();
        Agent::launch_with(Some(netns), Some(mount_ns), name, opts)
    }

    fn launch(netns: Option<Netns>, name: String, opts: AgentOpts) -> Agent {
        Agent::launch_with(netns, None, name, opts)
    }

    fn launch_with(
        netns: Option<Netns>,
        mount_ns: Option<PathBuf>,
        name: String,
        opts: AgentOpts,
    ) -> Agent {
        let bins = bins();
        let dir = PathBuf::from("/run/wte").join(&name);
        std::fs::create_dir_all(&dir).expect("creating the test directory");
        let socket = dir.join("weft.sock");
        let mut a = Agent { bins, netns, name, dir, socket, mount_ns, opts, child: None };
        a.spawn();
        a.wait_ready();
        a
    }

    /// A command run where the agent runs.
    pub fn cmd(&self, program: &str) -> Command {
        match (&self.netns, &self.mount_ns) {
            (Some(ns), Some(mnt)) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--mount={}", mnt.display()))
                    .arg(format!("--net={}", ns.path().display()))
                    .arg(program);
                c
            }
            (Some(ns), None) => ns.cmd(program),
            (None, _) => Command::new(program),
        }
    }

    /// The host namespace (panics for a root-namespace agent).
    pub fn host(&self) -> &Netns {
        self.netns.as_ref().expect("this agent runs in the root namespace")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("agent log");
        let mut cmd = self.cmd(self.bins.weft.to_str().unwrap_or_default());
        cmd.arg("--socket").arg(&self.socket).arg("agent").arg("--state-dir").arg(self.state_dir());
        if !self.opts.extra.iter().any(|a| a == "--status-addr") {
            cmd.args(["--status-addr", "off"]);
        }
        cmd.args(["--ipalloc-range", &self.opts.range, "--log-level", "debug"]);
        cmd.args(&self.opts.extra);
        cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log);
        self.child = Some(cmd.spawn().expect("starting the agent"));
    }

    /// The agent's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("the agent exited ({status}) during start-up:\n{}", self.log());
            }
            if self.status().is_some_and(|s| s["ready"] == true) {
                return;
            }
            assert!(Instant::now() < deadline, "agent not ready after 30 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The status report, if the agent answers.
    pub fn status(&self) -> Option<Value> {
        let out = run(self.weft().args(["status", "--json"]));
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    }

    /// A `weft` CLI command aimed at this agent.
    pub fn weft(&self) -> Command {
        let mut c = self.cmd(self.bins.weft.to_str().unwrap_or_default());
        c.arg("--socket").arg(&self.socket);
        c
    }

    /// `weft ps --json`.
    pub fn endpoints(&self) -> Vec<Value> {
        let out = must(self.weft().args(["ps", "--json"]));
        serde_json::from_str::<Value>(&out)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// The agent's process id while it runs (`ip netns exec` execs the agent in place, so this
    /// is the agent itself), for reading `/proc/PID`.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the agent and waits for the process to end.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = run(self.weft().arg("stop").arg("--state-dir").arg(self.state_dir()));
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("the agent did not stop within 20 s:\n{}", self.log());
        }
    }

    /// `weft reset`: the agent hands its address space over and stops, and its devices and
    /// state are removed.
    pub fn reset(&mut self) {
        if let Some(mut c) = self.child.take() {
            let mut cmd = self.weft();
            cmd.arg("reset").arg("--state-dir").arg(self.state_dir());
            for flag in ["--bridge", "--nft-table"] {
                if let Some(v) = self.flag(flag) {
                    cmd.args([flag, v]);
                }
            }
            let out = run(&mut cmd);
            assert!(
                out.status.success(),
                "weft reset failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
            let _ = c.wait();
        }
    }

    /// The `ipam` part of the status report.
    pub fn ipam(&self) -> Value {
        self.status().expect("status")["ipam"].clone()
    }

    /// Starts the agent again with the same state, without waiting for readiness.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the agent is still running");
        self.spawn();
    }

    /// Stops the agent and starts it again with other options (same namespace and state).
    pub fn restart_with(&mut self, opts: AgentOpts) {
        self.stop();
        self.opts = opts;
        self.restart();
    }

    pub fn restart(&mut self) {
        self.start_again();
        self.wait_ready();
    }

    /// A CNI network configuration for this agent.
    pub fn conf(&self, version: &str) -> String {
        serde_json::json!({
            "cniVersion": version, "name": "weft", "type": "weft-cni",
            "socket": self.socket, "readyTimeoutSeconds": 20
        })
        .to_string()
    }

    /// Runs weft-cni against this agent.
    pub fn cni(&self, command: &str, container: &str, netns: Option<&Path>, conf: &str) -> CniOut {
        cni(&self.bins, command, container, "eth0", netns, conf)
    }

    /// The agent's peer name.
    pub fn peer_name(&self) -> String {
        self.status().expect("status")["peer"]["name"].as_str().unwrap_or_default().to_owned()
    }

    /// A pod: a new namespace attached with `weft attach CIDR` as `eth0`.
    pub fn pod(&self, cidr: &str) -> Netns {
        let ns = Netns::new("p");
        must(self.weft().args(["attach", cidr, "--ifname", "eth0", "--netns"]).arg(ns.path()));
        ns
    }

    /// The overlay mode of the link to `peer` ("fastdp", "sleeve", "relayed"), if linked.
    pub fn overlay_mode(&self, peer: &str) -> Option<String> {
        let s = self.status()?;
        s["overlay"]["links"]
            .as_array()?
            .iter()
            .find(|l| l["peer"] == peer)
            .and_then(|l| l["mode"].as_str())
            .map(str::to_owned)
    }

    /// Host-side veths of endpoints.
    pub fn endpoint_links(&self) -> Vec<String> {
        let out = must(self.cmd("ip").args(["-o", "link", "show"]));
        out.lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            .filter(|l| l.starts_with("vwf"))
            .collect()
    }
}

impl Agent {
    fn flag(&self, name: &str) -> Option<&str> {
        let i = self.opts.extra.iter().position(|a| a == name)?;
        self.opts.extra.get(i + 1).map(String::as_str)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if self.netns.is_none() {
            // A root-namespace agent leaves its bridge and table behind on purpose (pods keep
            // their network); the test removes them.
            if let Some(bridge) = self.flag("--bridge") {
                let _ = Command::new("ip").args(["link", "del", bridge]).status();
            }
            if let Some(table) = self.flag("--nft-table") {
                for family in ["inet", "ip"] {
                    let _ = Command::new("nft").args(["delete", "table", family, table]).status();
                }
                // The overlay's VXLAN filter (with a password) and its per-peer counters.
                for own in [format!("{table}-overlay"), format!("{table}-traffic")] {
                    let _ = Command::new("nft").args(["delete", "table", "inet", &own]).status();
                }
            }
        }
        if std::thread::panicking() {
            eprintln!("--- agent log ({}) ---\n{}", self.name, self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The traffic tool run inside pods (tests/tools/nettool.py).
pub fn nettool() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/nettool.py")
}

/// A process started in a namespace whose first output line says it is ready.
#[derive(Debug)]
pub struct Server {
    child: Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Server {
    /// Starts `nettool.py ARGS` in `ns` and waits for its "ready" line.
    pub fn start(ns: &Netns, args: &[&str]) -> Server {
        use std::io::BufRead;
        let mut child = ns
            .cmd("python3")
            .arg(nettool())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nettool");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        assert_eq!(first, "ready", "nettool {args:?} did not start");
        Server { child, lines }
    }

    /// The next output line (the result), waiting at most for the process to end.
    pub fn result(mut self) -> String {
        let line = self.lines.next().and_then(Result::ok).unwrap_or_default();
        let _ = self.child.wait();
        line
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Hosts on a shared underlay: namespace `ul` with bridge `br0`, and per host a namespace
/// whose `eth0` (10.99.0.I/24) is plugged into it.
#[derive(Debug)]
pub struct Lab {
    pub underlay: Netns,
    pub ips: Vec<String>,
    cuts: std::sync::Mutex<Vec<(usize, usize)>>,
}

impl Lab {
    /// Builds the underlay and `n` hosts; returns the host namespaces for agents to run in.
    pub fn new(n: usize, mtu: u32) -> (Lab, Vec<Netns>) {
        require_root();
        let underlay = Netns::new("ul");
        let ul = underlay.name.clone();
        must(Command::new("ip").args(["-n", &ul, "link", "add", "br0", "type", "bridge"]));
        must(Command::new("ip").args(["-n", &ul, "link", "set", "br0", "up"]));
        let mut hosts = Vec::new();
        let mut ips = Vec::new();
        for i in 1..=n {
            let h = Netns::new("h");
            let ip = format!("10.99.0.{i}");
            let port = format!("h{i}");
            must(Command::new("ip").args([
                "link",
                "add",
                "eth0",
                "netns",
                &h.name,
                "mtu",
                &mtu.to_string(),
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &ul,
            ]));
            must(Command::new("ip").args([
                "-n",
                &ul,
                "link",
                "set",
                &port,
                "mtu",
                &mtu.to_string(),
                "master",
                "br0",
                "up",
            ]));
            must(Command::new("ip").args([
                "-n",
                &h.name,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]));
            must(Command::new("ip").args(["-n", &h.name, "link", "set", "eth0", "up"]));
            hosts.push(h);
            ips.push(ip);
        }
        (Lab { underlay, ips, cuts: std::sync::Mutex::new(Vec::new()) }, hosts)
    }

    /// One agent per host, each told about all the others (so `consensus=N` by default),
    /// nicknamed h1, h2, ...
    pub fn agents(&self, hosts: Vec<Netns>, extra: &[&str]) -> Vec<Agent> {
        let n = hosts.len();
        hosts
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                let mut e: Vec<&str> = extra.to_vec();
                e.extend((1..=n).filter(|j| *j != i + 1).map(|j| self.ip(j)));
                Agent::start_in(h, AgentOpts::nick(&format!("h{}", i + 1), &e))
            })
            .collect()
    }

    /// The underlay address of host `i` (1-based).
    pub fn ip(&self, i: usize) -> &str {
        &self.ips[i - 1]
    }

    fn apply_cuts(&self, cuts: &[(usize, usize)]) {
        let _ = run(self.underlay.cmd("nft").args(["delete", "table", "bridge", "wtecut"]));
        if cuts.is_empty() {
            return;
        }
        let mut rules = String::new();
        for (a, b) in cuts {
            rules.push_str(&format!(
                "iifname \"h{a}\" oifname \"h{b}\" drop\niifname \"h{b}\" oifname \"h{a}\" drop\n"
            ));
        }
        let script = format!(
            "table bridge wtecut {{\nchain cut {{\ntype filter hook forward priority 0; policy accept;\n{rules}}}\n}}\n"
        );
        let mut child =
            self.underlay.cmd("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().expect("nft");
        child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("nft script");
        assert!(child.wait().expect("nft").success(), "nft rejected {script}");
    }

    /// Captures underlay traffic while `work` runs; returns the raw capture.
    pub fn capture(&self, work: impl FnOnce()) -> Vec<u8> {
        let file = PathBuf::from("/run/wte").join(format!("{}.pcap", self.underlay.name));
        let _ = std::fs::create_dir_all("/run/wte");
        let mut tcpdump = self
            .underlay
            .cmd("tcpdump")
            .args(["-i", "br0", "--immediate-mode", "-U", "-B", "65536", "-s", "0", "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump (install tcpdump)");
        // The file appears once tcpdump listens: wait for it instead of sleeping.
        wait_until(Duration::from_secs(30), "tcpdump to start", || file.exists());
        work();
        let _ = Command::new("kill").arg(tcpdump.id().to_string()).status();
        let _ = tcpdump.wait();
        let bytes = std::fs::read(&file).unwrap_or_default();
        let _ = std::fs::remove_file(&file);
        bytes
    }

    /// Drops all underlay traffic between hosts `a` and `b`.
    pub fn cut(&self, a: usize, b: usize) {
        let mut cuts = self.cuts.lock().unwrap_or_else(|p| p.into_inner());
        cuts.push((a, b));
        self.apply_cuts(&cuts);
    }

    /// Lets hosts `a` and `b` talk again.
    pub fn heal(&self, a: usize, b: usize) {
        let mut cuts = self.cuts.lock().unwrap_or_else(|p| p.into_inner());
        cuts.retain(|c| *c != (a, b) && *c != (b, a));
        self.apply_cuts(&cuts);
    }
}

/// Whether `needle` occurs in `hay` (e.g. a marker in a capture).
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The outcome of one plugin run.
#[derive(Debug)]
pub struct CniOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CniOut {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("plugin output is not JSON ({e}): {self:?}"))
    }

    /// Requires success and returns the result.
    pub fn ok(&self) -> Value {
        assert_eq!(self.code, 0, "plugin failed: {self:?}");
        if self.stdout.trim().is_empty() { Value::Null } else { self.json() }
    }

    /// Requires a CNI error with `code` and returns its message.
    pub fn error(&self, code: u64) -> String {
        assert_ne!(self.code, 0, "plugin succeeded where it should fail: {self:?}");
        let j = self.json();
        assert_eq!(j["code"], code, "wrong CNI error code: {self:?}");
        j["msg"].as_str().unwrap_or_default().to_owned()
    }

    /// The first IP address of an ADD result, without prefix.
    pub fn ip(&self) -> String {
        let j = self.ok();
        let addr = j["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no address in {j}"));
        addr.split('/').next().unwrap_or_default().to_owned()
    }
}

/// Runs the plugin with the given command and environment.
pub fn cni(
    bins: &Bins,
    command: &str,
    container: &str,
    ifname: &str,
    netns: Option<&Path>,
    conf: &str,
) -> CniOut {
    let mut cmd = Command::new(&bins.cni);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        cmd.env("CNI_NETNS", ns);
    }
    let mut child = cmd.spawn().expect("starting weft-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.as_bytes())
        .expect("writing the configuration");
    let out = child.wait_with_output().expect("waiting for weft-cni");
    CniOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Adds `prevResult` to a configuration (for CHECK and DEL as runtimes send them).
pub fn with_prev(conf: &str, prev: &Value) -> String {
    let mut c: Value = serde_json::from_str(conf).expect("configuration JSON");
    c["prevResult"] = prev.clone();
    c.to_string()
}
