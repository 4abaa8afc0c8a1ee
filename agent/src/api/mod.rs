//! The local API served on the agent's unix socket.

pub mod server;
