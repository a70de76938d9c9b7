#![no_main]
//! Fuzz target: `launcher::props::control`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| launcher::props::control(data));
