//! Mutual authentication and encryption of mesh connections with a shared password, using the
//! Noise protocol (`Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`): a fresh ephemeral Diffie-Hellman
//! per connection (forward secrecy) mixed with a pre-shared key derived from the password with
//! Argon2id, so the password never travels and a peer without it cannot complete the
//! handshake. After the handshake the byte stream travels as records: a 2-byte big-endian
//! length and a ciphertext of at most 65535 bytes, each with its own nonce, so a replayed,
//! reordered or altered record fails to decrypt and ends the connection.

use std::sync::Arc;

use snow::{HandshakeState, StatelessTransportState};

use crate::mesh::frame::StreamBuf;

pub const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Noise messages are at most 65535 bytes, 16 of which are the authentication tag.
pub const MAX_RECORD: usize = 65535;
const TAG: usize = 16;
pub const MAX_RECORD_PLAIN: usize = MAX_RECORD - TAG;

pub type Psk = [u8; 32];

/// Derives the pre-shared key from the password: Argon2id, 19 MiB, 2 passes (a dictionary
/// attacker pays that per guess). The salt is fixed because every peer must derive the same key.
pub fn psk_from_password(password: &[u8]) -> Result<Psk, String> {
    use argon2::{Algorithm, Argon2, Params, Version};
    let params = Params::new(19 * 1024, 2, 1, Some(32)).map_err(|e| e.to_string())?;
    let mut out = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(password, b"weft mesh psk v1", &mut out)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

fn builder(psk: &Psk) -> Result<snow::Builder<'_>, snow::Error> {
    let params = NOISE_PATTERN.parse()?;
    snow::Builder::new(params).psk(0, psk)
}

pub fn initiator(psk: &Psk) -> Result<HandshakeState, snow::Error> {
    builder(psk)?.build_initiator()
}

pub fn responder(psk: &Psk) -> Result<HandshakeState, snow::Error> {
    builder(psk)?.build_responder()
}

/// The two directions of an established Noise channel. Each direction keeps its own nonce;
/// the shared transport state is only read.
#[derive(Clone)]
pub struct Channel {
    transport: Arc<StatelessTransportState>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Channel")
    }
}

impl Channel {
    pub fn new(done: HandshakeState) -> Result<Channel, snow::Error> {
        Ok(Channel { transport: Arc::new(done.into_stateless_transport_mode()?) })
    }

    pub fn sealer(&self) -> Sealer {
        Sealer { transport: self.transport.clone(), nonce: 0 }
    }

    pub fn opener(&self) -> Opener {
        Opener { transport: self.transport.clone(), nonce: 0, buf: StreamBuf::default() }
    }
}

/// Encrypts the outgoing stream.
pub struct Sealer {
    transport: Arc<StatelessTransportState>,
    nonce: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("nonce", &self.nonce).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener").field("nonce", &self.nonce).finish_non_exhaustive()
    }
}

impl Sealer {
    /// Appends the records carrying `plain` to `out`.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), snow::Error> {
        let mut cipher = vec![0u8; MAX_RECORD];
        for chunk in plain.chunks(MAX_RECORD_PLAIN) {
            let n = self.transport.write_message(self.nonce, chunk, &mut cipher)?;
            self.nonce += 1;
            out.extend_from_slice(&(n as u16).to_be_bytes());
            out.extend_from_slice(&cipher[..n]);
        }
        Ok(())
    }
}

/// Decrypts the incoming stream. Holds at most one incomplete record beyond what was pushed,
/// in a [`StreamBuf`] (linear work however small the records).
pub struct Opener {
    transport: Arc<StatelessTransportState>,
    nonce: u64,
    buf: StreamBuf,
}

impl Opener {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.push(bytes);
    }

    /// The plaintext of the next complete record, if any.
    pub fn next_plain(&mut self) -> Result<Option<Vec<u8>>, snow::Error> {
        let b = self.buf.unread();
        if b.len() < 2 {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([b[0], b[1]]));
        if b.len() < 2 + len {
            return Ok(None);
        }
        let mut plain = vec![0u8; len];
        let n = self.transport.read_message(self.nonce, &b[2..2 + len], &mut plain)?;
        self.nonce += 1;
        plain.truncate(n);
        self.buf.consume(2 + len);
        Ok(Some(plain))
    }

    /// Bytes received but not yet decrypted.
    pub fn pending(&self) -> usize {
        self.buf.unread().len()
    }

    /// Bytes moved within the buffer so far.
    pub fn moved(&self) -> u64 {
        self.buf.moved()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the two-message NNpsk0 handshake in memory.
    fn handshake(a: &Psk, b: &Psk) -> Result<(Channel, Channel), snow::Error> {
        let (mut i, mut r) = (initiator(a)?, responder(b)?);
        let mut m1 = vec![0u8; MAX_RECORD];
        let mut p = vec![0u8; MAX_RECORD];
        let n = i.write_message(&[], &mut m1)?;
        r.read_message(&m1[..n], &mut p)?;
        let n = r.write_message(&[], &mut m1)?;
        i.read_message(&m1[..n], &mut p)?;
        Ok((Channel::new(i)?, Channel::new(r)?))
    }

    fn psk(s: &str) -> Psk {
        // The real derivation is slow on purpose; tests only need distinct keys.
        let mut k = [0u8; 32];
        k[..s.len()].copy_from_slice(s.as_bytes());
        k
    }

    #[test]
    fn same_password_talks_different_password_fails() {
        let (a, b) = handshake(&psk("secret"), &psk("secret")).unwrap();
        let mut wire = Vec::new();
        let big = vec![7u8; 150_000];
        a.sealer().seal(&big, &mut wire).unwrap();
        let mut o = b.opener();
        let mut got = Vec::new();
        for chunk in wire.chunks(999) {
            o.push(chunk);
            while let Some(p) = o.next_plain().unwrap() {
                got.extend(p);
            }
        }
        assert_eq!(got, big);
        assert!(handshake(&psk("secret"), &psk("other")).is_err());
    }

    #[test]
    fn tampered_or_replayed_records_fail() {
        let (a, b) = handshake(&psk("k"), &psk("k")).unwrap();
        let mut s = a.sealer();
        let (mut r1, mut r2) = (Vec::new(), Vec::new());
        s.seal(b"hello", &mut r1).unwrap();
        s.seal(b"world", &mut r2).unwrap();
        let mut o = b.opener();
        o.push(&r1);
        assert_eq!(o.next_plain().unwrap().unwrap(), b"hello");
        o.push(&r1); // replay
        assert!(o.next_plain().is_err());
        let mut o = b.opener();
        let mut bad = r1.clone();
        bad[4] ^= 1;
        o.push(&bad);
        assert!(o.next_plain().is_err());
    }

    /// Many records of an empty plaintext (the smallest a peer can send), read 64 KiB at a
    /// time: each byte is moved within the buffer at most once.
    #[test]
    fn small_records_take_linear_work() {
        let (a, b) = handshake(&psk("k"), &psk("k")).unwrap();
        // `seal` cuts no record from nothing; a peer can, so write them directly.
        let mut wire = Vec::new();
        let mut cipher = [0u8; TAG];
        for nonce in 0..100_000 {
            let n = a.transport.write_message(nonce, &[], &mut cipher).unwrap();
            wire.extend_from_slice(&(n as u16).to_be_bytes());
            wire.extend_from_slice(&cipher[..n]);
        }
        let mut o = b.opener();
        let mut records = 0;
        for chunk in wire.chunks(64 * 1024) {
            o.push(chunk);
            while let Some(p) = o.next_plain().unwrap() {
                assert!(p.is_empty());
                records += 1;
            }
        }
        assert_eq!((records, o.pending()), (100_000, 0));
        assert!(o.moved() <= wire.len() as u64, "{} bytes moved", o.moved());
    }

    #[test]
    fn derivation_is_deterministic() {
        assert_eq!(psk_from_password(b"pw").unwrap(), psk_from_password(b"pw").unwrap());
        assert_ne!(psk_from_password(b"pw").unwrap(), psk_from_password(b"pw2").unwrap());
    }
}
