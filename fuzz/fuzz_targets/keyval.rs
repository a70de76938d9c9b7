#![no_main]
//! Fuzz target: `launcher::props::keyval`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| launcher::props::keyval(data));
