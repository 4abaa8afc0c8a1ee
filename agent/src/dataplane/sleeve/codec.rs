//! The sleeve packet format (specified in docs/sleeve.md) and the pure pieces of the sleeve
//! path: splitting a frame read from the TAP (with its virtio-net header, possibly a 64 KiB
//! segmentation-offload "super-frame") into datagram-sized chunks, putting them back together,
//! authenticated encryption per datagram, and a replay window.
//!
//! ```text
//!  0      1      2            8            14           20          28        32      34      36
//!  +------+------+------------+------------+------------+-----------+---------+-------+-------+----------------+-----+
//!  |magic |ttl|ty| hop sender | origin     | destination| sequence  | frame id| chunk | chunks| payload        | tag |
//!  | 0x57 |      | (6 bytes)  | (6 bytes)  | (6 bytes)  | (u64 BE)  | (u32 BE)| (u16) | (u16) | (vnet hdr+frame)| 16  |
//!  +------+------+------------+------------+------------+-----------+---------+-------+-------+----------------+-----+
//! ```
//! Byte 1 holds the kind (low 2 bits) and the hops left (high 6 bits). The tag is present when
//! the hop is encrypted; the header is its associated data.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::identity::PeerName;

pub const MAGIC: u8 = 0x57;
pub const HEADER: usize = 36;
pub const TAG: usize = 16;
/// Size of the virtio-net header in front of every TAP frame.
pub const VNET_HDR: usize = 10;

/// What a datagram carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A chunk of a frame.
    Data = 1,
    /// A small heartbeat.
    Heartbeat = 2,
    /// A heartbeat padded to the largest datagram the sender uses.
    HeartbeatFull = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Data),
            2 => Some(Kind::Heartbeat),
            3 => Some(Kind::HeartbeatFull),
            _ => None,
        }
    }
}

/// Hops a datagram may take before it is dropped (a guard against routing loops while the
/// topology changes).
pub const MAX_HOPS: u8 = 16;

/// A parsed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub ttl: u8,
    pub hop: PeerName,
    pub origin: PeerName,
    pub dst: PeerName,
    pub seq: u64,
    pub frame: u32,
    pub chunk: u16,
    pub chunks: u16,
}

fn name_bytes(p: PeerName) -> [u8; 6] {
    let b = p.get().to_be_bytes();
    [b[2], b[3], b[4], b[5], b[6], b[7]]
}

fn name_from(b: &[u8]) -> Option<PeerName> {
    let mut v = [0u8; 8];
    v[2..].copy_from_slice(b.get(..6)?);
    PeerName::new(u64::from_be_bytes(v))
}

impl Header {
    pub fn write(&self, out: &mut [u8]) {
        out[0] = MAGIC;
        out[1] = (self.ttl.min(63) << 2) | self.kind as u8;
        out[2..8].copy_from_slice(&name_bytes(self.hop));
        out[8..14].copy_from_slice(&name_bytes(self.origin));
        out[14..20].copy_from_slice(&name_bytes(self.dst));
        out[20..28].copy_from_slice(&self.seq.to_be_bytes());
        out[28..32].copy_from_slice(&self.frame.to_be_bytes());
        out[32..34].copy_from_slice(&self.chunk.to_be_bytes());
        out[34..36].copy_from_slice(&self.chunks.to_be_bytes());
    }

    /// Parses a datagram's header; `None` for anything that is not a well-formed sleeve packet.
    pub fn parse(d: &[u8]) -> Option<Header> {
        if d.len() < HEADER || d[0] != MAGIC {
            return None;
        }
        let h = Header {
            kind: Kind::from_u8(d[1] & 3)?,
            ttl: d[1] >> 2,
            hop: name_from(&d[2..8])?,
            origin: name_from(&d[8..14])?,
            dst: name_from(&d[14..20])?,
            seq: u64::from_be_bytes(d[20..28].try_into().ok()?),
            frame: u32::from_be_bytes(d[28..32].try_into().ok()?),
            chunk: u16::from_be_bytes(d[32..34].try_into().ok()?),
            chunks: u16::from_be_bytes(d[34..36].try_into().ok()?),
        };
        (h.chunks > 0 && h.chunk < h.chunks).then_some(h)
    }
}

/// One direction's AEAD key (AES-256-GCM). The nonce is the datagram's sequence number, which
/// the sender never reuses under a key.
pub struct Cipher {
    key: LessSafeKey,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher")
    }
}

fn nonce(seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

impl Cipher {
    pub fn new(key: &[u8]) -> Option<Cipher> {
        Some(Cipher { key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).ok()?) })
    }

    /// Encrypts `datagram[HEADER..len]` in place and appends the tag at `len`; returns the new
    /// length. The buffer must have `TAG` bytes of room after `len`.
    pub fn seal(&self, datagram: &mut [u8], len: usize, seq: u64) -> Option<usize> {
        let (hdr, rest) = datagram.split_at_mut(HEADER);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(seq), Aad::from(&hdr[..]), &mut rest[..len - HEADER])
            .ok()?;
        datagram.get_mut(len..len + TAG)?.copy_from_slice(tag.as_ref());
        Some(len + TAG)
    }

    /// Encrypts `payload` in place, authenticating `header`; returns the tag.
    pub fn seal_parts(&self, header: &[u8], payload: &mut [u8], seq: u64) -> Option<[u8; TAG]> {
        let tag =
            self.key.seal_in_place_separate_tag(nonce(seq), Aad::from(header), payload).ok()?;
        let mut t = [0u8; TAG];
        t.copy_from_slice(tag.as_ref());
        Some(t)
    }

    /// Decrypts in place; returns the payload length (after the header) if authentic.
    pub fn open(&self, datagram: &mut [u8], seq: u64) -> Option<usize> {
        if datagram.len() < HEADER + TAG {
            return None;
        }
        let (hdr, rest) = datagram.split_at_mut(HEADER);
        let plain = self.key.open_in_place(nonce(seq), Aad::from(&hdr[..]), rest).ok()?;
        Some(plain.len())
    }
}

/// Which sequence numbers of one sender have been seen: a sliding window, so replays and very
/// old datagrams are refused while moderate reordering is tolerated.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    top: u64,
    bits: Vec<u64>,
}

const WINDOW_BITS: u64 = 8192;

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow { top: 0, bits: vec![0; (WINDOW_BITS / 64) as usize] }
    }
}

impl ReplayWindow {
    /// Records `seq`; false if it was already seen or is too old.
    pub fn accept(&mut self, seq: u64) -> bool {
        let slot = |s: u64| ((s % WINDOW_BITS) / 64) as usize;
        let bit = |s: u64| 1u64 << (s % 64);
        if seq > self.top {
            let advance = seq - self.top;
            if advance >= WINDOW_BITS {
                self.bits.iter_mut().for_each(|w| *w = 0);
            } else {
                for s in self.top + 1..=seq {
                    self.bits[slot(s)] &= !bit(s);
                }
            }
            self.top = seq;
        } else if self.top - seq >= WINDOW_BITS {
            return false;
        }
        let (w, b) = (slot(seq), bit(seq));
        if self.bits[w] & b != 0 {
            return false;
        }
        self.bits[w] |= b;
        true
    }
}

/// How many chunks a frame of `len` bytes (virtio header included) needs.
pub fn chunk_count(len: usize, chunk: usize) -> usize {
    len.div_ceil(chunk).max(1)
}

/// Writes the datagrams for `payload` back to back into `out` (each `HEADER + chunk` bytes,
/// the last one shorter, each followed by `TAG` spare bytes when `tag_room`); returns the
/// datagram boundaries. Headers get consecutive sequence numbers from `first_seq`.
pub fn chunk_into(
    out: &mut Vec<u8>,
    payload: &[u8],
    chunk: usize,
    mut header: Header,
    first_seq: u64,
    tag_room: bool,
) -> Vec<std::ops::Range<usize>> {
    let n = chunk_count(payload.len(), chunk);
    header.chunks = n as u16;
    let extra = if tag_room { TAG } else { 0 };
    out.clear();
    out.reserve(payload.len() + n * (HEADER + extra));
    let mut ranges = Vec::with_capacity(n);
    for (i, part) in payload.chunks(chunk).enumerate() {
        let start = out.len();
        header.chunk = i as u16;
        header.seq = first_seq + i as u64;
        out.resize(start + HEADER, 0);
        header.write(&mut out[start..start + HEADER]);
        out.extend_from_slice(part);
        ranges.push(start..out.len());
        out.resize(out.len() + extra, 0);
    }
    if payload.is_empty() {
        let start = out.len();
        header.chunk = 0;
        header.seq = first_seq;
        out.resize(start + HEADER + extra, 0);
        header.write(&mut out[start..start + HEADER]);
        ranges.push(start..start + HEADER);
    }
    ranges
}

/// The largest payload (virtio-net header and frame) a sender puts into one frame's chunks: a
/// TAP read of a 64 KiB segmentation-offload super-frame with its headers.
pub const MAX_PAYLOAD: usize = 65_535 + VNET_HDR + 64;
/// The smallest chunk a sender cuts (all but a frame's last chunk have at least this size): a
/// hop's datagrams are never smaller than the header, the tag and this.
pub const MIN_CHUNK: usize = 256;
/// The most chunks a legal frame has.
pub const MAX_CHUNKS: u16 = MAX_PAYLOAD.div_ceil(MIN_CHUNK) as u16;
/// What all partial frames together may hold (buffers and early chunks): 512 super-frames.
pub const MAX_BUFFERED: usize = 32 << 20;

/// Frames being put back together, bounded in count, bytes and age. Chunks usually arrive in
/// order: those are appended once to the frame's buffer; only early ones wait aside. A frame
/// can only grow to [`MAX_PAYLOAD`], and a chunk that no legal frame has (too many chunks,
/// chunks of unequal or too small size) is refused before anything is allocated for it.
#[derive(Debug)]
pub struct Reassembly {
    partial: HashMap<(PeerName, u32), Partial>,
    /// Frames in the order they were started, for expiry and eviction (entries of frames
    /// that completed or restarted meanwhile are skipped when they come up).
    order: std::collections::VecDeque<(Instant, (PeerName, u32))>,
    /// Bytes held by all partial frames (buffer capacity and early chunks).
    bytes: usize,
    max: usize,
    ttl: Duration,
}

#[derive(Debug)]
struct Partial {
    chunks: u16,
    next: u16,
    /// The size of every chunk but the last, once one such chunk was seen.
    chunk_len: Option<usize>,
    buf: Vec<u8>,
    early: std::collections::BTreeMap<u16, Vec<u8>>,
    /// Payload bytes received (buffer and early chunks).
    len: usize,
    born: Instant,
}

impl Partial {
    fn new(chunks: u16, born: Instant) -> Partial {
        let (chunk_len, buf, early, len) = (None, Vec::new(), Default::default(), 0);
        Partial { chunks, next: 0, chunk_len, buf, early, len, born }
    }

    fn cost(&self) -> usize {
        self.buf.capacity() + self.early.values().map(Vec::len).sum::<usize>()
    }

    /// Whether a chunk of `len` bytes at `index` fits this frame's shape.
    fn fits(&mut self, index: u16, len: usize) -> bool {
        let last = index + 1 == self.chunks;
        match self.chunk_len {
            Some(c) if (last && len > c) || (!last && len != c) => return false,
            Some(_) => {}
            None if last => {}
            None => {
                // The last chunk may have come first: it must not be longer than the others.
                let last = self.early.get(&(self.chunks - 1));
                if last.is_some_and(|d| d.len() > len) {
                    return false;
                }
                self.chunk_len = Some(len);
            }
        }
        self.len + len <= MAX_PAYLOAD
    }
}

/// Whether a chunk of `len` bytes, `index` of `chunks`, can belong to a legal frame.
pub fn legal_chunk(index: u16, chunks: u16, len: usize) -> bool {
    let full = usize::from(chunks - 1);
    if chunks > MAX_CHUNKS || len > MAX_PAYLOAD {
        return false;
    }
    if index + 1 == chunks {
        full * MIN_CHUNK + len <= MAX_PAYLOAD
    } else {
        len >= MIN_CHUNK && full * len < MAX_PAYLOAD
    }
}

impl Reassembly {
    pub fn new(max: usize, ttl: Duration) -> Reassembly {
        let order = std::collections::VecDeque::new();
        Reassembly { partial: HashMap::new(), order, bytes: 0, max, ttl }
    }

    fn remove(&mut self, key: &(PeerName, u32)) -> Option<Partial> {
        let p = self.partial.remove(key)?;
        self.bytes -= p.cost();
        Some(p)
    }

    /// Drops frames older than the age limit, then the oldest while more than `count` frames
    /// or `bytes` bytes would be held.
    fn make_room(&mut self, now: Instant, count: usize, bytes: usize) {
        while let Some(&(born, key)) = self.order.front() {
            let live = self.partial.get(&key).is_some_and(|p| p.born == born);
            let expired = now.duration_since(born) >= self.ttl;
            let over = self.partial.len() > count || self.bytes > bytes;
            if live && !expired && !over {
                break;
            }
            self.order.pop_front();
            if live {
                self.remove(&key);
            }
        }
        // Completed frames leave stale entries behind; keep the queue in proportion.
        if self.order.len() > 2 * self.max.max(self.partial.len()) {
            let partial = &self.partial;
            self.order.retain(|(born, key)| partial.get(key).is_some_and(|p| p.born == *born));
        }
    }

    /// Adds a chunk; returns the whole payload once the last missing chunk arrives. A chunk
    /// that cannot belong to a legal frame is dropped, and so is the frame it claims to be in.
    pub fn add(&mut self, h: &Header, data: &[u8], now: Instant) -> Option<Vec<u8>> {
        if h.chunks == 1 {
            return (data.len() <= MAX_PAYLOAD).then(|| data.to_vec());
        }
        let key = (h.origin, h.frame);
        if !legal_chunk(h.chunk, h.chunks, data.len()) {
            self.remove(&key);
            return None;
        }
        if self.partial.get(&key).is_some_and(|p| p.chunks != h.chunks) {
            // A frame id reused with another shape: start over.
            self.remove(&key);
        }
        let fresh = !self.partial.contains_key(&key);
        // Room for what this chunk may take: for a new frame, the buffer for all its chunks.
        let reserve =
            if fresh { (usize::from(h.chunks) * data.len()).min(MAX_PAYLOAD) } else { data.len() };
        let count = if fresh { self.max.saturating_sub(1) } else { self.max };
        self.make_room(now, count, MAX_BUFFERED.saturating_sub(reserve));
        if fresh {
            let mut p = Partial::new(h.chunks, now);
            p.buf.reserve_exact(reserve);
            self.bytes += p.cost();
            self.partial.insert(key, p);
            self.order.push_back((now, key));
        }
        let p = self.partial.get_mut(&key)?;
        if !p.fits(h.chunk, data.len()) {
            self.remove(&key);
            return None;
        }
        let before = p.cost();
        if h.chunk == p.next {
            p.buf.extend_from_slice(data);
            p.len += data.len();
            p.next += 1;
            while let Some(d) = p.early.remove(&p.next) {
                p.buf.extend_from_slice(&d);
                p.next += 1;
            }
        } else if h.chunk > p.next && !p.early.contains_key(&h.chunk) {
            p.early.insert(h.chunk, data.to_vec());
            p.len += data.len();
        }
        let (done, after) = (p.next >= p.chunks, p.cost());
        self.bytes = self.bytes + after - before;
        if !done {
            return None;
        }
        self.remove(&key).map(|p| p.buf)
    }

    /// Frames being reassembled.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }

    /// Bytes the frames being reassembled hold.
    pub fn buffered(&self) -> usize {
        self.bytes
    }
}

/// An ICMP "fragmentation needed" reply to an oversize IPv4 frame with DF set, as an Ethernet
/// frame to write back towards its sender; `None` if the frame is not such a packet.
pub fn frag_needed(frame: &[u8], mtu: u16) -> Option<Vec<u8>> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let df = ip[6] & 0x40 != 0;
    let proto_icmp = ip[9] == 1;
    if !df
        || ihl < 20
        || ip.len() < ihl
        || (proto_icmp && ip.get(ihl).is_some_and(|t| *t != 8 && *t != 0))
    {
        return None; // never answer ICMP errors with ICMP errors
    }
    let quoted = &ip[..(ihl + 8).min(ip.len())];
    let mut icmp = vec![3u8, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = 20 + icmp.len();
    let mut hdr = [0u8; 20];
    hdr[0] = 0x45;
    hdr[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    hdr[8] = 64;
    hdr[9] = 1;
    hdr[12..16].copy_from_slice(&ip[16..20]); // from: the unreachable destination
    hdr[16..20].copy_from_slice(&ip[12..16]); // to: the sender
    let c = checksum(&hdr);
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
    let mut out = Vec::with_capacity(14 + total);
    out.extend_from_slice(&frame[6..12]); // back to the sender's MAC
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&[0x08, 0x00]);
    out.extend_from_slice(&hdr);
    out.extend_from_slice(&icmp);
    Some(out)
}

/// An ICMPv6 "packet too big" reply (type 2, code 0, RFC 4443) to an oversize IPv6 frame, as
/// an Ethernet frame to write back towards its sender; `None` if the frame is not IPv6 or
/// carries an ICMPv6 error (never answered with an error).
pub fn packet_too_big(frame: &[u8], mtu: u32) -> Option<Vec<u8>> {
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x86, 0xdd] || ip.len() < 40 || ip[0] >> 4 != 6 {
        return None;
    }
    if ip[6] == 58 && ip.get(40).is_none_or(|t| *t < 128) {
        return None;
    }
    // The reply, quote included, must not exceed the minimum IPv6 MTU.
    let quoted = &ip[..ip.len().min(1280 - 40 - 8)];
    let (src, dst) = (&ip[24..40], &ip[8..24]); // from the destination back to the sender
    let mut icmp = vec![2u8, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let mut pseudo = Vec::with_capacity(40 + icmp.len());
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let c = checksum(&pseudo);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut out = Vec::with_capacity(14 + 40 + icmp.len());
    out.extend_from_slice(&frame[6..12]); // back to the sender's MAC
    out.extend_from_slice(&frame[0..6]);
    out.extend_from_slice(&[0x86, 0xdd]);
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    out.extend_from_slice(&[58, 64]);
    out.extend_from_slice(src);
    out.extend_from_slice(dst);
    out.extend_from_slice(&icmp);
    Some(out)
}

/// The ICMP error telling the sender of an oversize frame the largest size that crosses:
/// "fragmentation needed" for IPv4 with DF, "packet too big" for IPv6.
pub fn too_big(frame: &[u8], mtu: u16) -> Option<Vec<u8>> {
    frag_needed(frame, mtu).or_else(|| packet_too_big(frame, u32::from(mtu)))
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(i: u64) -> PeerName {
        PeerName::new(i).unwrap()
    }

    fn hdr() -> Header {
        Header {
            kind: Kind::Data,
            ttl: MAX_HOPS,
            hop: p(1),
            origin: p(2),
            dst: p(3),
            seq: 0,
            frame: 9,
            chunk: 0,
            chunks: 1,
        }
    }

    #[test]
    fn headers_round_trip_and_reject_garbage() {
        let mut b = [0u8; HEADER];
        let h = Header { seq: 77, chunk: 2, chunks: 5, ..hdr() };
        h.write(&mut b);
        assert_eq!(Header::parse(&b), Some(h));
        b[0] = 0;
        assert_eq!(Header::parse(&b), None);
        let bad = Header { chunk: 5, chunks: 5, ..hdr() };
        bad.write(&mut b);
        assert_eq!(Header::parse(&b), None, "chunk index beyond the count");
    }

    #[test]
    fn encryption_authenticates_header_and_payload() {
        let c = Cipher::new(&[9u8; 32]).unwrap();
        let mut d = vec![0u8; HEADER + 5 + TAG];
        hdr().write(&mut d);
        d[HEADER..HEADER + 5].copy_from_slice(b"hello");
        let n = c.seal(&mut d, HEADER + 5, 1).unwrap();
        assert_eq!(n, HEADER + 5 + TAG);
        assert_ne!(&d[HEADER..HEADER + 5], b"hello");
        let mut ok = d.clone();
        assert_eq!(c.open(&mut ok, 1), Some(5));
        assert_eq!(&ok[HEADER..HEADER + 5], b"hello");
        let mut wrong_seq = d.clone();
        assert_eq!(c.open(&mut wrong_seq, 2), None);
        let mut tampered = d.clone();
        tampered[9] ^= 1; // the origin, in the header
        assert_eq!(c.open(&mut tampered, 1), None);
        let other = Cipher::new(&[8u8; 32]).unwrap();
        assert_eq!(other.open(&mut d, 1), None);
    }

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(1));
        assert!(!w.accept(1));
        assert!(w.accept(3));
        assert!(w.accept(2), "reordering is fine");
        assert!(w.accept(100_000));
        assert!(!w.accept(3), "too old");
        assert!(w.accept(100_000 - 8000));
        assert!(!w.accept(100_000 - 8000));
    }

    proptest! {
        /// Any frame survives chunking and reassembly in any chunk order.
        #[test]
        fn chunks_reassemble(payload in proptest::collection::vec(any::<u8>(), 0..20000), chunk in MIN_CHUNK..2000, seed in any::<u64>()) {
            let mut buf = Vec::new();
            let ranges = chunk_into(&mut buf, &payload, chunk, hdr(), 10, false);
            let mut order: Vec<usize> = (0..ranges.len()).collect();
            let mut s = seed;
            for i in (1..order.len()).rev() { s = s.wrapping_mul(6364136223846793005).wrapping_add(1); order.swap(i, (s >> 33) as usize % (i + 1)); }
            let mut r = Reassembly::new(16, Duration::from_secs(1));
            let now = Instant::now();
            let mut out = None;
            for i in order {
                let d = &buf[ranges[i].clone()];
                let h = Header::parse(d).unwrap();
                prop_assert_eq!(h.seq, 10 + i as u64);
                if let Some(whole) = r.add(&h, &d[HEADER..], now) { out = Some(whole); }
            }
            prop_assert_eq!(out, Some(payload));
            prop_assert_eq!(r.pending(), 0);
        }

        #[test]
        fn replay_never_accepts_twice(seqs in proptest::collection::vec(0u64..20000, 1..500)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::HashSet::new();
            for s in seqs {
                if w.accept(s) { prop_assert!(seen.insert(s), "accepted {} twice", s); }
            }
        }
    }

    #[test]
    fn reassembly_is_bounded_in_count() {
        let mut r = Reassembly::new(4, Duration::from_millis(100));
        let now = Instant::now();
        for f in 0..100u32 {
            let h = Header { frame: f, chunks: 2, ..hdr() };
            assert!(r.add(&h, &[0; MIN_CHUNK], now).is_none());
        }
        assert_eq!(r.pending(), 4);
    }

    /// Issue 16, item 5: no frame larger than the largest legal one is ever buffered for.
    #[test]
    fn reassembly_refuses_frames_no_sender_makes() {
        let mut r = Reassembly::new(4096, Duration::from_millis(500));
        let now = Instant::now();
        let chunk = vec![0u8; 1400];
        let h = Header { chunks: 65535, ..hdr() };
        assert!(r.add(&h, &chunk, now).is_none());
        assert_eq!((r.pending(), r.buffered()), (0, 0), "65535 chunks: nothing buffered");
        // 60 000-byte chunks: two of them already exceed a 64 KiB frame.
        let h = Header { chunks: 3, ..hdr() };
        assert!(r.add(&h, &vec![0u8; 60_000], now).is_none());
        assert_eq!(r.pending(), 0, "oversize chunks");
        // Tiny chunks would make many small allocations per frame.
        assert!(r.add(&Header { chunks: 200, ..hdr() }, &[0; 8], now).is_none());
        assert_eq!(r.pending(), 0, "chunks below the smallest a sender cuts");
        // A legal frame, then chunks of another size: the frame is dropped.
        assert!(r.add(&Header { chunks: 3, ..hdr() }, &chunk, now).is_none());
        assert_eq!(r.pending(), 1);
        assert!(r.add(&Header { chunk: 1, chunks: 3, ..hdr() }, &chunk[..1000], now).is_none());
        assert_eq!((r.pending(), r.buffered()), (0, 0), "chunks of unequal size");
        // The last chunk may be short, not longer than the others.
        assert!(r.add(&Header { chunk: 1, chunks: 2, ..hdr() }, &chunk, now).is_none());
        let whole = r.add(&Header { chunks: 2, ..hdr() }, &chunk[..700], now);
        assert!(whole.is_none(), "a first chunk shorter than the last");
        assert_eq!(r.pending(), 0);
    }

    /// Issue 16, item 5: partial frames expire by age on every insert, and all of them
    /// together never hold more than the byte budget.
    #[test]
    fn reassembly_expires_by_age_and_stays_within_its_byte_budget() {
        let mut r = Reassembly::new(4096, Duration::from_millis(500));
        let t0 = Instant::now();
        let chunk = vec![0u8; 1400];
        for f in 0..10u32 {
            assert!(r.add(&Header { frame: f, chunks: 40, ..hdr() }, &chunk, t0).is_none());
        }
        assert_eq!(r.pending(), 10);
        let later = t0 + Duration::from_millis(600);
        assert!(r.add(&Header { frame: 99, chunks: 2, ..hdr() }, &chunk, later).is_none());
        assert_eq!(r.pending(), 1, "only the new frame is left");
        assert!(r.buffered() <= 2 * chunk.len());
        // Many large frames, each missing its last chunk, stay within the budget.
        let mut peak = 0;
        for f in 0..4000u32 {
            let h = Header { frame: 1000 + f, chunks: 46, ..hdr() };
            assert!(r.add(&h, &chunk, later).is_none());
            peak = peak.max(r.buffered());
        }
        assert!(peak <= MAX_BUFFERED, "peak {peak} bytes");
        assert!(r.pending() < 4000 && r.pending() > 100, "{} pending", r.pending());
    }

    #[test]
    fn frag_needed_for_df_packets_only() {
        let mut frame = vec![0u8; 14 + 40];
        frame[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        frame[12..14].copy_from_slice(&[8, 0]);
        frame[14] = 0x45;
        frame[14 + 6] = 0x40; // DF
        frame[14 + 9] = 6; // TCP
        frame[14 + 12..14 + 16].copy_from_slice(&[10, 32, 0, 2]);
        frame[14 + 16..14 + 20].copy_from_slice(&[10, 32, 0, 3]);
        let reply = frag_needed(&frame, 1450).unwrap();
        assert_eq!(&reply[0..6], &frame[6..12]);
        assert_eq!(&reply[14 + 12..14 + 16], &[10, 32, 0, 3]);
        assert_eq!(&reply[14 + 20..14 + 22], &[3, 4], "type 3 code 4");
        assert_eq!(&reply[14 + 26..14 + 28], &1450u16.to_be_bytes());
        assert_eq!(checksum(&reply[14..34]), 0, "valid IP header checksum");
        frame[14 + 6] = 0;
        assert!(frag_needed(&frame, 1450).is_none(), "no DF, no reply");
    }

    #[test]
    fn packet_too_big_for_oversize_ipv6() {
        let mut frame = vec![0u8; 14 + 3000];
        frame[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        frame[12..14].copy_from_slice(&[0x86, 0xdd]);
        frame[14] = 0x60;
        frame[14 + 6] = 6; // TCP
        frame[14 + 8..14 + 24]
            .copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        frame[14 + 24..14 + 40]
            .copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        let reply = too_big(&frame, 1450).expect("a reply");
        assert_eq!(reply.len(), 14 + 1280, "capped at the minimum IPv6 MTU");
        assert_eq!(&reply[0..6], &frame[6..12]);
        let ip = &reply[14..];
        assert_eq!(ip[6], 58, "ICMPv6");
        assert_eq!(&ip[8..24], &frame[14 + 24..14 + 40], "from the unreachable destination");
        assert_eq!(&ip[24..40], &frame[14 + 8..14 + 24], "to the sender");
        assert_eq!(&ip[40..42], &[2, 0], "type 2 code 0");
        assert_eq!(&ip[44..48], &1450u32.to_be_bytes());
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[8..40]);
        pseudo.extend_from_slice(&((ip.len() - 40) as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(&ip[40..]);
        assert_eq!(checksum(&pseudo), 0, "valid ICMPv6 checksum");
        // An ICMPv6 error is not answered.
        frame[14 + 6] = 58;
        frame[14 + 40] = 1;
        assert!(too_big(&frame, 1450).is_none());
    }
}
