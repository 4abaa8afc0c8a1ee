//! The `weft` command line: `weft agent` runs the daemon in the foreground, every other verb
//! is a client of the running agent's unix socket (Weave's verbs, with the same meaning).

pub mod client;
pub mod container;
pub mod launch;
pub mod render;
pub mod table;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::addr::AddrRequest;
use crate::config::AgentArgs;

/// How attach and detach tell a container from an address.
const OPERANDS_HELP: &str = "Operands: every address form contains a '/' or a ':' (10.2.1.1/24, ip:…, net:…, net:default);\n\
    an operand with neither is a Docker container name or id (at most one), looked up through\n\
    --docker-socket: its network namespace (Docker's SandboxKey) is attached as endpoint\n\
    docker-cli:CONTAINER_ID, named CONTAINER_NAME.weave.local. With --netns (or --id for detach)\n\
    every operand must be an address.";

#[derive(Parser, Debug)]
#[command(
    name = "weft",
    version,
    about = "weft: one flat virtual network for containers on many hosts (a successor to Weave Net)",
    long_about = "weft connects containers and pods on many hosts into one virtual Ethernet network.\n\
                  `weft launch` starts the per-host agent in the background (`weft agent` runs it in the\n\
                  foreground); the other verbs talk to the running agent over its unix socket.",
    after_help = "Addresses (ADDR) use Weave's syntax: 10.2.1.1/24 or ip:10.2.1.1/24 (exactly this address),\n\
                  net:10.2.3.0/24 (any free address in that subnet), net:default (the default subnet)."
)]
pub struct Cli {
    /// The agent's unix socket.
    #[arg(long, global = true, env = "WEFT_SOCKET", default_value = weft_api::DEFAULT_SOCKET)]
    pub socket: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

/// Parts of `weft status`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusView {
    Peers,
    Connections,
    Targets,
    Ipam,
    Dns,
    /// NetworkPolicy: this node's pods and the policies isolating each.
    Policy,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent in the foreground (for systemd, Kubernetes, or debugging).
    Agent(AgentArgs),
    /// Start the agent in the background and wait until it is ready.
    Launch {
        #[command(flatten)]
        args: AgentArgs,
        /// How long to wait for the agent to become ready.
        #[arg(long, default_value = "60")]
        wait_seconds: u64,
    },
    /// Stop the agent (the network of running pods stays in place).
    Stop {
        /// The agent's state directory (to clean up its pid file).
        #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
        state_dir: PathBuf,
    },
    /// Leave the network for good: hand this peer's address space to another peer, stop the
    /// agent, and remove weft's bridge, overlay devices, firewall table and persisted state.
    Reset {
        #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
        state_dir: PathBuf,
        /// The bridge the agent ran with.
        #[arg(long, default_value = "weft")]
        bridge: String,
        /// The nftables table the agent ran with.
        #[arg(long, default_value = "weft")]
        nft_table: String,
    },
    /// Take over the address space of a peer that is gone for good (name or nickname).
    Rmpeer { peer: String },
    /// Wait until the IP allocation ring exists (e.g. before starting workloads).
    Prime {
        /// Give up after this many seconds.
        #[arg(long, default_value = "60")]
        timeout_seconds: u64,
    },
    /// Show the agent's status: a summary, or one aspect of it.
    Status {
        #[arg(value_enum)]
        what: Option<StatusView>,
        /// Print the report (or the chosen part) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Connect to more peers (or, with --replace, to exactly these); they are remembered.
    Connect {
        #[arg(value_name = "PEER", required = true)]
        peers: Vec<String>,
        #[arg(long)]
        replace: bool,
    },
    /// Stop connecting to peers given earlier.
    Forget {
        #[arg(value_name = "PEER", required = true)]
        peers: Vec<String>,
    },
    /// List the endpoints attached on this host with their addresses (Docker endpoints show
    /// their container's name); with CONTAINERs (names or ids), only theirs.
    Ps {
        #[arg(value_name = "CONTAINER")]
        containers: Vec<String>,
        #[arg(long)]
        json: bool,
        /// The Docker API, asked for the CONTAINERs.
        #[arg(long, value_name = "PATH", default_value = container::DEFAULT_DOCKER_SOCKET)]
        docker_socket: PathBuf,
    },
    /// Attach a Docker container or a network namespace (e.g. of a plain process) to the weft
    /// network.
    #[command(after_help = OPERANDS_HELP)]
    Attach {
        /// A running Docker container (name or id), unless --netns is given, and the addresses
        /// to give it; none means one address in the default subnet.
        #[arg(value_name = "CONTAINER|ADDR")]
        operands: Vec<String>,
        /// Path of the network namespace (e.g. /run/netns/NAME or /proc/PID/ns/net).
        #[arg(long)]
        netns: Option<PathBuf>,
        /// Interface name inside the namespace.
        #[arg(long, default_value = "ethwe")]
        ifname: String,
        /// Endpoint id (default: the namespace path; for a container docker-cli:CONTAINER_ID).
        #[arg(long)]
        id: Option<String>,
        /// DNS name for the endpoint (default for a container: its name).
        #[arg(long)]
        name: Option<String>,
        /// Do not route multicast (224.0.0.0/4) over the weft interface.
        #[arg(long)]
        no_multicast_route: bool,
        #[arg(long)]
        json: bool,
        /// The Docker API, asked for the container.
        #[arg(long, value_name = "PATH", default_value = container::DEFAULT_DOCKER_SOCKET)]
        docker_socket: PathBuf,
    },
    /// Remove addresses from an attached container or namespace (all of them, and its
    /// interface, by default).
    #[command(after_help = OPERANDS_HELP)]
    Detach {
        /// The Docker container given to attach (name or id), unless --netns or --id is
        /// given, and the addresses to remove.
        #[arg(value_name = "CONTAINER|ADDR")]
        operands: Vec<String>,
        /// The namespace given to attach.
        #[arg(long, conflicts_with = "id")]
        netns: Option<PathBuf>,
        /// The endpoint id given to attach.
        #[arg(long)]
        id: Option<String>,
        /// The Docker API, asked for the container.
        #[arg(long, value_name = "PATH", default_value = container::DEFAULT_DOCKER_SOCKET)]
        docker_socket: PathBuf,
    },
    /// Give the host an address on the weft network (idempotent).
    #[command(disable_help_flag = true)]
    Expose {
        addrs: Vec<AddrRequest>,
        /// DNS name for the host's addresses (a single label is put in the domain).
        #[arg(short = 'h', long = "hostname", value_name = "NAME")]
        hostname: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, action = clap::ArgAction::Help, help = "Print help")]
        help: Option<bool>,
    },
    /// Register a DNS name for addresses and/or an endpoint (its addresses, now and later;
    /// the name goes away with the endpoint).
    #[command(name = "dns-add", disable_help_flag = true)]
    DnsAdd {
        /// IP addresses, and/or one endpoint (id or namespace path, see weft ps).
        #[arg(value_name = "IP|ENDPOINT", required = true)]
        targets: Vec<String>,
        /// The name (a single label is put in the domain, e.g. db -> db.weave.local).
        #[arg(short = 'h', long = "hostname", value_name = "NAME")]
        name: String,
        #[arg(long, action = clap::ArgAction::Help, help = "Print help")]
        help: Option<bool>,
    },
    /// Remove DNS names: those matching every given filter (name, addresses, endpoint).
    #[command(name = "dns-remove", disable_help_flag = true)]
    DnsRemove {
        /// IP addresses, and/or one endpoint (id or namespace path).
        #[arg(value_name = "IP|ENDPOINT")]
        targets: Vec<String>,
        #[arg(short = 'h', long = "hostname", value_name = "NAME")]
        name: Option<String>,
        #[arg(long, action = clap::ArgAction::Help, help = "Print help")]
        help: Option<bool>,
    },
    /// Print the addresses weft DNS has for a name.
    #[command(name = "dns-lookup")]
    DnsLookup {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove the host's addresses from the weft network (all by default).
    Hide { addrs: Vec<AddrRequest> },
    /// Install CNI plugin binaries into a directory atomically (the init step of the
    /// Kubernetes DaemonSet): each is looked up next to this `weft`, then in /usr/local/bin
    /// and /usr/bin, copied to a temporary file in DIR, and renamed into place.
    InstallCni {
        /// The host's CNI plugin directory (as mounted, e.g. /host/opt/cni/bin).
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// Plugins to install.
        #[arg(default_value = "weft-cni")]
        plugins: Vec<String>,
    },
    /// Print the versions of this binary and of the running agent.
    Version {
        #[arg(long)]
        json: bool,
    },
}
