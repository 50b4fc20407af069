//! Developer commands for strait, run as `cargo xtask <command>`:
//!
//! - `setup`: installs what building and testing need (Debian packages, bpf-linker, a
//!   kube-apiserver built once per machine, see `kube.rs`); does
//!   nothing when everything is present.
//! - `test`: setup, then formatting, clippy with warnings denied, and every test, end to end
//!   included. This is what CI runs.
//! - `demo`: setup, build, then `strait demo`.
//! - `bench [SCENARIO...]`: setup, release build, then `strait-bench`, which measures strait
//!   against direct traffic and writes `target/bench/report.{md,json}` and `chart.png`
//!   (`control`, `kube`, `gateway` and `fanout` run alone and write `<name>.md` and `<name>.json`).
//! - `soak [--minutes N]`: setup, release build, then N minutes (default 30) at 1,000 req/s
//!   through the node proxies and a waypoint with connection churn; fails on any error, a
//!   proxy's RSS changing by more than 5 % or its descriptors growing. Not part of `test`.
//! - `fuzz [TARGET] [SECONDS]`: setup, then the fuzz targets of `fuzz/` (see `fuzz.rs`).
//! - `gen-crds [--check]`: writes `deploy/crds` from strait's configuration types (with
//!   `--check`, fails if the committed files differ); `test` runs the check.
//!
//! Long commands write a numbered progress line per step with its time (`progress.rs`).
//!
//! std only: this crate is the first thing compiled on a fresh machine.

mod fuzz;
mod kube;
mod progress;

use std::{
    env,
    ffi::OsString,
    io,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use progress::Progress;

/// Debian packages the build and the tests need. rustc-web/cargo-web provide Debian's rustc
/// with LLVM 22, libstd-rust-web-dev-bpf a prebuilt `core` for bpfel-unknown-none, llvm-22-dev
/// the library bpf-linker links against; the rest are tools the tests and demo drive.
const DEBIAN_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "bpftool",
    "iproute2",
    "curl",
    "tcpdump",
    // The underlay firewall test (L4-6): nftables rules in a node namespace.
    "nftables",
    "openssl",
    "util-linux",
    "fonts-dejavu-core",
    // The Kubernetes tests: etcd 3.4 under the kube-apiserver that `kube.rs` builds, and a
    // venv for kubernetes-validate.
    "etcd-server",
    "python3-venv",
    // The Prometheus test (OBS-5) runs Debian's Prometheus server against the proxies.
    "prometheus",
    // The mesh map's test (OBS-6): the page loaded in headless Chromium.
    "chromium",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("test") => setup().and_then(|()| test(&args[1..])),
        Some("demo") => setup().and_then(|()| demo()),
        Some("bench") => setup().and_then(|()| bench(&args[1..])),
        Some("soak") => soak_minutes(&args[1..]).and_then(|minutes| setup().and_then(|()| soak(minutes))),
        Some("fuzz") => setup().and_then(|()| fuzz::fuzz(&args[1..])),
        Some("gen-crds") => gen_crds(&args[1..]),
        _ => Err(usage()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> String {
    format!(
        "usage: cargo xtask <setup | test [TEST-FILTER...] | demo | bench [--quick] [SCENARIO... | control | kube | gateway | fanout [--fanout-clients N] | same-node] | \
         soak [--minutes N] | fuzz [TARGET] [SECONDS] | gen-crds [--check]>\n\
         fuzz targets: {}",
        fuzz::TARGETS.join(", ")
    )
}

fn workspace_root() -> PathBuf {
    // xtask/ sits directly under the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// PATH with cargo's bin directory first: aya-build runs `rustup` and `bpf-linker` from PATH.
fn path_with_cargo_bin() -> OsString {
    let mut dirs = vec![cargo_home().join("bin")];
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    env::join_paths(dirs).unwrap_or_default()
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root()).env("PATH", path_with_cargo_bin());
    // `cargo xtask` runs with CARGO_MANIFEST_DIR set to xtask's directory; passed on, it is
    // seen by build scripts that track it (ring's), and every switch between `cargo xtask ...`
    // and a plain `cargo build` rebuilt ring, rustls and strait (12-16 minutes here).
    cmd.env_remove("CARGO_MANIFEST_DIR");
    cmd
}

fn run(cmd: &mut Command, what: &str) -> Result {
    let status = cmd.status().map_err(|e| format!("{what}: cannot start {:?}: {e}", cmd.get_program()))?;
    if status.success() { Ok(()) } else { Err(format!("{what} failed ({status})")) }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

fn have(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

fn setup() -> Result {
    let started = Instant::now();
    let mut progress = Progress::new("setup", 6, io::stderr());
    progress.run("Debian packages", |step| {
        let missing = missing_packages()?;
        if missing.is_empty() {
            step.outcome(format!("all {} present", DEBIAN_PACKAGES.len()));
            return Ok(());
        }
        if !have("apt-get") {
            return Err(format!(
                "this machine has no apt-get; install these Debian packages (or their equivalents) by hand: {}",
                missing.join(" ")
            ));
        }
        if !is_root() {
            return Err(format!(
                "packages missing ({}); apt-get needs root: run `sudo -E cargo xtask setup` once",
                missing.join(" ")
            ));
        }
        step.start(&format!("installing {}", missing.join(" ")));
        apt_install(&missing)?;
        step.outcome(format!("installed {}", missing.len()));
        Ok(())
    })?;
    progress.run(&format!("bpf-linker {BPF_LINKER_VERSION}"), ensure_bpf_linker)?;
    progress.run(&format!("kube-apiserver {}", kube::KUBE_APISERVER_VERSION), kube::ensure_kube_apiserver)?;
    progress
        .run(&format!("kubernetes-validate {}", kube::KUBERNETES_VALIDATE_VERSION), kube::ensure_kubernetes_validate)?;
    progress
        .run("Python prometheus_client", |step| ensure_python_module(step, "prometheus_client", "prometheus-client"))?;
    progress.run("rustup", |step| {
        if !have("rustup") {
            return Err(
                "rustup is not on PATH; aya-build runs `rustup run /usr cargo` to build the eBPF programs".to_owned()
            );
        }
        step.outcome("present");
        Ok(())
    })?;
    println!("xtask: setup complete ({:.1}s)", started.elapsed().as_secs_f64());
    Ok(())
}

/// `apt-get update` and `install`; waits up to 10 minutes for another apt (e.g. a parallel setup)
/// to release the dpkg lock instead of failing at once.
fn apt_install(packages: &[String]) -> Result {
    run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update", "-q"]), "apt-get update")?;
    run(
        Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install",
    )
}

fn missing_packages() -> Result<Vec<String>> {
    missing_of(DEBIAN_PACKAGES)
}

/// Which of `packages` dpkg does not list as installed.
fn missing_of(packages: &[&str]) -> Result<Vec<String>> {
    if !have("dpkg-query") {
        return Err(format!(
            "this is not a Debian-based machine (no dpkg-query); install by hand: {}",
            packages.join(" ")
        ));
    }
    let output = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Status}\\n"])
        .args(packages)
        .output()
        .map_err(|e| format!("dpkg-query: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    let installed: Vec<&str> =
        text.lines().filter_map(|l| l.strip_suffix(" installed")).map(|p| p.split(':').next().unwrap_or(p)).collect();
    Ok(packages.iter().filter(|p| !installed.contains(p)).map(|p| (*p).to_owned()).collect())
}

/// The observability test checks `/metrics` with a real Prometheus parser, Python's.
fn ensure_python_module(step: &mut progress::Step<'_, io::Stderr>, module: &str, package: &str) -> Result {
    let present = Command::new("python3").args(["-c", &format!("import {module}")]).output();
    if present.is_ok_and(|o| o.status.success()) {
        step.outcome("present");
        return Ok(());
    }
    step.start(&format!("pip install {package}"));
    run(Command::new("python3").args(["-m", "pip", "install", "-q", package]), "pip install")?;
    step.outcome("installed");
    Ok(())
}

fn ensure_bpf_linker(step: &mut progress::Step<'_, io::Stderr>) -> Result {
    let linker = cargo_home().join("bin").join("bpf-linker");
    let version = Command::new(&linker).arg("--version").output();
    if version.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)) {
        step.outcome("present");
        return Ok(());
    }
    step.start("building it against LLVM 22 (a minute or two)");
    run(
        cargo()
            .args(["install", "--locked", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
            .args(["--no-default-features", "--features", "llvm-22", "--force"])
            // Without it bpf-linker's build finds the system's older LLVM and fails to link.
            .env("LLVM_PREFIX", LLVM_PREFIX),
        "cargo install bpf-linker",
    )?;
    step.outcome("built");
    Ok(())
}

fn test(filters: &[String]) -> Result {
    if !is_root() {
        return Err("the end-to-end tests build network namespaces and load eBPF programs: run as root".into());
    }
    let started = Instant::now();
    let mut progress = Progress::new("test", 6, io::stderr());
    progress.run("cargo fmt --check", |_| {
        run(cargo().args(["fmt", "--all", "--", "--check"]), "formatting check (run `cargo fmt --all`)")
    })?;
    progress.run("cargo clippy -D warnings", |step| {
        step.start("checking every crate");
        run(
            cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "strait-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
            "clippy",
        )
    })?;
    progress.run("fuzz corpus replay", |step| {
        step.start("building the fuzz targets and replaying each corpus");
        fuzz::regression()
    })?;
    progress.run("gen-crds --check", |_| gen_crds(&["--check".to_owned()]))?;
    progress.run("cargo build --bins", |step| {
        step.start("building");
        run(cargo().args(["build", "--bins"]), "build")
    })?;
    progress.run("unit and end-to-end tests", |step| {
        step.start("running (several minutes; cargo's own lines follow)");
        run(cargo().args(["test", "--workspace", "--exclude", "strait-ebpf", "--"]).args(filters), "tests")
    })?;
    println!("xtask: all checks passed in {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `deploy/crds` from strait's types: the `gen-crds` example, built with the `crd-schema`
/// feature (schemars), which the normal build leaves out.
fn gen_crds(args: &[String]) -> Result {
    let check = match args {
        [] => false,
        [flag] if flag == "--check" => true,
        _ => return Err(usage()),
    };
    println!("xtask: gen-crds{}", if check { " --check" } else { "" });
    let dir = workspace_root().join("deploy").join("crds");
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "-p", "strait", "--features", "crd-schema", "--example", "gen-crds", "--"]);
    if check {
        cmd.arg("--check");
    }
    run(cmd.arg(&dir), "gen-crds")
}

fn demo() -> Result {
    if !is_root() {
        return Err("the demo builds network namespaces and loads eBPF programs: run as root".into());
    }
    run(cargo().args(["build", "--bins"]), "build")?;
    let strait = workspace_root().join("target").join("debug").join("strait");
    run(Command::new(strait).arg("demo").env("PATH", path_with_cargo_bin()), "strait demo")
}

fn bench(args: &[String]) -> Result {
    if !is_root() {
        return Err("the benchmark builds network namespaces and loads eBPF programs: run as root".into());
    }
    release_build()?;
    let root = workspace_root();
    let bench = root.join("target").join("release").join("strait-bench");
    run(
        Command::new(bench)
            .current_dir(&root)
            .args(["--out", "target/bench"])
            .args(args)
            .env("PATH", path_with_cargo_bin()),
        "strait-bench",
    )
}

/// The release binaries the benchmark and the soak run (minutes when the code changed).
fn release_build() -> Result {
    Progress::new("build", 1, io::stderr()).run("release binaries", |step| {
        step.start("cargo build --release --bins");
        run(cargo().args(["build", "--release", "--bins"]), "release build")
    })
}

/// The soak's length from `[--minutes N]`; 30 minutes by default.
fn soak_minutes(args: &[String]) -> Result<u64> {
    match args {
        [] => Ok(30),
        [flag, n] if flag == "--minutes" => n.parse().map_err(|_| format!("--minutes takes a whole number, not `{n}`")),
        _ => Err(usage()),
    }
}

fn soak(minutes: u64) -> Result {
    if !is_root() {
        return Err("the soak builds network namespaces and loads eBPF programs: run as root".into());
    }
    release_build()?;
    let root = workspace_root();
    let bench = root.join("target").join("release").join("strait-bench");
    run(
        Command::new(bench)
            .current_dir(&root)
            .args(["--out", "target/soak", "--soak-minutes", &minutes.to_string()])
            .env("PATH", path_with_cargo_bin()),
        "strait-bench --soak-minutes",
    )
}
