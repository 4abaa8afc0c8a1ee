#![no_main]
//! A payload on the ipam gossip channel; a ring is merged.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzz::ipam_gossip(data));
