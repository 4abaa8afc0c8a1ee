#![no_main]
//! Datagrams on the sleeve port (u16 length prefixes), through reassembly.
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft::fuzz::sleeve(data));
