//! Per-peer counters of fastdp traffic. The kernel's VXLAN device counts for all peers
//! together; this table (`inet <table>-traffic`) counts each peer's VXLAN datagrams apart: on
//! the output hook, UDP to the fastdp port is looked up by destination address in a verdict
//! map that jumps to the peer's chain, whose only rule is a counter; on the input hook the same
//! by source address. One hash lookup per VXLAN datagram whatever the number of peers, and one
//! failed port comparison for any other packet. The table is written whole, in one batch, when
//! the peers change; [`read`] returns the counters by peer address.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::dataplane::Traffic;

use super::policy::{
    Message, NFT_DATA_VERDICT, NFT_MSG_NEWSETELEM, NFT_SET_MAP, NFTA_COUNTER_BYTES,
    NFTA_COUNTER_PACKETS, NFTA_SET_DATA_TYPE, TYPE_IPV4, base_chain_in, element,
    element_messages_in, ipv4, lookup, regular_chain_in, set_attrs_in,
};
use super::{
    Attrs, CmpOp, Expr, Family, Hook, META_L4PROTO, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE, NFT_MSG_NEWSET, NFT_MSG_NEWTABLE, NFT_REG_VERDICT, NLM_F_APPEND, NLM_F_CREATE,
    NftError, NftSocket, PAYLOAD_NETWORK, PAYLOAD_TRANSPORT, cmp, meta_load, payload_load,
    table_attrs,
};

const OUT_MAP: &str = "fastdp-out";
const IN_MAP: &str = "fastdp-in";

fn out_chain(peer: Ipv4Addr) -> String {
    format!("to-{peer}")
}

fn in_chain(peer: Ipv4Addr) -> String {
    format!("from-{peer}")
}

/// One direction: its map (and set id in the batch), base chain and hook, the offset of the
/// peer's address in the IPv4 header, and the name of a peer's counting chain.
struct Side {
    map: &'static str,
    id: u32,
    base: &'static str,
    hook: Hook,
    offset: u32,
    chain_of: fn(Ipv4Addr) -> String,
}

impl Side {
    const OUT: Side = Side {
        map: OUT_MAP,
        id: 1,
        base: "output",
        hook: Hook::Output,
        offset: 16,
        chain_of: out_chain,
    };
    const IN: Side = Side {
        map: IN_MAP,
        id: 2,
        base: "input",
        hook: Hook::Input,
        offset: 12,
        chain_of: in_chain,
    };
}

/// The table's batch: replaced as a whole.
fn batch(table: &str, port: u16, peers: &[Ipv4Addr]) -> Vec<Message> {
    let mut out: Vec<Message> = vec![
        (NFT_MSG_NEWTABLE, NLM_F_CREATE, table_attrs(table)),
        (NFT_MSG_DELTABLE, 0, table_attrs(table)),
        (NFT_MSG_NEWTABLE, NLM_F_CREATE, table_attrs(table)),
    ];
    let counter = || {
        let mut a = Attrs::default();
        a.raw(NFTA_COUNTER_BYTES, &0u64.to_be_bytes());
        a.raw(NFTA_COUNTER_PACKETS, &0u64.to_be_bytes());
        Expr { name: "counter", data: a }
    };
    for &p in peers {
        for chain in [out_chain(p), in_chain(p)] {
            out.push((NFT_MSG_NEWCHAIN, NLM_F_CREATE, regular_chain_in(table, &chain)));
            let count = vec![counter()];
            let rule = super::exprs_attrs(table, &chain, count);
            out.push((NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, rule));
        }
    }
    for side in [Side::OUT, Side::IN] {
        let Side { map, id, base, hook, offset, chain_of } = side;
        let mut a = set_attrs_in(table, map, id, NFT_SET_MAP, 4, TYPE_IPV4);
        a.u32(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
        out.push((NFT_MSG_NEWSET, NLM_F_CREATE, a));
        let elems = peers.iter().map(|p| element(&p.octets(), Some(&chain_of(*p)), false));
        out.extend(element_messages_in(table, NFT_MSG_NEWSETELEM, map, Some(id), elems.collect()));
        out.push((NFT_MSG_NEWCHAIN, NLM_F_CREATE, base_chain_in(table, base, hook, 0)));
        let mut exprs = ipv4();
        exprs.extend([
            meta_load(META_L4PROTO),
            cmp(CmpOp::Eq, &[super::L4::Udp as u8]),
            payload_load(PAYLOAD_TRANSPORT, 2, 2),
            cmp(CmpOp::Eq, &port.to_be_bytes()),
            payload_load(PAYLOAD_NETWORK, offset, 4),
            lookup(map, id, Some(NFT_REG_VERDICT)),
        ]);
        let rule = super::exprs_attrs(table, base, exprs);
        out.push((NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, rule));
    }
    out
}

/// Writes the table for `peers` (their underlay addresses), counters from 0.
pub fn install(
    sock: &mut NftSocket,
    table: &str,
    port: u16,
    peers: &[Ipv4Addr],
) -> Result<(), NftError> {
    sock.send_batch(Family::Inet as u8, &batch(table, port, peers))
}

/// The counters of every peer in the table: VXLAN datagrams and their bytes (outer headers
/// included) sent to and received from it; none when there is no table.
pub fn read(sock: &mut NftSocket, table: &str) -> Result<BTreeMap<Ipv4Addr, Traffic>, NftError> {
    let mut out: BTreeMap<Ipv4Addr, Traffic> = BTreeMap::new();
    for (chain, packets, bytes) in sock.counters(Family::Inet, table)? {
        if let Some(p) = chain.strip_prefix("to-").and_then(|a| a.parse().ok()) {
            let c = out.entry(p).or_default();
            (c.tx_packets, c.tx_bytes) = (packets, bytes);
        } else if let Some(p) = chain.strip_prefix("from-").and_then(|a| a.parse().ok()) {
            let c = out.entry(p).or_default();
            (c.rx_packets, c.rx_bytes) = (packets, bytes);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_chain_and_map_element_per_peer_and_direction() {
        let peers = ["10.99.0.2".parse().expect("ip"), "10.99.0.3".parse().expect("ip")];
        let b = batch("t-traffic", 6784, &peers);
        let count = |kind: u16| b.iter().filter(|(k, _, _)| *k == kind).count();
        assert_eq!(count(NFT_MSG_NEWCHAIN), 2 * 2 + 2, "a chain per peer and direction, 2 base");
        assert_eq!(count(NFT_MSG_NEWRULE), 2 * 2 + 2, "a counter each, a dispatch each");
        assert_eq!(count(NFT_MSG_NEWSET), 2, "two verdict maps");
        assert_eq!(count(NFT_MSG_NEWSETELEM), 2, "their elements");
    }
}
