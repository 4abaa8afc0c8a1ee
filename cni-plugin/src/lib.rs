//! weft's CNI plugin. The runtime executes `weft-cni` once per CNI command; the plugin parses
//! the invocation (environment + network configuration on stdin), asks the local weft agent
//! over its unix socket to do the work, and prints the CNI result or CNI error on stdout.
//! Nothing else may be printed on stdout: it is the protocol channel.

pub mod agent;
pub mod env;
pub mod error;
pub mod netns;
pub mod plugin;
pub mod types;
