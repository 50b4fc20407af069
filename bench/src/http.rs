//! The minimal HTTP/1.1 both ends speak: a request line, a few headers, bodies framed by
//! Content-Length only.
//!
//! Hand-written rather than hyper because the generator must cost as little CPU as possible next
//! to the proxies it measures, and because this subset is all the benchmark needs: no chunked
//! encoding, no pipelining by the client, no trailers. Parsing is pure (byte slices in, heads
//! out) so it is table-tested; [`read_response`] is the only I/O here and reads into a buffer the
//! caller reuses, so the request path allocates nothing.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest request or response head accepted; ours are under 100 bytes.
pub const MAX_HEAD: usize = 16 * 1024;

/// Largest body `GET /bytes/N` serves: a typo should not stream for minutes.
pub const MAX_BYTES_BODY: u64 = 1 << 30;

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connection closed before the response was complete")]
    UnexpectedEof,
    #[error("message head longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed HTTP message: {0}")]
    Malformed(&'static str),
    #[error("chunked transfer encoding is not supported: send Content-Length")]
    Chunked,
    #[error("response without Content-Length")]
    NoContentLength,
    #[error("response carried more bytes than its Content-Length")]
    TrailingBytes,
    #[error("status {0}, expected 200")]
    Status(u16),
    #[error("body of {got} bytes, expected {expected}")]
    BodyLength { expected: u64, got: u64 },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What the client needs from a response head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub content_length: u64,
    /// Bytes of the head, blank line included: the body starts here.
    pub head_len: usize,
    /// The server will close after this response.
    pub close: bool,
}

impl ResponseHead {
    /// Checks status 200 and, when the caller knows it, the body length.
    pub fn check(&self, expected_len: Option<u64>) -> Result<(), HttpError> {
        if self.status != 200 {
            return Err(HttpError::Status(self.status));
        }
        match expected_len {
            Some(expected) if expected != self.content_length => {
                Err(HttpError::BodyLength { expected, got: self.content_length })
            }
            _ => Ok(()),
        }
    }
}

/// What the server serves for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /bytes/N`: N bytes of body.
    Bytes(u64),
    /// `GET /bytes/N` with N over [`MAX_BYTES_BODY`].
    TooLarge,
    /// Anything else: the body `ok`.
    Ok,
}

/// What the server needs from a request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub route: Route,
    /// Request body to read and discard before answering.
    pub content_length: u64,
    /// Bytes of the head, blank line included.
    pub head_len: usize,
    /// The client asked to close after the response (or spoke HTTP/1.0 without keep-alive).
    pub close: bool,
}

/// What the first bytes of a connection say it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    /// Raw bytes for the sink protocol.
    Sink,
    /// Too few bytes to tell yet.
    NeedMore,
}

/// Tells HTTP from sink traffic by the request method at the start.
///
/// Stream clients send zeros, so a method prefix can only come from an HTTP client.
pub fn detect(prefix: &[u8]) -> Protocol {
    const METHODS: [&[u8]; 2] = [b"GET ", b"POST "];
    let mut could_be_http = false;
    for method in METHODS {
        if prefix.starts_with(method) {
            return Protocol::Http;
        }
        could_be_http |= method.starts_with(prefix);
    }
    if could_be_http { Protocol::NeedMore } else { Protocol::Sink }
}

/// The request a client sends, built once per connection and written as is for every request.
pub fn request(path: &str, host: &str, close: bool) -> Vec<u8> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{connection}\r\n").into_bytes()
}

/// The body length a path asks the server for, when it is a `/bytes/N` path.
pub fn expected_body_len(path: &str) -> Option<u64> {
    match route(path.as_bytes()) {
        Route::Bytes(n) => Some(n),
        Route::TooLarge | Route::Ok => None,
    }
}

/// Parses a response head from the start of `buf`; `Ok(None)` until the blank line has arrived.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, HttpError> {
    let Some(head_len) = head_end(buf)? else { return Ok(None) };
    let mut lines = lines(&buf[..head_len]);
    let status_line = lines.next().unwrap_or_default();
    // "HTTP/1.1 200 OK": the version, one space, three digits, then anything.
    let (minor, rest) = split_version(status_line).ok_or(HttpError::Malformed("status line"))?;
    let code = rest.get(..3).filter(|c| c.iter().all(u8::is_ascii_digit)).ok_or(HttpError::Malformed("status code"))?;
    let status = code.iter().fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    let headers = Headers::parse(lines)?;
    let bodiless = (100..200).contains(&status) || status == 204 || status == 304;
    let content_length = match headers.content_length {
        Some(n) => n,
        None if bodiless => 0,
        None => return Err(HttpError::NoContentLength),
    };
    Ok(Some(ResponseHead { status, content_length, head_len, close: headers.closes(minor) }))
}

/// Parses a request head from the start of `buf`; `Ok(None)` until the blank line has arrived.
pub fn parse_request_head(buf: &[u8]) -> Result<Option<RequestHead>, HttpError> {
    let Some(head_len) = head_end(buf)? else { return Ok(None) };
    let mut lines = lines(&buf[..head_len]);
    let request_line = lines.next().unwrap_or_default();
    // "GET /path HTTP/1.1"
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(path), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed("request line"));
    };
    let (minor, rest) = split_version(version).ok_or(HttpError::Malformed("HTTP version"))?;
    if !rest.is_empty() || method.is_empty() {
        return Err(HttpError::Malformed("request line"));
    }
    let headers = Headers::parse(lines)?;
    Ok(Some(RequestHead {
        route: route(path),
        content_length: headers.content_length.unwrap_or(0),
        head_len,
        close: headers.closes(minor),
    }))
}

/// Reads one response into `buf`, which the caller keeps across requests.
///
/// The head must fit in `buf`; the body streams through it and is only counted, so a 1 GiB body
/// needs no more memory than a 1 KiB one. Bytes past the body are an error: the client sends one
/// request at a time, so the server has no reason to send them.
pub async fn read_response<R>(reader: &mut R, buf: &mut [u8]) -> Result<ResponseHead, HttpError>
where
    R: AsyncRead + Unpin,
{
    let mut filled = 0;
    let head = loop {
        if filled == buf.len() {
            return Err(HttpError::HeadTooLarge);
        }
        let n = reader.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(HttpError::UnexpectedEof);
        }
        filled += n;
        // Re-parsing from the start is fine: heads are ~50 bytes and nearly always come in one read.
        if let Some(head) = parse_response_head(&buf[..filled])? {
            break head;
        }
    };
    let mut body = (filled - head.head_len) as u64;
    while body < head.content_length {
        let want = usize::try_from(head.content_length - body).map_or(buf.len(), |w| w.min(buf.len()));
        let n = reader.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(HttpError::UnexpectedEof);
        }
        body += n as u64;
    }
    if body > head.content_length {
        return Err(HttpError::TrailingBytes);
    }
    Ok(head)
}

/// The route of a request path.
fn route(path: &[u8]) -> Route {
    let Some(digits) = path.strip_prefix(b"/bytes/") else { return Route::Ok };
    match parse_decimal(digits) {
        Some(n) if n <= MAX_BYTES_BODY => Route::Bytes(n),
        Some(_) => Route::TooLarge,
        None => Route::Ok,
    }
}

/// Where the head ends (after its blank line), if it has arrived; an error once it cannot fit.
fn head_end(buf: &[u8]) -> Result<Option<usize>, HttpError> {
    match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(at) if at + 4 <= MAX_HEAD => Ok(Some(at + 4)),
        Some(_) => Err(HttpError::HeadTooLarge),
        None if buf.len() >= MAX_HEAD => Err(HttpError::HeadTooLarge),
        None => Ok(None),
    }
}

/// The CRLF-separated lines of a head, without the blank line that ends it.
fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    head[..head.len() - 4].split(|&b| b == b'\n').map(|line| line.strip_suffix(b"\r").unwrap_or(line))
}

/// Splits "HTTP/1.x" off the front, returning x and what follows a single space (if anything).
fn split_version(s: &[u8]) -> Option<(u8, &[u8])> {
    let rest = s.strip_prefix(b"HTTP/1.")?;
    let (&minor, rest) = rest.split_first()?;
    if !matches!(minor, b'0' | b'1') {
        return None;
    }
    match rest {
        [] => Some((minor - b'0', rest)),
        [b' ', rest @ ..] => Some((minor - b'0', rest)),
        _ => None,
    }
}

/// A decimal with no sign, no spaces, no overflow.
fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &d| {
        if d.is_ascii_digit() { acc.checked_mul(10)?.checked_add(u64::from(d - b'0')) } else { None }
    })
}

/// The headers this subset of HTTP acts on.
#[derive(Default)]
struct Headers {
    content_length: Option<u64>,
    connection_close: bool,
    keep_alive: bool,
}

impl Headers {
    fn parse<'a>(lines: impl Iterator<Item = &'a [u8]>) -> Result<Self, HttpError> {
        let mut headers = Self::default();
        for line in lines {
            let colon = line.iter().position(|&b| b == b':').ok_or(HttpError::Malformed("header line"))?;
            let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
            if name.eq_ignore_ascii_case(b"content-length") {
                let n = parse_decimal(value).ok_or(HttpError::Malformed("Content-Length"))?;
                // Two different lengths would let two parsers frame the stream differently.
                if headers.content_length.is_some_and(|m| m != n) {
                    return Err(HttpError::Malformed("conflicting Content-Length"));
                }
                headers.content_length = Some(n);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                return Err(HttpError::Chunked);
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    headers.connection_close |= token.eq_ignore_ascii_case(b"close");
                    headers.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
        }
        Ok(headers)
    }

    /// Whether the connection closes after this message, given the HTTP/1.x minor version.
    fn closes(&self, minor: u8) -> bool {
        self.connection_close || (minor == 0 && !self.keep_alive)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        pin::Pin,
        task::{Context, Poll},
    };

    use tokio::io::ReadBuf;

    use super::*;

    /// Hands out its chunks one read at a time, the way a socket splits a message.
    struct Chunks(VecDeque<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if let Some(mut chunk) = self.0.pop_front() {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.0.push_front(chunk.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Input, and the (status or route, content length, close) it parses to once complete.
    type Case<T> = (&'static [u8], Option<(T, u64, bool)>);

    fn chunks(parts: &[&[u8]]) -> Chunks {
        Chunks(parts.iter().map(|p| p.to_vec()).collect())
    }

    #[test]
    fn response_heads() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n";
        assert_eq!(
            parse_response_head(ok).expect("valid"),
            Some(ResponseHead { status: 200, content_length: 1024, head_len: ok.len(), close: false })
        );
        let cases: &[Case<u16>] = &[
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n", None),
            (b"HTTP/1.1 200 OK\r\ncontent-length:  7 \r\nConnection: Close\r\n\r\nbody...", Some((200, 7, true))),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", Some((200, 0, true))),
            (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", Some((200, 0, false))),
            (b"HTTP/1.1 204 No Content\r\n\r\n", Some((204, 0, false))),
            (b"HTTP/1.1 503\r\nContent-Length: 3\r\n\r\n", Some((503, 3, false))),
        ];
        for (input, want) in cases {
            let got = parse_response_head(input).expect("valid").map(|h| (h.status, h.content_length, h.close));
            assert_eq!(got, *want, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn bad_response_heads() {
        let cases: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/2 200 OK\r\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.1 2x0 OK\r\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        ];
        for input in cases {
            assert!(parse_response_head(input).is_err(), "{}", String::from_utf8_lossy(input));
        }
        assert!(matches!(parse_response_head(&[b'a'; MAX_HEAD]), Err(HttpError::HeadTooLarge)));
    }

    #[test]
    fn request_heads() {
        let cases: &[Case<Route>] = &[
            (b"GET /bytes/1024 HTTP/1.1\r\nHost: x\r\n\r\n", Some((Route::Bytes(1024), 0, false))),
            (b"GET /bytes/64 HTTP/1.1\r\nConnection: close\r\n\r\n", Some((Route::Bytes(64), 0, true))),
            (b"GET /bytes/2000000000 HTTP/1.1\r\n\r\n", Some((Route::TooLarge, 0, false))),
            (b"GET /bytes/12x HTTP/1.1\r\n\r\n", Some((Route::Ok, 0, false))),
            (b"GET / HTTP/1.0\r\n\r\n", Some((Route::Ok, 0, true))),
            (b"POST /upload HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", Some((Route::Ok, 5, false))),
            (b"GET / HTTP/1.1\r\nHost: x\r\n", None),
        ];
        for (input, want) in cases {
            let got = parse_request_head(input).expect("valid").map(|h| (h.route, h.content_length, h.close));
            assert_eq!(got, *want, "{}", String::from_utf8_lossy(input));
        }
        assert!(parse_request_head(b"GET /  HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_request_head(b"GET / HTTP/1.1 x\r\n\r\n").is_err());
    }

    #[test]
    fn protocol_detection() {
        assert_eq!(detect(b""), Protocol::NeedMore);
        assert_eq!(detect(b"GE"), Protocol::NeedMore);
        assert_eq!(detect(b"POST"), Protocol::NeedMore);
        assert_eq!(detect(b"GET "), Protocol::Http);
        assert_eq!(detect(b"POST /x"), Protocol::Http);
        assert_eq!(detect(b"GETX"), Protocol::Sink);
        assert_eq!(detect(&[0, 0, 0]), Protocol::Sink);
    }

    #[test]
    fn request_bytes_and_expected_length() {
        assert_eq!(request("/bytes/1", "10.0.0.1:80", false), b"GET /bytes/1 HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n");
        assert_eq!(request("/", "h", true), b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        assert_eq!(expected_body_len("/bytes/1024"), Some(1024));
        assert_eq!(expected_body_len("/"), None);
    }

    #[tokio::test]
    async fn response_split_across_reads() {
        // The head arrives a few bytes at a time, even split inside the CRLF CRLF; the body too.
        let mut r = chunks(&[b"HTTP/1.", b"1 200 OK\r\nContent-Le", b"ngth: 10\r\n\r", b"\n0123", b"456", b"789"]);
        let mut buf = [0u8; 64];
        let head = read_response(&mut r, &mut buf).await.expect("complete response");
        assert_eq!((head.status, head.content_length), (200, 10));
        head.check(Some(10)).expect("status and length as expected");
        assert!(matches!(head.check(Some(11)), Err(HttpError::BodyLength { expected: 11, got: 10 })));
    }

    #[tokio::test]
    async fn body_larger_than_the_buffer_streams_through_it() {
        let body = vec![7u8; 10_000];
        let mut r = chunks(&[b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n", &body]);
        let mut buf = [0u8; 256];
        let head = read_response(&mut r, &mut buf).await.expect("complete response");
        assert_eq!(head.content_length, 10_000);
    }

    #[tokio::test]
    async fn short_or_long_bodies_are_errors() {
        let mut buf = [0u8; 256];
        let mut short = chunks(&[b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc"]);
        assert!(matches!(read_response(&mut short, &mut buf).await, Err(HttpError::UnexpectedEof)));
        let mut long = chunks(&[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabc"]);
        assert!(matches!(read_response(&mut long, &mut buf).await, Err(HttpError::TrailingBytes)));
        let mut tiny = [0u8; 8];
        let mut big_head = chunks(&[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]);
        assert!(matches!(read_response(&mut big_head, &mut tiny).await, Err(HttpError::HeadTooLarge)));
    }
}
