//! One mesh connection: dialling or accepting, the handshake (preamble, Noise when a password
//! is set, Hello), then a reader and a writer task that move frames between the socket and the
//! router. Heartbeats every [`HEARTBEAT`]; a connection silent for [`SILENCE`] is failed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::frame::{FrameReader, PREAMBLE_LEN, Preamble, ProtocolError, decode, frame_of};
use super::proto;
use super::secure::{self, Channel, Psk};
use crate::identity::PeerName;

pub const HEARTBEAT: Duration = Duration::from_secs(3);
pub const SILENCE: Duration = Duration::from_secs(12);
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A Hello larger than this is refused.
const MAX_HELLO: usize = 64 * 1024;

/// What we tell peers about ourselves, and how we judge them.
#[derive(Clone, Debug)]
pub struct Setup {
    pub me: PeerName,
    pub uid: u64,
    pub nickname: String,
    pub listen_port: u16,
    pub psk: Option<Psk>,
    pub trusted: Vec<IpNet>,
    pub overlays: Vec<String>,
    pub fastdp_port: u16,
    pub sleeve_port: u16,
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("authentication failed: {0} (is the same --password set on both peers?)")]
    Auth(String),
    #[error("this is ourselves")]
    ToSelf,
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("cannot resolve {0}")]
    Resolve(String),
}

impl ConnError {
    /// Errors that retrying cannot fix.
    pub fn is_permanent(&self) -> bool {
        matches!(self, ConnError::ToSelf)
    }
}

/// A connection whose handshake is complete.
#[derive(Debug)]
pub struct Established {
    pub hello: proto::Hello,
    pub remote: SocketAddr,
    pub outbound: bool,
    /// Agreed by both ends: XOR of the two `conn_id`s.
    pub conn_uid: u64,
    pub encrypted: bool,
    /// Whether we consider the remote address trusted (`--trusted-subnets`).
    pub we_trust: bool,
    /// The key we encrypt sleeve packets to this peer with (sent to it in our Hello).
    pub our_sleeve_key: Vec<u8>,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    // The cipher states carry on from the handshake: their nonces must never restart.
    sealer: Option<secure::Sealer>,
    opener: Option<secure::Opener>,
    leftover: Vec<u8>,
}

impl Established {
    pub fn peer(&self) -> Option<PeerName> {
        PeerName::new(self.hello.peer_name)
    }
}

fn trusted(addr: IpAddr, nets: &[IpNet]) -> bool {
    nets.iter().any(|n| n.contains(&addr))
}

/// Resolves `spec` (`host` or `host:port`, default port `port`) and connects.
pub async fn dial(spec: &str, port: u16, setup: &Setup) -> Result<Established, ConnError> {
    let with_port = if spec.parse::<SocketAddr>().is_ok()
        || spec.rsplit_once(':').is_some_and(|(h, p)| !h.contains(':') && p.parse::<u16>().is_ok())
    {
        spec.to_owned()
    } else if spec.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{spec}]:{port}")
    } else {
        format!("{spec}:{port}")
    };
    let addr = tokio::net::lookup_host(&with_port)
        .await
        .map_err(|e| ConnError::Resolve(format!("{spec}: {e}")))?
        .next()
        .ok_or_else(|| ConnError::Resolve(spec.to_owned()))?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnError::Timeout(CONNECT_TIMEOUT))??;
    handshake(stream, true, setup).await
}

/// Runs the handshake on a connected socket.
pub async fn handshake(
    stream: TcpStream,
    outbound: bool,
    setup: &Setup,
) -> Result<Established, ConnError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake_inner(stream, outbound, setup))
        .await
        .map_err(|_| ConnError::Timeout(HANDSHAKE_TIMEOUT))?
}

async fn read_exact_or(r: &mut OwnedReadHalf, buf: &mut [u8], what: &str) -> Result<(), ConnError> {
    r.read_exact(buf).await.map(drop).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ConnError::Io(std::io::Error::new(
                e.kind(),
                format!("the peer closed the connection during {what}"),
            ))
        } else {
            ConnError::Io(e)
        }
    })
}

async fn handshake_inner(
    stream: TcpStream,
    outbound: bool,
    setup: &Setup,
) -> Result<Established, ConnError> {
    stream.set_nodelay(true)?;
    let remote = stream.peer_addr()?;
    let (mut reader, mut writer) = stream.into_split();
    let ours = Preamble::ours(setup.psk.is_some());
    writer.write_all(&ours.encode()).await?;
    let mut theirs = [0u8; PREAMBLE_LEN];
    read_exact_or(&mut reader, &mut theirs, "the preamble").await?;
    ours.negotiate(&Preamble::decode(&theirs)?)?;

    let channel = match &setup.psk {
        Some(psk) => Some(noise(&mut reader, &mut writer, psk, outbound).await?),
        None => None,
    };
    let we_trust = trusted(remote.ip(), &setup.trusted);
    let our_sleeve_key =
        if channel.is_some() { rand::random::<[u8; 32]>().to_vec() } else { Vec::new() };
    let conn_id: u64 = rand::random();
    let hello = proto::Hello {
        peer_name: setup.me.get(),
        nickname: setup.nickname.clone(),
        uid: setup.uid,
        conn_id,
        listen_port: u32::from(setup.listen_port),
        trusts_you: we_trust,
        features: vec!["gossip-v1".into()],
        overlays: setup.overlays.clone(),
        sleeve_key: our_sleeve_key.clone(),
        fastdp_port: u32::from(setup.fastdp_port),
        sleeve_port: u32::from(setup.sleeve_port),
    };
    let mut sealer = channel.as_ref().map(Channel::sealer);
    let mut opener = channel.as_ref().map(Channel::opener);
    let encrypted = channel.is_some();
    let mut wire = Vec::new();
    let hello_frame = frame_of(&hello);
    match sealer.as_mut() {
        Some(s) => s.seal(&hello_frame, &mut wire).map_err(|e| ConnError::Auth(e.to_string()))?,
        None => wire.extend_from_slice(&hello_frame),
    }
    writer.write_all(&wire).await?;

    let mut frames = FrameReader::new(MAX_HELLO);
    let mut buf = vec![0u8; 16 * 1024];
    let theirs: proto::Hello = loop {
        if let Some(f) = frames.next_frame()? {
            break decode(&f)?;
        }
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Err(ConnError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer closed the connection before its hello",
            )));
        }
        match opener.as_mut() {
            Some(o) => {
                o.push(&buf[..n]);
                while let Some(p) = o.next_plain().map_err(|e| ConnError::Auth(e.to_string()))? {
                    frames.push(&p);
                }
            }
            None => frames.push(&buf[..n]),
        }
    };
    let Some(peer) = PeerName::new(theirs.peer_name) else {
        return Err(ProtocolError::Decode(format!(
            "peer name {:#x} is longer than 48 bits",
            theirs.peer_name
        ))
        .into());
    };
    if theirs.uid == 0 {
        return Err(ProtocolError::Decode("peer uid is 0".into()).into());
    }
    if peer == setup.me {
        return Err(ConnError::ToSelf);
    }
    let leftover = frames.take_rest();
    Ok(Established {
        conn_uid: conn_id ^ theirs.conn_id,
        hello: theirs,
        remote,
        outbound,
        encrypted,
        we_trust,
        our_sleeve_key,
        reader,
        writer,
        sealer,
        opener,
        leftover,
    })
}

/// The two-message NNpsk0 handshake; messages carry a 2-byte length.
async fn noise(
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    psk: &Psk,
    initiator: bool,
) -> Result<Channel, ConnError> {
    let auth = |e: snow::Error| ConnError::Auth(e.to_string());
    let mut state =
        if initiator { secure::initiator(psk) } else { secure::responder(psk) }.map_err(auth)?;
    let mut msg = vec![0u8; secure::MAX_RECORD];
    let mut payload = vec![0u8; secure::MAX_RECORD];
    for step in 0..2 {
        let our_turn = (step == 0) == initiator;
        if our_turn {
            let n = state.write_message(&[], &mut msg).map_err(auth)?;
            let mut out = (n as u16).to_be_bytes().to_vec();
            out.extend_from_slice(&msg[..n]);
            writer.write_all(&out).await?;
        } else {
            let mut len = [0u8; 2];
            read_exact_or(reader, &mut len, "authentication")
                .await
                .map_err(|e| ConnError::Auth(e.to_string()))?;
            let len = usize::from(u16::from_be_bytes(len));
            read_exact_or(reader, &mut msg[..len], "authentication").await?;
            state.read_message(&msg[..len], &mut payload).map_err(|_| {
                ConnError::Auth("the peer's handshake does not verify with our password".into())
            })?;
        }
    }
    Channel::new(state).map_err(auth)
}

/// Why a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// We closed it (shutdown, or its send queue overflowed).
    Closed,
    ClosedByPeer,
    /// No data, not even heartbeats, for this many seconds.
    Silent(u64),
    /// A newer connection to the same incarnation of the peer replaced it.
    Replaced,
    /// The peer came back with a new incarnation.
    PeerRestarted,
    /// Reading, writing, decoding or decrypting failed.
    Failed(String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Closed => f.write_str("closed"),
            CloseReason::ClosedByPeer => f.write_str("closed by the peer"),
            CloseReason::Silent(s) => write!(f, "no data for {s}s (heartbeats lost)"),
            CloseReason::Replaced => f.write_str("replaced by a duplicate connection"),
            CloseReason::PeerRestarted => f.write_str("the peer restarted"),
            CloseReason::Failed(why) => f.write_str(why),
        }
    }
}

/// What the connection tasks tell the router.
#[derive(Debug)]
pub enum ConnEvent {
    /// A decoded frame. Its bytes count against [`ROUTER_BYTES`] until the router drops the
    /// event (`held`).
    Frame {
        id: u64,
        frame: proto::Frame,
        bytes: usize,
        held: OwnedSemaphorePermit,
    },
    Closed {
        id: u64,
        reason: CloseReason,
    },
}

/// Frames decoded by all connections and not yet handled by the router: beyond either bound a
/// connection's reader waits, stops reading its socket, and TCP slows the peer down.
pub const ROUTER_QUEUE: usize = 1024;
/// (At least one frame of [`super::frame::MAX_FRAME`] always fits.)
pub const ROUTER_BYTES: usize = 64 << 20;

/// The connections' side of their queues to the router.
///
/// Frames go on a bounded queue that readers wait on (back-pressure). No cycle can block:
/// the router never waits on a connection (it queues frames to send with `try_send` and
/// closes a connection whose send queue is full), so a reader waiting on the router always
/// ends. Closures go on a queue of their own, unbounded but holding at most two events per
/// connection, so a writer never waits and the end of a connection is never lost behind
/// frames.
#[derive(Clone, Debug)]
pub struct ToRouter {
    frames: mpsc::Sender<ConnEvent>,
    budget: Arc<Semaphore>,
    /// The budget's size in bytes.
    budget_bytes: usize,
    closed: mpsc::UnboundedSender<ConnEvent>,
}

/// The router's side of [`ToRouter`].
#[derive(Debug)]
pub struct FromConns {
    frames: mpsc::Receiver<ConnEvent>,
    closed: mpsc::UnboundedReceiver<ConnEvent>,
}

impl FromConns {
    /// The next event, closures first. Cancel-safe.
    pub async fn recv(&mut self) -> Option<ConnEvent> {
        tokio::select! {
            biased;
            Some(e) = self.closed.recv() => Some(e),
            Some(e) = self.frames.recv() => Some(e),
            else => None,
        }
    }

    /// Frames queued and not yet received.
    pub fn queued(&self) -> usize {
        self.frames.len()
    }
}

/// The queues from connections to the router, bounded by `frames` frames and `bytes` bytes.
pub fn to_router(frames: usize, bytes: usize) -> (ToRouter, FromConns) {
    let (ftx, frx) = mpsc::channel(frames);
    let (ctx, crx) = mpsc::unbounded_channel();
    let bytes = bytes.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let budget = Arc::new(Semaphore::new(bytes));
    let to = ToRouter { frames: ftx, budget, budget_bytes: bytes, closed: ctx };
    (to, FromConns { frames: frx, closed: crx })
}

impl ToRouter {
    fn closed(&self, id: u64, reason: CloseReason) {
        let _ = self.closed.send(ConnEvent::Closed { id, reason });
    }

    /// Queues a frame, waiting for room; false if cancelled or the router is gone.
    async fn frame(
        &self,
        id: u64,
        frame: proto::Frame,
        bytes: usize,
        cancel: &CancellationToken,
    ) -> bool {
        // A frame larger than the whole budget takes all of it.
        let want = u32::try_from(bytes.clamp(1, self.budget_bytes)).unwrap_or(u32::MAX);
        let held = tokio::select! {
            _ = cancel.cancelled() => return false,
            held = self.budget.clone().acquire_many_owned(want) => match held {
                Ok(h) => h,
                Err(_) => return false,
            },
        };
        tokio::select! {
            _ = cancel.cancelled() => false,
            sent = self.frames.send(ConnEvent::Frame { id, frame, bytes, held }) => sent.is_ok(),
        }
    }
}

/// The router's handle on a running connection.
#[derive(Debug)]
pub struct Handle {
    pub id: u64,
    /// Encoded frames to send.
    pub tx: mpsc::Sender<Vec<u8>>,
    pub cancel: CancellationToken,
}

/// Frames queued for a connection beyond this are a sign of a dead or hopelessly slow peer.
pub const SEND_QUEUE: usize = 4096;

/// Starts the reader and writer tasks of an established connection.
pub fn start(est: Established, id: u64, events: ToRouter) -> Handle {
    let (tx, rx) = mpsc::channel(SEND_QUEUE);
    let cancel = CancellationToken::new();
    let Established { reader, writer, sealer, opener, leftover, .. } = est;
    tokio::spawn(write_loop(writer, sealer, rx, cancel.clone(), id, events.clone()));
    tokio::spawn(read_loop(reader, opener, leftover, cancel.clone(), id, events));
    Handle { id, tx, cancel }
}

async fn write_loop(
    mut writer: OwnedWriteHalf,
    mut sealer: Option<secure::Sealer>,
    mut rx: mpsc::Receiver<Vec<u8>>,
    cancel: CancellationToken,
    id: u64,
    events: ToRouter,
) {
    let heartbeat =
        frame_of(&proto::Frame { kind: Some(proto::frame::Kind::Heartbeat(proto::Heartbeat {})) });
    let mut tick = tokio::time::interval(HEARTBEAT);
    let mut plain = Vec::new();
    let mut wire = Vec::new();
    let reason = loop {
        plain.clear();
        tokio::select! {
            _ = cancel.cancelled() => break None,
            _ = tick.tick() => plain.extend_from_slice(&heartbeat),
            f = rx.recv() => match f {
                Some(f) => {
                    plain.extend_from_slice(&f);
                    // Coalesce whatever else is queued into one write.
                    while plain.len() < 256 * 1024 {
                        match rx.try_recv() {
                            Ok(more) => plain.extend_from_slice(&more),
                            Err(_) => break,
                        }
                    }
                }
                None => break None,
            },
        }
        wire.clear();
        let sealed = match sealer.as_mut() {
            Some(s) => s.seal(&plain, &mut wire).map_err(|e| e.to_string()),
            None => {
                wire.extend_from_slice(&plain);
                Ok(())
            }
        };
        if let Err(e) = sealed {
            break Some(CloseReason::Failed(format!("encryption failed: {e}")));
        }
        if let Err(e) = writer.write_all(&wire).await {
            break Some(CloseReason::Failed(format!("write failed: {e}")));
        }
    };
    cancel.cancel();
    if let Some(reason) = reason {
        events.closed(id, reason);
    }
}

/// Reads frames and hands them to the router, waiting when the router is behind (and not
/// reading meanwhile). A connection fails when it is silent for [`SILENCE`] or when a frame
/// takes longer than [`super::frame::frame_allowance`] of our waiting to arrive.
async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    mut opener: Option<secure::Opener>,
    leftover: Vec<u8>,
    cancel: CancellationToken,
    id: u64,
    events: ToRouter,
) {
    let mut frames = FrameReader::default();
    frames.push(&leftover);
    let mut buf = vec![0u8; 64 * 1024];
    let reason = 'outer: loop {
        loop {
            match frames.next_frame() {
                Ok(Some(f)) => match proto::Frame::decode(f.as_slice()) {
                    Ok(frame) => {
                        if !events.frame(id, frame, f.len() + 4, &cancel).await {
                            break 'outer CloseReason::Closed;
                        }
                    }
                    Err(e) => break 'outer CloseReason::Failed(format!("undecodable frame: {e}")),
                },
                Ok(None) => break,
                Err(e) => break 'outer CloseReason::Failed(e.to_string()),
            }
        }
        let limit = frames.time_left().map_or(SILENCE, |left| left.min(SILENCE));
        let began = tokio::time::Instant::now();
        let read = tokio::select! {
            _ = cancel.cancelled() => break CloseReason::Closed,
            r = tokio::time::timeout(limit, reader.read(&mut buf)) => r,
        };
        if let Err(e) = frames.wait(began.elapsed()) {
            break CloseReason::Failed(e.to_string());
        }
        let n = match read {
            Err(_) => break CloseReason::Silent(SILENCE.as_secs()),
            Ok(Err(e)) => break CloseReason::Failed(format!("read failed: {e}")),
            Ok(Ok(0)) => break CloseReason::ClosedByPeer,
            Ok(Ok(n)) => n,
        };
        match opener.as_mut() {
            Some(o) => {
                o.push(&buf[..n]);
                loop {
                    match o.next_plain() {
                        Ok(Some(p)) => frames.push(&p),
                        Ok(None) => break,
                        Err(e) => {
                            break 'outer CloseReason::Failed(format!("decryption failed: {e}"));
                        }
                    }
                }
            }
            None => frames.push(&buf[..n]),
        }
    };
    cancel.cancel();
    events.closed(id, reason);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::frame::frame_allowance;

    /// The peer's side of a connection whose reader runs on the other side.
    fn reader(to: ToRouter) -> (tokio::io::DuplexStream, CancellationToken) {
        let (peer, ours) = tokio::io::duplex(64 * 1024);
        let cancel = CancellationToken::new();
        tokio::spawn(read_loop(ours, None, Vec::new(), cancel.clone(), 1, to));
        (peer, cancel)
    }

    /// A router that takes nothing: once the queue is full the reader stops reading and the
    /// peer's writes stall, instead of a million frames queueing up in memory. (The clock is
    /// paused: it jumps only when every task waits, so the 30 s mean "no progress at all".)
    #[tokio::test(start_paused = true)]
    async fn a_stalled_router_stops_the_reader() {
        let (to, from) = to_router(ROUTER_QUEUE, ROUTER_BYTES);
        let (mut peer, cancel) = reader(to);
        let wire = vec![0u8; 4 * 1_000_000]; // a million empty frames
        let mut taken = 0;
        while taken < wire.len() {
            let end = (taken + 64 * 1024).min(wire.len());
            let write = peer.write(&wire[taken..end]);
            match tokio::time::timeout(Duration::from_secs(30), write).await {
                Ok(Ok(n)) => taken += n,
                Ok(Err(e)) => panic!("write failed: {e}"),
                Err(_) => break,
            }
        }
        assert!(taken < wire.len(), "all {taken} bytes were taken while the router took none");
        assert_eq!(from.queued(), ROUTER_QUEUE);
        // The queue, one read of the reader's and the pipe's buffer, nothing more.
        assert!(taken <= 4 * ROUTER_QUEUE + 3 * 64 * 1024, "{taken} bytes taken");
        cancel.cancel();
    }

    /// Large frames count by their bytes: with a 24 MiB budget and two 10 MiB frames held by
    /// the router, a third waits (although the queue has room for many frames) until one of
    /// them is handled.
    #[tokio::test(start_paused = true)]
    async fn queued_bytes_are_bounded() {
        let (to, mut from) = to_router(ROUTER_QUEUE, 24 << 20);
        let (mut peer, cancel) = reader(to);
        let body = frame_of(&proto::Frame {
            kind: Some(proto::frame::Kind::Gossip(proto::GossipMessage {
                channel: "x".into(),
                payload: vec![0; 10 << 20],
                ..Default::default()
            })),
        });
        let writer = tokio::spawn(async move {
            for _ in 0..3 {
                peer.write_all(&body).await.expect("write");
            }
            peer
        });
        let first = from.recv().await;
        let second = from.recv().await;
        assert!(matches!(first, Some(ConnEvent::Frame { .. })));
        assert!(matches!(second, Some(ConnEvent::Frame { .. })));
        let third = tokio::time::timeout(Duration::from_secs(30), from.recv()).await;
        assert!(third.is_err(), "a third frame was queued beyond the byte budget");
        drop(first);
        assert!(matches!(from.recv().await, Some(ConnEvent::Frame { .. })));
        let _peer = writer.await.expect("writer");
        cancel.cancel();
    }

    /// A frame drip-fed a byte every 5 s (often enough never to be silent) fails the
    /// connection once its allowance is over.
    #[tokio::test(start_paused = true)]
    async fn a_drip_fed_frame_closes_the_connection() {
        let (to, mut from) = to_router(ROUTER_QUEUE, ROUTER_BYTES);
        let (mut peer, _cancel) = reader(to);
        let started = tokio::time::Instant::now();
        peer.write_all(&[0, 0x10, 0, 0, 0x12]).await.expect("write"); // 1 MiB of gossip
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if peer.write_all(&[0]).await.is_err() {
                    return;
                }
            }
        });
        let ev = tokio::time::timeout(Duration::from_secs(300), from.recv()).await;
        let Ok(Some(ConnEvent::Closed { reason: CloseReason::Failed(why), .. })) = ev else {
            panic!("the connection is still open or ended otherwise: {ev:?}");
        };
        assert!(why.contains("did not arrive within"), "{why}");
        let allowed = frame_allowance(1 << 20);
        assert!(started.elapsed() <= allowed + Duration::from_secs(1), "{:?}", started.elapsed());
    }
}
