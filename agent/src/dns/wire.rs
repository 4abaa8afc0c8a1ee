//! The messages of the `dns` gossip channel (`weft.mesh.v1.DnsEntries`, specified in
//! docs/dns.md): conversion to and from table entries. Decoding checks what a peer could get
//! wrong and never trusts its input.

use std::net::IpAddr;

use prost::Message;

use super::table::Entry;
use crate::identity::PeerName;
use crate::mesh::frame::STATE_MESSAGE;
use crate::mesh::gossip::split_by_size;
use crate::proto;

/// Bounds on what one message may carry.
const MAX_ENTRIES: usize = 1 << 20;
const MAX_NAME: usize = 254;
const MAX_ENDPOINT: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("undecodable: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("too many entries ({0})")]
    TooMany(usize),
    #[error("entry {0:?}: bad name")]
    Name(String),
    #[error("entry {0:?}: bad address (want 4 or 16 bytes)")]
    Address(String),
    #[error("entry {0:?}: endpoint id too long")]
    Endpoint(String),
    #[error("entry {0:?}: bad origin {1:#x}")]
    Origin(String, u64),
}

/// One message carrying `entries` (tests, and sets known to be small).
pub fn encode<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> Vec<u8> {
    proto::DnsEntries { entries: entries.into_iter().map(to_wire).collect() }.encode_to_vec()
}

/// `entries` as messages of at most [`STATE_MESSAGE`] bytes each: entries merge one by one,
/// so any split is a valid set of updates (docs/dns.md). None when there are no entries.
pub fn messages<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> Vec<Vec<u8>> {
    let all = entries.into_iter().map(to_wire).collect();
    split_by_size(all, STATE_MESSAGE)
        .into_iter()
        .map(|entries| proto::DnsEntries { entries }.encode_to_vec())
        .collect()
}

fn to_wire(e: &Entry) -> proto::DnsEntry {
    proto::DnsEntry {
        name: e.name.clone(),
        address: match e.addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        },
        endpoint: e.endpoint.clone(),
        origin: e.origin.get(),
        version: e.version,
        tombstone: e.tombstone,
    }
}

pub fn decode(bytes: &[u8]) -> Result<Vec<Entry>, WireError> {
    let msg = proto::DnsEntries::decode(bytes)?;
    if msg.entries.len() > MAX_ENTRIES {
        return Err(WireError::TooMany(msg.entries.len()));
    }
    msg.entries.into_iter().map(entry).collect()
}

fn entry(e: proto::DnsEntry) -> Result<Entry, WireError> {
    let name_ok = e.name.len() <= MAX_NAME
        && e.name.ends_with('.')
        && e.name.bytes().all(|b| b.is_ascii_graphic());
    if !name_ok {
        return Err(WireError::Name(e.name));
    }
    let bytes = e.address.as_slice();
    let addr = if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        IpAddr::from(v4)
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        IpAddr::from(v6)
    } else {
        return Err(WireError::Address(e.name));
    };
    if e.endpoint.len() > MAX_ENDPOINT {
        return Err(WireError::Endpoint(e.name));
    }
    let origin = PeerName::new(e.origin).ok_or(WireError::Origin(e.name.clone(), e.origin))?;
    Ok(Entry {
        name: e.name,
        addr,
        endpoint: e.endpoint,
        origin,
        version: e.version,
        tombstone: e.tombstone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 200 000 entries with container-id endpoints (about 22 MB as one message, beyond
    /// even the whole frame limit) go as several messages each below half the frame limit,
    /// and merging them on a fresh table gives the whole table.
    #[test]
    fn a_large_table_is_sent_as_messages_that_merge_to_the_whole() {
        use super::super::table::Table;
        use crate::mesh::frame::MAX_FRAME;
        let mut table = Table::new(PeerName::new(1).unwrap());
        let entries = (0..200_000u32).map(|i| {
            let [_, a, b, c] = i.to_be_bytes();
            Entry {
                name: format!("pod-{i:06}.default.weave.local."),
                addr: IpAddr::from([10, a, b, c]),
                endpoint: format!("{i:064x}"),
                origin: PeerName::new(2 + u64::from(i % 100)).unwrap(),
                version: 1,
                tombstone: 0,
            }
        });
        table.merge(entries, 0);
        assert_eq!(table.len(), 200_000);
        assert!(encode(table.entries()).len() > MAX_FRAME, "the old single message");
        let split = messages(table.entries());
        assert!(split.len() > 1);
        for m in &split {
            assert!(m.len() < MAX_FRAME / 2 && m.len() <= STATE_MESSAGE, "{} bytes", m.len());
        }
        let mut fresh = Table::new(PeerName::new(999).unwrap());
        for m in &split {
            fresh.merge(decode(m).unwrap(), 0);
        }
        assert_eq!(fresh.entries().collect::<Vec<_>>(), table.entries().collect::<Vec<_>>());
        assert!(messages(std::iter::empty()).is_empty());
    }

    #[test]
    fn round_trip_and_refusals() {
        let e = Entry {
            name: "SeeOne.weave.local.".into(),
            addr: "10.32.0.1".parse().unwrap(),
            endpoint: "c1".into(),
            origin: PeerName::new(0x0a0b_0c0d_0e0f).unwrap(),
            version: 3,
            tombstone: 0,
        };
        let v6 = Entry { addr: "fd00::1".parse().unwrap(), tombstone: 99, ..e.clone() };
        assert_eq!(decode(&encode([&e, &v6])).unwrap(), vec![e.clone(), v6]);
        let bad = |f: &dyn Fn(&mut proto::DnsEntry)| {
            let mut m = proto::DnsEntries::decode(encode([&e]).as_slice()).unwrap();
            f(&mut m.entries[0]);
            decode(&m.encode_to_vec())
        };
        assert!(matches!(bad(&|m| m.address = vec![1, 2, 3]), Err(WireError::Address(_))));
        assert!(matches!(bad(&|m| m.name = "no-dot".into()), Err(WireError::Name(_))));
        assert!(matches!(bad(&|m| m.name = "a b.".into()), Err(WireError::Name(_))));
        assert!(matches!(bad(&|m| m.origin = 1 << 48), Err(WireError::Origin(..))));
        assert!(matches!(bad(&|m| m.endpoint = "x".repeat(600)), Err(WireError::Endpoint(_))));
        assert!(decode(&[0xff, 0xff]).is_err());
    }
}
