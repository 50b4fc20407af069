//! End to end: the `strait-load` binary as a server on 127.0.0.1, and each client mode run briefly
//! against it, checking the JSON each prints. Needs no root; each test has its own server on a
//! free port, so they run in parallel (about 4 s in all).

use std::{
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_strait-load");

/// Longest any client run may take before the test fails (and kills it).
const CLIENT_LIMIT: Duration = Duration::from_secs(15);

/// A `strait-load server` child, killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    /// Starts a server on a free port and waits for its `listening on` line.
    fn start() -> Self {
        let mut child = Command::new(BIN)
            .args(["server", "--bind", "127.0.0.1", "--port", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn strait-load server");
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let addr = loop {
            let line = lines.next().expect("the server exited before listening").expect("read server stderr");
            if let Some(addr) = line.strip_prefix("listening on ") {
                break addr.parse().expect("a socket address after `listening on`");
            }
        };
        // Keep draining: a closed pipe would turn the server's next warning into a panic.
        thread::spawn(move || lines.for_each(drop));
        Self { child, addr }
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child` up to [`CLIENT_LIMIT`], killing it if it overruns; returns status, stdout, stderr.
fn finish(mut child: Child) -> (ExitStatus, String, String) {
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).map(|_| s)
    });
    let deadline = Instant::now() + CLIENT_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for client") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("strait-load did not finish within {CLIENT_LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let out = out.join().expect("stdout reader").expect("utf-8 stdout");
    let err = err.join().expect("stderr reader").expect("utf-8 stderr");
    (status, out, err)
}

fn spawn_client(args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strait-load client")
}

/// Runs a client mode to completion and returns the one JSON object it printed.
fn run_client(args: &[&str]) -> Value {
    let (status, out, err) = finish(spawn_client(args));
    assert!(status.success(), "strait-load {args:?} failed ({status}): {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line of JSON on stdout, got {out:?}");
    serde_json::from_str(lines[0]).expect("stdout is JSON")
}

fn u(report: &Value, field: &str) -> u64 {
    report[field].as_u64().unwrap_or_else(|| panic!("{field} is not an unsigned integer in {report}"))
}

fn f(report: &Value, field: &str) -> f64 {
    report[field].as_f64().unwrap_or_else(|| panic!("{field} is not a number in {report}"))
}

#[test]
fn rate_sends_the_schedule_and_reports_latency() {
    let server = Server::start();
    let report = run_client(&[
        "rate",
        "--target",
        &server.target(),
        "--rps",
        "500",
        "--duration",
        "2",
        "--connections",
        "4",
        "--warmup",
        "1",
        "--path",
        "/bytes/1024",
    ]);
    assert_eq!(report["mode"], "rate");
    assert_eq!(u(&report, "target_rps"), 500);
    // 2 s at 500 req/s after the warm-up: exactly 1000 requests are due in the window.
    assert_eq!((u(&report, "requests"), u(&report, "errors")), (1000, 0), "{report}");
    assert!((450.0..=550.0).contains(&f(&report, "achieved_rps")), "{report}");
    assert!((1.9..=2.5).contains(&f(&report, "duration_s")), "{report}");
    let percentiles: Vec<u64> =
        ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"].iter().map(|p| u(&report, p)).collect();
    assert!(percentiles[0] > 0 && percentiles.windows(2).all(|w| w[0] <= w[1]), "{report}");
    assert!(f(&report, "mean_us") > 0.0);
    let histogram = report["histogram"].as_array().expect("histogram array");
    assert!((50..=100).contains(&histogram.len()), "{} points", histogram.len());
    let points: Vec<(u64, f64)> = histogram
        .iter()
        .map(|p| (p[0].as_u64().expect("value_us"), p[1].as_f64().expect("cumulative_fraction")))
        .collect();
    assert!(points.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1), "not a CDF: {points:?}");
    assert_eq!(points.last().map(|p| (p.0, p.1)), Some((percentiles[4], 1.0)));
}

#[test]
fn connections_opens_and_closes_connections() {
    let server = Server::start();
    let report = run_client(&["connections", "--target", &server.target(), "--duration", "1", "--concurrency", "4"]);
    assert_eq!(report["mode"], "connections");
    assert!(u(&report, "connections") > 50, "{report}");
    assert_eq!(u(&report, "errors"), 0, "{report}");
    assert!(f(&report, "per_second") > 50.0, "{report}");
    assert!((1.0..=2.0).contains(&f(&report, "duration_s")), "{report}");
    assert!(0 < u(&report, "p50_us") && u(&report, "p50_us") <= u(&report, "p99_us"), "{report}");
}

#[test]
fn stream_delivers_every_byte() {
    let server = Server::start();
    let report = run_client(&["stream", "--target", &server.target(), "--bytes", "64M", "--streams", "2"]);
    assert_eq!(report["mode"], "stream");
    assert_eq!((u(&report, "streams"), u(&report, "bytes")), (2, 64 << 20));
    assert!(f(&report, "gbit_per_s") > 0.0 && f(&report, "duration_s") > 0.0, "{report}");
}

#[test]
fn hold_keeps_connections_until_sigterm() {
    let server = Server::start();
    let ready = std::env::temp_dir().join(format!("strait-load-hold-{}", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let child = spawn_client(&[
        "hold",
        "--target",
        &server.target(),
        "--count",
        "100",
        "--ready-file",
        ready.to_str().expect("utf-8 temp path"),
    ]);
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    let announced = wait_for_file(&ready, Duration::from_secs(10));
    // SAFETY: kill only sends a signal, to the child this test spawned and has not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = std::fs::remove_file(&ready);
    assert_eq!(announced.as_deref(), Some("holding 100"));
    let (status, out, err) = finish(child);
    assert!(status.success(), "hold failed ({status}): {err}");
    let report: Value = serde_json::from_str(out.trim()).expect("stdout is JSON");
    assert_eq!(report["mode"], "hold");
    assert_eq!((u(&report, "open"), u(&report, "failed"), u(&report, "closed_by_peer")), (100, 0, 0), "{report}");
}

#[test]
fn an_unreachable_target_fails_with_a_message_and_no_json() {
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let target = format!("127.0.0.1:{port}");
    let (status, out, err) =
        finish(spawn_client(&["rate", "--target", &target, "--rps", "10", "--duration", "1", "--warmup", "0"]));
    assert!(!status.success());
    assert!(out.is_empty(), "no JSON on failure: {out}");
    assert!(err.contains("could not open connection") && err.contains(&target), "{err}");
}

/// The file's content once it exists, polling until `limit`.
fn wait_for_file(path: &PathBuf, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(content) = std::fs::read_to_string(path) {
            return Some(content);
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}
