//! Entry points for fuzzing the decoders that read bytes from other peers: the preamble and
//! frame decoder, the Noise handshake and record layer, and the messages inside. Used by the
//! cargo-fuzz targets in `fuzz/` and by a bounded run in the test suite; each must return
//! without panicking and without buffering beyond the decoders' limits, whatever the input.

use prost::Message;

use super::frame::{FrameReader, PREAMBLE_LEN, Preamble, decode};
use super::proto;
use super::secure;
use super::topology::Topology;
use crate::identity::PeerName;

/// The byte stream after the handshake: frames, their messages, and topology merges.
pub fn frames(data: &[u8]) {
    let mut reader = FrameReader::new(64 * 1024);
    let mut topo =
        Topology::new(PeerName::new(1).unwrap_or_else(PeerName::random), "fuzz".into(), 1, 1);
    // Feed in uneven pieces, as TCP would deliver them.
    for chunk in data.chunks(data.first().map_or(1, |b| usize::from(*b).max(1))) {
        reader.push(chunk);
        while let Ok(Some(f)) = reader.next_frame() {
            assert!(f.len() <= 64 * 1024);
            if let Ok(frame) = proto::Frame::decode(f.as_slice()) {
                if let Some(
                    proto::frame::Kind::Gossip(m)
                    | proto::frame::Kind::Broadcast(m)
                    | proto::frame::Kind::Unicast(m),
                ) = frame.kind
                {
                    if let Ok(t) = proto::Topology::decode(m.payload.as_slice()) {
                        topo.merge_wire(&t);
                        topo.garbage_collect();
                    }
                }
            }
        }
        assert!(reader.pending() <= 64 * 1024 + 4 + chunk.len());
    }
}

/// The handshake as a responder sees it: preamble, the initiator's Noise message, then
/// records that should carry the Hello.
pub fn handshake(data: &[u8]) {
    if data.len() < PREAMBLE_LEN {
        return;
    }
    let (pre, rest) = data.split_at(PREAMBLE_LEN);
    let mut p = [0u8; PREAMBLE_LEN];
    p.copy_from_slice(pre);
    if let Ok(theirs) = Preamble::decode(&p) {
        let _ = Preamble::ours(true).negotiate(&theirs);
        let _ = Preamble::ours(false).negotiate(&theirs);
    }
    let _ = decode::<proto::Hello>(rest);
    let psk = [7u8; 32];
    let Ok(mut responder) = secure::responder(&psk) else { return };
    let mut payload = vec![0u8; secure::MAX_RECORD];
    let len = rest.len().min(secure::MAX_RECORD);
    if responder.read_message(&rest[..len], &mut payload).is_err() {
        return;
    }
    // The initiator's message happened to verify (only with crafted input): keep going.
    let mut msg = vec![0u8; secure::MAX_RECORD];
    if responder.write_message(&[], &mut msg).is_err() {
        return;
    }
    let Ok(channel) = secure::Channel::new(responder) else { return };
    let mut opener = channel.opener();
    opener.push(&rest[len..]);
    while let Ok(Some(plain)) = opener.next_plain() {
        let _ = decode::<proto::Hello>(&plain);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn frames_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            frames(&data);
        }

        #[test]
        fn handshakes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            handshake(&data);
        }
    }
}
