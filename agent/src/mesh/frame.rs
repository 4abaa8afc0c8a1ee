//! The mesh wire format below the messages: the 7-byte preamble that negotiates the protocol
//! version and whether the connection is encrypted, and length-prefixed frames. Decoders are
//! bounded: a peer cannot make us buffer more than one maximum-size frame. Pure.

use prost::Message;

/// The first four bytes on every mesh connection.
pub const MAGIC: &[u8; 4] = b"weft";
/// Protocol versions this build speaks.
pub const PROTOCOL_MIN: u8 = 1;
pub const PROTOCOL_MAX: u8 = 1;
pub const PREAMBLE_LEN: usize = 7;
/// Largest frame accepted (and sent): a full topology of thousands of peers fits.
pub const MAX_FRAME: usize = 16 << 20;

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

/// Splits a byte stream into frames.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    max: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader::new(MAX_FRAME)
    }
}

impl FrameReader {
    pub fn new(max: usize) -> FrameReader {
        FrameReader { buf: Vec::new(), max }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if any. Fails as soon as a length prefix exceeds the limit,
    /// before any of that frame is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, ProtocolError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(ProtocolError::FrameTooLarge { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(frame))
    }

    /// Hands over the bytes buffered but not yet returned (switching readers).
    pub fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Bytes buffered but not yet returned.
    pub fn pending(&self) -> usize {
        self.buf.len()
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
