//! One mesh connection: dialling or accepting, the handshake (preamble, Noise when a password
//! is set, Hello), then a reader and a writer task that move frames between the socket and the
//! router. Heartbeats every [`HEARTBEAT`]; a connection silent for [`SILENCE`] is failed.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
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
    Frame { id: u64, frame: proto::Frame, bytes: usize },
    Closed { id: u64, reason: CloseReason },
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
pub fn start(est: Established, id: u64, events: mpsc::UnboundedSender<ConnEvent>) -> Handle {
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
    events: mpsc::UnboundedSender<ConnEvent>,
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
        let _ = events.send(ConnEvent::Closed { id, reason });
    }
}

async fn read_loop(
    mut reader: OwnedReadHalf,
    mut opener: Option<secure::Opener>,
    leftover: Vec<u8>,
    cancel: CancellationToken,
    id: u64,
    events: mpsc::UnboundedSender<ConnEvent>,
) {
    let mut frames = FrameReader::default();
    frames.push(&leftover);
    let mut buf = vec![0u8; 64 * 1024];
    let reason = 'outer: loop {
        loop {
            match frames.next_frame() {
                Ok(Some(f)) => match proto::Frame::decode(f.as_slice()) {
                    Ok(frame) => {
                        let _ = events.send(ConnEvent::Frame { id, frame, bytes: f.len() + 4 });
                    }
                    Err(e) => break 'outer CloseReason::Failed(format!("undecodable frame: {e}")),
                },
                Ok(None) => break,
                Err(e) => break 'outer CloseReason::Failed(e.to_string()),
            }
        }
        let n = tokio::select! {
            _ = cancel.cancelled() => break CloseReason::Closed,
            r = tokio::time::timeout(SILENCE, reader.read(&mut buf)) => match r {
                Err(_) => break CloseReason::Silent(SILENCE.as_secs()),
                Ok(Err(e)) => break CloseReason::Failed(format!("read failed: {e}")),
                Ok(Ok(0)) => break CloseReason::ClosedByPeer,
                Ok(Ok(n)) => n,
            },
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
    let _ = events.send(ConnEvent::Closed { id, reason });
}
