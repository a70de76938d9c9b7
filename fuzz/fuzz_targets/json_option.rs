#![no_main]
//! Fuzz target: `launcher::props::json_option`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| launcher::props::json_option(data));
