//! sleeve: the userspace overlay. Frames the bridge sends to the TAP port are carried in UDP
//! datagrams to the peer behind their destination MAC — directly, or relayed along data
//! routes through other peers — and written into that peer's TAP. It is used for peers that
//! fastdp cannot reach, for relaying through partial connectivity, and for encryption (AES-GCM
//! per datagram, keys exchanged over the mesh's encrypted channel, replay window per sender).
//!
//! Two dedicated threads move the packets (TAP to UDP, and UDP to TAP or onward); they read a
//! forwarding [`Table`] that the overlay replaces as a whole when anything changes. Each
//! TAP read takes a whole offloaded super-frame and each UDP call moves many datagrams.

pub mod codec;
pub mod io;

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use self::codec::{
    Cipher, HEADER, Header, Kind, MAX_HOPS, MAX_PAYLOAD, MIN_CHUNK, Reassembly, ReplayWindow, TAG,
    chunk_into, too_big,
};
use self::io::{Tap, Udp};
use super::{Mac, Traffic};
use crate::identity::PeerName;

/// A next hop: a directly connected peer's sleeve address, the link's keys and the size of
/// the datagrams that reach it.
#[derive(Debug)]
pub struct Hop {
    pub addr: SocketAddr,
    /// Encrypts what we send to this peer (our key, announced in our Hello).
    pub send: Option<Cipher>,
    /// Decrypts what this peer sends us (its key, from its Hello).
    pub recv: Option<Cipher>,
    pub seq: AtomicU64,
    /// Largest datagram (UDP payload: header, chunk and tag) to send on this hop; set by
    /// the overlay's path-MTU discovery.
    pub datagram: AtomicUsize,
    /// Data datagrams sent to and received from this peer (relayed ones included).
    pub traffic: HopTraffic,
}

/// Per-hop counters of data datagrams: the UDP payloads (sleeve header, chunk, tag) sent to
/// and received from one peer, for the per-peer overlay metrics.
#[derive(Debug, Default)]
pub struct HopTraffic {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
}

impl HopTraffic {
    pub fn report(&self) -> Traffic {
        Traffic {
            tx_packets: self.tx_packets.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
        }
    }

    fn sent(&self, datagrams: usize, bytes: usize) {
        self.tx_packets.fetch_add(datagrams as u64, Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Relaxed);
    }
}

/// The smallest datagram size a hop is given: room for the header, the tag and a chunk.
pub const MIN_DATAGRAM: usize = HEADER + TAG + MIN_CHUNK;

impl Hop {
    /// Payload bytes per datagram on this hop.
    pub fn chunk(&self) -> usize {
        let tag = if self.send.is_some() { TAG } else { 0 };
        self.datagram.load(Relaxed).max(MIN_DATAGRAM) - HEADER - tag
    }
}

/// Everything the packet threads need to forward, replaced as a whole by the overlay.
#[derive(Debug, Default)]
pub struct Table {
    pub me: Option<PeerName>,
    /// Remote MACs and the peer they are behind.
    pub macs: HashMap<Mac, PeerName>,
    /// Peers that receive broadcasts and unknown unicast through sleeve (those not on fastdp).
    pub flood: Vec<PeerName>,
    /// Destination peer -> next hop, for every peer sleeve can reach.
    pub next_hop: HashMap<PeerName, PeerName>,
    pub hops: HashMap<PeerName, Arc<Hop>>,
    /// Largest frame (Ethernet header included) pods may send; bigger IPv4 DF frames are
    /// answered with ICMP "fragmentation needed", bigger IPv6 ones with "packet too big".
    pub max_frame: usize,
    /// A password is set: a hop without both keys is never used, in either direction (the
    /// overlay installs no such hop; this guards the packet threads all the same).
    pub encrypted: bool,
}

impl Table {
    /// The hop to send to `peer` on, if it may be used.
    fn usable_hop(&self, peer: &PeerName) -> Option<&Arc<Hop>> {
        self.hops.get(peer).filter(|h| !self.encrypted || (h.send.is_some() && h.recv.is_some()))
    }
}

/// What the packet threads report to the overlay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SleeveEvent {
    /// A heartbeat from `from` arrived; `size` is its datagram's length (a path-MTU probe's
    /// size, acknowledged to the sender).
    Heartbeat { from: PeerName, id: u32, full: bool, size: usize },
}

/// Counters, for status and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub relayed: AtomicU64,
    pub dropped_no_route: AtomicU64,
    pub dropped_bad: AtomicU64,
    pub frag_needed: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub relayed: u64,
    pub dropped_no_route: u64,
    pub dropped_bad: u64,
    pub frag_needed: u64,
}

impl Stats {
    pub fn report(&self) -> StatsReport {
        StatsReport {
            tx_frames: self.tx_frames.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            rx_frames: self.rx_frames.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            relayed: self.relayed.load(Relaxed),
            dropped_no_route: self.dropped_no_route.load(Relaxed),
            dropped_bad: self.dropped_bad.load(Relaxed),
            frag_needed: self.frag_needed.load(Relaxed),
        }
    }
}

#[derive(Debug)]
struct Shared {
    table: ArcSwap<Table>,
    udp: Udp,
    tap: Tap,
    frames: AtomicU32,
    stats: Stats,
}

/// The running sleeve (cheap to clone).
#[derive(Clone, Debug)]
pub struct Sleeve {
    shared: Arc<Shared>,
}

/// Largest TAP read: a 64 KiB super-frame plus headers.
const TAP_BUF: usize = MAX_PAYLOAD;
/// UDP_SEGMENT sends at most this many bytes (and 64 datagrams) per call.
const GSO_MAX_BYTES: usize = 65_000;
const GSO_MAX_SEGMENTS: usize = 64;

impl Sleeve {
    /// Creates the TAP and the UDP socket and starts the packet threads.
    pub fn start(
        tap_name: &str,
        bind: SocketAddr,
        events: mpsc::Sender<SleeveEvent>,
    ) -> std::io::Result<Sleeve> {
        let tap = Tap::open(tap_name)?;
        let udp = Udp::bind(bind)?;
        let shared = Arc::new(Shared {
            table: ArcSwap::from_pointee(Table::default()),
            udp,
            tap,
            frames: AtomicU32::new(rand::random()),
            stats: Stats::default(),
        });
        let s = shared.clone();
        std::thread::Builder::new().name("sleeve-tx".into()).spawn(move || tx_loop(&s))?;
        let s = shared.clone();
        std::thread::Builder::new().name("sleeve-rx".into()).spawn(move || rx_loop(&s, &events))?;
        Ok(Sleeve { shared })
    }

    pub fn set_table(&self, t: Table) {
        self.shared.table.store(Arc::new(t));
    }

    pub fn stats(&self) -> StatsReport {
        self.shared.stats.report()
    }

    /// Sends a heartbeat to a directly connected peer: a small one (`probe` = None) or a
    /// path-MTU probe padded to a datagram of `probe` bytes (tag included).
    pub fn heartbeat(&self, peer: PeerName, id: u32, probe: Option<usize>) {
        let table = self.shared.table.load();
        let (Some(me), Some(hop)) = (table.me, table.usable_hop(&peer)) else { return };
        let tag = if hop.send.is_some() { TAG } else { 0 };
        let len = probe.map_or(HEADER + 8, |size| size.max(HEADER + 8 + tag) - tag);
        let mut d = vec![0u8; len + TAG];
        let h = Header {
            kind: if probe.is_some() { Kind::HeartbeatFull } else { Kind::Heartbeat },
            ttl: 1,
            hop: me,
            origin: me,
            dst: peer,
            seq: hop.seq.fetch_add(1, Relaxed),
            frame: id,
            chunk: 0,
            chunks: 1,
        };
        h.write(&mut d);
        let n = match &hop.send {
            Some(c) => match c.seal(&mut d, len, h.seq) {
                Some(n) => n,
                None => return,
            },
            None => len,
        };
        if let Err(e) = self.shared.udp.sock.send_to(&d[..n], hop.addr) {
            debug!(peer = %peer, error = %e, "sleeve heartbeat not sent");
        }
    }
}

fn is_multicast(frame: &[u8]) -> bool {
    frame.first().is_some_and(|b| b & 1 == 1)
}

fn dst_mac(frame: &[u8]) -> Option<Mac> {
    Some(Mac(frame.get(..6)?.try_into().ok()?))
}

/// TAP -> UDP.
fn tx_loop(s: &Shared) {
    let mut buf = vec![0u8; TAP_BUF];
    let mut out = Vec::with_capacity(2 * TAP_BUF);
    let mut scratch = Scratch::default();
    loop {
        let n = match s.tap.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "sleeve: reading the TAP failed; stopping");
                return;
            }
        };
        if n <= codec::VNET_HDR {
            continue;
        }
        let table = s.table.load();
        let Some(me) = table.me else { continue };
        let frame = &buf[codec::VNET_HDR..n];
        let gso = buf[1] != 0; // gso_type: a super-frame the kernel will segment at the receiver
        if !gso && frame.len() > table.max_frame && table.max_frame > 0 {
            if let Some(reply) = too_big(frame, (table.max_frame - 14) as u16) {
                s.stats.frag_needed.fetch_add(1, Relaxed);
                let _ = s.tap.write_plain(&reply);
            }
            continue;
        }
        let known =
            dst_mac(frame).filter(|_| !is_multicast(frame)).and_then(|m| table.macs.get(&m));
        let frame_id = s.frames.fetch_add(1, Relaxed);
        match (known, &table.flood[..]) {
            (Some(dst), _) | (None, [dst]) => {
                send_in_place(s, &table, me, *dst, frame_id, &mut buf[..n], &mut scratch)
            }
            (None, flood) => {
                for dst in flood {
                    send_copy(s, &table, me, *dst, frame_id, &buf[..n], &mut out);
                }
            }
        }
    }
}

/// The hop for sending to `dst` (counted as dropped if there is none).
fn next_hop<'t>(s: &Shared, table: &'t Table, dst: PeerName) -> Option<&'t Arc<Hop>> {
    let hop = table.next_hop.get(&dst).and_then(|h| table.usable_hop(h));
    if hop.is_none() {
        s.stats.dropped_no_route.fetch_add(1, Relaxed);
    }
    hop
}

fn counted(s: &Shared, r: std::io::Result<()>, dst: PeerName, bytes: usize) {
    match r {
        Ok(()) => {
            s.stats.tx_frames.fetch_add(1, Relaxed);
            s.stats.tx_bytes.fetch_add(bytes as u64, Relaxed);
        }
        Err(e) => {
            debug!(error = %e, dst = %dst, "sleeve send failed");
            s.stats.dropped_no_route.fetch_add(1, Relaxed);
        }
    }
}

/// Headers and tags of one frame's datagrams, kept between frames to avoid allocations.
#[derive(Default)]
struct Scratch {
    headers: Vec<[u8; HEADER]>,
    tags: Vec<[u8; TAG]>,
}

/// Sends one TAP frame (virtio header included) to a single destination without copying it:
/// chunks are sealed in place and the kernel gathers headers, chunks and tags.
fn send_in_place(
    s: &Shared,
    table: &Table,
    me: PeerName,
    dst: PeerName,
    frame_id: u32,
    payload: &mut [u8],
    scratch: &mut Scratch,
) {
    let Some(hop) = next_hop(s, table, dst) else { return };
    let chunk = hop.chunk();
    let n = codec::chunk_count(payload.len(), chunk);
    let first = hop.seq.fetch_add(n as u64, Relaxed);
    let mut header = Header {
        kind: Kind::Data,
        ttl: MAX_HOPS,
        hop: me,
        origin: me,
        dst,
        seq: first,
        frame: frame_id,
        chunk: 0,
        chunks: n as u16,
    };
    scratch.headers.resize(n, [0; HEADER]);
    scratch.tags.resize(n, [0; TAG]);
    for (i, part) in payload.chunks_mut(chunk).enumerate() {
        header.chunk = i as u16;
        header.seq = first + i as u64;
        header.write(&mut scratch.headers[i]);
        if let Some(c) = &hop.send {
            match c.seal_parts(&scratch.headers[i], part, header.seq) {
                Some(t) => scratch.tags[i] = t,
                None => {
                    s.stats.dropped_bad.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
    }
    let sealed = hop.send.is_some();
    let segment = HEADER + chunk + if sealed { TAG } else { 0 };
    let per_call = (GSO_MAX_BYTES / segment).clamp(1, GSO_MAX_SEGMENTS);
    // The gather list lives on the stack: nothing is allocated per frame.
    let mut iov = [IoSlice::new(&[]); 3 * GSO_MAX_SEGMENTS];
    let payload: &[u8] = payload;
    let mut first_chunk = 0;
    while first_chunk < n {
        let last = (first_chunk + per_call).min(n);
        let mut used = 0;
        for i in first_chunk..last {
            let part = &payload[i * chunk..((i + 1) * chunk).min(payload.len())];
            iov[used] = IoSlice::new(&scratch.headers[i]);
            iov[used + 1] = IoSlice::new(part);
            used += 2;
            if sealed {
                iov[used] = IoSlice::new(&scratch.tags[i]);
                used += 1;
            }
        }
        let r = s.udp.send_parts(&iov[..used], segment, hop.addr);
        if r.is_err() {
            return counted(s, r, dst, 0);
        }
        first_chunk = last;
    }
    hop.traffic.sent(n, n * (HEADER + if sealed { TAG } else { 0 }) + payload.len());
    counted(s, Ok(()), dst, payload.len());
}

/// Chunks, seals and sends one TAP frame to one of several destinations (the frame itself is
/// left untouched for the others).
fn send_copy(
    s: &Shared,
    table: &Table,
    me: PeerName,
    dst: PeerName,
    frame_id: u32,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    let Some(hop) = next_hop(s, table, dst) else { return };
    let chunk = hop.chunk();
    let chunks = codec::chunk_count(payload.len(), chunk) as u64;
    let first = hop.seq.fetch_add(chunks, Relaxed);
    let header = Header {
        kind: Kind::Data,
        ttl: MAX_HOPS,
        hop: me,
        origin: me,
        dst,
        seq: first,
        frame: frame_id,
        chunk: 0,
        chunks: 0,
    };
    let sealed = hop.send.is_some();
    let ranges = chunk_into(out, payload, chunk, header, first, sealed);
    if let Some(c) = &hop.send {
        for (i, r) in ranges.iter().enumerate() {
            let slice = &mut out[r.start..r.end + TAG];
            if c.seal(slice, r.len(), first + i as u64).is_none() {
                s.stats.dropped_bad.fetch_add(1, Relaxed);
                return;
            }
        }
    }
    let segment = HEADER + chunk + if sealed { TAG } else { 0 };
    let per_call = (GSO_MAX_BYTES / segment).clamp(1, GSO_MAX_SEGMENTS) * segment;
    let mut r = Ok(());
    for batch in out.chunks(per_call) {
        r = s.udp.send_segments(batch, segment, hop.addr);
        if r.is_err() {
            break;
        }
    }
    if r.is_ok() {
        hop.traffic.sent(ranges.len(), out.len());
    }
    counted(s, r, dst, payload.len());
}

/// UDP -> TAP, or onward to the next hop.
fn rx_loop(s: &Shared, events: &mpsc::Sender<SleeveEvent>) {
    let mut buf = vec![0u8; 65_536 + 4096];
    let mut windows: HashMap<PeerName, (usize, ReplayWindow)> = HashMap::new();
    let mut reassembly = Reassembly::new(4096, Duration::from_millis(500));
    let mut relay_buf = vec![0u8; 65_536];
    loop {
        let (n, segment, from) = match s.udp.recv(&mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(error = %e, "sleeve: receiving failed; stopping");
                return;
            }
        };
        let table = s.table.load();
        let Some(me) = table.me else { continue };
        let now = Instant::now();
        let step = if segment == 0 { n } else { segment };
        let mut at = 0;
        while at < n {
            let end = (at + step).min(n);
            let mut ctx = RxContext {
                windows: &mut windows,
                reassembly: &mut reassembly,
                relay_buf: &mut relay_buf,
                now,
            };
            handle_datagram(s, &table, me, from.ip(), &mut buf[at..end], &mut ctx, events);
            at = end;
        }
    }
}

/// The receive thread's own state.
struct RxContext<'a> {
    windows: &'a mut HashMap<PeerName, (usize, ReplayWindow)>,
    reassembly: &'a mut Reassembly,
    relay_buf: &'a mut [u8],
    now: Instant,
}

/// Checks a received datagram and decrypts it in place: its hop sender must be a peer we
/// have a link with, it must come from that peer's address, and, on an encrypted hop (every
/// hop with a password), be authentic and not replayed. Returns the header and the payload
/// length; `None` for a datagram to drop as bad.
fn open_datagram<'t>(
    table: &'t Table,
    from: IpAddr,
    d: &mut [u8],
    windows: &mut HashMap<PeerName, (usize, ReplayWindow)>,
) -> Option<(Header, usize, &'t Arc<Hop>)> {
    let h = Header::parse(d)?;
    let hop = table.hops.get(&h.hop)?;
    // Only the peer's own address may speak for it (a dual-stack socket reports IPv4
    // senders as IPv4-mapped IPv6 addresses).
    if from.to_canonical() != hop.addr.ip().to_canonical() {
        return None;
    }
    let Some(c) = &hop.recv else {
        return (!table.encrypted).then_some((h, d.len() - HEADER, hop));
    };
    let n = c.open(d, h.seq)?;
    // One window per key: a new connection (new key) starts a new window.
    let key_id = Arc::as_ptr(hop) as usize;
    let w = windows.entry(h.hop).or_insert_with(|| (key_id, ReplayWindow::default()));
    if w.0 != key_id {
        *w = (key_id, ReplayWindow::default());
    }
    w.1.accept(h.seq).then_some((h, n, hop))
}

fn handle_datagram(
    s: &Shared,
    table: &Table,
    me: PeerName,
    from: IpAddr,
    d: &mut [u8],
    ctx: &mut RxContext<'_>,
    events: &mpsc::Sender<SleeveEvent>,
) {
    let size = d.len();
    let Some((h, payload_len, hop)) = open_datagram(table, from, d, ctx.windows) else {
        s.stats.dropped_bad.fetch_add(1, Relaxed);
        return;
    };
    if h.kind == Kind::Data {
        hop.traffic.rx_packets.fetch_add(1, Relaxed);
        hop.traffic.rx_bytes.fetch_add(size as u64, Relaxed);
    }
    let payload = &d[HEADER..HEADER + payload_len];
    match h.kind {
        Kind::Heartbeat | Kind::HeartbeatFull => {
            if h.dst == me {
                // Heartbeats repeat: when the overlay is behind, dropping one is harmless,
                // and a flood of them cannot queue up in memory.
                let _ = events.try_send(SleeveEvent::Heartbeat {
                    from: h.hop,
                    id: h.frame,
                    full: h.kind == Kind::HeartbeatFull,
                    size,
                });
            }
        }
        // A frame in one datagram goes straight to the TAP device, without a copy.
        Kind::Data if h.dst == me && h.chunks == 1 => deliver(s, payload),
        Kind::Data if h.dst == me => match ctx.reassembly.add(&h, payload, ctx.now) {
            Some(whole) => deliver(s, &whole),
            None if !codec::legal_chunk(h.chunk, h.chunks, payload.len()) => {
                s.stats.dropped_bad.fetch_add(1, Relaxed);
            }
            None => {}
        },
        Kind::Data => relay(s, table, me, &h, payload, ctx.relay_buf),
    }
}

/// Writes a received frame (virtio header included) to the TAP device.
fn deliver(s: &Shared, frame: &[u8]) {
    s.stats.rx_frames.fetch_add(1, Relaxed);
    s.stats.rx_bytes.fetch_add(frame.len() as u64, Relaxed);
    if let Err(e) = s.tap.write(frame) {
        debug!(error = %e, "sleeve: TAP write failed");
    }
}

/// Passes a datagram on towards its destination, re-sealed for the next hop.
fn relay(s: &Shared, table: &Table, me: PeerName, h: &Header, payload: &[u8], out: &mut [u8]) {
    if h.ttl <= 1 {
        s.stats.dropped_no_route.fetch_add(1, Relaxed);
        return;
    }
    let Some(next) = table.next_hop.get(&h.dst).and_then(|n| table.usable_hop(n)) else {
        s.stats.dropped_no_route.fetch_add(1, Relaxed);
        return;
    };
    let len = HEADER + payload.len();
    if out.len() < len + TAG {
        return;
    }
    let seq = next.seq.fetch_add(1, Relaxed);
    Header { ttl: h.ttl - 1, hop: me, seq, ..*h }.write(&mut out[..HEADER]);
    out[HEADER..len].copy_from_slice(payload);
    let n = match &next.send {
        Some(c) => match c.seal(out, len, seq) {
            Some(n) => n,
            None => return,
        },
        None => len,
    };
    if s.udp.sock.send_to(&out[..n], next.addr).is_ok() {
        s.stats.relayed.fetch_add(1, Relaxed);
        next.traffic.sent(1, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u64) -> PeerName {
        PeerName::new(n).expect("peer name")
    }

    fn hop(addr: &str, key: Option<[u8; 32]>) -> Arc<Hop> {
        Arc::new(Hop {
            addr: addr.parse().expect("address"),
            send: key.and_then(|k| Cipher::new(&k)),
            recv: key.and_then(|k| Cipher::new(&k)),
            seq: AtomicU64::new(1),
            datagram: AtomicUsize::new(1400),
            traffic: HopTraffic::default(),
        })
    }

    fn table(hop: Arc<Hop>, encrypted: bool) -> Table {
        let hops = [(peer(2), hop)].into();
        Table { me: Some(peer(1)), hops, encrypted, ..Table::default() }
    }

    /// A data datagram from peer 2 to peer 1, sealed with `key` if given.
    fn datagram(seq: u64, key: Option<[u8; 32]>) -> Vec<u8> {
        let h = Header {
            kind: Kind::Data,
            ttl: MAX_HOPS,
            hop: peer(2),
            origin: peer(2),
            dst: peer(1),
            seq,
            frame: 1,
            chunk: 0,
            chunks: 1,
        };
        let mut d = vec![0u8; HEADER + 20 + TAG];
        h.write(&mut d);
        let n = match key.and_then(|k| Cipher::new(&k)) {
            Some(c) => c.seal(&mut d, HEADER + 20, seq).expect("sealed"),
            None => HEADER + 20,
        };
        d.truncate(n);
        d
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    /// Issue 16, item 2: a datagram is accepted only from the address of the hop it claims.
    #[test]
    fn datagrams_are_accepted_only_from_the_claimed_hops_address() {
        let t = table(hop("10.0.0.2:6783", None), false);
        let mut w = HashMap::new();
        let forged = open_datagram(&t, ip("10.0.0.99"), &mut datagram(5, None), &mut w);
        assert!(forged.is_none(), "another address claiming peer 2");
        let (h, n, _) = open_datagram(&t, ip("10.0.0.2"), &mut datagram(6, None), &mut w)
            .expect("from peer 2's address");
        assert_eq!((h.hop, n), (peer(2), 20));
        let mapped = open_datagram(&t, ip("::ffff:10.0.0.2"), &mut datagram(7, None), &mut w);
        assert!(mapped.is_some(), "an IPv4-mapped sender is that IPv4 address");
        // The address check comes before (and besides) authentication.
        let key = Some([3u8; 32]);
        let t = table(hop("10.0.0.2:6783", key), true);
        let forged = open_datagram(&t, ip("10.0.0.99"), &mut datagram(8, key), &mut w);
        assert!(forged.is_none(), "a sealed datagram replayed from elsewhere");
        assert!(open_datagram(&t, ip("10.0.0.2"), &mut datagram(9, key), &mut w).is_some());
    }

    /// Issue 16, item 13: with a password, a hop without keys neither accepts nor sends.
    #[test]
    fn with_a_password_a_hop_without_keys_is_never_used() {
        let t = table(hop("10.0.0.2:6783", None), true);
        let mut w = HashMap::new();
        let plain = open_datagram(&t, ip("10.0.0.2"), &mut datagram(1, None), &mut w);
        assert!(plain.is_none(), "plaintext accepted with a password");
        assert!(t.usable_hop(&peer(2)).is_none(), "plaintext would be sent");
        let open = table(hop("10.0.0.2:6783", None), false);
        assert!(open.usable_hop(&peer(2)).is_some(), "without a password the hop is used");
    }
}
