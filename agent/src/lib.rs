//! The weft agent and CLI. The binary `weft` runs the per-host agent (`weft agent`, or in the
//! background `weft launch`) and is the command-line client of a running agent.
//!
//! Layout by concern: `api` (local gRPC), `mesh` (peers, topology, gossip), `endpoints`
//! (pods and attached namespaces),
//! `dataplane` (kernel: bridge, veth, nftables), `ipam` (address allocation), `dns` (weave.local names), `store`
//! (persistence), `status` and `metrics` (reporting), `cli` (the verbs), `daemon` (wiring).

pub mod addr;
pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod endpoints;
pub mod error;
pub mod identity;
pub mod ipam;
pub mod mesh;
pub mod metrics;
pub mod overlay;
pub mod status;
pub mod store;
