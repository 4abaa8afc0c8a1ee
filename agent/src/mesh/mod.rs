//! The peer mesh: agents connect over TCP (default port 6783), authenticate and encrypt with
//! a shared password, learn the whole topology by gossip, route messages through partial
//! connectivity, and offer named gossip channels to the other subsystems. The wire protocol is
//! specified in docs/mesh-protocol.md.

pub mod connection;
pub mod departed;
pub mod frame;
pub mod fuzz;
pub mod gossip;
pub mod limits;
pub mod maker;
pub mod report;
pub mod router;
pub mod routes;
pub mod secure;
pub mod sim;
pub mod topology;
pub mod view;

pub use crate::proto;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use self::gossip::{GossipChannel, Outgoing};
use self::maker::Source;
use self::report::MeshReport;
use self::router::{Command, Inputs, Outputs, Router, RouterConfig};
use self::view::MeshView;
use crate::identity::PeerName;
use crate::metrics::Metrics;
use crate::store::Store;

/// Default TCP port of the mesh (and UDP port of sleeve).
pub const DEFAULT_PORT: u16 = 6783;

/// The handle other parts of the agent use.
#[derive(Clone, Debug)]
pub struct Mesh {
    me: PeerName,
    commands: mpsc::UnboundedSender<Command>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    report: watch::Receiver<MeshReport>,
    view: watch::Receiver<MeshView>,
    data_routes: watch::Receiver<BTreeMap<PeerName, PeerName>>,
    accepts: router::SharedGate,
}

/// The data plane's side of the mesh, to be taken once: link changes (`Up`, `Down`; never
/// dropped, at most two per connection) and data-plane control messages from neighbours
/// (`Control`; at most [`LINK_CONTROL_QUEUE`] queued, further ones dropped: they acknowledge
/// heartbeats, which repeat, and a peer sending a flood of them must not grow our memory).
#[derive(Debug)]
pub struct Links {
    pub changes: mpsc::UnboundedReceiver<router::LinkEvent>,
    pub control: mpsc::Receiver<router::LinkEvent>,
}

/// Control messages from neighbours queued for the data plane.
pub const LINK_CONTROL_QUEUE: usize = 1024;

/// The mesh could not start.
#[derive(Debug, thiserror::Error)]
#[error("--port: cannot listen on {addr}: {source}")]
pub struct StartError {
    addr: SocketAddr,
    source: std::io::Error,
}

impl Mesh {
    /// Binds the listener and builds the router; the caller spawns the returned task.
    pub async fn start(
        cfg: RouterConfig,
        bind: SocketAddr,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<(Mesh, Links, impl Future<Output = ()> + Send + 'static), StartError> {
        let listener =
            TcpListener::bind(bind).await.map_err(|source| StartError { addr: bind, source })?;
        let me = cfg.setup.me;
        let (commands, cmd_rx) = mpsc::unbounded_channel();
        let (outgoing, out_rx) = mpsc::unbounded_channel();
        let (setup_tx, setup_rx) = mpsc::unbounded_channel();
        let (conn_tx, conn_rx) =
            connection::to_router(connection::ROUTER_QUEUE, connection::ROUTER_BYTES);
        let (report_tx, report) = watch::channel(MeshReport::default());
        let (view_tx, view) = watch::channel(MeshView::default());
        let (links_tx, links_rx) = mpsc::unbounded_channel();
        let (control_tx, control_rx) = mpsc::channel(LINK_CONTROL_QUEUE);
        let (routes_tx, data_routes) = watch::channel(BTreeMap::new());
        let out = Outputs {
            report: report_tx,
            view: view_tx,
            setup: setup_tx,
            conns: conn_tx,
            links: links_tx,
            link_control: control_tx,
            data_routes: routes_tx,
        };
        let router = Router::new(cfg, store, metrics, out);
        let accepts = router.accept_gate();
        let inputs = Inputs { commands: cmd_rx, outgoing: out_rx, setup: setup_rx, conns: conn_rx };
        let task = router.run(inputs, listener, shutdown);
        let links = Links { changes: links_rx, control: control_rx };
        let mesh = Mesh { me, commands, outgoing, report, view, data_routes, accepts };
        Ok((mesh, links, task))
    }

    /// Starts accepting and dialling. Call it once every subsystem has taken its
    /// [`channel`](Mesh::channel): until then the mesh only answers commands, so that the
    /// state a peer sends on a new connection always finds its receiver.
    pub fn open(&self) {
        let _ = self.commands.send(Command::Open);
    }

    /// Tells the mesh whether data flows over the link to `peer`.
    pub fn set_established(&self, peer: PeerName, established: bool) {
        let _ = self.commands.send(Command::SetEstablished { peer, established });
    }

    /// Sends a data-plane control message to a directly connected peer.
    pub fn send_overlay(&self, peer: PeerName, msg: proto::OverlayControl) {
        let _ = self.commands.send(Command::SendOverlay { peer, msg });
    }

    /// Data routes (destination -> next hop), updated when the topology changes.
    pub fn data_routes(&self) -> watch::Receiver<BTreeMap<PeerName, PeerName>> {
        self.data_routes.clone()
    }

    pub fn me(&self) -> PeerName {
        self.me
    }

    /// Registers a gossip channel.
    pub fn channel(&self, name: &str) -> GossipChannel {
        let (tx, rx) = mpsc::channel(router::CHANNEL_QUEUE);
        let _ = self.commands.send(Command::Register { name: name.to_owned(), events: tx });
        GossipChannel::new(name.into(), self.me, rx, self.outgoing.clone())
    }

    /// A peer source states every target it wants now (see [`Source`]); the user's targets
    /// and other sources' are left alone.
    pub fn set_targets(&self, source: Source, targets: std::collections::BTreeSet<String>) {
        let _ = self.commands.send(Command::SetTargets { source, targets });
    }

    /// The typed view of the mesh as it changes: what subsystems decide on.
    pub fn view(&self) -> watch::Receiver<MeshView> {
        self.view.clone()
    }

    /// The user's direct targets (command line, `weft connect`, persisted).
    pub async fn targets(&self) -> Vec<String> {
        self.connect(Vec::new(), false).await
    }

    /// Adds the user's direct targets (or replaces them); returns the user's targets.
    pub async fn connect(&self, peers: Vec<String>, replace: bool) -> Vec<String> {
        let (reply, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Connect { peers, replace, reply });
        rx.await.unwrap_or_default()
    }

    /// Removes direct targets; returns the remaining ones.
    pub async fn forget(&self, peers: Vec<String>) -> Vec<String> {
        let (reply, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Forget { peers, reply });
        rx.await.unwrap_or_default()
    }

    /// The mesh's part of the status report (for people and scripts, not for decisions).
    pub fn report(&self) -> MeshReport {
        let mut r = self.report.borrow().clone();
        r.accepts = router::lock_gate(&self.accepts).report();
        r
    }
}
