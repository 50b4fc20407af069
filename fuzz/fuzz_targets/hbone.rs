//! HBONE request handling after the TLS handshake, at the node proxy and at the waypoint:
//! `[setup byte] [HTTP/2 from the peer]` (see `strait::fuzzing::hbone`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strait::fuzzing::hbone(data));
