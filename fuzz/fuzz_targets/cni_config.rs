#![no_main]
//! A network configuration on the plugin's stdin.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(conf) = weft_cni::types::NetConf::parse(data) {
        if let Some(prev) = &conf.prev_result {
            let _ = weft_cni::types::CniResult::from_prev(prev);
        }
    }
});
