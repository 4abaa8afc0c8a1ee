//! `weft agent`: opens the state, starts the subsystems, serves the local API and the status
//! listener, brings the host to the desired state, and shuts down cleanly on SIGTERM, SIGINT
//! or a Stop request (the kernel state stays, so pods keep their network).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::AgentConfig;
use crate::dataplane::Dataplane;
use crate::dataplane::linux::LinuxDataplane;
use crate::dataplane::nft::L4;
use crate::endpoints::error::EndpointError;
use crate::endpoints::state::StateConfig;
use crate::endpoints::{self, Endpoints, Readiness};
use crate::identity::{self, Identity};
use crate::ipam::{InitMode, IpamConfig};
use crate::mesh::connection::Setup;
use crate::mesh::router::{self, RouterConfig};
use crate::mesh::secure;
use crate::mesh::{Links, Mesh};
use crate::metrics::Metrics;
use crate::overlay::health::Overlay;
use crate::overlay::{self, OverlayConfig};
use crate::services::Services;
use crate::store::Store;
use crate::subsystem::{Hub, Tasks};

/// How long a stopping agent lets its tasks (and API clients) finish.
const STOP_DRAIN: Duration = Duration::from_secs(3);

fn init_logging(filter: &str) {
    let mut filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_owned());
    // bollard logs every Docker API request and answer (whole inspect documents) at debug.
    if !filter.contains("bollard") {
        filter.push_str(",bollard=info");
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Creates `dir` (and its parents) with mode 0700: the state file holds the peer's identity
/// and every endpoint. An existing directory is left as it is, with a warning if others can
/// enter it (it may be shared on purpose, e.g. a mount).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Ok(m) = std::fs::metadata(dir) {
        if m.is_dir() && m.permissions().mode() & 0o077 != 0 {
            warn!(dir = %dir.display(), mode = format!("{:o}", m.permissions().mode() & 0o7777), "the state directory is open to other users; 0700 is expected");
        }
        if m.is_dir() {
            return Ok(());
        }
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Binds the API socket, refusing to steal it from a running agent.
async fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another weft agent is already serving {}; stop it first (weft stop)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// The underlay MTU, and the MTU of endpoint interfaces derived from it (or `--mtu`).
fn mtus(cfg: &AgentConfig, dp: &dyn Dataplane) -> (u32, u32) {
    let underlay = match dp.underlay_mtu(&cfg.bridge) {
        Ok(Some(under)) => under,
        Ok(None) => {
            warn!("no underlay interface found; assuming MTU 1500 (set --mtu to override)");
            1500
        }
        Err(e) => {
            warn!(error = %e, "cannot read the underlay MTU; assuming 1500 (set --mtu to override)");
            1500
        }
    };
    (underlay, cfg.mtu.unwrap_or_else(|| overlay::derived_mtu(underlay)))
}

/// Runs the agent until it is asked to stop.
pub async fn run(cfg: AgentConfig, log_filter: &str) -> anyhow::Result<()> {
    init_logging(log_filter);
    for w in &cfg.warnings {
        warn!("{w}");
    }
    let store = open_store(&cfg)?;
    let identity = load_identity(&cfg, &store)?;
    let dp: Arc<dyn Dataplane> = Arc::new(LinuxDataplane);
    let (underlay_mtu, mtu) = mtus(&cfg, dp.as_ref());
    info!(
        peer = %identity.name, nickname = %identity.nickname, version = env!("CARGO_PKG_VERSION"),
        range = %cfg.range, bridge = %cfg.bridge, mtu, underlay_mtu, socket = %cfg.socket.display(),
        "weft agent starting"
    );
    let shutdown = CancellationToken::new();
    let mut tasks = Tasks::new(shutdown.clone());
    let metrics = Arc::new(Metrics::new());
    let (mesh, links) = start_mesh(&cfg, &identity, &store, &metrics, &mut tasks).await?;
    // Kubernetes mode decides the ring's init mode, so it comes before IP allocation.
    let kube = match cfg.kube.clone() {
        Some(k) => Some(
            crate::kube::prepare(k, identity.name, cfg.ipalloc_init.is_some())
                .await
                .context("Kubernetes mode")?,
        ),
        None => None,
    };
    let kube_mode = kube.as_ref().and_then(crate::kube::Prepared::init_mode);
    let (ready_tx, ready) = watch::channel(Readiness::starting("setting up the bridge"));
    let ipam_channel = mesh.channel("ipam");
    let state = endpoints::start(
        store.clone(),
        dp.clone(),
        state_config(&cfg, &identity, mtu),
        ipam_config(&cfg, &identity, &mesh, kube_mode).await,
        ipam_channel.sender(),
        ready.clone(),
    )?;
    let hub = Hub {
        identity: identity.clone(),
        mesh: mesh.clone(),
        endpoints: state.endpoints.clone(),
        ipam: state.ipam.clone(),
        store,
        metrics,
        shutdown: shutdown.clone(),
    };
    tasks.spawn(
        "ipam",
        endpoints::ipam::feed(hub.ipam.clone(), ipam_channel, mesh.view(), shutdown.clone()),
    );
    let dns = cfg.dns.clone().map(|dns_cfg| crate::dns::start(dns_cfg, &hub, &mut tasks));
    // The bridge must exist before the overlay ports join it.
    hub.endpoints.reconcile_bridge().await.context("setting up the bridge")?;
    let overlay =
        overlay::start(overlay_config(&cfg, &identity, mtu, underlay_mtu), &hub, links, &mut tasks)
            .await?;
    let policy = kube.as_ref().and_then(|k| start_policy(k, &hub, &mut tasks));
    if let Some(k) = kube {
        crate::kube::start(k, dp.clone(), &hub, &mut tasks);
    }
    if let Some(d) = cfg.docker.clone() {
        crate::docker::start(d, &hub, &mut tasks)?;
    }
    // Every gossip channel is registered by now.
    hub.mesh.open();
    let svc = Arc::new(Services { hub, overlay, dns, ready, policy });
    serve(&cfg, svc.clone(), &mut tasks).await?;
    tasks.spawn("signals", watch_signals(shutdown.clone()));
    tasks.spawn(
        "bring-up",
        bring_up(svc.hub.endpoints.clone(), dp, ready_tx, cfg.clone(), shutdown),
    );

    tasks.run().await;
    // The NetworkPolicy table stays too: pods stay isolated while the agent restarts.
    info!("weft agent stopping; the kernel state stays in place");
    // Graceful shutdown waits for API clients to hang up; one that keeps its connection open
    // must not keep the agent alive.
    tasks.stop(STOP_DRAIN).await;
    svc.hub.endpoints.stop();
    drop(svc);
    // Waiting for the state thread makes sure the final writes are on disk before the
    // process exits.
    let _ = tokio::task::spawn_blocking(move || state.thread.join()).await;
    let _ = std::fs::remove_file(&cfg.socket);
    info!("weft agent stopped");
    Ok(())
}

/// NetworkPolicy enforcement fed by Kubernetes mode's watches, unless turned off.
fn start_policy(
    kube: &crate::kube::Prepared,
    hub: &Hub,
    tasks: &mut Tasks,
) -> Option<crate::netpol::PolicyHandle> {
    let events = kube.policy_events(tasks)?;
    let cfg = crate::netpol::NetpolConfig {
        node: kube.node_name().to_owned(),
        check_every: crate::netpol::CHECK_EVERY,
    };
    let opts = crate::dataplane::nft::policy::TableOptions {
        log: kube.policy_log(),
        strict: kube.policy_strict(),
    };
    let kernel = Arc::new(crate::netpol::kernel::NftPolicyKernel::new(opts));
    Some(crate::netpol::start(cfg, hub, tasks, events, kernel))
}

fn open_store(cfg: &AgentConfig) -> anyhow::Result<Arc<Store>> {
    create_private_dir(&cfg.state_dir)
        .with_context(|| format!("creating --state-dir {}", cfg.state_dir.display()))?;
    Ok(Arc::new(Store::open(&cfg.state_dir)?))
}

fn load_identity(cfg: &AgentConfig, store: &Store) -> anyhow::Result<Identity> {
    let (name, renamed) = identity::load_or_create(store, cfg.name)?;
    // A different name is a different peer: nothing tied to the old one may be reused.
    if renamed {
        warn!(peer = %name, "peer name changed by --name; this peer starts with a new identity");
    }
    Ok(Identity { name, nickname: cfg.nickname.clone() })
}

fn state_config(cfg: &AgentConfig, identity: &Identity, mtu: u32) -> StateConfig {
    StateConfig {
        bridge: cfg.bridge.clone(),
        bridge_mac: identity.name.mac(),
        mtu,
        firewall_table: cfg.nft_table.clone(),
        // Pods must not join the mesh or inject overlay traffic through their gateway.
        guarded_ports: vec![
            (L4::Tcp, cfg.mesh.port),
            (L4::Udp, cfg.mesh.port),
            (L4::Udp, cfg.mesh.fastdp_port),
        ],
        dns_tcp_ports: cfg.dns.as_ref().map(|d| d.listen.ports()).unwrap_or_default(),
    }
}

async fn ipam_config(
    cfg: &AgentConfig,
    identity: &Identity,
    mesh: &Mesh,
    kube_mode: Option<InitMode>,
) -> IpamConfig {
    let ipam = IpamConfig {
        me: identity.name,
        incarnation: incarnation(),
        range: cfg.range,
        default_subnet: cfg.default_subnet,
        mode: match cfg.ipalloc_init.clone().or(kube_mode) {
            Some(mode) => mode,
            // Weave's default: agreement among the peers this one was told about, and itself.
            None => InitMode::Consensus(mesh.targets().await.len() + 1),
        },
    };
    info!(mode = %ipam.mode, "IP allocation");
    ipam
}

fn overlay_config(
    cfg: &AgentConfig,
    identity: &Identity,
    mtu: u32,
    underlay_mtu: u32,
) -> OverlayConfig {
    let (vxlan, tap) = overlay::device_names(&cfg.bridge);
    OverlayConfig {
        me: identity.name,
        bridge: cfg.bridge.clone(),
        bridge_mac: identity.name.mac(),
        vxlan,
        tap,
        fastdp_port: cfg.mesh.fastdp_port,
        sleeve_port: cfg.mesh.port,
        bind: cfg.mesh.bind,
        filter_table: overlay::filter_table(&cfg.nft_table),
        traffic_table: overlay::traffic_table(&cfg.nft_table),
        mtu,
        underlay_mtu,
        no_fastdp: cfg.mesh.no_fastdp,
        password: cfg.mesh.password.is_some(),
    }
}

/// Starts the local API on the unix socket and, unless disabled, the status listener.
async fn serve(cfg: &AgentConfig, svc: Arc<Services>, tasks: &mut Tasks) -> anyhow::Result<()> {
    let listener = bind_socket(&cfg.socket).await?;
    tasks.spawn("api", crate::api::server::serve(svc.clone(), listener));
    if let Some(addr) = cfg.status_addr {
        tasks.spawn("status", crate::status::http::serve(svc, addr).await?);
    }
    Ok(())
}

/// Derives the key from the password (slow on purpose, so off the async threads) and starts
/// the mesh.
async fn start_mesh(
    cfg: &AgentConfig,
    identity: &Identity,
    store: &Arc<Store>,
    metrics: &Arc<Metrics>,
    tasks: &mut Tasks,
) -> anyhow::Result<(Mesh, Links)> {
    let m = &cfg.mesh;
    let psk = match m.password.clone() {
        Some(pw) => Some(
            tokio::task::spawn_blocking(move || secure::psk_from_password(&pw))
                .await?
                .map_err(|e| anyhow::anyhow!("deriving the key from the password: {e}"))?,
        ),
        None => None,
    };
    let setup = Setup {
        me: identity.name,
        uid: router::new_uid(),
        nickname: identity.nickname.clone(),
        listen_port: m.port,
        psk,
        trusted: m.trusted_subnets.clone(),
        overlays: if m.no_fastdp {
            vec![Overlay::Sleeve]
        } else {
            vec![Overlay::Fastdp, Overlay::Sleeve]
        }
        .into_iter()
        .map(|o| o.name().to_owned())
        .collect(),
        fastdp_port: m.fastdp_port,
        sleeve_port: m.port,
    };
    let discovery_subnets = if m.discovery_subnets.is_empty() {
        underlay_networks(cfg.range)
    } else {
        m.discovery_subnets.clone()
    };
    let rcfg = RouterConfig {
        setup,
        port: m.port,
        discovery: m.discovery,
        conn_limit: m.conn_limit,
        discovery_subnets,
        initial_targets: m.peers.clone(),
    };
    let bind = std::net::SocketAddr::new(m.bind, m.port);
    info!(
        port = m.port,
        encryption = m.password.is_some(),
        discovery = m.discovery,
        "starting the mesh"
    );
    let (mesh, links, task) =
        Mesh::start(rcfg, bind, store.clone(), metrics.clone(), tasks.shutdown().clone()).await?;
    tasks.spawn("mesh", task);
    Ok((mesh, links))
}

/// The networks of this host's addresses (where discovered peers may be dialled by default):
/// loopback and link-local ones, and those overlapping the allocation `range`, left out.
fn underlay_networks(range: ipnet::IpNet) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list that is freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot list this host's addresses; discovery dials only the networks of the peers given");
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if let (Some(ip), Some(mask)) = (sockaddr_ip(ifa.ifa_addr), sockaddr_ip(ifa.ifa_netmask)) {
            let net = ipnet::ip_mask_to_prefix(mask)
                .ok()
                .and_then(|len| ipnet::IpNet::new(ip, len).ok())
                .map(|n| n.trunc());
            let special = ip.is_loopback()
                || matches!(ip, std::net::IpAddr::V4(a) if a.is_link_local())
                || matches!(ip, std::net::IpAddr::V6(a) if a.is_unicast_link_local());
            if let Some(net) = net.filter(|n| !special && !n.contains(&range) && !range.contains(n))
            {
                if !out.contains(&net) {
                    out.push(net);
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The IP address in a `sockaddr` of getifaddrs, if it is IPv4 or IPv6.
fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<std::net::IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: getifaddrs gives valid sockaddrs; the family says which layout it has.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*(sa.cast::<libc::sockaddr_in>());
                Some(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into())
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa.cast::<libc::sockaddr_in6>());
                Some(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into())
            }
            _ => None,
        }
    }
}

/// Distinguishes this start of the agent from earlier ones (consensus forgets promises made
/// before a restart).
fn incarnation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
        _ = shutdown.cancelled() => return,
    }
    shutdown.cancel();
}

/// Brings the host to the desired state, marks the agent ready, then keeps it there.
async fn bring_up(
    endpoints: Endpoints,
    dp: Arc<dyn Dataplane>,
    ready: watch::Sender<Readiness>,
    cfg: AgentConfig,
    shutdown: CancellationToken,
) {
    if let Err(e) = dp.set_sysctl("net/ipv4/ip_forward", "1") {
        warn!(error = %e, "cannot enable IPv4 forwarding; pods will not reach other networks");
    }
    let queue = weft_api::del_queue_dir(&cfg.socket);
    let mut pause = Duration::from_millis(200);
    loop {
        match startup_pass(&endpoints, &queue).await {
            Ok(()) => break,
            Err(e) => {
                warn!(error = %e, "start-up not complete; retrying");
                let _ = ready.send(Readiness::starting(e.to_string()));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return,
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
    let _ = ready.send(Readiness { ready: true, reason: String::new() });
    info!("weft agent ready");

    let mut fast = tokio::time::interval(Duration::from_secs(5));
    let mut slow = tokio::time::interval(cfg.reconcile_interval);
    fast.tick().await;
    slow.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = fast.tick() => {
                if let Err(e) = endpoints.reconcile_bridge().await {
                    warn!(error = %e, "bridge reconciliation failed");
                }
                endpoints.drain_del_queue(&queue).await;
            }
            _ = slow.tick() => {
                if let Err(e) = endpoints.reconcile(false).await {
                    warn!(error = %e, "endpoint reconciliation failed");
                }
            }
        }
    }
}

async fn startup_pass(endpoints: &Endpoints, queue: &Path) -> Result<(), EndpointError> {
    endpoints.reconcile_bridge().await?;
    endpoints.reconcile(true).await?;
    endpoints.drain_del_queue(queue).await;
    Ok(())
}
