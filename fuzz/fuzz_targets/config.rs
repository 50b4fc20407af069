//! The configuration loader: one YAML file, parsed and compiled (see `strait::fuzzing::config`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strait::fuzzing::config(data));
