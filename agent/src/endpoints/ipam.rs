//! [`IpamHandle`]: the typed way to the IP allocation state, which lives on the state owner's
//! thread beside the endpoint records (an allocation and the record that holds it are written
//! together). The API, the mesh feed below, and later the Kubernetes node reclaim use it;
//! nobody outside `endpoints/` sends the state owner closures. Also the feed that hands the
//! `ipam` gossip channel, the mesh view and a clock tick to the allocator.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::error::EndpointError;
use super::state::StateHandle;
use crate::identity::PeerName;
use crate::ipam::{IpamError, Wait};
use crate::mesh::gossip::{GossipChannel, GossipEvent};
use crate::mesh::view::MeshView;

/// How often the allocator repeats requests and checks its timers.
const TICK: Duration = Duration::from_secs(1);

/// Why a peer's space cannot be taken over.
#[derive(Debug, thiserror::Error)]
pub enum ReclaimError {
    #[error("{0}")]
    UnknownPeer(String),
    #[error(
        "peer {0} is reachable: rmpeer is for peers that are gone for good (run `weft reset` on \
         that peer to make it hand its space over)"
    )]
    Reachable(String),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    State(#[from] EndpointError),
}

/// The IP allocation state's interface (cheap to clone).
#[derive(Clone, Debug)]
pub struct IpamHandle {
    state: StateHandle,
}

impl IpamHandle {
    pub(super) fn new(state: StateHandle) -> IpamHandle {
        IpamHandle { state }
    }

    /// The peer a name or nickname stands for (also peers that are gone).
    pub async fn resolve(&self, name_or_nick: &str) -> Result<PeerName, ReclaimError> {
        let lookup = name_or_nick.to_owned();
        self.state.call(move |s| s.ipam_resolve(&lookup)).await?.map_err(ReclaimError::UnknownPeer)
    }

    /// Takes over the address space of a peer that is gone for good (`weft rmpeer`, and the
    /// Kubernetes reclaim of a deleted Node). Refused while `view` shows the peer reachable;
    /// returns the number of addresses taken over.
    pub async fn rmpeer(&self, name_or_nick: &str, view: &MeshView) -> Result<u128, ReclaimError> {
        let peer = self.resolve(name_or_nick).await?;
        if view.is_reachable(peer) {
            return Err(ReclaimError::Reachable(name_or_nick.to_owned()));
        }
        Ok(self.state.call(move |s| s.ipam_rmpeer(peer)).await??)
    }

    /// Starts forming the ring if nobody has; `Err` says why it is not there yet.
    pub async fn try_prime(&self) -> Result<Result<(), Wait>, EndpointError> {
        self.state.call(|s| s.ipam_prime()).await
    }

    /// A message from another peer on the `ipam` channel.
    pub async fn message(
        &self,
        src: PeerName,
        payload: Vec<u8>,
        gossiped: bool,
    ) -> Result<(), EndpointError> {
        self.state.call(move |s| s.ipam_message(src, &payload, gossiped)).await
    }

    /// A new neighbour on the `ipam` channel.
    pub async fn peer_up(&self, peer: PeerName) -> Result<(), EndpointError> {
        self.state.call(move |s| s.ipam_peer_up(peer)).await
    }

    /// The peers reachable now, and the nicknames of the peers known.
    pub async fn peers(&self, view: &MeshView) -> Result<(), EndpointError> {
        let alive: BTreeSet<PeerName> = view.reachable.clone();
        let nicknames: Vec<(PeerName, String)> =
            view.peers.iter().map(|(p, n)| (*p, n.clone())).collect();
        self.state.call(move |s| s.ipam_peers(alive, nicknames)).await
    }

    /// Periodic work (repeats, hints, anti-entropy).
    pub async fn tick(&self) -> Result<(), EndpointError> {
        self.state.call(|s| s.ipam_tick()).await
    }

    /// `weft reset`: hands this peer's ranges to a reachable peer; the heir, if any.
    pub(super) async fn leave(&self) -> Result<Option<PeerName>, EndpointError> {
        self.state.call(|s| s.ipam_leave()).await
    }
}

/// Feeds the allocator: messages of the `ipam` channel, the mesh view, and a tick. Ends on
/// shutdown or when the state owner stops.
pub async fn feed(
    ipam: IpamHandle,
    mut channel: GossipChannel,
    mut view: watch::Receiver<MeshView>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The peers reachable before this task started count too.
    view.mark_changed();
    loop {
        let done = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = channel.recv() => match ev {
                None => break,
                Some(GossipEvent::Gossip { src, payload }) => ipam.message(src, payload, true).await,
                Some(GossipEvent::Broadcast { src, payload } | GossipEvent::Unicast { src, payload }) => {
                    ipam.message(src, payload, false).await
                }
                Some(GossipEvent::PeerUp(peer)) => ipam.peer_up(peer).await,
                Some(GossipEvent::PeersGone(_)) => Ok(()),
            },
            changed = view.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = view.borrow_and_update().clone();
                ipam.peers(&now).await
            }
            _ = tick.tick() => ipam.tick().await,
        };
        if done.is_err() {
            break; // the state owner has stopped
        }
    }
    info!("IP allocation feed stopped");
}
