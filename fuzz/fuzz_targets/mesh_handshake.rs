#![no_main]
//! Bytes a peer sends during the handshake.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::mesh::fuzz::handshake(data));
