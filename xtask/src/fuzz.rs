//! The fuzz targets of `fuzz/` (libFuzzer through cargo-fuzz): `cargo xtask fuzz` runs them, and
//! `cargo xtask test` builds them and replays their corpus as a regression test.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{Result, cargo, cargo_home, path_with_cargo_bin, run, workspace_root};

/// Every fuzz target, in the order `cargo xtask fuzz` runs them (names of `fuzz/Cargo.toml`).
pub const TARGETS: [&str; 4] = ["hbone", "l7_http", "config", "jwt"];

/// How long each target runs when no duration is given.
const DEFAULT_SECONDS: u64 = 60;

/// 0.13.2 builds with rustc 1.95 (the stable toolchain here) and drives libfuzzer-sys 0.4.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// One input taking longer than this is a hang, reported like a crash. The stream targets serve
/// a connection in paused time; their slowest seeds take milliseconds.
const INPUT_TIMEOUT_SECONDS: u64 = 10;

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// `cargo xtask fuzz [TARGET] [SECONDS]`: fuzzes one target, or all one after another, for
/// SECONDS each, then minimizes the target's corpus (`cargo fuzz cmin`) so that what is
/// committed stays small.
pub fn fuzz(args: &[String]) -> Result {
    let (targets, seconds) = parse_args(args)?;
    ensure_cargo_fuzz()?;
    let toolchain = Toolchain::detect();
    println!("xtask: fuzzing with {}", toolchain.describe());
    for target in targets {
        println!("xtask: fuzzing {target} for {seconds} s (one process; libFuzzer's statistics follow)");
        let corpus = fuzz_dir().join("corpus").join(target);
        run(
            toolchain.cargo_fuzz().args(["run", target]).arg(&corpus).args([
                "--",
                &format!("-max_total_time={seconds}"),
                &format!("-timeout={INPUT_TIMEOUT_SECONDS}"),
                "-print_final_stats=1",
            ]),
            &format!("fuzzing {target} (a crash leaves its input in fuzz/artifacts/{target}/)"),
        )?;
        println!("xtask: minimizing the corpus of {target}");
        // Inputs are kept for the code they reach, not for how often they loop through it: after
        // 10 minutes, hit counts kept 2,297 config inputs (6.8 MB), edges alone 1,174 (3.1 MB).
        run(
            toolchain.cargo_fuzz().args(["cmin", target]).arg(&corpus).args(["--", "-use_counters=0"]),
            &format!("cargo fuzz cmin {target}"),
        )?;
    }
    Ok(())
}

fn parse_args(args: &[String]) -> Result<(Vec<&'static str>, u64)> {
    let mut targets: Vec<&'static str> = TARGETS.to_vec();
    let mut seconds = DEFAULT_SECONDS;
    for arg in args {
        if let Ok(s) = arg.parse::<u64>() {
            seconds = s;
        } else if let Some(target) = TARGETS.iter().find(|t| **t == arg.as_str()) {
            targets = vec![target];
        } else if arg != "all" {
            return Err(format!("unknown fuzz target `{arg}`; the targets are {} (or all)", TARGETS.join(", ")));
        }
    }
    Ok((targets, seconds))
}

/// Installs cargo-fuzz unless the pinned version is there.
fn ensure_cargo_fuzz() -> Result {
    let binary = cargo_home().join("bin").join("cargo-fuzz");
    let version = Command::new(&binary).arg("--version").output();
    if version.is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (a minute)");
    run(
        cargo().args(["install", "--locked", &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"), "--force"]),
        "cargo install cargo-fuzz",
    )
}

/// Sanitizers and libFuzzer's instrumentation take unstable compiler flags: a nightly toolchain
/// when rustup has one, else stable with `RUSTC_BOOTSTRAP=1` (stable ships the sanitizer
/// runtimes).
enum Toolchain {
    Nightly,
    Stable,
}

impl Toolchain {
    fn detect() -> Self {
        let nightly = Command::new("rustup").args(["run", "nightly", "rustc", "--version"]).output();
        if nightly.is_ok_and(|o| o.status.success()) { Toolchain::Nightly } else { Toolchain::Stable }
    }

    fn describe(&self) -> &'static str {
        match self {
            Toolchain::Nightly => "the nightly toolchain",
            Toolchain::Stable => "the stable toolchain (RUSTC_BOOTSTRAP=1; no nightly installed)",
        }
    }

    fn cargo_fuzz(&self) -> Command {
        let mut cmd = match self {
            Toolchain::Nightly => {
                // rustup's `cargo` proxy, told which toolchain to run (for rustc too).
                let mut cmd = Command::new("cargo");
                cmd.env("PATH", path_with_cargo_bin()).env("RUSTUP_TOOLCHAIN", "nightly");
                cmd
            }
            Toolchain::Stable => {
                let mut cmd = cargo();
                cmd.env("RUSTC_BOOTSTRAP", "1");
                cmd
            }
        };
        cmd.current_dir(fuzz_dir()).arg("fuzz");
        cmd
    }
}

/// Part of `cargo xtask test`: formatting and clippy of the fuzz crate and of the proxy's
/// `fuzzing` module, then every target, built without sanitizers (stable, no cargo-fuzz), run
/// over its committed corpus. A panic or a hang on any file fails the test.
pub fn regression() -> Result {
    let manifest = fuzz_dir().join("Cargo.toml");
    let manifest = manifest.to_string_lossy();
    // The main workspace's target directory: the fuzz crate's dependencies are the proxy's
    // (the same lock file), so most of them are already built there.
    let target_dir = workspace_root().join("target");
    let target_dir = target_dir.to_string_lossy();
    println!("xtask: fuzz targets: cargo fmt --check, clippy -D warnings");
    run(cargo().args(["fmt", "--manifest-path", &manifest, "--", "--check"]), "formatting check of fuzz/")?;
    run(
        cargo().args(["clippy", "-p", "strait", "--features", "fuzzing", "--lib", "--", "-D", "warnings"]),
        "clippy of the proxy's fuzzing module",
    )?;
    let fuzz_cargo = |subcommand: &str| {
        let mut cmd = cargo();
        cmd.args([subcommand, "--manifest-path", &manifest, "--target-dir", &target_dir]);
        cmd
    };
    run(fuzz_cargo("clippy").args(["--all-targets", "--", "-D", "warnings"]), "clippy of fuzz/")?;
    println!("xtask: fuzz targets: build, and replay each corpus");
    run(&mut fuzz_cargo("build"), "building the fuzz targets")?;
    for target in TARGETS {
        let inputs = corpus_files(target)?;
        let binary = workspace_root().join("target").join("debug").join(target);
        replay(&binary, target, &inputs)?;
    }
    Ok(())
}

/// Given files, libFuzzer's main runs each once and exits non-zero on a crash or a hang. It
/// prints two lines per file: shown only when it fails.
fn replay(binary: &Path, target: &str, inputs: &[PathBuf]) -> Result {
    let what = format!("replaying the {} inputs of fuzz/corpus/{target}", inputs.len());
    let output = Command::new(binary)
        .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
        .args(inputs)
        .output()
        .map_err(|e| format!("{what}: cannot start {}: {e}", binary.display()))?;
    if output.status.success() {
        println!("xtask: {what}: no crash");
        return Ok(());
    }
    let log = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = log.lines().collect();
    eprintln!("{}", lines[lines.len().saturating_sub(60)..].join("\n"));
    Err(format!("{what} failed ({}): a panic on one of them is a bug to fix, its trace is above", output.status))
}

fn corpus_files(target: &str) -> Result<Vec<PathBuf>> {
    let dir = fuzz_dir().join("corpus").join(target);
    let entries = fs::read_dir(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect();
    if files.is_empty() {
        return Err(format!("{} has no inputs: every target keeps a corpus", dir.display()));
    }
    files.sort();
    Ok(files)
}
