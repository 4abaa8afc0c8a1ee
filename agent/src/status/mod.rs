//! What the agent reports about itself: the report document and the read-only HTTP listener.

pub mod http;
pub mod report;
