//! `strait-echo http`: a small threaded HTTP/1.1 server that tells the client who it saw and
//! who answered, standing in for Bookinfo's and httpbin's services in waypoint tests.
//!
//! Its answers let tests check what the mesh did to a request: the peer address (was the client
//! IP preserved), headers added by a waypoint (`/headers`), statuses for retry and outlier tests
//! (`/status/N`, `/flaky/N/KEY`), slow answers for timeouts (`/delay/MS`, `--delay-ms`), large
//! bodies both ways with digests, and WebSocket upgrades. Every response names the server in
//! `x-served-by`, so routing shows without parsing bodies.
//!
//! Routes (query strings ignored): `/flaky/N/KEY` → 503 for the first N requests with that KEY,
//! then as below; `POST`/`PUT`/`PATCH` any path → `received <n> bytes fnv1a64=<hex>`;
//! `GET /bytes/N` → N pattern bytes; `/delay/MS`, `/status/CODE`, `/headers`; a WebSocket
//! upgrade → 101 and an echo of every message; anything else → `hello from <name>
//! peer=<ip:port> local=<ip:port>` (plus ` path=<p>` when not `/`). With `--http-version 1.0`
//! it answers as an old server does: `HTTP/1.0`, `connection: close`, one request each.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use super::wire::{BadRequest, BodyKind, IO_CHUNK, RequestHead, parse_head, read_body, read_head};
use super::{Fnv1a64, ServerConfig, pattern_slice, websocket};

/// Keep-alive connections idle this long are closed, so abandoned ones do not pile up threads.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// What every connection of one server shares.
struct Server {
    config: ServerConfig,
    flaky: FlakyCounter,
}

/// Requests seen per `/flaky/N/KEY` key since the server started.
#[derive(Debug, Default)]
pub struct FlakyCounter(Mutex<HashMap<String, u64>>);

impl FlakyCounter {
    /// Counts one request for `key` and tells whether it is among the first `failures`.
    pub fn should_fail(&self, key: &str, failures: u64) -> bool {
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = seen.entry(key.to_string()).or_insert(0);
        *count += 1;
        *count <= failures
    }
}

/// Serves HTTP on `0.0.0.0:port` until the process is killed.
pub fn serve(port: u16, config: ServerConfig) -> io::Result<()> {
    if config.name.chars().any(char::is_control) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the server name must not contain control characters"));
    }
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    println!("listening on 0.0.0.0:{port}");
    let server = Arc::new(Server { config, flaky: FlakyCounter::default() });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let server = Arc::clone(&server);
        thread::spawn(move || {
            let _ = serve_connection(stream, &server);
        });
    }
    Ok(())
}

fn serve_connection(stream: TcpStream, server: &Server) -> io::Result<()> {
    let peer = stream.peer_addr()?;
    let local = stream.local_addr()?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    let served_by = server.config.name.as_str();
    loop {
        let head = match read_head(&mut reader)? {
            None => return Ok(()),
            Some(head) => head,
        };
        let parsed = head.and_then(|h| parse_head(&h)).and_then(|req| req.body_kind().map(|kind| (req, kind)));
        let (request, kind) = match parsed {
            Ok(parsed) => parsed,
            Err(BadRequest(reason)) => return reject(&mut writer, peer, served_by, &reason),
        };
        if kind != BodyKind::Empty && request.header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            writer.flush()?;
        }
        let mut digest = Fnv1a64::default();
        let length = match read_body(&mut reader, kind, |b| digest.update(b))? {
            Ok(length) => length,
            Err(BadRequest(reason)) => return reject(&mut writer, peer, served_by, &reason),
        };

        if let Some(key) = websocket::upgrade_key(&request) {
            thread::sleep(server.config.delay);
            log_request(peer, &request, 101);
            let accept = websocket::accept_key(key);
            write!(
                writer,
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
                 sec-websocket-accept: {accept}\r\nx-served-by: {served_by}\r\n\r\n"
            )?;
            writer.flush()?;
            let echoed = websocket::serve_echo(&mut reader, &mut writer);
            println!("websocket peer={peer} echoed={}", echoed.unwrap_or(0));
            return Ok(());
        }

        let keep_alive = request.keep_alive() && !server.config.http10;
        let answer =
            route(&request, Received { length, digest }, Peers { name: served_by, peer, local }, &server.flaky);
        thread::sleep(server.config.delay.saturating_add(answer.delay));
        // Logged before the response is written, so a client that has its answer finds the line.
        log_request(peer, &request, answer.status);
        let version = if server.config.http10 { "1.0" } else { "1.1" };
        write_answer(&mut writer, &answer, Framing { served_by, version, keep_alive }, request.method == "HEAD")?;
        writer.flush()?;
        if !keep_alive {
            return Ok(());
        }
    }
}

/// The access line tests grep: `request peer=<ip:port> <METHOD> <target> <status> host=<Host>
/// request_id=<x-request-id> user=<end-user>`, `-` for a missing header.
fn log_request(peer: SocketAddr, request: &RequestHead, status: u16) {
    let header = |name| request.header(name).unwrap_or("-");
    println!(
        "request peer={peer} {} {} {status} host={} request_id={} user={}",
        request.method,
        request.target,
        header("host"),
        header("x-request-id"),
        header("end-user")
    );
}

/// Answers a malformed request with 400 and ends the connection: its framing is unknown.
fn reject(writer: &mut impl Write, peer: SocketAddr, served_by: &str, reason: &str) -> io::Result<()> {
    println!("request peer={peer} - - 400 host=- request_id=- user=-");
    let answer = Answer::text(400, format!("bad request: {reason}\n"));
    write_answer(writer, &answer, Framing { served_by, version: "1.1", keep_alive: false }, false)?;
    writer.flush()
}

struct Received {
    length: u64,
    digest: Fnv1a64,
}

struct Peers<'a> {
    name: &'a str,
    peer: SocketAddr,
    local: SocketAddr,
}

/// The response to one request, decided before anything is written.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    status: u16,
    body: Body,
    /// How long to wait before answering (`/delay/MS`), on top of the server's own delay.
    delay: Duration,
}

#[derive(Debug, PartialEq, Eq)]
enum Body {
    Text(String),
    /// That many bytes of the test pattern, streamed.
    Pattern(u64),
}

impl Answer {
    fn text(status: u16, body: impl Into<String>) -> Answer {
        Answer { status, body: Body::Text(body.into()), delay: Duration::ZERO }
    }
}

fn route(request: &RequestHead, received: Received, peers: Peers<'_>, flaky: &FlakyCounter) -> Answer {
    let path = request.path();
    if let Some(rest) = path.strip_prefix("/flaky/") {
        let Some((Ok(failures), key)) = rest.split_once('/').map(|(n, key)| (n.parse::<u64>(), key)) else {
            return Answer::text(400, "bad flaky path, expected /flaky/N/KEY\n");
        };
        if flaky.should_fail(key, failures) {
            return Answer::text(503, format!("flaky {key}: failing the first {failures} requests\n"));
        }
    }

    let mut hello = format!("hello from {} peer={} local={}", peers.name, peers.peer, peers.local);
    if path != "/" {
        hello.push_str(&format!(" path={path}"));
    }
    hello.push('\n');

    if matches!(request.method.as_str(), "POST" | "PUT" | "PATCH") {
        Answer::text(200, format!("received {} bytes fnv1a64={}\n", received.length, received.digest.hex()))
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        match n.parse::<u64>() {
            Ok(n) => Answer { status: 200, body: Body::Pattern(n), delay: Duration::ZERO },
            Err(_) => Answer::text(400, "bad byte count\n"),
        }
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        match ms.parse::<u64>() {
            Ok(ms) => Answer { delay: Duration::from_millis(ms), ..Answer::text(200, hello) },
            Err(_) => Answer::text(400, "bad delay\n"),
        }
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code.parse::<u16>() {
            Ok(code @ 200..=599) => Answer::text(code, hello),
            _ => Answer::text(400, "bad status\n"),
        }
    } else if path == "/headers" {
        let mut body = String::new();
        for (name, value) in &request.headers {
            body.push_str(&format!("{}: {value}\n", name.to_ascii_lowercase()));
        }
        Answer::text(200, body)
    } else {
        Answer::text(200, hello)
    }
}

/// How a response is framed: who sends it, in which HTTP version, whether the connection stays.
struct Framing<'a> {
    served_by: &'a str,
    version: &'a str,
    keep_alive: bool,
}

fn write_answer(writer: &mut impl Write, answer: &Answer, framing: Framing<'_>, head_only: bool) -> io::Result<()> {
    let Framing { served_by, version, keep_alive } = framing;
    let length = match &answer.body {
        Body::Text(text) => text.len() as u64,
        Body::Pattern(n) => *n,
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(
        writer,
        "HTTP/{version} {} {}\r\ncontent-type: text/plain\r\ncontent-length: {length}\r\nconnection: {connection}\r\n\
         x-served-by: {served_by}\r\n\r\n",
        answer.status,
        reason(answer.status)
    )?;
    if head_only {
        return Ok(());
    }
    match &answer.body {
        Body::Text(text) => writer.write_all(text.as_bytes()),
        Body::Pattern(n) => {
            let mut sent = 0;
            while sent < *n {
                let chunk = pattern_slice(sent, usize::try_from(n - sent).unwrap_or(IO_CHUNK).min(IO_CHUNK));
                writer.write_all(chunk)?;
                sent += chunk.len() as u64;
            }
            Ok(())
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(raw: &str, flaky: &FlakyCounter) -> Answer {
        let request = parse_head(raw).expect("valid request");
        let addr: SocketAddr = "10.0.0.1:1234".parse().expect("address");
        let peers = Peers { name: "v1", peer: addr, local: addr };
        route(&request, Received { length: 0, digest: Fnv1a64::default() }, peers, flaky)
    }

    #[test]
    fn flaky_fails_the_first_n_requests_per_key() {
        let flaky = FlakyCounter::default();
        let statuses: Vec<u16> = (0..4).map(|_| answer("GET /flaky/2/a?x=1 HTTP/1.1\r\n\r\n", &flaky).status).collect();
        assert_eq!(statuses, [503, 503, 200, 200]);
        // Keys count apart; the answer after the failures is the usual one for the request.
        assert_eq!(answer("GET /flaky/1/b HTTP/1.1\r\n\r\n", &flaky).status, 503);
        let ok = answer("GET /flaky/1/b HTTP/1.1\r\n\r\n", &flaky);
        assert_eq!(
            ok.body,
            Body::Text("hello from v1 peer=10.0.0.1:1234 local=10.0.0.1:1234 path=/flaky/1/b\n".into())
        );
        assert_eq!(answer("POST /flaky/0/c HTTP/1.1\r\n\r\n", &flaky).status, 200);
        assert_eq!(answer("GET /flaky/x/c HTTP/1.1\r\n\r\n", &flaky).status, 400);
        assert_eq!(answer("GET /flaky/3 HTTP/1.1\r\n\r\n", &flaky).status, 400);
    }

    #[test]
    fn flaky_counter_is_exact_across_threads() {
        let flaky = FlakyCounter::default();
        let failures: usize = thread::scope(|s| {
            let workers: Vec<_> =
                (0..8).map(|_| s.spawn(|| (0..100).filter(|_| flaky.should_fail("k", 250)).count())).collect();
            workers.into_iter().map(|w| w.join().expect("no panic")).sum()
        });
        assert_eq!(failures, 250);
    }

    #[test]
    fn routes_keep_their_answers() {
        let flaky = FlakyCounter::default();
        assert_eq!(answer("GET /bytes/7 HTTP/1.1\r\n\r\n", &flaky).body, Body::Pattern(7));
        assert_eq!(answer("GET /status/418 HTTP/1.1\r\n\r\n", &flaky).status, 418);
        assert_eq!(answer("GET /delay/20 HTTP/1.1\r\n\r\n", &flaky).delay, Duration::from_millis(20));
        let headers = answer("GET /headers HTTP/1.1\r\nX-A: b\r\n\r\n", &flaky);
        assert_eq!(headers.body, Body::Text("x-a: b\n".into()));
    }

    #[test]
    fn responses_name_the_server() {
        let mut out = Vec::new();
        let framing = Framing { served_by: "reviews-v2", version: "1.1", keep_alive: true };
        write_answer(&mut out, &Answer::text(503, "x"), framing, false).expect("write to a Vec");
        let text = String::from_utf8(out).expect("ASCII");
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{text}");
        assert!(text.contains("\r\nx-served-by: reviews-v2\r\n") && text.ends_with("\r\n\r\nx"), "{text}");
    }
}
