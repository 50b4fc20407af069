//! Traffic from and to pods: curl and `strait-echo`'s clients as clients, `strait-echo` as the
//! server.
//!
//! Clients run through `ip netns exec`, so what a test sees is what a process in the pod would
//! see, capture and policy included. `strait-echo`'s clients print one JSON object, read back
//! here into the types the `echo` module defines.

use std::fmt::Display;
use std::fs;
use std::io;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::bins::require_bin;
use crate::echo::abuse::AbuseReport;
use crate::echo::client::GetSummary;
use crate::echo::grpc::GrpcReply;
use crate::echo::rapid_reset::RapidResetReport;
use crate::echo::websocket::WsReport;
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
    /// Response headers of the last response, names lower case, in order.
    pub headers: Vec<(String, String)>,
    pub stderr: String,
    /// curl's exit code (7 could not connect, 28 timeout, 52 empty reply, 56 reset), if any.
    pub exit_code: Option<i32>,
}

impl CurlResult {
    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first response header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Header lines of the last response in a `curl -D` dump (redirects and 100-continue add
/// earlier blocks).
fn parse_header_dump(dump: &str) -> Vec<(String, String)> {
    let last = dump.split("\r\n\r\n").filter(|b| !b.trim().is_empty()).last().unwrap_or("");
    last.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect()
}

/// Which server `strait-echo` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EchoKind {
    /// HTTP/1.1 server answering `hello from <name> peer=... local=...`, with `x-served-by:
    /// <name>` and WebSocket echo (see the `echo::http` module).
    Http,
    /// TCP echo, for `strait-echo send` and `hold`.
    Tcp,
    /// gRPC over h2c, `/strait.test.Echo/Say` answering `<name>: <message>` (see `echo::grpc`).
    Grpc,
}

/// A `strait-echo` server about to start in a pod; see [`Pod::echo_server`].
#[derive(Debug)]
#[must_use = "an echo server only starts with .start()"]
pub struct EchoServer<'a> {
    pod: &'a Pod,
    kind: EchoKind,
    port: u16,
    /// The pod's name unless set.
    name: Option<String>,
    delay: Duration,
    http10: bool,
}

impl EchoServer<'_> {
    /// The name the server answers with and sends in `x-served-by`, e.g. `reviews-v2`.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }

    /// Delays every response by `delay` (`--delay-ms`): a slow version of a service.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Answers as an HTTP/1.0 server (`--http-version 1.0`): status line `HTTP/1.0`,
    /// `connection: close`, one request per connection.
    pub fn http10(mut self) -> Self {
        self.http10 = true;
        self
    }

    /// Starts the server and returns once its port accepts connections.
    pub fn start(self) -> io::Result<Process> {
        let pod = self.pod;
        let echo = require_bin("strait-echo")?;
        let port_arg = self.port.to_string();
        let name = self.name.as_deref().unwrap_or(pod.name());
        let delay_arg = self.delay.as_millis().to_string();
        let args: Vec<&str> = match self.kind {
            EchoKind::Tcp if self.name.is_some() || !self.delay.is_zero() || self.http10 => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "a TCP echo server has no name or delay"));
            }
            EchoKind::Tcp => vec!["tcp", &port_arg],
            EchoKind::Http | EchoKind::Grpc => {
                let mode = if self.kind == EchoKind::Http { "http" } else { "grpc" };
                let mut args = vec![mode, &port_arg, "--name", name];
                if !self.delay.is_zero() {
                    args.extend(["--delay-ms", &delay_arg]);
                }
                if self.http10 {
                    args.extend(["--http-version", "1.0"]);
                }
                args
            }
        };
        let log = log_name(&["echo", args[0], pod.name(), &port_arg]);
        let process = pod.spawn(&log, &echo, &args, &[])?;
        process.wait_for_log("listening on", ECHO_START_TIMEOUT)?;
        let deadline = Instant::now() + ECHO_START_TIMEOUT;
        let target = format!("127.0.0.1:{}", self.port);
        while !pod.can_connect(&target, Duration::from_millis(200))? {
            if Instant::now() >= deadline || !process.is_running() {
                return Err(io::Error::other(format!(
                    "echo server in pod {} does not accept connections on {target}; its log:\n{}",
                    pod.name(),
                    process.log_tail()
                )));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(process)
    }
}

/// Default for `curl_args`, which has no timeout argument: a hung test is worse than a failed one.
const DEFAULT_CURL_TIMEOUT: &str = "10";
/// How long an echo server gets to start listening.
const ECHO_START_TIMEOUT: Duration = Duration::from_secs(10);

impl Pod {
    /// Starts `strait-echo dns` on port 53 of the pod, answering each `name=ip` of `records`
    /// (the stand-in for a cluster's or the Internet's DNS), once it serves.
    pub fn start_dns(&self, records: &[String]) -> io::Result<Process> {
        let mut args = vec!["dns", "53"];
        for record in records {
            args.extend(["--record", record.as_str()]);
        }
        let server = self.spawn("dns", require_bin("strait-echo")?, &args, &[])?;
        server.wait_for_log("dns serving", ECHO_START_TIMEOUT)?;
        Ok(server)
    }

    /// `curl -sS --max-time <timeout> <url>` from inside the pod.
    pub fn curl(&self, url: &str, timeout: Duration) -> io::Result<CurlResult> {
        self.curl_args(&["--max-time", &format!("{:.3}", timeout.as_secs_f64()), url])
    }

    /// curl from inside the pod with custom arguments (URL included), e.g.
    /// `["-H", "x-user: a", "-X", "POST", url]`. Adds `--max-time 10` unless `extra` sets one.
    pub fn curl_args(&self, extra: &[&str]) -> io::Result<CurlResult> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let body_path = self.netns().dir().join(format!("curl-{seq}.body"));
        let head_path = self.netns().dir().join(format!("curl-{seq}.head"));
        let body_arg = body_path.to_string_lossy().into_owned();
        let head_arg = head_path.to_string_lossy().into_owned();
        // curl uses the last --max-time it is given, so `extra` can override this one.
        let mut args =
            vec!["-sS", "-o", &body_arg, "-D", &head_arg, "-w", "%{http_code}", "--max-time", DEFAULT_CURL_TIMEOUT];
        args.extend_from_slice(extra);
        let output = self.run("curl", &args)?;
        // No file when no response came: an empty body then.
        let body_bytes = fs::read(&body_path).unwrap_or_default();
        let headers = parse_header_dump(&fs::read_to_string(&head_path).unwrap_or_default());
        let _ = fs::remove_file(&body_path);
        let _ = fs::remove_file(&head_path);
        Ok(CurlResult {
            status: String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or(0),
            body: String::from_utf8_lossy(&body_bytes).into_owned(),
            body_bytes,
            headers,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            exit_code: output.status.code(),
        })
    }

    /// Starts `strait-echo` in the pod on `port`, named after the pod, and returns once the
    /// port accepts connections.
    pub fn start_echo_server(&self, kind: EchoKind, port: u16) -> io::Result<Process> {
        self.echo_server(kind, port).start()
    }

    /// A `strait-echo` server to configure and start, e.g.
    /// `pod.echo_server(EchoKind::Http, 9080).name("reviews-v2").delay(ms(500)).start()?`.
    pub fn echo_server(&self, kind: EchoKind, port: u16) -> EchoServer<'_> {
        EchoServer { pod: self, kind, port, name: None, delay: Duration::ZERO, http10: false }
    }

    /// `strait-echo get <url> --count <count>` from inside the pod, with `headers` as
    /// `(name, value)` pairs; a `Host` among them replaces the URL's.
    pub fn echo_get(&self, url: &str, count: u64, headers: &[(&str, &str)]) -> io::Result<GetSummary> {
        let count = count.to_string();
        let headers: Vec<String> = headers.iter().map(|(name, value)| format!("{name}: {value}")).collect();
        let mut args = vec!["--count", &count];
        for header in &headers {
            args.extend(["--header", header.as_str()]);
        }
        self.echo_get_args(url, &args)
    }

    /// `strait-echo get <url> <args...>`, for the flags `echo_get` does not set
    /// (`--concurrency`, `--timeout-ms`). Failed requests are in the summary, not an error.
    pub fn echo_get_args(&self, url: &str, args: &[&str]) -> io::Result<GetSummary> {
        let mut full = vec!["get", url];
        full.extend_from_slice(args);
        self.run_echo_client(&full, GetSummary::from_json)
    }

    /// `strait-echo ws <url> --message <message>` from inside the pod: one WebSocket round trip.
    pub fn echo_ws(&self, url: &str, message: &str) -> io::Result<WsReport> {
        self.run_echo_client(&["ws", url, "--message", message], WsReport::from_json)
    }

    /// `strait-echo grpc-call <target> --message <message> <args...>` from inside the pod;
    /// `args` may add `--authority HOST`, `--status N`, `--timeout-ms N`. A call that failed
    /// below gRPC is a reply with `grpc_status: None`, not an error.
    pub fn grpc_call(&self, target: impl Display, message: &str, args: &[&str]) -> io::Result<GrpcReply> {
        let target = target.to_string();
        let mut full = vec!["grpc-call", &target, "--message", message];
        full.extend_from_slice(args);
        self.run_echo_client(&full, GrpcReply::from_json)
    }

    /// Runs a `strait-echo` client and parses the JSON it printed, whatever its exit status
    /// (a failed check still reports what it saw); only unreadable output is an error.
    fn run_echo_client<T>(&self, args: &[&str], parse: fn(&str) -> Result<T, String>) -> io::Result<T> {
        let echo = require_bin("strait-echo")?;
        let output = self.run(&echo, args)?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        parse(stdout.trim()).map_err(|e| client_error(self, args, &output, &e))
    }

    /// `strait-echo abuse <target> <args...>` from inside the pod: hostile HTTP/1.1 clients
    /// (`--mode`, `--connections`, `--bytes`, `--hold-secs`, `--host`, `--path`).
    pub fn echo_abuse(&self, target: impl Display, args: &[&str]) -> io::Result<AbuseReport> {
        let target = target.to_string();
        let mut full = vec!["abuse", &target];
        full.extend_from_slice(args);
        self.run_echo_client(&full, AbuseReport::from_json)
    }

    /// `strait-echo rapid-reset <target> --streams <streams> <args...>` from inside the pod:
    /// the HTTP/2 rapid reset attack (`--burst`, `--authority`, `--path`, `--end-stream`).
    pub fn rapid_reset(&self, target: impl Display, streams: u64, args: &[&str]) -> io::Result<RapidResetReport> {
        let (target, streams) = (target.to_string(), streams.to_string());
        let mut full = vec!["rapid-reset", &target, "--streams", &streams];
        full.extend_from_slice(args);
        self.run_echo_client(&full, RapidResetReport::from_json)
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

fn client_error(pod: &Pod, args: &[&str], output: &Output, error: &str) -> io::Error {
    io::Error::other(format!(
        "strait-echo {} in pod {} ({}) printed no report ({error}); stdout: {:?}, stderr: {:?}",
        args.join(" "),
        pod.name(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}
