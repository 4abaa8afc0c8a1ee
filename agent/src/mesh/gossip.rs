//! The gossip API other subsystems (IP allocation, DNS, MAC tables) use: a named channel
//! with three ways to send — `gossip` to a few neighbours (who pass on what is new to them),
//! `broadcast` down the sender's broadcast tree to every peer, `unicast` along routes to one
//! peer — and a stream of [`GossipEvent`]s. A subsystem whose state is a CRDT implements
//! [`GossipData`] (its merge function) and lets [`GossipChannel::handle`] do the rest.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::identity::PeerName;

/// The greatest version a peer may send for any gossiped entry (topology, DNS, MACs, the IP
/// ring). Honest versions start small or at the time in milliseconds (about 2^41); a greater
/// one can only be meant to win every merge forever. Refusing it on receipt leaves 2^62 of room
/// to raise any accepted version without overflow.
pub const MAX_VERSION: u64 = 1 << 62;

/// Whether a received version may be merged (see [`MAX_VERSION`]).
pub fn version_ok(v: u64) -> bool {
    v <= MAX_VERSION
}

/// Splits the items of a whole state into groups, each encoding (as a repeated message field)
/// to at most `max` bytes, in order; an item larger than `max` alone makes a group. Senders of
/// a whole state send one message per group, each mergeable on its own (docs/mesh-protocol.md
/// §3.2), so that no frame approaches the receiver's limit.
pub fn split_by_size<T: prost::Message>(items: Vec<T>, max: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut size = 0;
    for item in items {
        let len = item.encoded_len();
        let len = 1 + prost::length_delimiter_len(len) + len;
        match out.last_mut() {
            Some(group) if size + len <= max => group.push(item),
            _ => {
                out.push(vec![item]);
                size = 0;
            }
        }
        size += len;
    }
    out
}

/// What arrives on a channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GossipEvent {
    /// State gossiped by a neighbour.
    Gossip { src: PeerName, payload: Vec<u8> },
    /// A broadcast from `src` (already passed on by the mesh).
    Broadcast { src: PeerName, payload: Vec<u8> },
    /// A message for this peer only.
    Unicast { src: PeerName, payload: Vec<u8> },
    /// A new connection to `peer` (or a new incarnation of it): a chance to send it everything.
    PeerUp(PeerName),
    /// Peers no longer reachable, dropped from the topology.
    PeersGone(Vec<PeerName>),
}

/// How a message travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendKind {
    /// To a few random neighbours (`exclude` is skipped).
    Gossip { exclude: Option<PeerName> },
    /// To every peer, down our broadcast tree.
    Broadcast,
    /// To one peer.
    Unicast(PeerName),
}

/// A message from a subsystem to the mesh.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub channel: Arc<str>,
    pub kind: SendKind,
    pub payload: Vec<u8>,
}

/// A subsystem's end of a named channel.
#[derive(Debug)]
pub struct GossipChannel {
    name: Arc<str>,
    me: PeerName,
    events: mpsc::Receiver<GossipEvent>,
    out: mpsc::UnboundedSender<Outgoing>,
}

/// A cloneable way to send on a channel, for code that does not own the channel (e.g. a
/// state owner on its own thread). Sending never blocks.
#[derive(Clone, Debug)]
pub struct GossipSender {
    name: Arc<str>,
    out: mpsc::UnboundedSender<Outgoing>,
}

impl GossipSender {
    pub fn send(&self, kind: SendKind, payload: Vec<u8>) {
        // A stopped mesh drops messages.
        let _ = self.out.send(Outgoing { channel: self.name.clone(), kind, payload });
    }
}

/// State that can be gossiped: merging must be commutative, associative and idempotent.
pub trait GossipData {
    /// Merges state received from a peer; returns the encoded part that was new here, if any.
    fn merge_encoded(&mut self, src: PeerName, bytes: &[u8]) -> Result<Option<Vec<u8>>, String>;
    /// The whole state, as messages of at most [`super::frame::STATE_MESSAGE`] bytes each
    /// (an indivisible item may be larger), each mergeable on its own; none when empty.
    fn encode_all(&self) -> Vec<Vec<u8>>;
}

impl GossipChannel {
    pub(crate) fn new(
        name: Arc<str>,
        me: PeerName,
        events: mpsc::Receiver<GossipEvent>,
        out: mpsc::UnboundedSender<Outgoing>,
    ) -> GossipChannel {
        GossipChannel { name, me, events, out }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// This peer's name.
    pub fn me(&self) -> PeerName {
        self.me
    }

    /// The next event; `None` once the mesh has stopped.
    pub async fn recv(&mut self) -> Option<GossipEvent> {
        self.events.recv().await
    }

    /// A sender for this channel that can be handed to other tasks and threads.
    pub fn sender(&self) -> GossipSender {
        GossipSender { name: self.name.clone(), out: self.out.clone() }
    }

    fn send(&self, kind: SendKind, payload: Vec<u8>) {
        // A stopped mesh drops messages; the subsystem sees `recv` end.
        let _ = self.out.send(Outgoing { channel: self.name.clone(), kind, payload });
    }

    pub fn gossip(&self, payload: Vec<u8>) {
        self.send(SendKind::Gossip { exclude: None }, payload);
    }

    /// Gossips to a few neighbours other than `exclude` (who told us).
    pub fn gossip_except(&self, exclude: PeerName, payload: Vec<u8>) {
        self.send(SendKind::Gossip { exclude: Some(exclude) }, payload);
    }

    pub fn broadcast(&self, payload: Vec<u8>) {
        self.send(SendKind::Broadcast, payload);
    }

    pub fn unicast(&self, dst: PeerName, payload: Vec<u8>) {
        self.send(SendKind::Unicast(dst), payload);
    }

    /// The standard handling of an event for CRDT state: merge gossip and broadcasts (and
    /// gossip on what was new, except back to the sender), send everything to a new peer.
    /// Returns whether `data` changed; unicasts and departures are left to the caller
    /// (returned as `Err(event)`).
    pub fn handle<D: GossipData>(
        &self,
        data: &mut D,
        event: GossipEvent,
    ) -> Result<bool, GossipEvent> {
        match event {
            GossipEvent::Gossip { src, payload } => Ok(self.merge(data, src, &payload, true)),
            GossipEvent::Broadcast { src, payload } => Ok(self.merge(data, src, &payload, false)),
            GossipEvent::PeerUp(peer) => {
                for message in data.encode_all() {
                    self.unicast(peer, message);
                }
                Ok(false)
            }
            other => Err(other),
        }
    }

    fn merge<D: GossipData>(
        &self,
        data: &mut D,
        src: PeerName,
        payload: &[u8],
        pass_on: bool,
    ) -> bool {
        match data.merge_encoded(src, payload) {
            Ok(Some(delta)) => {
                if pass_on {
                    self.send(SendKind::Gossip { exclude: Some(src) }, delta);
                }
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(channel = %self.name, from = %src, error = %e, "ignoring undecodable gossip");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A grow-only set of numbers, the smallest CRDT.
    #[derive(Default)]
    struct Numbers(BTreeSet<u8>);

    impl GossipData for Numbers {
        fn merge_encoded(&mut self, _: PeerName, bytes: &[u8]) -> Result<Option<Vec<u8>>, String> {
            let new: Vec<u8> = bytes.iter().copied().filter(|b| self.0.insert(*b)).collect();
            Ok((!new.is_empty()).then_some(new))
        }
        fn encode_all(&self) -> Vec<Vec<u8>> {
            vec![self.0.iter().copied().collect()]
        }
    }

    #[test]
    fn handle_merges_and_passes_on_only_news() {
        let me = PeerName::new(1).unwrap();
        let peer = PeerName::new(2).unwrap();
        let (_tx, rx) = mpsc::channel(1);
        let (out, mut sent) = mpsc::unbounded_channel();
        let ch = GossipChannel::new("numbers".into(), me, rx, out);
        let mut data = Numbers::default();
        assert_eq!(
            ch.handle(&mut data, GossipEvent::Gossip { src: peer, payload: vec![1, 2] }),
            Ok(true)
        );
        let o = sent.try_recv().unwrap();
        assert_eq!((o.kind, o.payload), (SendKind::Gossip { exclude: Some(peer) }, vec![1, 2]));
        assert_eq!(
            ch.handle(&mut data, GossipEvent::Gossip { src: peer, payload: vec![2] }),
            Ok(false)
        );
        assert!(sent.try_recv().is_err(), "nothing new, nothing passed on");
        assert_eq!(
            ch.handle(&mut data, GossipEvent::Broadcast { src: peer, payload: vec![3] }),
            Ok(true)
        );
        assert!(sent.try_recv().is_err(), "broadcasts are passed on by the mesh itself");
        ch.handle(&mut data, GossipEvent::PeerUp(peer)).unwrap();
        assert_eq!(sent.try_recv().unwrap().payload, vec![1, 2, 3]);
        assert!(ch.handle(&mut data, GossipEvent::PeersGone(vec![peer])).is_err());
    }
}
