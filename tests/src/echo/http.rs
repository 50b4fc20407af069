//! `strait-echo http`: a small HTTP/1.1 server that tells the client who it saw.
//!
//! Its answers let tests check what the mesh did to a request: the peer address (was the client
//! IP preserved), headers added by a waypoint (`/headers`), statuses for retry and outlier tests
//! (`/status/N`), slow answers for timeouts (`/delay/MS`), large bodies both ways with digests.
//!
//! Routes (query strings ignored): `POST`/`PUT`/`PATCH` any path → `received <n> bytes
//! fnv1a64=<hex>`; `GET /bytes/N` → N pattern bytes; `/delay/MS`, `/status/CODE`, `/headers`;
//! anything else → `hello from <name> peer=<ip:port> local=<ip:port>` (plus ` path=<p>` when not `/`).

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::{Fnv1a64, pattern_slice};

/// Longest request head accepted; a client sending more is broken or hostile.
const MAX_HEAD: usize = 64 * 1024;
/// Keep-alive connections idle this long are closed, so abandoned ones do not pile up threads.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Chunk size for streaming bodies in and out.
const IO_CHUNK: usize = 64 * 1024;

/// Why a request could not be understood; answered with 400 and a closed connection.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRequest(pub String);

fn bad(msg: impl Into<String>) -> BadRequest {
    BadRequest(msg.into())
}

/// A parsed request line and headers.
#[derive(Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request target as sent, query string included.
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub headers: Vec<(String, String)>,
}

/// How the request body is delimited.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
}

impl RequestHead {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The path without the query string.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub fn body_kind(&self) -> Result<BodyKind, BadRequest> {
        // Transfer-Encoding wins over Content-Length (RFC 9112 6.3).
        if let Some(te) = self.header("transfer-encoding") {
            return match te.rsplit(',').next().map(str::trim) {
                Some(last) if last.eq_ignore_ascii_case("chunked") => Ok(BodyKind::Chunked),
                _ => Err(bad(format!("unsupported transfer-encoding {te:?}"))),
            };
        }
        let mut length = None;
        for (_, value) in self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("content-length")) {
            let parsed: u64 = value.trim().parse().map_err(|_| bad(format!("bad content-length {value:?}")))?;
            if length.is_some_and(|l| l != parsed) {
                return Err(bad("conflicting content-length headers"));
            }
            length = Some(parsed);
        }
        Ok(length.map_or(BodyKind::Empty, BodyKind::Length))
    }

    /// HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless told to keep.
    pub fn keep_alive(&self) -> bool {
        let connection = self.header("connection").unwrap_or("").to_ascii_lowercase();
        if self.minor_version == 0 { connection.contains("keep-alive") } else { !connection.contains("close") }
    }
}

/// Reads one request head (through the empty line). `Ok(None)` on a clean end of stream
/// before a request starts, the normal end of a keep-alive connection.
pub fn read_head<R: BufRead>(reader: &mut R) -> io::Result<Option<Result<String, BadRequest>>> {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        let limit = u64::try_from(MAX_HEAD + 1 - head.len().min(MAX_HEAD)).unwrap_or(0);
        let n = reader.by_ref().take(limit).read_until(b'\n', &mut head)?;
        if n == 0 {
            return if head.iter().all(|b| b.is_ascii_whitespace()) {
                Ok(None)
            } else {
                Ok(Some(Err(bad("connection closed inside the request head"))))
            };
        }
        if head.len() > MAX_HEAD {
            return Ok(Some(Err(bad("request head too large"))));
        }
        let line = &head[start..];
        let is_blank = line == b"\r\n" || line == b"\n";
        // Blank lines before the request line are allowed (RFC 9112 2.2); after it they end the head.
        if is_blank && head[..start].iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        if is_blank {
            return Ok(Some(String::from_utf8(head).map_err(|_| bad("request head is not UTF-8"))));
        }
    }
}

/// Parses a request head as returned by [`read_head`].
pub fn parse_head(head: &str) -> Result<RequestHead, BadRequest> {
    let mut lines = head.trim_start().lines().map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().ok_or_else(|| bad("empty request"))?;
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err(bad(format!("malformed request line {request_line:?}"))),
    };
    if !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(bad(format!("malformed method {method:?}")));
    }
    let minor_version = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        _ => return Err(bad(format!("unsupported version {version:?}"))),
    };
    let mut headers = Vec::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or_else(|| bad(format!("malformed header {line:?}")))?;
        if name.is_empty() || name.contains(|c: char| c.is_whitespace()) {
            return Err(bad(format!("malformed header name {name:?}")));
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    Ok(RequestHead { method: method.to_string(), target: target.to_string(), minor_version, headers })
}

/// Reads a body of `kind`, feeding its bytes to `sink`; returns its length.
pub fn read_body<R: BufRead>(
    reader: &mut R,
    kind: BodyKind,
    mut sink: impl FnMut(&[u8]),
) -> io::Result<Result<u64, BadRequest>> {
    match kind {
        BodyKind::Empty => Ok(Ok(0)),
        BodyKind::Length(n) => copy_exact(reader, n, &mut sink).map(|()| Ok(n)),
        BodyKind::Chunked => {
            let mut total = 0u64;
            loop {
                let line = read_short_line(reader)?;
                let size_text = line.split(';').next().unwrap_or("").trim();
                let Ok(size) = u64::from_str_radix(size_text, 16) else {
                    return Ok(Err(bad(format!("bad chunk size {size_text:?}"))));
                };
                if size == 0 {
                    // Trailers, ignored, up to the empty line.
                    while !read_short_line(reader)?.trim().is_empty() {}
                    return Ok(Ok(total));
                }
                copy_exact(reader, size, &mut sink)?;
                total += size;
                if !read_short_line(reader)?.trim().is_empty() {
                    return Ok(Err(bad("chunk data longer than its size")));
                }
            }
        }
    }
}

fn copy_exact<R: Read>(reader: &mut R, mut n: u64, sink: &mut impl FnMut(&[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; IO_CHUNK];
    while n > 0 {
        let want = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
        let got = reader.read(&mut buf[..want])?;
        if got == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "body ended early"));
        }
        sink(&buf[..got]);
        n -= got as u64;
    }
    Ok(())
}

/// A chunk-size or trailer line, at most 4 KiB; a missing line is an error (the body is cut).
fn read_short_line<R: BufRead>(reader: &mut R) -> io::Result<String> {
    let mut line = Vec::new();
    if reader.by_ref().take(4096).read_until(b'\n', &mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunked body ended early"));
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Serves HTTP on `0.0.0.0:port` until the process is killed.
pub fn serve(port: u16, name: &str) -> io::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    println!("listening on 0.0.0.0:{port}");
    let name: Arc<str> = Arc::from(name);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = Arc::clone(&name);
        thread::spawn(move || {
            let _ = serve_connection(stream, &name);
        });
    }
    Ok(())
}

fn serve_connection(stream: TcpStream, name: &str) -> io::Result<()> {
    let peer = stream.peer_addr()?;
    let local = stream.local_addr()?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    loop {
        let head = match read_head(&mut reader)? {
            None => return Ok(()),
            Some(head) => head,
        };
        let parsed = head.and_then(|h| parse_head(&h)).and_then(|req| req.body_kind().map(|kind| (req, kind)));
        let (request, kind) = match parsed {
            Ok(parsed) => parsed,
            Err(BadRequest(reason)) => return reject(&mut writer, peer, &reason),
        };
        if kind != BodyKind::Empty && request.header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue")) {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            writer.flush()?;
        }
        let mut digest = Fnv1a64::default();
        let length = match read_body(&mut reader, kind, |b| digest.update(b))? {
            Ok(length) => length,
            Err(BadRequest(reason)) => return reject(&mut writer, peer, &reason),
        };
        let keep_alive = request.keep_alive();
        let status =
            respond(&mut writer, &request, Received { length, digest }, Peers { name, peer, local }, keep_alive)?;
        writer.flush()?;
        println!("request peer={peer} {} {} {status}", request.method, request.target);
        if !keep_alive {
            return Ok(());
        }
    }
}

/// Answers a malformed request with 400 and ends the connection: its framing is unknown.
fn reject(writer: &mut impl Write, peer: SocketAddr, reason: &str) -> io::Result<()> {
    let body = format!("bad request: {reason}\n");
    write_head(writer, 400, body.len() as u64, false)?;
    writer.write_all(body.as_bytes())?;
    writer.flush()?;
    println!("request peer={peer} - - 400");
    Ok(())
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

/// Writes the response for `request` and returns its status.
fn respond(
    writer: &mut impl Write,
    request: &RequestHead,
    received: Received,
    peers: Peers<'_>,
    keep_alive: bool,
) -> io::Result<u16> {
    let path = request.path();
    let head_only = request.method == "HEAD";
    let mut hello = format!("hello from {} peer={} local={}", peers.name, peers.peer, peers.local);
    if path != "/" {
        hello.push_str(&format!(" path={path}"));
    }
    hello.push('\n');

    let (status, body) = if matches!(request.method.as_str(), "POST" | "PUT" | "PATCH") {
        (200, format!("received {} bytes fnv1a64={}\n", received.length, received.digest.hex()))
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        let Ok(n) = n.parse::<u64>() else {
            return simple(writer, 400, "bad byte count\n", keep_alive, head_only);
        };
        write_head(writer, 200, n, keep_alive)?;
        if !head_only {
            let mut sent = 0;
            while sent < n {
                let chunk = pattern_slice(sent, usize::try_from(n - sent).unwrap_or(IO_CHUNK).min(IO_CHUNK));
                writer.write_all(chunk)?;
                sent += chunk.len() as u64;
            }
        }
        return Ok(200);
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        let Ok(ms) = ms.parse::<u64>() else {
            return simple(writer, 400, "bad delay\n", keep_alive, head_only);
        };
        thread::sleep(Duration::from_millis(ms));
        (200, hello)
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code.parse::<u16>() {
            Ok(code @ 200..=599) => (code, hello),
            _ => (400, "bad status\n".to_string()),
        }
    } else if path == "/headers" {
        let mut body = String::new();
        for (name, value) in &request.headers {
            body.push_str(&format!("{}: {value}\n", name.to_ascii_lowercase()));
        }
        (200, body)
    } else {
        (200, hello)
    };
    simple(writer, status, &body, keep_alive, head_only)
}

fn simple(writer: &mut impl Write, status: u16, body: &str, keep_alive: bool, head_only: bool) -> io::Result<u16> {
    write_head(writer, status, body.len() as u64, keep_alive)?;
    if !head_only {
        writer.write_all(body.as_bytes())?;
    }
    Ok(status)
}

fn write_head(writer: &mut impl Write, status: u16, length: u64, keep_alive: bool) -> io::Result<()> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(
        writer,
        "HTTP/1.1 {status} {}\r\ncontent-type: text/plain\r\ncontent-length: {length}\r\nconnection: {connection}\r\n\r\n",
        reason(status)
    )
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

    fn head_of(raw: &[u8]) -> Option<Result<String, BadRequest>> {
        read_head(&mut &raw[..]).expect("reading from a slice cannot fail")
    }

    #[test]
    fn parses_request_line_and_headers() {
        let raw = "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Thing:  v  \r\n\r\n";
        let req = parse_head(raw).expect("valid request");
        assert_eq!(req.method, "GET");
        assert_eq!(req.path(), "/a");
        assert_eq!(req.header("x-thing"), Some("v"));
        assert_eq!(req.body_kind(), Ok(BodyKind::Empty));
        assert!(req.keep_alive());
    }

    #[test]
    fn rejects_malformed_requests() {
        for raw in [
            "GET /\r\n\r\n",
            "get / HTTP/1.1\r\n\r\n",
            "GET / HTTP/2\r\n\r\n",
            "GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
        ] {
            assert!(parse_head(raw).is_err(), "{raw:?}");
        }
        let req = parse_head("POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n").expect("parses");
        assert!(req.body_kind().is_err());
        let req = parse_head("POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n").expect("parses");
        assert!(req.body_kind().is_err());
    }

    #[test]
    fn keep_alive_follows_version_and_connection_header() {
        let ka = |raw: &str| parse_head(raw).expect("parses").keep_alive();
        assert!(!ka("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    }

    #[test]
    fn reads_heads_off_a_stream() {
        assert_eq!(head_of(b""), None);
        assert_eq!(head_of(b"\r\n"), None);
        let head = head_of(b"\r\nGET / HTTP/1.1\nHost: a\n\nrest").expect("a head").expect("valid");
        assert_eq!(parse_head(&head).map(|r| r.header("host").map(String::from)), Ok(Some("a".into())));
        assert!(head_of(b"GET / HTTP/1.1\r\nHost").expect("a head").is_err());
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(head_of(huge.as_bytes()).expect("a head").is_err());
    }

    #[test]
    fn reads_chunked_and_sized_bodies() {
        let mut body = Vec::new();
        let mut raw: &[u8] = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let n = read_body(&mut raw, BodyKind::Chunked, |b| body.extend_from_slice(b)).expect("io ok");
        assert_eq!(n, Ok(11));
        assert_eq!(body, b"hello world");
        assert_eq!(raw, b"NEXT");

        let mut raw: &[u8] = b"abcdef";
        assert_eq!(read_body(&mut raw, BodyKind::Length(4), |_| {}).expect("io ok"), Ok(4));
        assert_eq!(raw, b"ef");

        let mut raw: &[u8] = b"zz\r\n";
        assert!(read_body(&mut raw, BodyKind::Chunked, |_| {}).expect("io ok").is_err());
        let mut raw: &[u8] = b"abc";
        assert!(read_body(&mut raw, BodyKind::Length(10), |_| {}).is_err());
    }
}
