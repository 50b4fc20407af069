//! Traffic from and to pods: curl as the client, `strait-echo` as the server.
//!
//! Clients run through `ip netns exec`, so what a test sees is what a process in the pod would
//! see, capture and policy included.

use std::fmt::Display;
use std::fs;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::bins::require_bin;
use crate::process::Process;
use crate::topology::{Pod, log_name};

/// What curl saw. Failures to connect are results too (`status` 0, curl's message in
/// `stderr`), since tests assert on them: a denied connection is often the expected outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurlResult {
    /// The HTTP status, 0 when no response arrived.
    pub status: u16,
    /// The body as text (invalid UTF-8 replaced); see `body_bytes` for binary bodies.
    pub body: String,
    pub body_bytes: Vec<u8>,
    pub stderr: String,
    /// curl's exit code (7 could not connect, 28 timeout, 52 empty reply, 56 reset), if any.
    pub exit_code: Option<i32>,
}

impl CurlResult {
    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Which server `strait-echo` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EchoKind {
    /// HTTP/1.1 server answering `hello from <pod> peer=... local=...` (see the `echo` module).
    Http,
    /// TCP echo, for `strait-echo send` and `hold`.
    Tcp,
}

/// Default for `curl_args`, which has no timeout argument: a hung test is worse than a failed one.
const DEFAULT_CURL_TIMEOUT: &str = "10";
/// How long an echo server gets to start listening.
const ECHO_START_TIMEOUT: Duration = Duration::from_secs(10);

impl Pod {
    /// `curl -sS --max-time <timeout> <url>` from inside the pod.
    pub fn curl(&self, url: &str, timeout: Duration) -> io::Result<CurlResult> {
        self.curl_args(&["--max-time", &format!("{:.3}", timeout.as_secs_f64()), url])
    }

    /// curl from inside the pod with custom arguments (URL included), e.g.
    /// `["-H", "x-user: a", "-X", "POST", url]`. Adds `--max-time 10` unless `extra` sets one.
    pub fn curl_args(&self, extra: &[&str]) -> io::Result<CurlResult> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let body_path = self.netns().dir().join(format!("curl-{}.body", SEQ.fetch_add(1, Ordering::Relaxed)));
        let body_arg = body_path.to_string_lossy().into_owned();
        // curl uses the last --max-time it is given, so `extra` can override this one.
        let mut args = vec!["-sS", "-o", &body_arg, "-w", "%{http_code}", "--max-time", DEFAULT_CURL_TIMEOUT];
        args.extend_from_slice(extra);
        let output = self.run("curl", &args)?;
        // No file when no response came: an empty body then.
        let body_bytes = fs::read(&body_path).unwrap_or_default();
        let _ = fs::remove_file(&body_path);
        Ok(CurlResult {
            status: String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or(0),
            body: String::from_utf8_lossy(&body_bytes).into_owned(),
            body_bytes,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            exit_code: output.status.code(),
        })
    }

    /// Starts `strait-echo` in the pod on `port` and returns once the port accepts connections.
    pub fn start_echo_server(&self, kind: EchoKind, port: u16) -> io::Result<Process> {
        let echo = require_bin("strait-echo")?;
        let port_arg = port.to_string();
        let (mode, args): (&str, Vec<&str>) = match kind {
            EchoKind::Http => ("http", vec!["http", &port_arg, "--name", self.name()]),
            EchoKind::Tcp => ("tcp", vec!["tcp", &port_arg]),
        };
        let log = log_name(&["echo", mode, self.name(), &port_arg]);
        let process = self.spawn(&log, &echo, &args, &[])?;
        process.wait_for_log("listening on", ECHO_START_TIMEOUT)?;
        let deadline = Instant::now() + ECHO_START_TIMEOUT;
        let target = format!("127.0.0.1:{port}");
        while !self.can_connect(&target, Duration::from_millis(200))? {
            if Instant::now() >= deadline || !process.is_running() {
                return Err(io::Error::other(format!(
                    "echo server in pod {} does not accept connections on {target}; its log:\n{}",
                    self.name(),
                    process.log_tail()
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(process)
    }

    /// Whether a TCP connection from the pod to `target` (`ip:port`) succeeds within `timeout`.
    pub fn can_connect(&self, target: impl Display, timeout: Duration) -> io::Result<bool> {
        let echo = require_bin("strait-echo")?;
        let target = target.to_string();
        let millis = timeout.as_millis().to_string();
        let output = self.run(&echo, &["probe", &target, "--timeout-ms", &millis])?;
        Ok(output.status.success())
    }
}
