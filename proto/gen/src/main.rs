//! Regenerates `proto/src/generated/` from the `.proto` files in `proto/defs/`.
//!
//! The generated code is committed so that building strait never needs `protoc`; run this (with
//! Debian's `protobuf-compiler` installed) after changing a `.proto` file, from the workspace
//! root: `cargo run -p strait-proto-gen`. The output depends only on the inputs and the pinned
//! generator versions in Cargo.lock, so an unchanged tree regenerates byte for byte.

use std::{error::Error, path::Path};

/// The roots protoc starts from; what they import is generated along with them.
const ROOTS: [&str; 5] =
    ["workload.proto", "authorization.proto", "ca.proto", "discovery.proto", "strait/config.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("strait-proto-gen must live in proto/gen")?;
    let defs = crate_dir.join("defs");
    let out = crate_dir.join("src").join("generated");
    let roots = ROOTS.map(|file| defs.join(file));
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The generated `connect()` needs tonic's transport feature, which strait does not use.
        .build_transport(false)
        // Maps of served resources encode in key order, so the same resource always encodes to
        // the same bytes and a hash of them can version it (CFG-3).
        .btree_map(".istio.workload")
        .btree_map(".strait.config")
        .out_dir(&out)
        .compile_protos(&roots, &[defs])
        .map_err(|e| format!("protoc failed (is protobuf-compiler installed?): {e}"))?;
    println!("regenerated {}", out.display());
    Ok(())
}
