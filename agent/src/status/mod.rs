//! What the agent reports about itself: the report document collected from every subsystem,
//! the Prometheus gauges set from it, and the read-only HTTP listener.

pub mod gauges;
pub mod http;
pub mod report;
