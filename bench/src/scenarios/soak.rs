//! The soak (`cargo xtask soak`): 1,000 req/s for N minutes through both node proxies and the
//! waypoint, with connection churn, checking that no request fails and no proxy grows.
//!
//! The bench's topology and `strait-load rate` carry it: keep-alive connections where every
//! tenth request closes its connection, so about 100 new connections a second cross every
//! proxy next to the reused ones. Each proxy's RSS and open descriptors are sampled once it is
//! warm and again just before the load ends; a leak of memory or of connections shows as the
//! difference.

use std::{
    collections::VecDeque,
    fs,
    io::{BufRead as _, BufReader},
    path::Path as FsPath,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::Value;
use strait_testbed::{Process, bin_path};

use super::{Bed, procfs, waypoint};

/// The request rate, and how often a connection closes: 1 request in 10 on a connection that
/// closes after it, so a tenth of the requests open a fresh connection.
const RPS: u64 = 1000;
const CLOSE_EVERY: &str = "10";
/// RSS may differ by this fraction between the start and the end.
const RSS_TOLERANCE: f64 = 0.05;
/// Samples taken one second apart at each end: descriptors come and go with connections in
/// flight, so a window shows their range rather than one instant.
const SAMPLES: usize = 5;

/// One proxy's figures at the start and the end.
#[derive(Debug, Serialize)]
pub struct ProxyFigures {
    pub proxy: String,
    pub rss_start_bytes: u64,
    pub rss_end_bytes: u64,
    /// Open descriptors at the start and the end: (fewest, most) over the sampling window.
    pub fds_start: (usize, usize),
    pub fds_end: (usize, usize),
}

impl ProxyFigures {
    fn rss_change(&self) -> f64 {
        self.rss_end_bytes as f64 / self.rss_start_bytes.max(1) as f64 - 1.0
    }

    /// A leak raises the floor of the window; connections in flight only move within it.
    fn fds_grew(&self) -> bool {
        self.fds_end.0 > self.fds_start.1
    }
}

/// What the soak measured, and whether it passed.
#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub minutes: u64,
    pub target_rps: u64,
    pub achieved_rps: f64,
    pub requests: u64,
    pub errors: u64,
    /// Connections the client opened beyond its first 8 (the churn).
    pub new_connections: u64,
    pub p99_us: u64,
    /// The first failed request's error, as the client saw it.
    pub first_error: Option<String>,
    /// When the start samples were taken, seconds into the run.
    pub start_sample_s: u64,
    pub proxies: Vec<ProxyFigures>,
    /// The last warnings and errors each proxy logged, when requests failed.
    pub proxy_warnings: Vec<String>,
    pub failures: Vec<String>,
}

impl SoakReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn markdown(&self) -> String {
        let mut text = format!(
            "## Soak: {} min at {} req/s through node proxies and the waypoint\n\n\
             {} requests ({:.1} req/s), {} errors, {} new connections, p99 {:.2} ms; start samples at {} s\n\n\
             | Proxy | RSS start | RSS end | Change | Descriptors start | Descriptors end |\n|---|---|---|---|---|---|\n",
            self.minutes,
            self.target_rps,
            self.requests,
            self.achieved_rps,
            self.errors,
            self.new_connections,
            self.p99_us as f64 / 1000.0,
            self.start_sample_s,
        );
        for p in &self.proxies {
            text.push_str(&format!(
                "| {} | {:.1} MiB | {:.1} MiB | {:+.1} % | {}-{} | {}-{} |\n",
                p.proxy,
                p.rss_start_bytes as f64 / 1048576.0,
                p.rss_end_bytes as f64 / 1048576.0,
                100.0 * p.rss_change(),
                p.fds_start.0,
                p.fds_start.1,
                p.fds_end.0,
                p.fds_end.1,
            ));
        }
        text.push_str(if self.passed() { "\nPASSED\n" } else { "\nFAILED:\n" });
        for failure in &self.failures {
            text.push_str(&format!("- {failure}\n"));
        }
        if let Some(first) = &self.first_error {
            text.push_str(&format!("\nFirst failed request: {first}\n"));
        }
        if !self.proxy_warnings.is_empty() {
            text.push_str(&format!("\nThe proxies' last warnings:\n```\n{}\n```\n", self.proxy_warnings.join("\n")));
        }
        text
    }
}

/// Runs the soak for `minutes` and judges it.
pub fn run(bed: &Bed, minutes: u64) -> anyhow::Result<SoakReport> {
    let wp = bed.waypoint()?;
    let mut processes: Vec<(String, &Process)> =
        bed.proxies.iter().enumerate().map(|(i, p)| (format!("strait node (node {})", i + 1), p)).collect();
    processes.push(("strait waypoint".into(), &wp.process));
    let proxies: Vec<(String, u32)> = processes.iter().map(|(name, p)| (name.clone(), p.pid())).collect();

    let total = Duration::from_secs(minutes * 60);
    // Warm: pools, caches and allocator arenas at their working size. A tenth of the run,
    // at least 20 s, at most 2 min.
    let warm = (total / 10).clamp(Duration::from_secs(20), Duration::from_secs(120));
    let end_sample = total.saturating_sub(Duration::from_secs(SAMPLES as u64 + 5));
    if end_sample <= warm + Duration::from_secs(SAMPLES as u64) {
        bail!("{minutes} minute(s) is too short for a soak: give at least 2");
    }
    let args = [
        "rate",
        "--rps",
        &RPS.to_string(),
        "--duration",
        &total.as_secs().to_string(),
        "--warmup",
        "0",
        "--connections",
        "8",
        "--close-every",
        CLOSE_EVERY,
        "--target",
        &waypoint::target(),
    ];
    let started = Instant::now();
    let load = bed.client.spawn("soak-load", bin_path("strait-load"), &args, &[])?;

    sleep_until(started + warm);
    let start = sample(&proxies);
    eprintln!("strait-bench: soak warm after {} s; sampled the start", warm.as_secs());
    sleep_until(started + end_sample);
    let end = sample(&proxies);
    let status = load.wait_exit(total + Duration::from_secs(60)).context("strait-load did not finish")?;
    let log = load.log();
    let result: Value =
        log.lines().find(|l| l.starts_with('{')).and_then(|l| serde_json::from_str(l).ok()).with_context(|| {
            format!("strait-load ({status}) printed no result; its log ends with:\n{}", load.log_tail())
        })?;

    let u = |key: &str| result.get(key).and_then(Value::as_u64).unwrap_or(0);
    let mut report = SoakReport {
        minutes,
        target_rps: RPS,
        achieved_rps: result.get("achieved_rps").and_then(Value::as_f64).unwrap_or(0.0),
        requests: u("requests"),
        errors: u("errors"),
        new_connections: u("reconnects"),
        p99_us: u("p99_us"),
        first_error: result.get("first_error").and_then(Value::as_str).map(str::to_owned),
        start_sample_s: warm.as_secs(),
        proxies: proxies
            .iter()
            .zip(start.into_iter().zip(end))
            .map(|((name, _), (s, e))| ProxyFigures {
                proxy: name.clone(),
                rss_start_bytes: s.rss,
                rss_end_bytes: e.rss,
                fds_start: s.fds,
                fds_end: e.fds,
            })
            .collect(),
        proxy_warnings: Vec::new(),
        failures: Vec::new(),
    };
    report.failures = judge(&report);
    if report.errors > 0 {
        report.proxy_warnings = processes.iter().flat_map(|(name, p)| warnings(name, p)).collect();
    }
    Ok(report)
}

/// Writes `soak.json` and `soak.md` in `out`.
pub fn write(out: &FsPath, report: &SoakReport) -> anyhow::Result<()> {
    fs::write(out.join("soak.json"), serde_json::to_string_pretty(report)?)?;
    fs::write(out.join("soak.md"), report.markdown())?;
    Ok(())
}

/// What failed: any request, a proxy's RSS beyond the tolerance, descriptors beyond the start's
/// range.
fn judge(report: &SoakReport) -> Vec<String> {
    let mut failures = Vec::new();
    if report.errors > 0 {
        failures.push(format!("{} requests failed", report.errors));
    }
    if report.requests == 0 {
        failures.push("no request completed".into());
    }
    for p in &report.proxies {
        if p.rss_change().abs() > RSS_TOLERANCE {
            failures.push(format!("{}: RSS changed by {:+.1} % (limit 5 %)", p.proxy, 100.0 * p.rss_change()));
        }
        if p.fds_grew() {
            failures.push(format!("{}: descriptors grew from {:?} to {:?}", p.proxy, p.fds_start, p.fds_end));
        }
        if p.rss_start_bytes == 0 || p.rss_end_bytes == 0 {
            failures.push(format!("{}: the process was gone when sampled", p.proxy));
        }
    }
    failures
}

struct Sample {
    /// Median RSS over the window, bytes.
    rss: u64,
    fds: (usize, usize),
}

/// `SAMPLES` readings one second apart of every proxy.
fn sample(proxies: &[(String, u32)]) -> Vec<Sample> {
    let mut readings: Vec<Vec<(u64, usize)>> = vec![Vec::new(); proxies.len()];
    for i in 0..SAMPLES {
        if i > 0 {
            thread::sleep(Duration::from_secs(1));
        }
        for (reading, (_, pid)) in readings.iter_mut().zip(proxies) {
            reading.push((procfs::rss_bytes(*pid), procfs::open_fds(*pid)));
        }
    }
    readings
        .into_iter()
        .map(|r| {
            let mut rss: Vec<u64> = r.iter().map(|(rss, _)| *rss).collect();
            rss.sort_unstable();
            let fds = r.iter().map(|(_, fds)| *fds);
            Sample { rss: rss[rss.len() / 2], fds: (fds.clone().min().unwrap_or(0), fds.max().unwrap_or(0)) }
        })
        .collect()
}

/// The last warnings and errors in a proxy's log, read line by line: the waypoint's holds an
/// access line per request, hundreds of megabytes after a long soak.
fn warnings(name: &str, process: &Process) -> Vec<String> {
    let Ok(file) = fs::File::open(process.log_path()) else { return Vec::new() };
    let mut last = VecDeque::new();
    for line in BufReader::new(file).lines().map_while(Result::ok) {
        if line.contains(" WARN ") || line.contains(" ERROR ") {
            if last.len() == 10 {
                last.pop_front();
            }
            last.push_back(format!("{name}: {line}"));
        }
    }
    last.into()
}

fn sleep_until(at: Instant) {
    thread::sleep(at.saturating_duration_since(Instant::now()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxy(rss: (u64, u64), fds_start: (usize, usize), fds_end: (usize, usize)) -> ProxyFigures {
        ProxyFigures { proxy: "p".into(), rss_start_bytes: rss.0, rss_end_bytes: rss.1, fds_start, fds_end }
    }

    fn report(proxies: Vec<ProxyFigures>, errors: u64) -> SoakReport {
        SoakReport {
            minutes: 3,
            target_rps: 1000,
            achieved_rps: 1000.0,
            requests: 180_000,
            errors,
            new_connections: 18_000,
            p99_us: 900,
            first_error: None,
            start_sample_s: 20,
            proxies,
            proxy_warnings: Vec::new(),
            failures: Vec::new(),
        }
    }

    #[test]
    fn growth_beyond_the_tolerance_or_the_start_range_fails() {
        let steady = proxy((20 << 20, (20 << 20) + (1 << 19)), (30, 36), (31, 35));
        assert!(judge(&report(vec![steady], 0)).is_empty());
        let grown = proxy((20 << 20, 22 << 20), (30, 36), (37, 40));
        let failures = judge(&report(vec![grown], 3));
        assert_eq!(failures.len(), 3, "{failures:?}");
        assert!(failures[0].contains("3 requests failed") && failures[1].contains("+10.0 %"), "{failures:?}");
    }
}
