//! The messages of the `ipam` gossip channel: conversion between the protobuf types
//! (`weft.mesh.v1.IpamMessage`, specified in docs/ipam.md) and the ring and consensus types.
//! Decoding checks everything a peer could get wrong; nothing here trusts its input.

use std::collections::BTreeMap;
use std::ops::Range;

use prost::Message;

use super::paxos::{Ballot, Claims};
use super::ring::{Entry, Ring, RingError};
use crate::identity::PeerName;
use crate::proto;

/// A bound on consensus participants accepted from a peer.
const MAX_ELECTORS: usize = 4096;

/// A decoded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpamMsg {
    Ring { ring: Ring, reply: bool },
    Paxos(BTreeMap<PeerName, Claims>),
    SpaceRequest { range: Range<u128>, exact: bool },
    SpaceDenied { range: Range<u128>, reason: String },
    RingRequest,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("undecodable: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("empty message")]
    Empty,
    #[error("bad address field (want 16 bytes)")]
    Address,
    #[error("bad peer name {0:#x}")]
    Peer(u64),
    #[error("too many electors")]
    TooMany,
    #[error(
        "consensus state from an older weft (its ballots lack the proposer's incarnation): \
         refused; upgrade every elector, or give the ring's owners with --ipalloc-init seed=..."
    )]
    OldConsensus,
    #[error(transparent)]
    Ring(#[from] RingError),
}

fn key_bytes(k: u128) -> Vec<u8> {
    k.to_be_bytes().to_vec()
}

fn key_of(b: &[u8]) -> Result<u128, WireError> {
    Ok(u128::from_be_bytes(b.try_into().map_err(|_| WireError::Address)?))
}

fn peer(v: u64) -> Result<PeerName, WireError> {
    PeerName::new(v).ok_or(WireError::Peer(v))
}

fn ballot(b: Option<proto::Ballot>) -> Result<Option<Ballot>, WireError> {
    b.map(|b| {
        Ok(Ballot { round: b.round, proposer: peer(b.proposer)?, incarnation: b.incarnation })
    })
    .transpose()
}

fn ballot_to(b: Option<Ballot>) -> Option<proto::Ballot> {
    b.map(|b| proto::Ballot {
        round: b.round,
        proposer: b.proposer.get(),
        incarnation: b.incarnation,
    })
}

fn ring_to(ring: &Ring, reply: bool) -> proto::IpamRing {
    let r = ring.range();
    proto::IpamRing {
        start: key_bytes(r.start),
        end: key_bytes(r.end),
        entries: ring
            .entries()
            .map(|(range, e)| proto::RingEntry {
                token: key_bytes(range.start),
                peer: e.peer.get(),
                version: e.version,
                free: u64::try_from(e.free).unwrap_or(u64::MAX),
                free_version: e.free_version,
            })
            .collect(),
        seeds: ring.seeds().iter().map(|p| p.get()).collect(),
        reply,
    }
}

fn ring_from(m: proto::IpamRing) -> Result<Ring, WireError> {
    let range = key_of(&m.start)?..key_of(&m.end)?;
    let entries = m
        .entries
        .into_iter()
        .map(|e| {
            let entry = Entry {
                peer: peer(e.peer)?,
                version: e.version,
                free: u128::from(e.free),
                free_version: e.free_version,
            };
            Ok((key_of(&e.token)?, entry))
        })
        .collect::<Result<Vec<_>, WireError>>()?;
    let seeds = m.seeds.into_iter().map(peer).collect::<Result<Vec<_>, _>>()?;
    Ok(Ring::from_parts(range, entries, seeds)?)
}

pub fn encode(msg: &IpamMsg) -> Vec<u8> {
    use proto::ipam_message::Kind;
    let kind = match msg {
        IpamMsg::Ring { ring, reply } => Kind::Ring(ring_to(ring, *reply)),
        IpamMsg::Paxos(nodes) => Kind::Paxos(proto::PaxosState {
            nodes: nodes
                .iter()
                .map(|(p, c)| proto::PaxosNode {
                    peer: p.get(),
                    incarnation: c.incarnation,
                    promise: ballot_to(c.promise),
                    accepted: ballot_to(c.accepted),
                    value: c.value.iter().map(|v| v.get()).collect(),
                })
                .collect(),
            ballot_incarnations: true,
        }),
        IpamMsg::SpaceRequest { range, exact } => Kind::SpaceRequest(proto::SpaceRequest {
            start: key_bytes(range.start),
            end: key_bytes(range.end),
            exact: *exact,
        }),
        IpamMsg::SpaceDenied { range, reason } => Kind::SpaceDenied(proto::SpaceDenied {
            start: key_bytes(range.start),
            end: key_bytes(range.end),
            reason: reason.clone(),
        }),
        IpamMsg::RingRequest => Kind::RingRequest(proto::RingRequest {}),
    };
    proto::IpamMessage { kind: Some(kind) }.encode_to_vec()
}

pub fn decode(bytes: &[u8]) -> Result<IpamMsg, WireError> {
    use proto::ipam_message::Kind;
    let m = proto::IpamMessage::decode(bytes)?;
    Ok(match m.kind.ok_or(WireError::Empty)? {
        Kind::Ring(r) => {
            let reply = r.reply;
            IpamMsg::Ring { ring: ring_from(r)?, reply }
        }
        Kind::Paxos(p) => {
            if !p.ballot_incarnations {
                return Err(WireError::OldConsensus);
            }
            if p.nodes.len() > MAX_ELECTORS {
                return Err(WireError::TooMany);
            }
            let mut nodes = BTreeMap::new();
            for n in p.nodes {
                if n.value.len() > MAX_ELECTORS {
                    return Err(WireError::TooMany);
                }
                let claims = Claims {
                    incarnation: n.incarnation,
                    promise: ballot(n.promise)?,
                    accepted: ballot(n.accepted)?,
                    value: n.value.into_iter().map(peer).collect::<Result<_, _>>()?,
                };
                nodes.insert(peer(n.peer)?, claims);
            }
            IpamMsg::Paxos(nodes)
        }
        Kind::SpaceRequest(r) => {
            IpamMsg::SpaceRequest { range: key_of(&r.start)?..key_of(&r.end)?, exact: r.exact }
        }
        Kind::SpaceDenied(d) => IpamMsg::SpaceDenied {
            range: key_of(&d.start)?..key_of(&d.end)?,
            reason: d.reason.chars().take(200).collect(),
        },
        Kind::RingRequest(_) => IpamMsg::RingRequest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u64) -> PeerName {
        PeerName::new(n).unwrap()
    }

    #[test]
    fn messages_round_trip() {
        let mut ring = Ring::new(100..1124);
        ring.seed(&[p(1), p(2)]);
        ring.grant(p(1), 200..300, p(3)).unwrap();
        let mut claims = BTreeMap::new();
        claims.insert(
            p(1),
            Claims {
                incarnation: 5,
                promise: Some(Ballot { round: 2, proposer: p(1), incarnation: 9 }),
                accepted: None,
                value: vec![p(1), p(2)],
            },
        );
        for m in [
            IpamMsg::Ring { ring, reply: true },
            IpamMsg::Paxos(claims),
            IpamMsg::SpaceRequest { range: 5..9, exact: true },
            IpamMsg::SpaceDenied { range: 5..9, reason: "full".into() },
            IpamMsg::RingRequest,
        ] {
            assert_eq!(decode(&encode(&m)).unwrap(), m);
        }
    }

    #[test]
    fn garbage_is_refused() {
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
        assert!(matches!(decode(&[]), Err(WireError::Empty)));
        let bad = proto::IpamMessage {
            kind: Some(proto::ipam_message::Kind::SpaceRequest(proto::SpaceRequest {
                start: vec![1, 2],
                end: vec![],
                exact: false,
            })),
        };
        assert!(matches!(decode(&bad.encode_to_vec()), Err(WireError::Address)));
    }

    #[test]
    fn consensus_state_from_older_peers_is_refused_clearly() {
        let old = proto::IpamMessage {
            kind: Some(proto::ipam_message::Kind::Paxos(proto::PaxosState {
                nodes: vec![],
                ballot_incarnations: false,
            })),
        };
        let err = decode(&old.encode_to_vec()).unwrap_err();
        assert!(matches!(err, WireError::OldConsensus));
        assert!(err.to_string().contains("older weft"), "{err}");
    }
}
