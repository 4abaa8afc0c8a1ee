//! The mesh wire format below the messages: the 7-byte preamble that negotiates the protocol
//! version and whether the connection is encrypted, and length-prefixed frames. Decoders are
//! bounded: a peer cannot make us buffer more than one maximum-size frame. Pure.

use std::time::Duration;

use prost::Message;

/// The first four bytes on every mesh connection.
pub const MAGIC: &[u8; 4] = b"weft";
/// Protocol versions this build speaks.
pub const PROTOCOL_MIN: u8 = 1;
pub const PROTOCOL_MAX: u8 = 1;
pub const PREAMBLE_LEN: usize = 7;
/// Largest frame accepted (and sent), of the kinds that carry gossip. Senders split their
/// state into messages of at most [`STATE_MESSAGE`] (docs/mesh-protocol.md §3.2).
pub const MAX_FRAME: usize = 16 << 20;
/// The payload size senders aim at when splitting a whole state into messages (each message
/// mergeable on its own): far below [`MAX_FRAME`] / 2, so framing and relaying always fit.
pub const STATE_MESSAGE: usize = 1 << 20;

/// Why a peer's bytes are unacceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("not a weft peer (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error(
        "no common protocol version: we speak {our_min}..={our_max}, the peer {their_min}..={their_max}"
    )]
    IncompatibleVersions { our_min: u8, our_max: u8, their_min: u8, their_max: u8 },
    #[error("the peer uses a password and we do not; set the same --password on every peer")]
    PeerEncrypts,
    #[error("we use a password and the peer does not; set the same --password on every peer")]
    PeerDoesNotEncrypt,
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("a frame of {len} bytes did not arrive within {secs} s")]
    FrameTooSlow { len: usize, secs: u64 },
    #[error("undecodable message: {0}")]
    Decode(String),
}

/// What each side announces before anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preamble {
    pub min: u8,
    pub max: u8,
    pub encrypted: bool,
}

impl Preamble {
    pub fn ours(encrypted: bool) -> Preamble {
        Preamble { min: PROTOCOL_MIN, max: PROTOCOL_MAX, encrypted }
    }

    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let m = MAGIC;
        [m[0], m[1], m[2], m[3], self.min, self.max, u8::from(self.encrypted)]
    }

    pub fn decode(b: &[u8; PREAMBLE_LEN]) -> Result<Preamble, ProtocolError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if &magic != MAGIC {
            return Err(ProtocolError::BadMagic(magic));
        }
        // Unknown flag bits are reserved for later versions and ignored.
        Ok(Preamble { min: b[4], max: b[5], encrypted: b[6] & 1 == 1 })
    }

    /// The version both sides speak (the highest common one), or why there is none.
    pub fn negotiate(&self, theirs: &Preamble) -> Result<u8, ProtocolError> {
        if theirs.encrypted != self.encrypted {
            return Err(if theirs.encrypted {
                ProtocolError::PeerEncrypts
            } else {
                ProtocolError::PeerDoesNotEncrypt
            });
        }
        let version = self.max.min(theirs.max);
        if version < self.min.max(theirs.min) || theirs.min > theirs.max {
            return Err(ProtocolError::IncompatibleVersions {
                our_min: self.min,
                our_max: self.max,
                their_min: theirs.min,
                their_max: theirs.max,
            });
        }
        Ok(version)
    }
}

/// Prefixes a frame with its length (4 bytes, big-endian).
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Encodes a message as a frame.
pub fn frame_of(msg: &impl Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 4);
    encode_frame(&body, &mut out);
    out
}

/// Largest frame of a kind other than gossip, broadcast and unicast (heartbeats, data-plane
/// control): only those carry state that can be large.
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;
/// The first byte of a frame body is the key of its kind (`Frame.kind`, a oneof written
/// alone): fields 2, 3 and 4 (gossip, broadcast, unicast) as length-delimited.
const LARGE_KINDS: [u8; 3] = [0x12, 0x1a, 0x22];
/// Every frame may take this long to arrive once it has begun, plus [`FRAME_MIN_RATE`]...
pub const FRAME_TIME: Duration = Duration::from_secs(10);
/// ...the time its declared length takes at this many bytes per second (16 MiB: 74 s).
pub const FRAME_MIN_RATE: usize = 256 * 1024;

/// How long a frame of `len` bytes may take to arrive (time spent waiting for the socket).
pub fn frame_allowance(len: usize) -> Duration {
    FRAME_TIME + Duration::from_millis((len as u64).saturating_mul(1000) / FRAME_MIN_RATE as u64)
}

/// Received bytes not yet consumed. Consuming advances an offset; the buffer is compacted
/// only once the consumed part is at least as long as the rest, so every byte is moved at most
/// once on average, whatever the message sizes (a `drain` per message would be quadratic in
/// the number of small messages per read).
#[derive(Debug, Default)]
pub struct StreamBuf {
    buf: Vec<u8>,
    /// Start of the bytes not yet consumed.
    start: usize,
    /// Bytes moved by compaction (a measure of the work done beyond copying messages out).
    moved: u64,
}

impl StreamBuf {
    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start >= self.buf.len() - self.start {
            self.moved += (self.buf.len() - self.start) as u64;
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The bytes not yet consumed.
    pub fn unread(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Marks the first `n` unread bytes consumed.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
    }

    /// Hands over the unread bytes.
    pub fn take_rest(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.start);
        self.buf.clear();
        self.start = 0;
        rest
    }

    /// Bytes moved within the buffer so far.
    pub fn moved(&self) -> u64 {
        self.moved
    }
}

/// Splits a byte stream into frames (buffered in a [`StreamBuf`]).
#[derive(Debug)]
pub struct FrameReader {
    buf: StreamBuf,
    /// Largest frame of a kind other than gossip, broadcast and unicast...
    small: usize,
    /// ...and of those.
    large: usize,
    /// Time spent waiting for the rest of the incomplete frame.
    waited: Duration,
}

impl Default for FrameReader {
    /// The reader of an established connection: [`MAX_FRAME`] for gossip, broadcast and
    /// unicast frames, [`MAX_CONTROL_FRAME`] for the others.
    fn default() -> Self {
        FrameReader { small: MAX_CONTROL_FRAME, ..FrameReader::new(MAX_FRAME) }
    }
}

impl FrameReader {
    /// A reader that accepts frames of any kind up to `max` bytes.
    pub fn new(max: usize) -> FrameReader {
        FrameReader { buf: StreamBuf::default(), small: max, large: max, waited: Duration::ZERO }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.push(bytes);
    }

    /// The next complete frame, if any. Fails as soon as a length prefix (and, above
    /// [`MAX_CONTROL_FRAME`], the kind) shows the frame exceeds its limit, before any more of
    /// it is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        let b = self.buf.unread();
        if b.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len > self.large {
            return Err(ProtocolError::FrameTooLarge { len, max: self.large });
        }
        if len > self.small {
            let max = match b.get(4) {
                None => return Ok(None),
                Some(kind) if LARGE_KINDS.contains(kind) => self.large,
                Some(_) => self.small,
            };
            if len > max {
                return Err(ProtocolError::FrameTooLarge { len, max });
            }
        }
        if b.len() < 4 + len {
            return Ok(None);
        }
        let frame = b[4..4 + len].to_vec();
        self.buf.consume(4 + len);
        self.waited = Duration::ZERO;
        Ok(Some(frame))
    }

    /// The declared length of the incomplete frame (0 while its length is incomplete), if
    /// any bytes of one are buffered.
    fn incomplete(&self) -> Option<usize> {
        let b = self.buf.unread();
        match b.len() {
            0 => None,
            1..4 => Some(0),
            _ => Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize),
        }
    }

    /// How much longer the incomplete frame may take, if there is one.
    pub fn time_left(&self) -> Option<Duration> {
        let len = self.incomplete()?;
        Some(frame_allowance(len).saturating_sub(self.waited))
    }

    /// Charges time spent waiting for the socket to the incomplete frame, if any; fails once
    /// the frame has taken [`frame_allowance`] (a peer drip-feeding a large frame
    /// would otherwise hold its buffer for as long as it keeps sending a byte now and then).
    pub fn wait(&mut self, d: Duration) -> Result<(), ProtocolError> {
        let Some(len) = self.incomplete() else { return Ok(()) };
        self.waited += d;
        let allowed = frame_allowance(len);
        // At the allowance exactly: the reader's timeout for this frame has fired.
        if self.waited >= allowed {
            return Err(ProtocolError::FrameTooSlow { len, secs: allowed.as_secs() });
        }
        Ok(())
    }

    /// Hands over the bytes buffered but not yet returned (switching readers).
    pub fn take_rest(&mut self) -> Vec<u8> {
        self.buf.take_rest()
    }

    /// Bytes buffered but not yet returned.
    pub fn pending(&self) -> usize {
        self.buf.unread().len()
    }

    /// Bytes moved within the buffer so far.
    pub fn moved(&self) -> u64 {
        self.buf.moved()
    }
}

/// Decodes a protobuf message.
pub fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, ProtocolError> {
    M::decode(bytes).map_err(|e| ProtocolError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn preambles() {
        let ours = Preamble::ours(false);
        assert_eq!(Preamble::decode(&ours.encode()), Ok(ours));
        assert_eq!(ours.negotiate(&Preamble { min: 1, max: 9, encrypted: false }), Ok(1));
        assert!(matches!(
            ours.negotiate(&Preamble { min: 2, max: 3, encrypted: false }),
            Err(ProtocolError::IncompatibleVersions { .. })
        ));
        assert_eq!(ours.negotiate(&Preamble::ours(true)), Err(ProtocolError::PeerEncrypts));
        assert_eq!(Preamble::ours(true).negotiate(&ours), Err(ProtocolError::PeerDoesNotEncrypt));
        assert!(matches!(Preamble::decode(b"GET / H"), Err(ProtocolError::BadMagic(_))));
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering() {
        let mut r = FrameReader::new(100);
        r.push(&1000u32.to_be_bytes());
        assert_eq!(r.next_frame(), Err(ProtocolError::FrameTooLarge { len: 1000, max: 100 }));
    }

    /// 10 MB of empty frames, read 64 KiB at a time as the connection does: every byte is
    /// moved within the buffer at most once (a `drain` per frame moved ~86 GB here).
    #[test]
    fn ten_megabytes_of_empty_frames_take_linear_work() {
        let wire = vec![0u8; 10_000_000];
        let mut r = FrameReader::default();
        let mut frames = 0usize;
        for chunk in wire.chunks(64 * 1024) {
            r.push(chunk);
            while let Some(f) = r.next_frame().unwrap() {
                assert!(f.is_empty());
                frames += 1;
            }
        }
        assert_eq!(frames, 2_500_000);
        assert_eq!(r.pending(), 0);
        assert!(r.moved() <= wire.len() as u64, "{} bytes moved", r.moved());
        // Reads that end mid-frame: the partial frame is moved, once per read at most.
        let mut r = FrameReader::default();
        let mut wire = Vec::new();
        for _ in 0..100_000 {
            encode_frame(&[1, 2, 3], &mut wire);
        }
        for chunk in wire.chunks(1000) {
            r.push(chunk);
            while r.next_frame().unwrap().is_some() {}
        }
        assert!(r.moved() <= wire.len() as u64, "{} bytes moved", r.moved());
    }

    #[test]
    fn only_gossip_frames_may_exceed_the_control_limit() {
        let header = |len: usize, kind: u8| {
            let mut b = (len as u32).to_be_bytes().to_vec();
            b.push(kind);
            b
        };
        let big = MAX_CONTROL_FRAME + 1;
        for kind in [0x0a, 0x2a, 0x08, 0x00] {
            let mut r = FrameReader::default();
            r.push(&header(big, kind)[..4]);
            assert_eq!(r.next_frame(), Ok(None), "the kind decides");
            r.push(&[kind]);
            assert_eq!(
                r.next_frame(),
                Err(ProtocolError::FrameTooLarge { len: big, max: MAX_CONTROL_FRAME })
            );
        }
        for kind in LARGE_KINDS {
            let mut r = FrameReader::default();
            r.push(&header(big, kind));
            assert_eq!(r.next_frame(), Ok(None));
            let mut r = FrameReader::default();
            r.push(&header(MAX_FRAME + 1, kind));
            assert_eq!(
                r.next_frame(),
                Err(ProtocolError::FrameTooLarge { len: MAX_FRAME + 1, max: MAX_FRAME })
            );
        }
    }

    #[test]
    fn a_frame_must_arrive_within_its_allowance() {
        assert_eq!(frame_allowance(0), FRAME_TIME);
        assert_eq!(frame_allowance(MAX_FRAME), Duration::from_secs(10 + 64));
        let mut r = FrameReader::default();
        assert_eq!(r.time_left(), None);
        r.wait(Duration::from_secs(3600)).unwrap(); // idle between frames: not charged
        let mut wire = (1u32 << 20).to_be_bytes().to_vec();
        wire.push(0x12);
        r.push(&wire);
        let allowed = frame_allowance(1 << 20);
        assert_eq!(r.time_left(), Some(allowed));
        // One byte every 5 s: enough to keep any silence timer quiet, not to finish.
        let mut waited = Duration::ZERO;
        let err = loop {
            waited += Duration::from_secs(5);
            if let Err(e) = r.wait(Duration::from_secs(5)) {
                break e;
            }
            r.push(&[0]);
            assert_eq!(r.next_frame(), Ok(None));
        };
        assert!(matches!(err, ProtocolError::FrameTooSlow { len: 1_048_576, .. }));
        assert!(waited > allowed && waited <= allowed + Duration::from_secs(5));
        // A frame that completes resets the clock for the next.
        let mut r = FrameReader::default();
        r.push(&[0, 0, 0, 2, 0x0a]);
        r.wait(Duration::from_secs(9)).unwrap();
        r.push(&[0, 0, 0, 0, 1]);
        assert_eq!(r.next_frame(), Ok(Some(vec![0x0a, 0])));
        assert_eq!(r.time_left(), Some(FRAME_TIME));
        r.wait(Duration::from_secs(9)).unwrap();
    }

    proptest! {
        /// Frames survive any split of the byte stream.
        #[test]
        fn frames_round_trip(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..10), cut in 1usize..50) {
            let mut wire = Vec::new();
            for f in &frames { encode_frame(f, &mut wire); }
            let mut r = FrameReader::new(1000);
            let mut got = Vec::new();
            for chunk in wire.chunks(cut) {
                r.push(chunk);
                while let Some(f) = r.next_frame().unwrap() { got.push(f); }
            }
            prop_assert_eq!(got, frames);
            prop_assert_eq!(r.pending(), 0);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut r = FrameReader::new(64);
            r.push(&bytes);
            while let Ok(Some(f)) = r.next_frame() {
                let _ = decode::<crate::mesh::proto::Frame>(&f);
            }
        }
    }
}
