#![no_main]
//! Fuzz target: `launcher::props::hmp_framing`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| launcher::props::hmp_framing(data));
