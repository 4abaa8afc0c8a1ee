//! The weft agent and CLI. The binary `weft` runs the per-host agent (`weft agent`, or in the
//! background `weft launch`) and is the command-line client of a running agent.
//!
//! Layout by concern (docs/architecture.md has the table, checked by `tests/architecture.rs`):
//! leaves (`addr`, `store`, `proto`, `metrics`, `identity`), the kernel (`dataplane`), the peer
//! mesh (`mesh`), address allocation (`ipam`), pods and attached namespaces with the state
//! owner (`endpoints`), the seam subsystems plug into (`subsystem`), weave.local names (`dns`),
//! the cross-host data plane (`overlay`), and at the top the flags (`config`), the handles the
//! servers use (`services`), reporting (`status`), the local gRPC API (`api`), the verbs
//! (`cli`) and the start and stop order (`daemon`).

pub mod addr;
pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod docker;
pub mod endpoints;
pub mod fuzz;
pub mod harden;
pub mod identity;
pub mod ipam;
pub mod kube;
pub mod mesh;
pub mod metrics;
pub mod netpol;
pub mod overlay;
pub mod policy;
pub mod proto;
pub mod services;
pub mod status;
pub mod store;
pub mod subsystem;
