//! The generated messages of the mesh protocol (`weft.mesh.v1`, docs/mesh-protocol.md): the
//! mesh's own frames and the payloads of every gossip channel (ipam, dns, macs). A leaf, so
//! that a subsystem depends on the wire types of its channel, not on the mesh that carries them.

#![allow(missing_docs, missing_debug_implementations, unused_qualifications, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/weft.mesh.v1.rs"));
