#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dcache_proto::fuzzing::server_input(data));
