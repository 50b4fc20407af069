//! The waypoint's HTTP/1.1 and HTTP/2 engine: `[setup byte] [bytes from the client]` (see
//! `strait::fuzzing::l7_http`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strait::fuzzing::l7_http(data));
