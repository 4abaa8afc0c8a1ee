#![no_main]
//! Bytes a peer sends after the handshake.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::mesh::fuzz::frames(data));
