//! What the agent reports about itself: the report document collected from every subsystem,
//! the Prometheus gauges set from it, the read-only HTTP listener and the map page it serves.

pub mod gauges;
pub mod http;
pub mod report;
pub mod simulated;
