//! `strait-echo get`: many GET requests over keep-alive connections, tallied by status and by
//! the `x-served-by` of the server that answered.
//!
//! Routing tests send a thousand requests and check the split between versions; curl in a
//! shell loop takes a process per request, this takes a few connections. Requests on one
//! connection go one after the other, like a browser's; `--concurrency` adds connections.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::json::{self, Value};
use super::tcp::resolve;
use super::wire::{parse_response_head, read_body, read_head};

/// Distinct error messages kept in a summary; the count covers the rest.
const MAX_ERROR_SAMPLES: usize = 5;

/// An `http://host:port/path` (or `ws://`) URL, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub addr: SocketAddr,
    /// The `Host` header: the URL's authority as written.
    pub host: String,
    /// Path and query, `/` when the URL has none.
    pub path: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let rest = ["http://", "ws://"]
            .iter()
            .find_map(|scheme| url.strip_prefix(scheme))
            .ok_or_else(|| format!("URL {url:?} must start with http:// or ws://"))?;
        let (authority, path) = rest.find(['/', '?']).map_or((rest, "/"), |i| rest.split_at(i));
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("URL {url:?} needs a host and no user info"));
        }
        let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']')) {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let addr = resolve(&with_port).map_err(|e| format!("cannot resolve {authority}: {e}"))?;
        let path = if path.starts_with('?') { format!("/{path}") } else { path.to_string() };
        Ok(HttpUrl { addr, host: authority.to_string(), path })
    }
}

/// How `get` sends its requests.
#[derive(Clone, Debug)]
pub struct GetOptions {
    pub count: u64,
    /// Extra request headers; a `Host` among them replaces the URL's.
    pub headers: Vec<(String, String)>,
    /// Bounds each request, from sending it to the end of its response body.
    pub timeout: Duration,
    /// Connections used in parallel, one thread each.
    pub concurrency: usize,
}

/// What `get` counted: the line it prints, and what tests read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GetSummary {
    pub requests: u64,
    /// Responses per HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// Responses per `x-served-by` value, `-` for responses without one (e.g. a proxy's own).
    pub served_by: BTreeMap<String, u64>,
    /// Requests without a response: connect failures, timeouts, broken connections.
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub elapsed_ms: u64,
    /// The slowest response, errors not included.
    pub max_latency_ms: u64,
}

impl GetSummary {
    /// Responses with `status`.
    pub fn status(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    /// Responses served by `name`.
    pub fn served(&self, name: &str) -> u64 {
        self.served_by.get(name).copied().unwrap_or(0)
    }

    fn merge(&mut self, other: GetSummary) {
        self.requests += other.requests;
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        for (name, n) in other.served_by {
            *self.served_by.entry(name).or_default() += n;
        }
        self.errors += other.errors;
        for sample in other.error_samples {
            self.sample_error(sample);
        }
        self.max_latency_ms = self.max_latency_ms.max(other.max_latency_ms);
    }

    fn sample_error(&mut self, message: String) {
        if self.error_samples.len() < MAX_ERROR_SAMPLES && !self.error_samples.contains(&message) {
            self.error_samples.push(message);
        }
    }

    pub fn to_json(&self) -> String {
        let counts =
            |entries: Vec<(String, u64)>| Value::Object(entries.into_iter().map(|(k, n)| (k, n.into())).collect());
        Value::Object(vec![
            ("requests".into(), self.requests.into()),
            ("statuses".into(), counts(self.statuses.iter().map(|(s, n)| (s.to_string(), *n)).collect())),
            ("served_by".into(), counts(self.served_by.iter().map(|(s, n)| (s.clone(), *n)).collect())),
            ("errors".into(), self.errors.into()),
            ("error_samples".into(), Value::Array(self.error_samples.iter().map(|s| s.as_str().into()).collect())),
            ("elapsed_ms".into(), self.elapsed_ms.into()),
            ("max_latency_ms".into(), self.max_latency_ms.into()),
        ])
        .to_string()
    }

    pub fn from_json(text: &str) -> Result<GetSummary, String> {
        let value = json::parse(text)?;
        let number = |key: &str| value.get(key).and_then(Value::as_u64).ok_or_else(|| format!("no number {key:?}"));
        let counts = |key: &str| -> Result<Vec<(String, u64)>, String> {
            let members = value.get(key).and_then(Value::as_object).ok_or_else(|| format!("no object {key:?}"))?;
            members
                .iter()
                .map(|(k, v)| v.as_u64().map(|n| (k.clone(), n)).ok_or_else(|| format!("bad count for {k:?}")))
                .collect()
        };
        let statuses = counts("statuses")?
            .into_iter()
            .map(|(k, n)| k.parse().map(|s| (s, n)).map_err(|_| format!("bad status {k:?}")))
            .collect::<Result<_, String>>()?;
        let samples = value.get("error_samples").and_then(Value::as_array).ok_or("no array \"error_samples\"")?;
        Ok(GetSummary {
            requests: number("requests")?,
            statuses,
            served_by: counts("served_by")?.into_iter().collect(),
            errors: number("errors")?,
            error_samples: samples.iter().filter_map(|s| s.as_str().map(String::from)).collect(),
            elapsed_ms: number("elapsed_ms")?,
            max_latency_ms: number("max_latency_ms")?,
        })
    }
}

/// Sends `options.count` GET requests for `url` and tallies the answers.
pub fn get(url: &HttpUrl, options: &GetOptions) -> GetSummary {
    let request = request_bytes(url, &options.headers);
    let next = AtomicU64::new(0);
    let start = Instant::now();
    let mut summary = thread::scope(|scope| {
        let workers: Vec<_> = (0..options.concurrency.max(1))
            .map(|_| scope.spawn(|| worker(url.addr, &request, options, &next)))
            .collect();
        let mut summary = GetSummary::default();
        for worker in workers {
            // A worker only panics on a bug; losing its tally then is acceptable.
            if let Ok(tally) = worker.join() {
                summary.merge(tally);
            }
        }
        summary
    });
    summary.elapsed_ms = millis(start.elapsed());
    summary
}

fn request_bytes(url: &HttpUrl, headers: &[(String, String)]) -> Vec<u8> {
    let mut request = format!("GET {} HTTP/1.1\r\n", url.path);
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("host: {}\r\n", url.host));
    }
    request.push_str("user-agent: strait-echo\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// One connection's share: takes request numbers from `next` until `count` are taken, so
/// faster connections send more.
fn worker(addr: SocketAddr, request: &[u8], options: &GetOptions, next: &AtomicU64) -> GetSummary {
    let mut tally = GetSummary::default();
    let mut connection: Option<Connection> = None;
    while next.fetch_add(1, Ordering::Relaxed) < options.count {
        tally.requests += 1;
        let started = Instant::now();
        let mut outcome = send(&mut connection, addr, request, options.timeout);
        // A kept-alive connection the server closed meanwhile fails before any answer; GET is
        // idempotent, so it is sent again on a new one (RFC 9110 9.2.2), once.
        if matches!(outcome, Err(Failure { stale: true, .. })) {
            outcome = send(&mut connection, addr, request, options.timeout);
        }
        match outcome {
            Ok(answer) => {
                *tally.statuses.entry(answer.status).or_default() += 1;
                *tally.served_by.entry(answer.served_by).or_default() += 1;
                tally.max_latency_ms = tally.max_latency_ms.max(millis(started.elapsed()));
            }
            Err(failure) => {
                connection = None;
                tally.errors += 1;
                tally.sample_error(failure.message);
            }
        }
    }
    tally
}

struct Connection {
    reader: BufReader<DeadlineReader>,
    writer: TcpStream,
    /// Whether a response already came over it, which makes a failure before the next one stale.
    reused: bool,
}

/// Reads that fail once the deadline of the current request has passed, however the bytes trickle.
struct DeadlineReader {
    stream: TcpStream,
    deadline: Instant,
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

struct Answer {
    status: u16,
    served_by: String,
}

struct Failure {
    /// The request may not have reached a server at all: it failed on a reused connection
    /// before any byte of a response.
    stale: bool,
    message: String,
}

fn failed(message: String) -> Failure {
    Failure { stale: false, message }
}

/// Sends one request on `connection` (connecting first if there is none) and reads its
/// response; leaves the connection in place only if it can carry the next request.
fn send(
    connection: &mut Option<Connection>,
    addr: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> Result<Answer, Failure> {
    let deadline = Instant::now() + timeout;
    let conn = match connection {
        Some(conn) => conn,
        None => connection.insert(connect(addr, timeout, deadline)?),
    };
    conn.reader.get_mut().deadline = deadline;
    let reused = conn.reused;
    let result = exchange(conn, request, timeout);
    match result {
        Ok((answer, keep_alive)) => {
            if keep_alive {
                conn.reused = true;
            } else {
                *connection = None;
            }
            Ok(answer)
        }
        Err((before_response, message)) => {
            *connection = None;
            Err(Failure { stale: reused && before_response, message })
        }
    }
}

fn connect(addr: SocketAddr, timeout: Duration, deadline: Instant) -> Result<Connection, Failure> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| failed(format!("connect {addr}: {e}")))?;
    let setup = |stream: &TcpStream| -> io::Result<TcpStream> {
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(timeout))?;
        stream.try_clone()
    };
    let writer = setup(&stream).map_err(|e| failed(format!("connection to {addr}: {e}")))?;
    Ok(Connection { reader: BufReader::new(DeadlineReader { stream, deadline }), writer, reused: false })
}

/// The answer and whether the connection stays usable; on failure, whether it happened before
/// any response byte, and why.
fn exchange(conn: &mut Connection, request: &[u8], timeout: Duration) -> Result<(Answer, bool), (bool, String)> {
    let describe = |doing: &str, e: io::Error| match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
            format!("{doing}: timed out after {} ms", timeout.as_millis())
        }
        _ => format!("{doing}: {e}"),
    };
    conn.writer.write_all(request).map_err(|e| (true, describe("sending the request", e)))?;
    match conn.reader.fill_buf() {
        Ok([]) => return Err((true, "connection closed before the response".into())),
        Ok(_) => {}
        Err(e) => return Err((true, describe("reading the response", e))),
    }
    loop {
        let head = read_head(&mut conn.reader)
            .map_err(|e| (false, describe("reading the response", e)))?
            .ok_or((false, "connection closed before the response".to_string()))?
            .and_then(|h| parse_response_head(&h))
            .map_err(|e| (false, format!("bad response: {}", e.0)))?;
        // Interim responses (100 Continue, 103 Early Hints) precede the real one.
        if (100..200).contains(&head.status) && head.status != 101 {
            continue;
        }
        let kind = head.body_kind("GET").map_err(|e| (false, format!("bad response: {}", e.0)))?;
        read_body(&mut conn.reader, kind, |_| {})
            .map_err(|e| (false, describe("reading the body", e)))?
            .map_err(|e| (false, format!("bad response body: {}", e.0)))?;
        let served_by = head.header("x-served-by").unwrap_or("-").to_string();
        let keep_alive = head.status != 101 && head.keep_alive("GET");
        return Ok((Answer { status: head.status, served_by }, keep_alive));
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let url = HttpUrl::parse("http://10.2.0.10:9080/productpage?u=1").expect("valid");
        assert_eq!(
            (url.addr.to_string(), url.host.as_str(), url.path.as_str()),
            ("10.2.0.10:9080".into(), "10.2.0.10:9080", "/productpage?u=1")
        );
        let url = HttpUrl::parse("ws://127.0.0.1").expect("valid");
        assert_eq!((url.addr.port(), url.host.as_str(), url.path.as_str()), (80, "127.0.0.1", "/"));
        assert_eq!(HttpUrl::parse("http://127.0.0.1?x").map(|u| u.path), Ok("/?x".into()));
        for bad in ["https://127.0.0.1/", "127.0.0.1:80", "http:///x", "http://u@127.0.0.1/"] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn builds_requests_with_a_host() {
        let url = HttpUrl::parse("http://127.0.0.1:8080/a").expect("valid");
        let plain = String::from_utf8(request_bytes(&url, &[])).expect("ASCII");
        assert_eq!(plain, "GET /a HTTP/1.1\r\nhost: 127.0.0.1:8080\r\nuser-agent: strait-echo\r\n\r\n");
        let headers = [("Host".to_string(), "reviews".to_string()), ("end-user".to_string(), "jason".to_string())];
        let custom = String::from_utf8(request_bytes(&url, &headers)).expect("ASCII");
        assert_eq!(custom, "GET /a HTTP/1.1\r\nuser-agent: strait-echo\r\nHost: reviews\r\nend-user: jason\r\n\r\n");
    }

    #[test]
    fn summary_json_round_trips() {
        let mut summary =
            GetSummary { requests: 3, errors: 1, elapsed_ms: 12, max_latency_ms: 7, ..Default::default() };
        summary.statuses.insert(200, 1);
        summary.statuses.insert(503, 1);
        summary.served_by.insert("v1".into(), 1);
        summary.served_by.insert("-".into(), 1);
        summary.sample_error("connect 10.0.0.1:80: \"refused\"".into());
        assert_eq!(
            summary.to_json(),
            r#"{"requests":3,"statuses":{"200":1,"503":1},"served_by":{"-":1,"v1":1},"errors":1,"error_samples":["connect 10.0.0.1:80: \"refused\""],"elapsed_ms":12,"max_latency_ms":7}"#
        );
        assert_eq!(GetSummary::from_json(&summary.to_json()), Ok(summary.clone()));
        assert_eq!((summary.status(503), summary.served("v1"), summary.served("v2")), (1, 1, 0));
        assert!(GetSummary::from_json(r#"{"requests":1}"#).is_err());
    }

    #[test]
    fn merging_keeps_samples_distinct_and_bounded() {
        let mut total = GetSummary::default();
        for i in 0..10 {
            let mut part = GetSummary { requests: 1, errors: 1, max_latency_ms: i, ..Default::default() };
            part.sample_error(format!("error {}", i % 7));
            total.merge(part);
        }
        assert_eq!((total.requests, total.errors, total.max_latency_ms), (10, 10, 9));
        assert_eq!(total.error_samples, ["error 0", "error 1", "error 2", "error 3", "error 4"]);
    }
}
