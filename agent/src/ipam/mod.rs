//! IP address management: the allocation range shared by all peers with no external
//! database. `space` is address arithmetic, `allocator` the allocation within this peer's
//! share, `ring` the CRDT of who owns which share, `paxos` the agreement on the first
//! division, `wire` the gossip messages, and `manager` ties them together for one peer.

pub mod allocator;
pub mod manager;
pub mod paxos;
pub mod ring;
#[cfg(test)]
mod sim_tests;
pub mod space;
pub mod wire;

pub use allocator::{Allocator, IpamError};
pub use manager::{AllocError, InitMode, Ipam, IpamConfig, RingState, Wait};
