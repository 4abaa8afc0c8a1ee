#![no_main]
//! A payload on the dns gossip channel, merged.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzz::dns_gossip(data));
