//! Entry points for fuzzing the decoders of remote input beside the mesh connection (that one
//! is `mesh::fuzz`): sleeve datagrams and their reassembly, and the gossip payloads of the DNS,
//! MAC and IPAM channels with the merges they feed. Used by the cargo-fuzz targets in `fuzz/`
//! and by the bounded run of the test suite (agent/tests/fuzz_bounded.rs), which runs them
//! under an address-space cap: whatever the input, each must return without panicking and
//! without reserving memory beyond its decoder's limits.

use std::time::{Duration, Instant};

use crate::dataplane::sleeve::codec::{Cipher, HEADER, Header, Reassembly};
use crate::identity::PeerName;
use crate::ipam::ring::Ring;
use crate::ipam::wire::{self as ipam_wire, IpamMsg};
use crate::overlay::macs::{self, MacTable};
use crate::{dns, mesh};

/// Reassembly limits of the sleeve receive thread (dataplane/sleeve/mod.rs `rx_loop`).
const PENDING_FRAMES: usize = 4096;
const FRAME_AGE: Duration = Duration::from_millis(500);

fn me() -> PeerName {
    PeerName::new(1).unwrap_or_else(PeerName::random)
}

/// Splits fuzz input into datagrams: each is a big-endian u16 length and that many bytes.
pub fn datagrams(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let (len, rest) = data.split_first_chunk::<2>()?;
        let n = usize::from(u16::from_be_bytes(*len)).min(rest.len());
        let (d, tail) = rest.split_at(n);
        data = tail;
        Some(d)
    })
}

/// A stream of datagrams on the sleeve port, as the receive thread handles them: header,
/// authentication when keyed, reassembly. The first byte of each datagram also moves the
/// clock (0-255 × 4 ms), so that ageing is exercised.
pub fn sleeve(data: &[u8]) {
    let mut reassembly = Reassembly::new(PENDING_FRAMES, FRAME_AGE);
    let cipher = Cipher::new(&[7u8; 32]);
    let mut now = Instant::now();
    for d in datagrams(data) {
        now += Duration::from_millis(u64::from(d.first().copied().unwrap_or(0)) * 4);
        let Some(h) = Header::parse(d) else { continue };
        if let Some(c) = &cipher {
            let mut sealed = d.to_vec();
            let _ = c.open(&mut sealed, h.seq);
        }
        let _ = reassembly.add(&h, &d[HEADER..], now);
    }
}

/// A payload on the `dns` gossip channel, merged into a table, then tombstones expired.
pub fn dns_gossip(data: &[u8]) {
    let Ok(entries) = dns::wire::decode(data) else { return };
    let mut table = dns::table::Table::new(me());
    let now = 1_700_000_000;
    let _ = table.merge(entries, now);
    let _ = table.expire_tombstones(now + 3600);
}

/// A payload on the `macs` gossip channel, merged into a table and read back.
pub fn mac_gossip(data: &[u8]) {
    let Ok(origins) = macs::decode(data) else { return };
    let mut table = MacTable::new(me());
    let _ = table.merge(&origins);
    let _ = table.remote();
    let _ = table.remote_ips();
}

/// A payload on the `ipam` channel; a ring is merged into an empty ring of the same range.
pub fn ipam_gossip(data: &[u8]) {
    let Ok(msg) = ipam_wire::decode(data) else { return };
    if let IpamMsg::Ring { ring, .. } = msg {
        let mut ours = Ring::new(ring.range());
        let _ = ours.merge(&ring, me(), |_| false);
    }
}

/// Every decoder of remote input on the same bytes (for a single cargo-fuzz target).
pub fn all(data: &[u8]) {
    mesh::fuzz::frames(data);
    mesh::fuzz::handshake(data);
    sleeve(data);
    dns_gossip(data);
    mac_gossip(data);
    ipam_gossip(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_split_by_length_prefix() {
        let d: Vec<&[u8]> = datagrams(&[0, 2, 9, 9, 0, 5, 1]).collect();
        assert_eq!(d, vec![&[9u8, 9][..], &[1u8][..]]);
    }
}
