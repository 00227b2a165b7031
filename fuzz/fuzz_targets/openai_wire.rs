#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_core_fuzz::openai_wire(data));
