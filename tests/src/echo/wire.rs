//! HTTP/1.1 message framing (RFC 9112) shared by the `http` server and the `get` and `ws` clients.
//!
//! Heads are parsed whole (they are small and bounded); bodies are streamed to a sink, so a
//! multi-gigabyte upload or download never sits in memory.

use std::io::{self, BufRead, Read};

/// Longest message head accepted; a peer sending more is broken or hostile.
const MAX_HEAD: usize = 64 * 1024;
/// Chunk size for streaming bodies in and out.
pub const IO_CHUNK: usize = 64 * 1024;

/// Why a message could not be understood; the server answers 400 and closes the connection.
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

/// How a message body is delimited.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum BodyKind {
    Empty,
    Length(u64),
    Chunked,
    /// Up to the end of the connection: only responses without a length (RFC 9112 6.3, rule 8).
    UntilClose,
}

impl RequestHead {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The path without the query string.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    pub fn body_kind(&self) -> Result<BodyKind, BadRequest> {
        Ok(framed_length(&self.headers)?.unwrap_or(BodyKind::Empty))
    }

    /// HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes unless told to keep.
    pub fn keep_alive(&self) -> bool {
        keep_alive(self.minor_version, &self.headers)
    }
}

/// A parsed status line and headers.
#[derive(Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// How the body of this response to a request with `method` is delimited (RFC 9112 6.3).
    pub fn body_kind(&self, method: &str) -> Result<BodyKind, BadRequest> {
        if method == "HEAD" || (100..200).contains(&self.status) || self.status == 204 || self.status == 304 {
            return Ok(BodyKind::Empty);
        }
        Ok(framed_length(&self.headers)?.unwrap_or(BodyKind::UntilClose))
    }

    /// Whether the connection can carry another request after this response's body.
    pub fn keep_alive(&self, method: &str) -> bool {
        keep_alive(self.minor_version, &self.headers) && self.body_kind(method).is_ok_and(|k| k != BodyKind::UntilClose)
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// The body framing the headers declare, `None` when they declare none.
fn framed_length(headers: &[(String, String)]) -> Result<Option<BodyKind>, BadRequest> {
    // Transfer-Encoding wins over Content-Length (RFC 9112 6.3).
    if let Some(te) = find_header(headers, "transfer-encoding") {
        return match te.rsplit(',').next().map(str::trim) {
            Some(last) if last.eq_ignore_ascii_case("chunked") => Ok(Some(BodyKind::Chunked)),
            _ => Err(bad(format!("unsupported transfer-encoding {te:?}"))),
        };
    }
    let mut length = None;
    for (_, value) in headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("content-length")) {
        let parsed: u64 = value.trim().parse().map_err(|_| bad(format!("bad content-length {value:?}")))?;
        if length.is_some_and(|l| l != parsed) {
            return Err(bad("conflicting content-length headers"));
        }
        length = Some(parsed);
    }
    Ok(length.map(BodyKind::Length))
}

fn keep_alive(minor_version: u8, headers: &[(String, String)]) -> bool {
    let connection = find_header(headers, "connection").unwrap_or("").to_ascii_lowercase();
    if minor_version == 0 { connection.contains("keep-alive") } else { !connection.contains("close") }
}

/// Whether a comma-separated header value (`Connection`, `Upgrade`) lists `token`.
pub fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Reads one message head (through the empty line). `Ok(None)` on a clean end of stream
/// before a message starts, the normal end of a keep-alive connection.
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
                Ok(Some(Err(bad("connection closed inside the message head"))))
            };
        }
        if head.len() > MAX_HEAD {
            return Ok(Some(Err(bad("message head too large"))));
        }
        let line = &head[start..];
        let is_blank = line == b"\r\n" || line == b"\n";
        // Blank lines before the start line are allowed (RFC 9112 2.2); after it they end the head.
        if is_blank && head[..start].iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        if is_blank {
            return Ok(Some(String::from_utf8(head).map_err(|_| bad("message head is not UTF-8"))));
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
    let minor_version = minor_version(version)?;
    let headers = parse_headers(lines)?;
    Ok(RequestHead { method: method.to_string(), target: target.to_string(), minor_version, headers })
}

/// Parses a response head as returned by [`read_head`].
pub fn parse_response_head(head: &str) -> Result<ResponseHead, BadRequest> {
    let mut lines = head.trim_start().lines().map(|l| l.strip_suffix('\r').unwrap_or(l));
    let status_line = lines.next().ok_or_else(|| bad("empty response"))?;
    // The reason phrase may contain spaces, or be missing altogether.
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let minor_version = minor_version(version)?;
    let status = match code.parse::<u16>() {
        Ok(status @ 100..=999) if code.len() == 3 => status,
        _ => return Err(bad(format!("malformed status line {status_line:?}"))),
    };
    Ok(ResponseHead { status, minor_version, headers: parse_headers(lines)? })
}

fn minor_version(version: &str) -> Result<u8, BadRequest> {
    match version {
        "HTTP/1.1" => Ok(1),
        "HTTP/1.0" => Ok(0),
        _ => Err(bad(format!("unsupported version {version:?}"))),
    }
}

fn parse_headers<'a>(lines: impl Iterator<Item = &'a str>) -> Result<Vec<(String, String)>, BadRequest> {
    let mut headers = Vec::new();
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or_else(|| bad(format!("malformed header {line:?}")))?;
        if name.is_empty() || name.contains(|c: char| c.is_whitespace()) {
            return Err(bad(format!("malformed header name {name:?}")));
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    Ok(headers)
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
        BodyKind::UntilClose => {
            let mut total = 0u64;
            loop {
                let chunk = reader.fill_buf()?;
                if chunk.is_empty() {
                    return Ok(Ok(total));
                }
                let n = chunk.len();
                sink(chunk);
                reader.consume(n);
                total += n as u64;
            }
        }
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
    fn parses_responses_and_their_framing() {
        let head = parse_response_head("HTTP/1.1 503 Service Unavailable\r\nX-Served-By: v1\r\n\r\n").expect("valid");
        assert_eq!((head.status, head.header("x-served-by")), (503, Some("v1")));
        assert_eq!(head.body_kind("GET"), Ok(BodyKind::UntilClose));
        assert!(!head.keep_alive("GET"));
        assert_eq!(head.body_kind("HEAD"), Ok(BodyKind::Empty));
        let head = parse_response_head("HTTP/1.1 200\r\ncontent-length: 5\r\n\r\n").expect("no reason phrase");
        assert_eq!(head.body_kind("GET"), Ok(BodyKind::Length(5)));
        assert!(head.keep_alive("GET"));
        let head = parse_response_head("HTTP/1.0 204 No Content\r\n\r\n").expect("valid");
        assert_eq!((head.body_kind("GET"), head.keep_alive("GET")), (Ok(BodyKind::Empty), false));
        for raw in ["HTTP/1.1 20 OK\r\n\r\n", "HTTP/2 200 OK\r\n\r\n", "HTTP/1.1 abc\r\n\r\n", ""] {
            assert!(parse_response_head(raw).is_err(), "{raw:?}");
        }
        assert!(has_token(Some("keep-alive, Upgrade"), "upgrade"));
        assert!(!has_token(Some("upgraded"), "upgrade") && !has_token(None, "upgrade"));
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
        let mut raw: &[u8] = b"to the end";
        assert_eq!(read_body(&mut raw, BodyKind::UntilClose, |_| {}).expect("io ok"), Ok(10));
    }
}
