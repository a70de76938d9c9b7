#![no_main]
//! Fuzz target: `launcher::props::journal`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| launcher::props::journal(data));
