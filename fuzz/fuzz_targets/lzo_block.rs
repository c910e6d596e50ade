#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dcache_server::fuzzing::lzo_block(data));
