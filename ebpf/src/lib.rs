#![no_std]
// The library target lets `cargo metadata` and aya-build treat this crate as a package; the
// programs live in the binary target (src/main.rs).
