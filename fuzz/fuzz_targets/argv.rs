#![no_main]
//! Fuzz target: `launcher::props::argv`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| launcher::props::argv(data));
