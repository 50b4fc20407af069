//! Builds the eBPF programs (`ebpf/`) for bpfel-unknown-none with Debian's rustc (the `/usr`
//! path toolchain, whose sysroot ships a prebuilt `core` for BPF) and leaves the object in
//! OUT_DIR, where `capture` embeds it. `cargo xtask setup` installs everything this needs.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("reading cargo metadata")?;
    let package = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "strait-ebpf")
        .ok_or_else(|| anyhow!("the strait-ebpf package is missing from the workspace"))?;
    let root_dir =
        package.manifest_path.parent().ok_or_else(|| anyhow!("{} has no parent directory", package.manifest_path))?;

    println!("cargo:rerun-if-env-changed=STRAIT_EBPF_TOOLCHAIN");
    let toolchain_name = std::env::var("STRAIT_EBPF_TOOLCHAIN").unwrap_or_else(|_| "/usr".into());
    // aya-ebpf needs one unstable feature; naming the crate (not "1") in RUSTC_BOOTSTRAP keeps
    // aya-build from switching to `-Z build-std`, which needs rust-src that is not available here.
    // Set even when the outer build has RUSTC_BOOTSTRAP=1 (the fuzz targets on a stable toolchain).
    // SAFETY: the build script is single-threaded here.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf") };
    let package = aya_build::Package { name: package.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() };
    aya_build::build_ebpf([package], Toolchain::Custom(&toolchain_name))
}
