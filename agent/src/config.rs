//! The agent's command-line flags (shared by `weft agent` and `weft launch`) and their
//! validation into an [`AgentConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use ipnet::IpNet;

use crate::identity::PeerName;
use crate::ipam::InitMode;

/// Flags of `weft agent` / `weft launch`.
#[derive(Args, Clone, Debug)]
pub struct AgentArgs {
    /// Directory for persistent state (peer name, allocations, ring, targets).
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
    pub state_dir: PathBuf,

    /// Name of the Linux bridge that endpoints attach to.
    #[arg(long, default_value = "weft")]
    pub bridge: String,

    /// The address range all endpoints get addresses from (Weave's --ipalloc-range).
    #[arg(long, env = "WEFT_IPALLOC_RANGE", default_value = "10.32.0.0/12")]
    pub ipalloc_range: IpNet,

    /// The subnet used when an endpoint asks for none; defaults to the whole range.
    #[arg(long)]
    pub ipalloc_default_subnet: Option<IpNet>,

    /// How the address range first gets owners: consensus=N (agreement among the first N
    /// peers; default: the peers given on the command line plus this one), seed=NAME,NAME...
    /// (exactly these peers own it from the start; every peer must be given the same list),
    /// or observer (this peer owns nothing until it needs addresses and asks for some).
    #[arg(long, env = "WEFT_IPALLOC_INIT")]
    pub ipalloc_init: Option<InitMode>,

    /// Read-only HTTP listener for /healthz, /status and /metrics ("off" to disable).
    #[arg(long, default_value = "127.0.0.1:6782")]
    pub status_addr: StatusAddr,

    /// MTU of endpoint interfaces; by default the underlay's MTU minus the overlay overhead.
    #[arg(long, env = "WEFT_MTU")]
    pub mtu: Option<u32>,

    /// Peer name (six hex bytes, e.g. 8a:3e:3e:3e:3e:3e); by default a random name
    /// generated once and kept in the state directory.
    #[arg(long)]
    pub name: Option<PeerName>,

    /// Human-readable name of this peer (default: the hostname).
    #[arg(long)]
    pub nickname: Option<String>,

    /// Name of weft's own nftables table.
    #[arg(long, default_value = "weft")]
    pub nft_table: String,

    /// Log filter, e.g. "info", "debug", "weft=debug,tonic=info" (or RUST_LOG).
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    pub log_level: String,

    /// Peers to connect to (host or host:port). Without any, the targets of the previous run
    /// are used; with some, they replace them.
    #[arg(value_name = "PEER")]
    pub peers: Vec<String>,

    /// TCP port of the mesh (and UDP port of sleeve).
    #[arg(long, default_value_t = crate::mesh::DEFAULT_PORT)]
    pub port: u16,

    /// Address to accept mesh connections on.
    #[arg(long, default_value = "0.0.0.0")]
    pub mesh_bind: std::net::IpAddr,

    /// Shared password: mesh connections are authenticated and encrypted, and so is data-plane
    /// traffic to peers outside --trusted-subnets. Every peer needs the same password.
    #[arg(long, env = "WEFT_PASSWORD", hide_env_values = true, conflicts_with = "password_file")]
    pub password: Option<String>,

    /// File holding the password (e.g. a mounted Kubernetes secret); trailing newlines are ignored.
    #[arg(long, env = "WEFT_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,

    /// Peers in these subnets may exchange data-plane traffic unencrypted, if they trust us too
    /// (comma-separated CIDRs).
    #[arg(long, value_delimiter = ',')]
    pub trusted_subnets: Vec<IpNet>,

    /// Only connect to the peers given, not to the peers of peers.
    #[arg(long)]
    pub no_discovery: bool,

    /// Most mesh connections this peer keeps; beyond it, traffic is relayed.
    #[arg(long, default_value_t = 200)]
    pub conn_limit: usize,

    /// Networks in which discovered peers (peers of peers) may be dialled (comma-separated
    /// CIDRs). Default: the networks of this host's addresses, outside the allocation range.
    /// The networks of the peers given as addresses (/24, IPv6 /64) are always included;
    /// `0.0.0.0/0,::/0` dials wherever gossip says.
    #[arg(long, value_delimiter = ',')]
    pub discovery_subnets: Vec<IpNet>,

    /// UDP port of fastdp (the kernel's VXLAN).
    #[arg(long, default_value_t = crate::overlay::FASTDP_PORT)]
    pub datapath_port: u16,

    /// Carry all cross-host traffic in sleeve (userspace), never in the kernel's VXLAN.
    #[arg(long, env = "WEFT_NO_FASTDP")]
    pub no_fastdp: bool,

    /// Do not run the DNS server (names are still gossiped by the other peers).
    #[arg(long, env = "WEFT_NO_DNS")]
    pub no_dns: bool,

    /// Where the DNS server listens: "exposed" (port 53 of each address the host has on the
    /// bridge, see weft expose), "exposed:PORT", or HOST:PORT[,HOST:PORT...].
    #[arg(long, env = "WEFT_DNS_LISTEN", default_value = "exposed")]
    pub dns_listen: crate::dns::Listen,

    /// The domain weft answers for; names outside it are forwarded.
    #[arg(long, env = "WEFT_DNS_DOMAIN", default_value = crate::dns::domain::DEFAULT_DOMAIN)]
    pub dns_domain: crate::dns::domain::Domain,

    /// TTL of weft's answers, in seconds.
    #[arg(long, default_value_t = 1)]
    pub dns_ttl: u32,

    /// Where the upstream resolvers for other names are read from.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,

    /// How long to wait for each upstream resolver, in seconds.
    #[arg(long, default_value_t = 5)]
    pub dns_fallback_timeout: u64,

    /// Seconds between checks of every endpoint's namespace and interfaces (tests shorten it).
    #[arg(long, default_value_t = 60, hide = true)]
    pub reconcile_interval: u64,

    /// Kubernetes mode: peers from the Node list, the ring agreed through a ConfigMap, the
    /// CNI configuration written when ready, node reclaim (docs/kubernetes-agent.md). On by
    /// itself when KUBERNETES_SERVICE_HOST is set; `--kube=false` keeps it off even then.
    #[arg(long, env = "WEFT_KUBE", num_args = 0..=1, default_missing_value = "true",
          require_equals = true, value_name = "BOOL")]
    pub kube: Option<bool>,

    /// This Node's name (Kubernetes mode; the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Namespace of weft's ConfigMaps and Lease (default: the ServiceAccount's, else
    /// kube-system).
    #[arg(long, env = "POD_NAMESPACE")]
    pub kube_namespace: Option<String>,

    /// Serve Docker's remote network and IPAM driver, `-d weft --ipam-driver weft`
    /// (docs/docker.md); `weft launch` turns it on where Docker runs.
    #[arg(long, env = "WEFT_DOCKER_PLUGIN")]
    pub docker_plugin: bool,

    /// The plugin's socket: dockerd finds a plugin named weft by /run/docker/plugins/weft.sock.
    #[arg(
        long,
        env = "WEFT_DOCKER_PLUGIN_SOCKET",
        default_value = "/run/docker/plugins/weft.sock"
    )]
    pub docker_plugin_socket: PathBuf,

    /// The Docker API's socket, asked for container names (weave.local).
    #[arg(long, env = "WEFT_DOCKER_SOCKET", default_value = "/var/run/docker.sock")]
    pub docker_socket: PathBuf,

    /// A Docker network (driver and IPAM weft) to create at start if it does not exist;
    /// `weft launch` gives `weft` where Docker runs.
    #[arg(long, env = "WEFT_DOCKER_NETWORK")]
    pub docker_network: Option<String>,

    /// Where Kubernetes mode writes 10-weft.conflist.
    #[arg(long, env = "WEFT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,

    /// Kubernetes mode: do not enforce NetworkPolicies (on by default there; the nftables
    /// table `inet weft-policy` is then neither written nor removed; docs/network-policy.md).
    #[arg(long, env = "WEFT_NO_NETWORK_POLICY")]
    pub no_network_policy: bool,

    /// Kubernetes mode: also log denied connections to the kernel log, naming the policies
    /// that isolate the pod (at most 10 a second per group of policies; read them with
    /// `dmesg` or `journalctl -k`, prefix `weft-policy deny`).
    #[arg(long, env = "WEFT_POLICY_LOG")]
    pub policy_log: bool,

    /// Kubernetes mode: check every packet a pod sends against the policies, not only the
    /// first of each connection, so that a connection a changed policy no longer allows stops
    /// at its next packet. Off by default: a connection allowed when it began lives on, as
    /// with most CNIs (docs/network-policy.md, "Established connections").
    #[arg(long, env = "WEFT_POLICY_STRICT")]
    pub policy_strict: bool,
}

/// `--status-addr`: an address, or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusAddr(pub Option<SocketAddr>);

impl std::str::FromStr for StatusAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<StatusAddr, String> {
        if s.is_empty() || s == "off" {
            return Ok(StatusAddr(None));
        }
        s.parse()
            .map(|a| StatusAddr(Some(a)))
            .map_err(|_| format!("{s:?} is not HOST:PORT (or \"off\")"))
    }
}

/// Validated agent settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bridge: String,
    pub range: IpNet,
    pub default_subnet: IpNet,
    /// `None`: consensus among the mesh's initial targets and this peer.
    pub ipalloc_init: Option<InitMode>,
    pub status_addr: Option<SocketAddr>,
    pub mtu: Option<u32>,
    pub name: Option<PeerName>,
    pub nickname: String,
    pub nft_table: String,
    pub mesh: MeshSettings,
    /// `None` with --no-dns.
    pub dns: Option<crate::dns::DnsConfig>,
    /// `None` outside Kubernetes mode.
    pub kube: Option<crate::kube::KubeConfig>,
    /// `None` without --docker-plugin.
    pub docker: Option<crate::docker::DockerConfig>,
    pub reconcile_interval: std::time::Duration,
    /// Things the operator should fix (logged once logging is up).
    pub warnings: Vec<String>,
}

/// Why a password file is readable by others, if it is.
pub fn password_file_warning(path: &Path, mode: u32) -> Option<String> {
    (mode & 0o077 != 0).then(|| {
        format!(
            "the password file {} has mode {:o}: anyone who can read it can join the mesh; \
             make it 0600 (or 0400)",
            path.display(),
            mode & 0o7777
        )
    })
}

/// A `weft agent` command line with `--password X`/`--password=X` taken out (it would be in
/// /proc/PID/cmdline for every local user to read), and the password; `None` without one.
pub fn strip_password(argv: &[String]) -> Option<(Vec<String>, String)> {
    let mut out = Vec::with_capacity(argv.len());
    let mut password = None;
    let mut args = argv.iter();
    while let Some(a) = args.next() {
        if a == "--" {
            out.push(a.clone());
            out.extend(args.by_ref().cloned());
        } else if a == "--password" {
            password = args.next().cloned();
        } else if let Some(p) = a.strip_prefix("--password=") {
            password = Some(p.to_owned());
        } else {
            out.push(a.clone());
        }
    }
    password.map(|p| (out, p))
}

/// Mesh settings after validation.
#[derive(Clone, Debug)]
pub struct MeshSettings {
    /// Targets from the command line; `None` resumes the persisted ones.
    pub peers: Option<Vec<String>>,
    pub port: u16,
    pub bind: std::net::IpAddr,
    pub password: Option<Vec<u8>>,
    pub trusted_subnets: Vec<IpNet>,
    pub discovery: bool,
    pub conn_limit: usize,
    /// `--discovery-subnets`; empty: this host's underlay networks.
    pub discovery_subnets: Vec<IpNet>,
    pub fastdp_port: u16,
    pub no_fastdp: bool,
}

/// A flag value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {message}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub message: String,
}

fn err(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError { flag, message: message.into() }
}

impl AgentArgs {
    /// Kubernetes mode: asked for, or running in a pod (KUBERNETES_SERVICE_HOST set).
    fn kube_config(
        &self,
        socket: &Path,
        mesh_port: u16,
    ) -> Result<Option<crate::kube::KubeConfig>, ConfigError> {
        let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty());
        if !self.kube.unwrap_or(in_pod) {
            return Ok(None);
        }
        let node_name = self.node_name.clone().filter(|n| !n.is_empty()).ok_or_else(|| {
            err(
                "node-name",
                "is required in Kubernetes mode (set NODE_NAME from the downward API's \
                 spec.nodeName)",
            )
        })?;
        Ok(Some(crate::kube::KubeConfig {
            node_name,
            namespace: self.kube_namespace.clone().unwrap_or_else(crate::kube::default_namespace),
            cni_conf_dir: self.cni_conf_dir.clone(),
            socket: socket.to_path_buf(),
            mesh_port,
            network_policy: !self.no_network_policy,
            policy_log: self.policy_log,
            policy_strict: self.policy_strict,
        }))
    }

    pub fn validate(&self, socket: PathBuf) -> Result<AgentConfig, ConfigError> {
        let range = self.ipalloc_range;
        if range.trunc() != range {
            return Err(err(
                "ipalloc-range",
                format!("{range} is not a network address (did you mean {}?)", range.trunc()),
            ));
        }
        let max = if range.addr().is_ipv4() { 30 } else { 126 };
        if range.prefix_len() > max {
            return Err(err("ipalloc-range", format!("{range} is too small")));
        }
        let default_subnet = self.ipalloc_default_subnet.unwrap_or(range);
        if default_subnet.trunc() != default_subnet || !range.contains(&default_subnet) {
            return Err(err(
                "ipalloc-default-subnet",
                format!("{default_subnet} must be a network inside the range {range}"),
            ));
        }
        if let Some(mtu) = self.mtu {
            if !(576..=65535).contains(&mtu) {
                return Err(err("mtu", format!("{mtu} is outside 576..=65535")));
            }
        }
        let bridge_ok = !self.bridge.is_empty()
            && self.bridge.len() <= 15
            && !self.bridge.contains(['/', ':', ' '])
            && !self.bridge.starts_with(crate::dataplane::HOST_IFNAME_PREFIX);
        if !bridge_ok {
            return Err(err("bridge", format!("{:?} is not a usable interface name", self.bridge)));
        }
        if self.docker_plugin && !self.docker_plugin_socket.is_absolute() {
            return Err(err("docker-plugin-socket", "must be an absolute path"));
        }
        if !socket.is_absolute() {
            return Err(err("socket", format!("{} must be an absolute path", socket.display())));
        }
        let mut warnings = Vec::new();
        let password = match (&self.password, &self.password_file) {
            (Some(p), _) => Some(p.as_bytes().to_vec()),
            (None, Some(path)) => {
                use std::os::unix::fs::MetadataExt;
                if let Some(w) =
                    std::fs::metadata(path).ok().and_then(|m| password_file_warning(path, m.mode()))
                {
                    warnings.push(w);
                }
                let mut bytes = std::fs::read(path)
                    .map_err(|e| err("password-file", format!("{}: {e}", path.display())))?;
                while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    bytes.pop();
                }
                Some(bytes)
            }
            (None, None) => None,
        };
        if password.as_ref().is_some_and(Vec::is_empty) {
            return Err(err("password", "is empty"));
        }
        if password.is_none() && !self.mesh_bind.is_loopback() {
            warnings.push(
                "no --password: anyone who reaches the mesh port can join the mesh and change \
                 its DNS, MAC and topology state; set --password (a long random one, e.g. \
                 `openssl rand -base64 32`)"
                    .to_owned(),
            );
        }
        if self.conn_limit == 0 {
            return Err(err("conn-limit", "must be at least 1"));
        }
        let mesh = MeshSettings {
            peers: (!self.peers.is_empty()).then(|| self.peers.clone()),
            port: self.port,
            bind: self.mesh_bind,
            password,
            trusted_subnets: self.trusted_subnets.clone(),
            discovery: !self.no_discovery,
            conn_limit: self.conn_limit,
            discovery_subnets: self.discovery_subnets.clone(),
            fastdp_port: self.datapath_port,
            no_fastdp: self.no_fastdp,
        };
        if mesh.fastdp_port == mesh.port {
            return Err(err(
                "datapath-port",
                "must differ from --port (sleeve uses that UDP port)",
            ));
        }
        let kube = self.kube_config(&socket, mesh.port)?;
        // The policy table matches IPv4: IPv6 pods would pass it unfiltered.
        if kube.as_ref().is_some_and(|k| k.network_policy) && range.addr().is_ipv6() {
            return Err(err(
                "ipalloc-range",
                format!(
                    "{range} is IPv6, and NetworkPolicy is enforced for IPv4 pods only: use an \
                     IPv4 range, or --no-network-policy to run without enforcement"
                ),
            ));
        }
        let policy_flags = [
            ("--no-network-policy", self.no_network_policy),
            ("--policy-log", self.policy_log),
            ("--policy-strict", self.policy_strict),
        ];
        for (flag, _) in policy_flags.iter().filter(|(_, set)| kube.is_none() && *set) {
            warnings.push(format!(
                "{flag} has no effect outside Kubernetes mode (NetworkPolicies are only \
                 enforced with --kube)"
            ));
        }
        if self.no_network_policy && (self.policy_log || self.policy_strict) {
            warnings.push(
                "--policy-log and --policy-strict have no effect with --no-network-policy"
                    .to_owned(),
            );
        }
        // A Node's name is what Kubernetes users know a host by (and where the hostname is not
        // the Node name, the only one that matches `kubectl get nodes`).
        let nickname = self.nickname.clone().unwrap_or_else(|| match &kube {
            Some(k) => k.node_name.clone(),
            None => crate::identity::hostname(),
        });
        Ok(AgentConfig {
            kube,
            socket,
            state_dir: self.state_dir.clone(),
            bridge: self.bridge.clone(),
            range,
            default_subnet,
            ipalloc_init: self.ipalloc_init.clone(),
            status_addr: self.status_addr.0,
            mtu: self.mtu,
            name: self.name,
            nickname,
            nft_table: self.nft_table.clone(),
            mesh,
            dns: (!self.no_dns).then(|| crate::dns::DnsConfig {
                domain: self.dns_domain.clone(),
                ttl: self.dns_ttl,
                listen: self.dns_listen.clone(),
                resolv_conf: self.resolv_conf.clone(),
                upstream_timeout: std::time::Duration::from_secs(self.dns_fallback_timeout.max(1)),
                clients: vec![range, default_subnet],
            }),
            reconcile_interval: std::time::Duration::from_secs(self.reconcile_interval.max(1)),
            docker: self.docker_plugin.then(|| crate::docker::DockerConfig {
                socket: self.docker_plugin_socket.clone(),
                api_socket: self.docker_socket.clone(),
                network: self.docker_network.clone().filter(|n| !n.is_empty()),
            }),
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn a_password_on_the_command_line_is_taken_out() {
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (rest, p) =
            strip_password(&argv(&["weft", "agent", "--password", "s3cret", "--port", "1"]))
                .unwrap();
        assert_eq!((rest, p.as_str()), (argv(&["weft", "agent", "--port", "1"]), "s3cret"));
        let (rest, p) = strip_password(&argv(&["weft", "agent", "--password=x y"])).unwrap();
        assert_eq!((rest, p.as_str()), (argv(&["weft", "agent"]), "x y"));
        assert!(strip_password(&argv(&["weft", "agent", "--", "--password", "x"])).is_none());
        assert!(strip_password(&argv(&["weft", "agent", "--password-file", "/p"])).is_none());
    }

    #[test]
    fn a_password_file_readable_by_others_is_warned_about() {
        let p = Path::new("/etc/weft/pw");
        assert!(password_file_warning(p, 0o100600).is_none());
        assert!(password_file_warning(p, 0o100400).is_none());
        assert!(password_file_warning(p, 0o100644).unwrap().contains("644"));
        assert!(password_file_warning(p, 0o100640).is_some());
    }

    #[derive(Parser, Debug)]
    struct Args {
        #[command(flatten)]
        agent: AgentArgs,
    }

    fn validate(args: &[&str]) -> Result<AgentConfig, ConfigError> {
        let parsed = Args::try_parse_from(std::iter::once("weft").chain(args.iter().copied()))
            .expect("parse");
        parsed.agent.validate(PathBuf::from("/run/weft/weft.sock"))
    }

    #[test]
    fn kubernetes_mode_flags() {
        let cfg =
            validate(&["--kube", "--node-name", "n1", "--kube-namespace", "net"]).expect("valid");
        let k = cfg.kube.expect("kube mode");
        assert_eq!((k.node_name.as_str(), k.namespace.as_str()), ("n1", "net"));
        assert_eq!(k.cni_conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(k.socket, PathBuf::from("/run/weft/weft.sock"));
        assert_eq!(cfg.nickname, "n1", "a Node's agent is known by the Node's name");
        assert!(validate(&["--kube=false", "--node-name", "n1"]).expect("valid").kube.is_none());
        assert!(k.network_policy, "NetworkPolicy is enforced by default in Kubernetes mode");
        let off = validate(&["--kube", "--node-name", "n1", "--no-network-policy"]).expect("valid");
        assert!(!off.kube.expect("kube mode").network_policy);
        let outside = validate(&["--kube=false", "--no-network-policy"]).expect("valid");
        assert!(outside.warnings.iter().any(|w| w.contains("--no-network-policy")));
        let outside = validate(&["--policy-strict", "--policy-log"]).expect("valid");
        for flag in ["--policy-strict", "--policy-log"] {
            assert!(outside.warnings.iter().any(|w| w.starts_with(flag)), "{flag}");
        }
        let strict = validate(&["--kube", "--node-name", "n1", "--policy-strict"]).expect("valid");
        assert!(strict.kube.expect("kube mode").policy_strict);
        let v6 = ["--kube", "--node-name", "n1", "--ipalloc-range", "fd00:10::/64"];
        let e = validate(&v6).expect_err("IPv6 pods would not be filtered");
        assert!(e.to_string().contains("--no-network-policy"), "{e}");
        let v6_off = [&v6[..], &["--no-network-policy"]].concat();
        assert!(validate(&v6_off).is_ok(), "without enforcement an IPv6 range is the user's call");
        if std::env::var_os("NODE_NAME").is_none() {
            let e = validate(&["--kube"]).expect_err("no node name");
            assert!(e.to_string().contains("--node-name"), "{e}");
        }
    }
}
