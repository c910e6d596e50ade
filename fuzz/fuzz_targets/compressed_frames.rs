#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| dcache_proto::fuzzing::compressed_frames(data));
