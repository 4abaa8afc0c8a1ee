//! The local API served on the agent's unix socket: the server, and the mapping of errors to
//! gRPC statuses.

pub mod server;
pub mod status;
