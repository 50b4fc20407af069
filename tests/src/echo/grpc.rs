//! `strait-echo grpc` and `grpc-call`: one unary gRPC method over h2c (HTTP/2 with prior
//! knowledge), so waypoint tests can route, retry and fault gRPC as Istio does.
//!
//! The method is `/strait.test.Echo/Say`, request and response both `message Text { string
//! message = 1; }`, encoded by hand: protoc, prost and tonic for one string field would cost
//! more than the twenty lines below. Requests with metadata `x-grpc-status: N` are answered
//! with that status, for tests of retries on and faults of gRPC statuses.

use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::header::CONTENT_TYPE;
use http::uri::Authority;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};

use super::ServerConfig;
use super::json::{self, Value};
use super::tcp::resolve;

/// The one method served.
pub const SAY_PATH: &str = "/strait.test.Echo/Say";
/// Largest request body read; a test never sends more, a broken client might.
const MAX_REQUEST: usize = 4 * 1024 * 1024;

/// gRPC status codes used here (grpc/doc/statuscodes.md).
pub const OK: u32 = 0;
const INVALID_ARGUMENT: u32 = 3;
const RESOURCE_EXHAUSTED: u32 = 8;
const UNIMPLEMENTED: u32 = 12;
const INTERNAL: u32 = 13;

/// The protobuf encoding of `Text { message }`: field 1, wire type 2 (tag 0x0a).
pub fn encode_message(message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 6);
    // proto3 leaves default values out.
    if !message.is_empty() {
        out.push(0x0a);
        put_varint(&mut out, message.len() as u64);
        out.extend_from_slice(message.as_bytes());
    }
    out
}

/// Field 1 of a protobuf message (the last one, as protobuf merges); unknown fields skipped.
pub fn decode_message(mut bytes: &[u8]) -> Result<String, String> {
    let mut message = String::new();
    while !bytes.is_empty() {
        let key = get_varint(&mut bytes)?;
        let (field, wire_type) = (key >> 3, key & 7);
        if field == 0 {
            return Err("field number 0".into());
        }
        match wire_type {
            0 => {
                get_varint(&mut bytes)?;
            }
            1 | 5 => {
                let width = if wire_type == 1 { 8 } else { 4 };
                bytes = bytes.get(width..).ok_or("truncated fixed-width field")?;
            }
            2 => {
                let length = usize::try_from(get_varint(&mut bytes)?).map_err(|_| "length too large")?;
                let value = bytes.get(..length).ok_or("truncated length-delimited field")?;
                bytes = &bytes[length..];
                if field == 1 {
                    message = String::from_utf8(value.to_vec()).map_err(|_| "field 1 is not UTF-8")?;
                }
            }
            _ => return Err(format!("unsupported wire type {wire_type}")),
        }
        if field == 1 && wire_type != 2 {
            return Err("field 1 is not a string".into());
        }
    }
    Ok(message)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(bytes: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return Ok(value);
        }
    }
    Err("truncated or overlong varint".into())
}

/// One length-prefixed gRPC message, uncompressed (flag 0, 4-byte big-endian length).
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&u32::try_from(message.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(message);
    out
}

/// The single message of a unary call's body.
pub fn unframe(body: &[u8]) -> Result<&[u8], String> {
    let (prefix, rest) = body.split_at_checked(5).ok_or("body shorter than a gRPC message prefix")?;
    if prefix[0] != 0 {
        return Err("compressed messages are not supported".into());
    }
    let length = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    match rest.len().cmp(&length) {
        std::cmp::Ordering::Equal => Ok(rest),
        std::cmp::Ordering::Less => Err("message shorter than its prefix says".into()),
        std::cmp::Ordering::Greater => Err("more than one message in a unary call".into()),
    }
}

/// `grpc-message` is percent-encoded outside printable ASCII (PROTOCOL-HTTP2.md).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| if (0x20..0x7f).contains(&b) && b != b'%' { char::from(b).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How one call is answered: its status, and a response message only with status 0.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    status: u32,
    grpc_message: Option<String>,
    message: Option<String>,
}

fn failure(status: u32, grpc_message: impl Into<String>) -> Reply {
    Reply { status, grpc_message: Some(grpc_message.into()), message: None }
}

/// Decides the answer to a call of `path` with `headers` and request `body`.
fn decide(path: &str, headers: &HeaderMap, body: &[u8], name: &str) -> Reply {
    if path != SAY_PATH {
        return failure(UNIMPLEMENTED, format!("unknown method {path}"));
    }
    if let Some(value) = headers.get("x-grpc-status") {
        return match value.to_str().ok().and_then(|v| v.trim().parse::<u32>().ok()) {
            Some(status) => failure(status, "requested"),
            None => failure(INVALID_ARGUMENT, "x-grpc-status must be a number"),
        };
    }
    match unframe(body).and_then(decode_message) {
        Ok(text) => Reply { status: OK, grpc_message: None, message: Some(format!("{name}: {text}")) },
        Err(error) => failure(INTERNAL, format!("bad request message: {error}")),
    }
}

/// What every connection of one server shares.
struct Server {
    config: ServerConfig,
    served_by: HeaderValue,
}

/// Serves gRPC over h2c on `0.0.0.0:port` until the process is killed.
pub fn serve(port: u16, config: ServerConfig) -> io::Result<()> {
    let served_by = HeaderValue::from_str(&config.name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "the server name must be a valid header value"))?;
    let server = Arc::new(Server { config, served_by });
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(("0.0.0.0", port)).await?;
        println!("listening on 0.0.0.0:{port}");
        accept_loop(listener, server).await
    })
}

async fn accept_loop(listener: TcpListener, server: Arc<Server>) -> io::Result<()> {
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => {
                tokio::spawn(serve_connection(socket, peer, Arc::clone(&server)));
            }
            // Out of file descriptors, most likely: wait for some to close rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn serve_connection(socket: TcpStream, peer: SocketAddr, server: Arc<Server>) {
    let _ = socket.set_nodelay(true);
    let Ok(mut connection) = h2::server::handshake(socket).await else { return };
    // Accepting also drives the connection's I/O; each call runs in its own task. An error
    // ends this connection only; it is logged, for tests that check a proxy never provokes one.
    while let Some(accepted) = connection.accept().await {
        match accepted {
            Ok((request, respond)) => {
                tokio::spawn(handle(request, respond, peer, Arc::clone(&server)));
            }
            Err(e) => {
                println!("connection error peer={peer}: {e} ({e:?})");
                return;
            }
        }
    }
}

async fn handle(request: Request<RecvStream>, respond: SendResponse<Bytes>, peer: SocketAddr, server: Arc<Server>) {
    let path = request.uri().path().to_string();
    let authority = request.uri().authority().map_or_else(|| "-".to_string(), ToString::to_string);
    let status = match answer(request, respond, &server).await {
        Ok(Some(status)) => status.to_string(),
        Ok(None) | Err(_) => "-".to_string(),
    };
    println!("grpc peer={peer} {path} status={status} authority={authority}");
}

/// Answers one call; the gRPC status sent, `None` for a request that is not gRPC at all.
async fn answer(
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    server: &Server,
) -> Result<Option<u32>, h2::Error> {
    let (parts, mut body) = request.into_parts();
    let content_type = parts.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if parts.method != Method::POST || !content_type.starts_with("application/grpc") {
        let mut response = Response::new(());
        // gRPC over HTTP/2 answers a foreign content type with 415 (PROTOCOL-HTTP2.md).
        *response.status_mut() = if parts.method == Method::POST {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        } else {
            StatusCode::METHOD_NOT_ALLOWED
        };
        respond.send_response(response, true)?;
        return Ok(None);
    }
    let mut received = Vec::new();
    let mut too_big = false;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if received.len() + chunk.len() > MAX_REQUEST {
            too_big = true;
            break;
        }
        received.extend_from_slice(&chunk);
    }
    let reply = if too_big {
        failure(RESOURCE_EXHAUSTED, "request message too large")
    } else {
        decide(parts.uri.path(), &parts.headers, &received, &server.config.name)
    };
    tokio::time::sleep(server.config.delay).await;

    let mut response = Response::new(());
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response.headers_mut().insert("x-served-by", server.served_by.clone());
    let mut send = respond.send_response(response, false)?;
    if let Some(text) = &reply.message {
        send.send_data(Bytes::from(frame(&encode_message(text))), false)?;
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(reply.status));
    if let Some(value) = reply.grpc_message.and_then(|m| HeaderValue::from_str(&percent_encode(&m)).ok()) {
        trailers.insert("grpc-message", value);
    }
    send.send_trailers(trailers)?;
    Ok(Some(reply.status))
}

/// A `grpc-call`, checked before anything is sent.
#[derive(Clone, Debug)]
pub struct CallOptions {
    pub addr: SocketAddr,
    /// `:authority`, the target itself unless `--authority` says otherwise.
    pub authority: Authority,
    pub message: String,
    /// Sent as `x-grpc-status`, asking the server to fail with it.
    pub status: Option<u32>,
    /// Bounds the whole call, connecting included.
    pub timeout: Duration,
}

impl CallOptions {
    pub fn new(target: &str, authority: Option<&str>, message: &str) -> Result<CallOptions, String> {
        let addr = resolve(target).map_err(|e| format!("bad target {target:?}: {e}"))?;
        let authority = authority.unwrap_or(target);
        let authority = Authority::from_str(authority).map_err(|e| format!("bad authority {authority:?}: {e}"))?;
        Ok(CallOptions { addr, authority, message: message.to_string(), status: None, timeout: Duration::from_secs(5) })
    }
}

/// What `grpc-call` saw: the line it prints, and what tests read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrpcReply {
    /// `None` when no `grpc-status` arrived (the call failed below gRPC).
    pub grpc_status: Option<u32>,
    /// The response message's text.
    pub message: Option<String>,
    pub http_status: Option<u16>,
    /// `grpc-message`, decoded.
    pub grpc_message: Option<String>,
    /// Why the call failed below gRPC, or why the response could not be read.
    pub error: Option<String>,
}

impl GrpcReply {
    /// `{"grpc_status":N,"message":"...","http_status":200,"grpc_message":...}`, plus `"error"`
    /// when something failed.
    pub fn to_json(&self) -> String {
        let mut members = vec![
            ("grpc_status".into(), self.grpc_status.map(u64::from).into()),
            ("message".into(), self.message.clone().into()),
            ("http_status".into(), self.http_status.map(u64::from).into()),
            ("grpc_message".into(), self.grpc_message.clone().into()),
        ];
        if let Some(error) = &self.error {
            members.push(("error".into(), error.as_str().into()));
        }
        Value::Object(members).to_string()
    }

    pub fn from_json(text: &str) -> Result<GrpcReply, String> {
        let value = json::parse(text)?;
        if value.get("grpc_status").is_none() {
            return Err("no \"grpc_status\" in grpc-call output".into());
        }
        let number = |key| value.get(key).and_then(Value::as_u64);
        let string = |key| value.get(key).and_then(Value::as_str).map(String::from);
        Ok(GrpcReply {
            grpc_status: number("grpc_status").and_then(|n| u32::try_from(n).ok()),
            message: string("message"),
            http_status: number("http_status").and_then(|n| u16::try_from(n).ok()),
            grpc_message: string("grpc_message"),
            error: string("error"),
        })
    }
}

/// Calls `/strait.test.Echo/Say` once.
pub fn call(options: &CallOptions) -> GrpcReply {
    call_path(options, SAY_PATH)
}

fn call_path(options: &CallOptions, path: &str) -> GrpcReply {
    let mut reply = GrpcReply::default();
    let result = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(async {
            match tokio::time::timeout(options.timeout, exchange(options, path, &mut reply)).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {} ms", options.timeout.as_millis())),
            }
        }),
        Err(e) => Err(format!("cannot start a runtime: {e}")),
    };
    reply.error = result.err();
    reply
}

/// Fills `reply` as the answer arrives, so a failure half-way still reports what came.
async fn exchange(options: &CallOptions, path: &str, reply: &mut GrpcReply) -> Result<(), String> {
    let addr = options.addr;
    let h2 = |e: h2::Error| format!("HTTP/2 with {addr}: {e}");
    let socket = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = socket.set_nodelay(true);
    let (sender, connection) = h2::client::handshake(socket).await.map_err(h2)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut sender = sender.ready().await.map_err(h2)?;
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}{path}", options.authority))
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "strait-echo");
    if let Some(status) = options.status {
        request = request.header("x-grpc-status", status);
    }
    let request = request.body(()).map_err(|e| format!("bad request: {e}"))?;
    let (response, mut send) = sender.send_request(request, false).map_err(h2)?;
    send.send_data(Bytes::from(frame(&encode_message(&options.message))), true).map_err(h2)?;

    let response = response.await.map_err(h2)?;
    reply.http_status = Some(response.status().as_u16());
    let (parts, mut body) = response.into_parts();
    // A call that fails before any message may put its status in the headers ("trailers-only").
    read_status(&parts.headers, reply);
    let mut received = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(h2)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        received.extend_from_slice(&chunk);
    }
    if let Some(trailers) = body.trailers().await.map_err(h2)? {
        read_status(&trailers, reply);
    }
    if !received.is_empty() {
        let text = unframe(&received).and_then(decode_message).map_err(|e| format!("bad response message: {e}"))?;
        reply.message = Some(text);
    }
    if reply.grpc_status.is_none() {
        return Err("no grpc-status in the response".into());
    }
    Ok(())
}

fn read_status(headers: &HeaderMap, reply: &mut GrpcReply) {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(status) = text("grpc-status").and_then(|s| s.trim().parse().ok()) {
        reply.grpc_status = Some(status);
    }
    if let Some(message) = text("grpc-message") {
        reply.grpc_message = Some(percent_decode(message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_decodes_the_text_message() {
        assert_eq!(encode_message("hi"), [0x0a, 0x02, b'h', b'i']);
        assert_eq!(encode_message(""), Vec::<u8>::new());
        let long = "x".repeat(300);
        let encoded = encode_message(&long);
        assert_eq!(&encoded[..3], [0x0a, 0xac, 0x02]);
        assert_eq!(decode_message(&encoded), Ok(long));
        assert_eq!(decode_message(&[]), Ok(String::new()));
        // Unknown fields of every wire type are skipped; the last field 1 wins.
        let mut mixed = vec![0x10, 0x96, 0x01, 0x19, 1, 2, 3, 4, 5, 6, 7, 8, 0x25, 1, 2, 3, 4, 0x12, 1, b'z'];
        mixed.extend_from_slice(&encode_message("a"));
        mixed.extend_from_slice(&encode_message("b"));
        assert_eq!(decode_message(&mixed), Ok("b".into()));
        for bad in
            [&[0x0a, 0x05, b'a'][..], &[0x0a], &[0x08, 0x01], &[0x0a, 0x01, 0xff], &[0x0b], &[0x02, 0x00], &[0x80; 11]]
        {
            assert!(decode_message(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn frames_one_uncompressed_message() {
        let framed = frame(b"abc");
        assert_eq!(framed, [0, 0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(unframe(&framed), Ok(&b"abc"[..]));
        assert_eq!(unframe(&frame(b"")), Ok(&b""[..]));
        assert!(unframe(&[0, 0, 0]).is_err());
        assert!(unframe(&[1, 0, 0, 0, 0]).is_err(), "compressed");
        assert!(unframe(&[0, 0, 0, 0, 2, b'a']).is_err(), "short");
        assert!(unframe(&[0, 0, 0, 0, 0, b'a']).is_err(), "trailing bytes");
    }

    #[test]
    fn decides_statuses() {
        let body = frame(&encode_message("hello"));
        let ok = decide(SAY_PATH, &HeaderMap::new(), &body, "ratings");
        assert_eq!(ok, Reply { status: OK, grpc_message: None, message: Some("ratings: hello".into()) });
        assert_eq!(decide("/strait.test.Echo/Nope", &HeaderMap::new(), &body, "r").status, UNIMPLEMENTED);
        let mut headers = HeaderMap::new();
        headers.insert("x-grpc-status", HeaderValue::from_static("14"));
        assert_eq!(decide(SAY_PATH, &headers, &body, "r"), failure(14, "requested"));
        headers.insert("x-grpc-status", HeaderValue::from_static("unavailable"));
        assert_eq!(decide(SAY_PATH, &headers, &body, "r").status, INVALID_ARGUMENT);
        assert_eq!(decide(SAY_PATH, &HeaderMap::new(), b"\x00\x00", "r").status, INTERNAL);
    }

    #[test]
    fn percent_encodes_grpc_messages() {
        assert_eq!(percent_encode("a b%c\né"), "a b%25c%0A%C3%A9");
        assert_eq!(percent_decode(&percent_encode("a b%c\né")), "a b%c\né");
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn reply_json_round_trips() {
        let ok = GrpcReply {
            grpc_status: Some(0),
            message: Some("v1: hi".into()),
            http_status: Some(200),
            ..Default::default()
        };
        assert_eq!(ok.to_json(), r#"{"grpc_status":0,"message":"v1: hi","http_status":200,"grpc_message":null}"#);
        assert_eq!(GrpcReply::from_json(&ok.to_json()), Ok(ok));
        let failed = GrpcReply { error: Some("connect: refused".into()), ..Default::default() };
        assert_eq!(GrpcReply::from_json(&failed.to_json()), Ok(failed));
    }

    /// The server and client together, in process: runs the server on a loopback port.
    fn local_server(name: &str) -> SocketAddr {
        let config = ServerConfig { name: name.into(), delay: Duration::ZERO, http10: false };
        let served_by = HeaderValue::from_str(name).expect("valid name");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        listener.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let listener = TcpListener::from_std(listener).expect("tokio listener");
                accept_loop(listener, Arc::new(Server { config, served_by })).await
            })
        });
        addr
    }

    #[test]
    fn client_and_server_agree() {
        let addr = local_server("local");
        let mut options = CallOptions::new(&addr.to_string(), Some("echo.test:50051"), "hi").expect("valid");
        let reply = call(&options);
        assert_eq!(
            (reply.grpc_status, reply.message.as_deref(), reply.http_status),
            (Some(0), Some("local: hi"), Some(200))
        );
        assert_eq!(reply.error, None);
        options.status = Some(14);
        let reply = call(&options);
        assert_eq!(
            (reply.grpc_status, reply.message, reply.grpc_message.as_deref()),
            (Some(14), None, Some("requested"))
        );
        let reply = call_path(&options, "/strait.test.Echo/Nope");
        assert_eq!(reply.grpc_status, Some(UNIMPLEMENTED));
        assert!(CallOptions::new(&addr.to_string(), Some("bad authority"), "hi").is_err());
    }
}
