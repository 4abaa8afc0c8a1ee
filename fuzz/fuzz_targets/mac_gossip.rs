#![no_main]
//! A payload on the macs gossip channel, merged.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzz::mac_gossip(data));
