//! `weft agent`: opens the state, starts the subsystems, serves the local API and the status
//! listener, brings the host to the desired state, and shuts down cleanly on SIGTERM, SIGINT
//! or a Stop request (the kernel state stays, so pods keep their network).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::AgentConfig;
use crate::dataplane::Dataplane;
use crate::dataplane::linux::LinuxDataplane;
use crate::dns::{self, Dns};
use crate::endpoints::record::Kind;
use crate::endpoints::state::{State, StateConfig, StateHandle};
use crate::endpoints::{Endpoints, Readiness};
use crate::identity::{self, Identity};
use crate::ipam::{InitMode, IpamConfig};
use crate::mesh::connection::Setup;
use crate::mesh::gossip::{GossipChannel, GossipEvent};
use crate::mesh::report::MeshReport;
use crate::mesh::router::{self, RouterConfig};
use crate::mesh::secure;
use crate::mesh::{Links, Mesh};
use crate::metrics::Metrics;
use crate::overlay::{self, DataPlane, OverlayConfig, OverlayReport};
use crate::status::report::{EndpointCounts, PeerReport, Report};
use crate::store::Store;

/// How long a stopping agent lets API clients finish.
const API_DRAIN: Duration = Duration::from_secs(3);

/// Everything the API and status servers need.
#[derive(Debug)]
pub struct Agent {
    pub cfg: AgentConfig,
    pub identity: Identity,
    pub endpoints: Endpoints,
    pub mesh: Mesh,
    pub overlay: watch::Receiver<OverlayReport>,
    pub metrics: Arc<Metrics>,
    /// `None` with --no-dns.
    pub dns: Option<Dns>,
    pub ready: watch::Receiver<Readiness>,
    pub shutdown: CancellationToken,
    pub started: Instant,
}

impl Agent {
    /// The status report.
    pub async fn report(&self) -> Report {
        let readiness = self.ready.borrow().clone();
        let state = self
            .endpoints
            .state()
            .call(|s| {
                let records = s.records();
                let count = |k: Kind| records.iter().filter(|r| r.kind == k).count() as u32;
                (
                    s.bridge_report(),
                    s.ipam_report(),
                    EndpointCounts {
                        cni: count(Kind::Cni),
                        attached: count(Kind::Attach),
                        reserved: count(Kind::Reservation),
                    },
                )
            })
            .await;
        let (bridge, ipam, endpoints) = state.unwrap_or_default();
        let dns = match &self.dns {
            Some(d) => Some(d.report().await),
            None => None,
        };
        Report {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            peer: PeerReport {
                name: self.identity.name.to_string(),
                nickname: self.identity.nickname.clone(),
            },
            ready: readiness.ready,
            not_ready_reason: readiness.reason,
            bridge,
            ipam,
            endpoints,
            mesh: self.mesh.report(),
            overlay: self.overlay.borrow().clone(),
            dns,
        }
    }
}

fn init_logging(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
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
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating --state-dir {}", cfg.state_dir.display()))?;
    let store = Arc::new(Store::open(&cfg.state_dir)?);
    let (name, renamed) = identity::load_or_create(&store, cfg.name)?;
    // A different name is a different peer: nothing tied to the old one may be reused.
    if renamed {
        warn!(peer = %name, "peer name changed by --name; this peer starts with a new identity");
    }
    let identity = Identity { name, nickname: cfg.nickname.clone() };
    let dp: Arc<dyn Dataplane> = Arc::new(LinuxDataplane);
    let (underlay_mtu, mtu) = mtus(&cfg, dp.as_ref());
    info!(
        peer = %identity.name, nickname = %identity.nickname, version = env!("CARGO_PKG_VERSION"),
        range = %cfg.range, bridge = %cfg.bridge, mtu, underlay_mtu, socket = %cfg.socket.display(),
        "weft agent starting"
    );

    let shutdown = CancellationToken::new();
    let metrics = Arc::new(Metrics::new());
    let (mesh, links) =
        start_mesh(&cfg, &identity, store.clone(), metrics.clone(), shutdown.clone()).await?;
    let ipam_cfg = IpamConfig {
        me: identity.name,
        incarnation: incarnation(),
        range: cfg.range,
        default_subnet: cfg.default_subnet,
        mode: match cfg.ipalloc_init.clone() {
            Some(mode) => mode,
            // Weave's default: agreement among the peers this one was told about, and itself.
            None => InitMode::Consensus(mesh.connect(Vec::new(), false).await.len() + 1),
        },
    };
    info!(mode = %ipam_cfg.mode, "IP allocation");
    let state_cfg = StateConfig {
        bridge: cfg.bridge.clone(),
        bridge_mac: identity.name.mac(),
        mtu,
        firewall_table: cfg.nft_table.clone(),
    };
    let mut state = State::load(store.clone(), dp.clone(), state_cfg, ipam_cfg)?;
    let ipam_channel = mesh.channel("ipam");
    state.connect_ipam(ipam_channel.sender());
    let ipam_changes = state.ipam_changes();
    let summaries = state.endpoint_summaries();
    let (state_handle, state_thread) = StateHandle::spawn(state)?;
    let dns = cfg.dns.clone().map(|dns_cfg| {
        let inputs = dns::Inputs {
            channel: mesh.channel("dns"),
            endpoints: summaries,
            mesh: mesh.report_watch(),
            state: state_handle.clone(),
            store: store.clone(),
        };
        dns::start(dns_cfg, inputs, shutdown.clone())
    });
    tokio::spawn(run_ipam(
        ipam_channel,
        state_handle.clone(),
        mesh.report_watch(),
        shutdown.clone(),
    ));
    let (ready_tx, ready_rx) = watch::channel(Readiness::starting("setting up the bridge"));
    let endpoints = Endpoints::new(
        state_handle,
        dp.clone(),
        ready_rx.clone(),
        ipam_changes,
        cfg.bridge.clone(),
    );
    let (vxlan, tap) = overlay::device_names(&cfg.bridge);
    // The bridge must exist before the overlay ports join it.
    endpoints
        .reconcile_bridge()
        .await
        .map_err(|e| anyhow::anyhow!("setting up the bridge: {e}"))?;
    let overlay_cfg = OverlayConfig {
        me: identity.name,
        bridge: cfg.bridge.clone(),
        bridge_mac: identity.name.mac(),
        vxlan,
        tap,
        fastdp_port: cfg.mesh.fastdp_port,
        sleeve_port: cfg.mesh.port,
        mtu,
        underlay_mtu,
        no_fastdp: cfg.mesh.no_fastdp,
    };
    let overlay =
        DataPlane::start(overlay_cfg, mesh.clone(), links, endpoints.clone(), shutdown.clone())
            .await?;
    let agent = Arc::new(Agent {
        cfg: cfg.clone(),
        identity,
        endpoints: endpoints.clone(),
        mesh,
        overlay,
        metrics,
        dns,
        ready: ready_rx,
        shutdown: shutdown.clone(),
        started: Instant::now(),
    });

    let listener = bind_socket(&cfg.socket).await?;
    let api = tokio::spawn(crate::api::server::serve(agent.clone(), listener));
    let status = match cfg.status_addr {
        Some(addr) => Some(tokio::spawn(crate::status::http::serve(agent.clone(), addr).await?)),
        None => None,
    };
    tokio::spawn(watch_signals(shutdown.clone()));
    tokio::spawn(bring_up(endpoints.clone(), dp.clone(), ready_tx, cfg.clone(), shutdown.clone()));

    shutdown.cancelled().await;
    info!("weft agent stopping; the kernel state stays in place");
    // Graceful shutdown waits for clients to hang up; one that keeps its connection open
    // must not keep the agent alive.
    let abort = api.abort_handle();
    match tokio::time::timeout(API_DRAIN, api).await {
        Ok(Err(e)) if !e.is_cancelled() => error!(error = %e, "API server task failed"),
        Ok(_) => {}
        Err(_) => {
            warn!("API clients still connected after {API_DRAIN:?}; closing their connections");
            abort.abort();
        }
    }
    if let Some(s) = status {
        let _ = s.await;
    }
    endpoints.state().stop();
    drop(endpoints);
    drop(agent);
    // Waiting for the state thread makes sure the final writes are on disk before the
    // process exits.
    let _ = tokio::task::spawn_blocking(move || state_thread.join()).await;
    let _ = std::fs::remove_file(&cfg.socket);
    info!("weft agent stopped");
    Ok(())
}

/// Derives the key from the password (slow on purpose, so off the async threads) and starts
/// the mesh.
async fn start_mesh(
    cfg: &AgentConfig,
    identity: &Identity,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
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
            vec!["sleeve".into()]
        } else {
            vec!["fastdp".into(), "sleeve".into()]
        },
        fastdp_port: m.fastdp_port,
        sleeve_port: m.port,
    };
    let rcfg = RouterConfig {
        setup,
        port: m.port,
        discovery: m.discovery,
        conn_limit: m.conn_limit,
        initial_targets: m.peers.clone(),
    };
    let bind = std::net::SocketAddr::new(m.bind, m.port);
    info!(
        port = m.port,
        encryption = m.password.is_some(),
        discovery = m.discovery,
        "starting the mesh"
    );
    Ok(Mesh::start(rcfg, bind, store, metrics, shutdown).await?)
}

/// Distinguishes this start of the agent from earlier ones (consensus forgets promises made
/// before a restart).
fn incarnation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Feeds the IP allocation state: messages from the `ipam` channel, the reachable peers, and
/// a tick for repeats and anti-entropy.
async fn run_ipam(
    mut channel: GossipChannel,
    state: StateHandle,
    mut mesh: watch::Receiver<MeshReport>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The peers reachable before this task started count too.
    mesh.mark_changed();
    loop {
        let done = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = channel.recv() => match ev {
                None => return,
                Some(GossipEvent::Gossip { src, payload }) => {
                    state.call(move |s| s.ipam_message(src, &payload, true)).await
                }
                Some(GossipEvent::Broadcast { src, payload } | GossipEvent::Unicast { src, payload }) => {
                    state.call(move |s| s.ipam_message(src, &payload, false)).await
                }
                Some(GossipEvent::PeerUp(peer)) => state.call(move |s| s.ipam_peer_up(peer)).await,
                Some(GossipEvent::PeersGone(_)) => Ok(()),
            },
            changed = mesh.changed() => {
                if changed.is_err() {
                    return;
                }
                let (alive, nicknames) = {
                    let report = mesh.borrow_and_update();
                    let nicks = report
                        .peers
                        .iter()
                        .filter_map(|p| Some((p.name.parse().ok()?, p.nickname.clone())))
                        .collect();
                    (report.reachable(), nicks)
                };
                state.call(move |s| s.ipam_peers(alive, nicknames)).await
            }
            _ = tick.tick() => state.call(|s| s.ipam_tick()).await,
        };
        if done.is_err() {
            return; // the state owner has stopped
        }
    }
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
    let mut slow = tokio::time::interval(Duration::from_secs(60));
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

async fn startup_pass(endpoints: &Endpoints, queue: &Path) -> Result<(), crate::error::ApiError> {
    endpoints.reconcile_bridge().await?;
    endpoints.reconcile(true).await?;
    endpoints.drain_del_queue(queue).await;
    Ok(())
}
