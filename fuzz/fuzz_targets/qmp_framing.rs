#![no_main]
//! Fuzz target: `launcher::props::qmp_framing`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| launcher::props::qmp_framing(data));
