#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate_core_fuzz::prompt_render(data));
