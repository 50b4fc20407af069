//! JWT parsing and verification: `[JWKS] NUL [token]`, or a token alone (see
//! `strait::fuzzing::jwt`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| strait::fuzzing::jwt(data));
