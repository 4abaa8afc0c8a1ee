//! The peer mesh: agents connect over TCP (default port 6783), authenticate and encrypt with
//! a shared password, learn the whole topology by gossip, route messages through partial
//! connectivity, and offer named gossip channels to the other subsystems. The wire protocol is
//! specified in docs/mesh-protocol.md.

pub mod connection;
pub mod frame;
pub mod fuzz;
pub mod gossip;
pub mod maker;
pub mod report;
pub mod router;
pub mod routes;
pub mod secure;
pub mod sim;
pub mod topology;

/// The generated protocol messages (`weft.mesh.v1`).
#[allow(missing_docs, missing_debug_implementations, unused_qualifications, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/weft.mesh.v1.rs"));
}

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use self::gossip::{GossipChannel, Outgoing};
use self::report::MeshReport;
use self::router::{Command, Inputs, Router, RouterConfig};
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
    data_routes: watch::Receiver<BTreeMap<PeerName, PeerName>>,
}

/// The data plane's side of the mesh: link events, to be taken once.
#[derive(Debug)]
pub struct Links(pub mpsc::UnboundedReceiver<router::LinkEvent>);

/// The mesh could not start.
#[derive(Debug, thiserror::Error)]
#[error("--port: cannot listen on {addr}: {source}")]
pub struct StartError {
    addr: SocketAddr,
    source: std::io::Error,
}

impl Mesh {
    /// Binds the listener and starts the router.
    pub async fn start(
        cfg: RouterConfig,
        bind: SocketAddr,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<(Mesh, Links), StartError> {
        let listener =
            TcpListener::bind(bind).await.map_err(|source| StartError { addr: bind, source })?;
        let me = cfg.setup.me;
        let (commands, cmd_rx) = mpsc::unbounded_channel();
        let (outgoing, out_rx) = mpsc::unbounded_channel();
        let (setup_tx, setup_rx) = mpsc::unbounded_channel();
        let (conn_tx, conn_rx) = mpsc::unbounded_channel();
        let (report_tx, report) = watch::channel(MeshReport::default());
        let (links_tx, links_rx) = mpsc::unbounded_channel();
        let (routes_tx, data_routes) = watch::channel(BTreeMap::new());
        let router =
            Router::new(cfg, store, metrics, report_tx, setup_tx, conn_tx, links_tx, routes_tx);
        let inputs = Inputs { commands: cmd_rx, outgoing: out_rx, setup: setup_rx, conns: conn_rx };
        tokio::spawn(router.run(inputs, listener, shutdown));
        Ok((Mesh { me, commands, outgoing, report, data_routes }, Links(links_rx)))
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

    /// Adds direct targets (or replaces them); returns the direct targets.
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

    /// The mesh report as it changes.
    pub fn report_watch(&self) -> watch::Receiver<MeshReport> {
        self.report.clone()
    }

    pub fn report(&self) -> MeshReport {
        self.report.borrow().clone()
    }
}
