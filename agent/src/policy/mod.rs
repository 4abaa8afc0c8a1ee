//! Kubernetes NetworkPolicy: the model of v1 (`model`), read from the API's objects at the
//! edge (`parse`), and the evaluator that answers "may A reach B on this port and protocol"
//! (`eval`), the oracle the nftables program and the conformance tests are held to, the
//! program one node runs (`compile`), and the cluster as the watches and the node's own
//! endpoints report it, event by event (`state`). docs/network-policy.md states the
//! semantics. Pure: no I/O here.

pub mod compile;
pub mod eval;
pub mod model;
pub mod parse;
pub mod state;
#[cfg(test)]
pub(crate) mod tests;
