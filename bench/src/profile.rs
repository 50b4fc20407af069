//! `--profile`: `perf record` on proxy processes for the length of one load run, then each
//! recording folded and drawn as a flame graph (`flame-<label>.svg` and `.folded`) beside
//! report.md, with its busiest functions for the report. perf missing or failing costs the
//! profiles, never the benchmark: every failure becomes a line of the report.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::flame;

/// Sampling rate: 999 Hz rather than 1,000 so sampling does not run in lockstep with the
/// load generator's 1 ms schedule; about 70 samples per second of a node proxy at 1,000 req/s.
const HZ: u32 = 999;
/// perf records the call stack by copying this many bytes of each sampled thread's stack and
/// unwinding them with the binary's DWARF tables afterwards. Release builds have `debug = 1`
/// and no frame pointers: with `-g` (frame pointers) every Rust stack measured here ended one
/// frame above the leaf (`strait::hbone::stream::copy::{{closure}}` then garbage). With DWARF,
/// the share of samples unwound to the thread's start (`clone3`), node 1 / node 2 proxy: 16 KiB
/// 27 % of node 2's; 32 KiB 100 % / 54 % (the HBONE server's h2 and rustls frames are large),
/// the waypoint 48 %; 65,528 bytes (perf's most) 100 % of node 2's. That costs 30 MB of data
/// per 500 samples, removed once folded, and perf's own CPU is too small to see at 70–200
/// samples/s; a stack cut short would draw its frames as a second tower beside the first.
const CALL_GRAPH: &str = "dwarf,65528";
/// How long perf may take to write its data after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `perf script` may take before it is run again without resolving inlined frames
/// (which it does by asking an `addr2line` process about every address; see [`Symbolizer`]).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
/// Functions listed per profile in the report.
const TOP: usize = 10;

/// What one recording gave: file names (relative to report.md) and the figures the report
/// shows. Shares are fractions of the profile's samples.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    /// "node1-mesh", "waypoint", …: the files are flame-<label>.svg and .folded.
    pub label: String,
    /// What was profiled during which run, for people.
    pub title: String,
    pub svg: String,
    pub folded: String,
    pub samples: u64,
    /// CPU the samples stand for: samples / rate / run length.
    pub vcpu: f64,
    pub top_inclusive: Vec<(String, f64)>,
    pub top_self: Vec<(String, f64)>,
    pub areas: Vec<(String, f64)>,
    /// What perf said about the recording that a reader should know (lost samples).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// A run recorded with perf and what its load generator measured, so the cost of profiling
/// shows beside the unprofiled figures.
#[derive(Debug, Clone, Serialize)]
pub struct ProfiledRun {
    pub path: String,
    pub p50_us: f64,
    pub p99_us: f64,
    pub achieved_rps: f64,
}

/// The report's "Profiles" section.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Profiles {
    pub runs: Vec<ProfiledRun>,
    pub profiles: Vec<Profile>,
    /// Why a profile (or all) is missing.
    pub problems: Vec<String>,
}

/// perf as this machine has it: checked once before the first recording.
pub fn check() -> Result<(), String> {
    match Command::new("perf").arg("--version").stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!("`perf --version` failed: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => Err(format!("cannot run perf ({e}); install it (Debian: linux-perf)")),
    }
}

/// Kernel symbols are hidden from everyone, root included, when `kernel.kptr_restrict` is 2;
/// this lowers it to 1 (root sees them) while it lives and puts the old value back.
pub struct KernelSymbols {
    restore: Option<String>,
}

const KPTR_RESTRICT: &str = "/proc/sys/kernel/kptr_restrict";

impl KernelSymbols {
    pub fn visible() -> KernelSymbols {
        let old = fs::read_to_string(KPTR_RESTRICT).unwrap_or_default().trim().to_owned();
        if old == "2" && fs::write(KPTR_RESTRICT, "1").is_ok() {
            return KernelSymbols { restore: Some(old) };
        }
        KernelSymbols { restore: None }
    }
}

impl Drop for KernelSymbols {
    fn drop(&mut self) {
        if let Some(old) = self.restore.take() {
            let _ = fs::write(KPTR_RESTRICT, old);
        }
    }
}

/// `perf record` attached to one process.
pub struct Recording {
    label: String,
    title: String,
    child: Child,
    data: PathBuf,
    log: PathBuf,
    started: Instant,
}

/// Removes the flame graphs of an earlier run, so none is taken for this one's.
pub fn clear(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with("flame-") {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Starts recording `pid` into `<dir>/flame-<label>.perf.data`.
pub fn start(dir: &Path, label: &str, title: &str, pid: u32) -> Result<Recording, String> {
    let data = dir.join(format!("flame-{label}.perf.data"));
    let log = dir.join(format!("flame-{label}.perf.log"));
    let _ = fs::remove_file(&data);
    let out = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new("perf")
        .args(["record", "-F", &HZ.to_string(), "--call-graph", CALL_GRAPH, "-p", &pid.to_string(), "-o"])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start perf record for {title}: {e}"))?;
    Ok(Recording { label: label.into(), title: title.into(), child, data, log, started: Instant::now() })
}

/// Waits until perf has attached to every process (it says nothing when it has, so give it a
/// moment), or returns why a recording already ended.
pub fn settle(recordings: &mut Vec<Recording>) -> Vec<String> {
    thread::sleep(Duration::from_millis(300));
    let mut problems = Vec::new();
    recordings.retain_mut(|r| match r.child.try_wait() {
        Ok(Some(status)) => {
            problems.push(format!("perf record for {} ended at once ({status}): {}", r.title, r.log_tail()));
            false
        }
        _ => true,
    });
    problems
}

impl Recording {
    /// Stops perf (SIGINT, as at a terminal: it writes its data and exits) and waits for it.
    /// Every recording of a run is stopped before any is processed, so none goes on sampling
    /// an idle proxy while `perf script` runs for another.
    pub fn stop(mut self) -> Result<Stopped, String> {
        let elapsed = self.started.elapsed();
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: a signal to our own child, not yet reaped (try_wait saw it running).
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        }
        let stopped = Stopped {
            label: self.label.clone(),
            title: self.title.clone(),
            data: self.data.clone(),
            log: self.log.clone(),
            elapsed,
        };
        match wait(&mut self.child, STOP_TIMEOUT) {
            Some(_) => Ok(stopped),
            None => Err(format!("perf record for {} did not finish writing within 60 s", self.title)),
        }
    }
}

/// Waits up to `timeout` for `child`; kills it if it has not exited by then (`None`).
fn wait(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// A finished recording, its data not yet read.
pub struct Stopped {
    label: String,
    title: String,
    data: PathBuf,
    log: PathBuf,
    /// How long perf recorded.
    elapsed: Duration,
}

impl Stopped {
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(3)..].join(" / ")
    }

    /// `perf script` of the data, with inlined frames when `inline`; `None` if it did not end
    /// within [`SCRIPT_TIMEOUT`]. Its output goes to a file, not a pipe: tens of MB.
    fn script(&self, symbolizer: Option<&Path>, inline: bool) -> Result<Option<String>, String> {
        let text = self.data.with_extension("script");
        let io = |e: std::io::Error| format!("perf script for {}: {e}", self.title);
        let out = fs::File::create(&text).map_err(io)?;
        let err = fs::OpenOptions::new().append(true).create(true).open(&self.log).map_err(io)?;
        let mut command = Command::new("perf");
        command.args(["script", "-i"]).arg(&self.data).stdin(Stdio::null()).stdout(out).stderr(err);
        if !inline {
            command.arg("--no-inline");
        }
        if let Some(bin) = symbolizer {
            command.env("PATH", path_with(bin));
        }
        let mut child = command.spawn().map_err(io)?;
        let status = wait(&mut child, SCRIPT_TIMEOUT);
        let output = fs::read(&text).map_err(io);
        let _ = fs::remove_file(&text);
        match status {
            None => Ok(None),
            Some(status) if status.success() => Ok(Some(String::from_utf8_lossy(&output?).into_owned())),
            Some(status) => Err(format!("perf script for {} failed ({status}): {}", self.title, self.log_tail())),
        }
    }

    /// Turns the data into the profile's files, then removes it (tens of MB per run: the folded
    /// stacks keep what the report uses).
    pub fn finish(self, dir: &Path, symbolizer: Option<&Path>) -> Result<Profile, String> {
        let mut notes = Vec::new();
        let script = match self.script(symbolizer, true) {
            Ok(Some(text)) => Ok(text),
            Ok(None) => {
                notes.push(format!(
                    "inlined frames not resolved (perf script took over {} s with them)",
                    SCRIPT_TIMEOUT.as_secs()
                ));
                self.script(symbolizer, false)
                    .and_then(|t| t.ok_or_else(|| format!("perf script for {} timed out", self.title)))
            }
            Err(e) => Err(e),
        };
        let _ = fs::remove_file(&self.data);
        let folded = flame::fold(&script?);
        let samples = folded.samples();
        if samples == 0 {
            return Err(format!("perf recorded no samples of {} ({})", self.title, self.log_tail()));
        }
        let (svg, folded_name) = (format!("flame-{}.svg", self.label), format!("flame-{}.folded", self.label));
        let title = format!("{} ({samples} samples at {HZ} Hz)", self.title);
        fs::write(dir.join(&svg), flame::svg(&folded, &title)).map_err(|e| format!("{svg}: {e}"))?;
        fs::write(dir.join(&folded_name), folded.text()).map_err(|e| format!("{folded_name}: {e}"))?;
        let share = |list: Vec<(String, u64)>| -> Vec<(String, f64)> {
            list.into_iter().map(|(name, n)| (name, n as f64 / samples as f64)).collect()
        };
        let (inclusive, leaf) = folded.top(TOP);
        let areas = folded.areas().into_iter().map(|(name, n)| (name.to_owned(), n)).collect();
        // perf's own words on the recording: lost samples are the one thing that skews it.
        let said = fs::read_to_string(&self.log).unwrap_or_default();
        notes.extend(said.lines().find(|l| l.to_lowercase().contains("lost")).map(|l| l.trim().to_owned()));
        let _ = fs::remove_file(&self.log);
        Ok(Profile {
            label: self.label.clone(),
            title: self.title.clone(),
            svg,
            folded: folded_name,
            samples,
            vcpu: samples as f64 / f64::from(HZ) / self.elapsed.as_secs_f64(),
            top_inclusive: share(inclusive),
            top_self: share(leaf),
            areas: share(areas),
            warning: (!notes.is_empty()).then(|| notes.join("; ")),
        })
    }
}

impl Recording {
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(3)..].join(" / ")
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A directory whose `addr2line` is LLVM's, for `perf script`: this perf (6.1, no libbfd)
/// resolves inlined frames by asking an `addr2line` process about each address and waiting for
/// its reply. On 562 samples of a node proxy: binutils' 42 s (mostly waiting), llvm-addr2line
/// 14 over 100 s (killed), llvm-addr2line 22 1.3 s, same output. So the newest LLVM's, and
/// `None` (binutils' then) when there is none; [`SCRIPT_TIMEOUT`] covers a slow one.
pub struct Symbolizer {
    dir: PathBuf,
}

impl Symbolizer {
    pub fn find(dir: &Path) -> Option<Symbolizer> {
        let version = |p: &Path| -> u32 {
            let digits: String = p.to_string_lossy().chars().filter(char::is_ascii_digit).collect();
            digits.parse().unwrap_or(0)
        };
        let llvm = fs::read_dir("/usr/lib")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("llvm-"))
            .map(|e| e.path().join("bin/llvm-addr2line"))
            .filter(|p| p.exists())
            .max_by_key(|p| version(p))?;
        let dir = dir.join(".addr2line");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).ok()?;
        std::os::unix::fs::symlink(&llvm, dir.join("addr2line")).ok()?;
        Some(Symbolizer { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Symbolizer {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn path_with(first: &Path) -> std::ffi::OsString {
    let mut dirs = vec![first.to_path_buf()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

/// The report's section: the profiled runs' own latency (perf's cost), then per profile its
/// files, samples, areas and busiest functions.
pub fn markdown(section: &Profiles) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("\n## Profiles\n\n");
    out.push_str(&format!(
        "`perf record -F {HZ} --call-graph {CALL_GRAPH}` on each proxy, user and kernel stacks, during extra \
         1,000 req/s runs made after the measured ones: the figures above are not profiled. perf costs the \
         proxies a little; the profiled runs measured:\n\n"
    ));
    for run in &section.runs {
        let _ = writeln!(
            out,
            "- {}: p50 {:.0} µs, p99 {:.0} µs, {:.0} req/s achieved",
            run.path, run.p50_us, run.p99_us, run.achieved_rps
        );
    }
    for problem in &section.problems {
        let _ = writeln!(out, "- no profile: {problem}");
    }
    for p in &section.profiles {
        let _ = writeln!(
            out,
            "\n### {}\n\n[{}]({}) ([folded stacks]({})): {} samples, about {:.3} vCPU.{}\n",
            p.title,
            p.svg,
            p.svg,
            p.folded,
            p.samples,
            p.vcpu,
            p.warning.as_ref().map_or(String::new(), |w| format!(" perf: {w}."))
        );
        let areas: Vec<String> =
            p.areas.iter().filter(|(_, s)| *s > 0.0).map(|(name, s)| format!("{name} {:.1} %", 100.0 * s)).collect();
        let _ = writeln!(out, "Samples by area: {}.\n", areas.join("; "));
        out.push_str(
            "| # | Inclusive (runtime plumbing left out) | Share | Self (leaf) | Share |\n|---:|---|---:|---|---:|\n",
        );
        for i in 0..p.top_inclusive.len().max(p.top_self.len()) {
            let cell = |list: &[(String, f64)]| {
                list.get(i).map_or(("".into(), "".into()), |(name, s)| {
                    (format!("`{}`", name.replace('|', "\\|").replace('`', "'")), format!("{:.1} %", 100.0 * s))
                })
            };
            let ((inc, inc_share), (own, own_share)) = (cell(&p.top_inclusive), cell(&p.top_self));
            let _ = writeln!(out, "| {} | {inc} | {inc_share} | {own} | {own_share} |", i + 1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_links_files_and_lists_shares() {
        let section = Profiles {
            runs: vec![ProfiledRun { path: "node path".into(), p50_us: 250.4, p99_us: 900.0, achieved_rps: 1000.0 }],
            profiles: vec![Profile {
                label: "node1-mesh".into(),
                title: "node 1 proxy, node path".into(),
                svg: "flame-node1-mesh.svg".into(),
                folded: "flame-node1-mesh.folded".into(),
                samples: 2000,
                vcpu: 0.067,
                top_inclusive: vec![("a|b".into(), 0.5)],
                top_self: vec![("c".into(), 0.25), ("d".into(), 0.125)],
                areas: vec![("kernel".into(), 0.5), ("none".into(), 0.0)],
                warning: None,
            }],
            problems: vec!["the waypoint was not running".into()],
        };
        let md = markdown(&section);
        assert!(md.contains("- node path: p50 250 µs, p99 900 µs, 1000 req/s achieved"), "{md}");
        assert!(
            md.contains(
                "[flame-node1-mesh.svg](flame-node1-mesh.svg) ([folded stacks](flame-node1-mesh.folded)): 2000 samples"
            ),
            "{md}"
        );
        assert!(md.contains("| 1 | `a\\|b` | 50.0 % | `c` | 25.0 % |"), "{md}");
        assert!(md.contains("| 2 |  |  | `d` | 12.5 % |"), "{md}");
        assert!(md.contains("Samples by area: kernel 50.0 %.") && !md.contains("none"), "{md}");
        assert!(md.contains("- no profile: the waypoint was not running"), "{md}");
    }
}
