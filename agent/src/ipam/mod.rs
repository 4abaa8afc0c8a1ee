//! IP address management: which addresses this peer may hand out and to whom they went.
//! `space` is address arithmetic, `allocator` the per-peer allocation logic.

pub mod allocator;
pub mod space;

pub use allocator::{Allocator, IpamError};
