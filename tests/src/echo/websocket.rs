//! WebSocket (RFC 6455) for `strait-echo`: the `http` server echoes messages on upgraded
//! connections, and `strait-echo ws` checks one round trip through the mesh.
//!
//! Both sides share one frame codec, so its tests cover both. Fragmented messages are refused
//! (close 1003): no test needs them, and a waypoint passes frames through without reassembly.

use std::hash::{BuildHasher, RandomState};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::json::Value;
use super::wire::{RequestHead, has_token, parse_response_head, read_head};
use super::{base64, client::HttpUrl, sha1};

/// Appended to the client's key before hashing (RFC 6455 1.3).
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest message accepted; bigger ones are closed with 1009, not buffered.
const MAX_MESSAGE: u64 = 16 * 1024 * 1024;

pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xa;

/// Close codes (RFC 6455 7.4.1).
const NORMAL: u16 = 1000;
const PROTOCOL_ERROR: u16 = 1002;
const UNSUPPORTED: u16 = 1003;
const INVALID_DATA: u16 = 1007;
const TOO_BIG: u16 = 1009;

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    base64::encode(&sha1::digest(format!("{key}{GUID}").as_bytes()))
}

/// The client's key if `request` asks for a WebSocket upgrade (RFC 6455 4.2.1).
pub fn upgrade_key(request: &RequestHead) -> Option<&str> {
    let asks = request.method == "GET"
        && request.minor_version == 1
        && has_token(request.header("upgrade"), "websocket")
        && has_token(request.header("connection"), "upgrade");
    request.header("sec-websocket-key").filter(|key| asks && !key.is_empty())
}

/// One frame, its payload unmasked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    /// Clients mask every frame, servers none (RFC 6455 5.1).
    pub mask: Option<[u8; 4]>,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(opcode: u8, payload: impl Into<Vec<u8>>, mask: Option<[u8; 4]>) -> Frame {
        Frame { fin: true, opcode, mask, payload: payload.into() }
    }

    /// The frame on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload.len() + 14);
        out.push(if self.fin { 0x80 } else { 0 } | self.opcode);
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        // The shortest length encoding is mandatory (RFC 6455 5.2).
        match self.payload.len() {
            n @ 0..=125 => out.push(mask_bit | n as u8),
            n @ 126..=0xffff => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let start = out.len() + self.mask.map_or(0, |m| m.len());
        if let Some(mask) = self.mask {
            out.extend_from_slice(&mask);
        }
        out.extend_from_slice(&self.payload);
        if let Some(mask) = self.mask {
            apply_mask(&mut out[start..], mask);
        }
        out
    }
}

fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

/// Why the peer's frames cannot be accepted: the close code to send, and a reason.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameError {
    pub code: u16,
    pub reason: &'static str,
}

fn refuse(code: u16, reason: &'static str) -> FrameError {
    FrameError { code, reason }
}

/// Reads one frame. I/O errors (the connection ended) are `Err`; frames that break the
/// protocol are `Ok(Err(_))`, to be answered with a close frame.
pub fn read_frame(reader: &mut impl Read, max_payload: u64) -> io::Result<Result<Frame, FrameError>> {
    let mut head = [0u8; 2];
    reader.read_exact(&mut head)?;
    let (fin, opcode) = (head[0] & 0x80 != 0, head[0] & 0x0f);
    let masked = head[1] & 0x80 != 0;
    if head[0] & 0x70 != 0 {
        return Ok(Err(refuse(PROTOCOL_ERROR, "reserved bits set without an extension")));
    }
    if !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
        return Ok(Err(refuse(PROTOCOL_ERROR, "unknown opcode")));
    }
    let length = match head[1] & 0x7f {
        126 => {
            let mut bytes = [0u8; 2];
            reader.read_exact(&mut bytes)?;
            u64::from(u16::from_be_bytes(bytes))
        }
        127 => {
            let mut bytes = [0u8; 8];
            reader.read_exact(&mut bytes)?;
            let length = u64::from_be_bytes(bytes);
            if length >> 63 != 0 {
                return Ok(Err(refuse(PROTOCOL_ERROR, "64-bit length with the top bit set")));
            }
            length
        }
        n => u64::from(n),
    };
    if opcode >= CLOSE && (!fin || length > 125) {
        return Ok(Err(refuse(PROTOCOL_ERROR, "control frames must be short and unfragmented")));
    }
    if length > max_payload {
        return Ok(Err(refuse(TOO_BIG, "message too big")));
    }
    let mask = if masked {
        let mut mask = [0u8; 4];
        reader.read_exact(&mut mask)?;
        Some(mask)
    } else {
        None
    };
    let mut payload = Vec::new();
    reader.take(length).read_to_end(&mut payload)?;
    if payload.len() as u64 != length {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "frame payload cut short"));
    }
    if let Some(mask) = mask {
        apply_mask(&mut payload, mask);
    }
    Ok(Ok(Frame { fin, opcode, mask, payload }))
}

/// Echoes text and binary messages back until the client closes; returns how many it echoed.
pub fn serve_echo(reader: &mut impl BufRead, writer: &mut impl Write) -> io::Result<u64> {
    let mut echoed = 0;
    loop {
        let frame = match read_frame(reader, MAX_MESSAGE)? {
            Ok(frame) => frame,
            Err(error) => return close(writer, error).map(|()| echoed),
        };
        let check = if frame.mask.is_none() {
            Err(refuse(PROTOCOL_ERROR, "client frames must be masked"))
        } else if frame.opcode == CONTINUATION || (!frame.fin && frame.opcode < CLOSE) {
            Err(refuse(UNSUPPORTED, "fragmented messages are not supported"))
        } else if frame.opcode == TEXT && std::str::from_utf8(&frame.payload).is_err() {
            Err(refuse(INVALID_DATA, "text message is not UTF-8"))
        } else {
            Ok(())
        };
        if let Err(error) = check {
            return close(writer, error).map(|()| echoed);
        }
        match frame.opcode {
            TEXT | BINARY => {
                writer.write_all(&Frame::new(frame.opcode, frame.payload, None).encode())?;
                echoed += 1;
            }
            PING => writer.write_all(&Frame::new(PONG, frame.payload, None).encode())?,
            CLOSE => {
                // Echoing the client's status code is the usual reply (RFC 6455 5.5.1).
                let code = frame.payload.get(..2).map(<[u8]>::to_vec).unwrap_or_default();
                writer.write_all(&Frame::new(CLOSE, code, None).encode())?;
                writer.flush()?;
                return Ok(echoed);
            }
            _ => {}
        }
        writer.flush()?;
    }
}

fn close(writer: &mut impl Write, error: FrameError) -> io::Result<()> {
    let mut payload = error.code.to_be_bytes().to_vec();
    payload.extend_from_slice(error.reason.as_bytes());
    writer.write_all(&Frame::new(CLOSE, payload, None).encode())?;
    writer.flush()
}

/// What `strait-echo ws` saw: the line it prints, and what tests read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WsReport {
    /// Whether the server answered 101 with the right accept value.
    pub upgraded: bool,
    /// The text that came back, if any.
    pub echo: Option<String>,
    /// What went wrong; `None` when the message came back unchanged.
    pub error: Option<String>,
}

impl WsReport {
    /// `{"upgraded":true,"echo":"..."}`, plus `"error"` when the check failed.
    pub fn to_json(&self) -> String {
        let mut members = vec![("upgraded".into(), self.upgraded.into()), ("echo".into(), self.echo.clone().into())];
        if let Some(error) = &self.error {
            members.push(("error".into(), error.as_str().into()));
        }
        Value::Object(members).to_string()
    }

    pub fn from_json(text: &str) -> Result<WsReport, String> {
        let value = super::json::parse(text)?;
        let upgraded = value.get("upgraded").and_then(Value::as_bool).ok_or("no \"upgraded\" in ws output")?;
        let string = |key| value.get(key).and_then(Value::as_str).map(String::from);
        Ok(WsReport { upgraded, echo: string("echo"), error: string("error") })
    }
}

/// Upgrades a connection to `url`, sends `message` as one masked text frame, expects it back,
/// and closes. `timeout` bounds the whole exchange.
pub fn check_echo(url: &HttpUrl, message: &str, timeout: Duration) -> WsReport {
    let mut report = WsReport { upgraded: false, echo: None, error: None };
    if let Err(error) = exchange(url, message, timeout, &mut report) {
        report.error = Some(error);
    } else if report.echo.as_deref() != Some(message) {
        report.error = Some("the echo differs from the message sent".into());
    }
    report
}

fn exchange(url: &HttpUrl, message: &str, timeout: Duration, report: &mut WsReport) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let stream = TcpStream::connect_timeout(&url.addr, timeout).map_err(|e| format!("connect {}: {e}", url.addr))?;
    let set_timeout = |stream: &TcpStream| {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        stream.set_read_timeout(Some(left)).and_then(|()| stream.set_write_timeout(Some(left)))
    };
    set_timeout(&stream).map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);

    let key = base64::encode(&random_bytes::<16>());
    let request = format!(
        "GET {} HTTP/1.1\r\nhost: {}\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-key: {key}\r\n\
         sec-websocket-version: 13\r\nuser-agent: strait-echo\r\n\r\n",
        url.path, url.host
    );
    writer.write_all(request.as_bytes()).map_err(|e| format!("sending the upgrade request: {e}"))?;
    let head = read_head(&mut reader)
        .map_err(|e| format!("reading the upgrade response: {e}"))?
        .ok_or("connection closed before the upgrade response")?
        .and_then(|h| parse_response_head(&h))
        .map_err(|e| format!("bad upgrade response: {}", e.0))?;
    if head.status != 101 {
        return Err(format!("upgrade answered with status {}", head.status));
    }
    if head.header("sec-websocket-accept") != Some(accept_key(&key).as_str()) {
        return Err(format!("wrong sec-websocket-accept {:?}", head.header("sec-websocket-accept")));
    }
    report.upgraded = true;

    let send = |writer: &mut TcpStream, opcode, payload: &[u8]| {
        let frame = Frame::new(opcode, payload, Some(random_bytes::<4>()));
        writer.write_all(&frame.encode()).map_err(|e| format!("sending a frame: {e}"))
    };
    send(&mut writer, TEXT, message.as_bytes())?;
    loop {
        set_timeout(reader.get_ref()).map_err(|e| e.to_string())?;
        let frame = read_frame(&mut reader, MAX_MESSAGE)
            .map_err(|e| format!("reading the echo: {e}"))?
            .map_err(|e| format!("bad frame from the server: {}", e.reason))?;
        match frame.opcode {
            TEXT => {
                report.echo = Some(String::from_utf8_lossy(&frame.payload).into_owned());
                break;
            }
            PING => send(&mut writer, PONG, &frame.payload)?,
            PONG => {}
            CLOSE => return Err("the server closed instead of echoing".into()),
            _ => return Err(format!("unexpected frame with opcode {}", frame.opcode)),
        }
    }
    send(&mut writer, CLOSE, &NORMAL.to_be_bytes())?;
    // The server's close completes the closing handshake; a connection that simply ends is fine.
    while let Ok(Ok(frame)) = read_frame(&mut reader, MAX_MESSAGE) {
        if frame.opcode == CLOSE {
            break;
        }
    }
    Ok(())
}

/// Unpredictable enough for keys and masks, which need no cryptographic strength; std seeds
/// `RandomState` from the OS.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let word = RandomState::new().hash_one((i, Instant::now())).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
        read_frame(&mut &bytes[..], MAX_MESSAGE).expect("complete frame")
    }

    #[test]
    fn accept_key_matches_rfc_6455() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn encodes_rfc_6455_examples() {
        // RFC 6455 5.7: "Hello", unmasked and masked.
        assert_eq!(Frame::new(TEXT, "Hello", None).encode(), [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        let masked = Frame::new(TEXT, "Hello", Some([0x37, 0xfa, 0x21, 0x3d]));
        let wire = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        assert_eq!(masked.encode(), wire);
        assert_eq!(decode(&wire), Ok(masked));
    }

    #[test]
    fn round_trips_16_and_64_bit_lengths() {
        for (len, header) in [(125usize, 2usize), (126, 4), (65_535, 4), (65_536, 10), (70_000, 10)] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            for mask in [None, Some([1, 2, 3, 4])] {
                let frame = Frame::new(BINARY, payload.clone(), mask);
                let wire = frame.encode();
                assert_eq!(wire.len(), header + mask.map_or(0, |_| 4) + len, "length {len}");
                assert_eq!(decode(&wire), Ok(frame), "length {len}");
            }
        }
        assert_eq!(&Frame::new(BINARY, vec![0; 70_000], None).encode()[1..10], [127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    #[test]
    fn refuses_protocol_violations() {
        assert_eq!(decode(&[0xc1, 0x00]).map_err(|e| e.code), Err(PROTOCOL_ERROR), "RSV1");
        assert_eq!(decode(&[0x83, 0x00]).map_err(|e| e.code), Err(PROTOCOL_ERROR), "opcode 3");
        assert_eq!(decode(&[0x09, 0x00]).map_err(|e| e.code), Err(PROTOCOL_ERROR), "fragmented ping");
        assert_eq!(decode(&[0x89, 0x7e, 0x00, 0x7e]).map_err(|e| e.code), Err(PROTOCOL_ERROR), "long ping");
        let huge = [0x82, 0x7f, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(decode(&huge).map_err(|e| e.code), Err(PROTOCOL_ERROR));
        let big = [0x82, 0x7f, 0, 0, 0, 0, 0x10, 0, 0, 0];
        assert_eq!(decode(&big).map_err(|e| e.code), Err(TOO_BIG));
        assert!(read_frame(&mut &[0x81, 0x05, b'H'][..], MAX_MESSAGE).is_err(), "cut payload");
    }

    /// Runs the server loop over the client frames `input`; returns the frames it sent.
    fn serve(input: &[Frame]) -> Vec<Frame> {
        let wire: Vec<u8> = input.iter().flat_map(Frame::encode).collect();
        let mut out = Vec::new();
        let _ = serve_echo(&mut &wire[..], &mut out);
        let mut frames = Vec::new();
        let mut rest = &out[..];
        while !rest.is_empty() {
            frames.push(read_frame(&mut rest, MAX_MESSAGE).expect("whole frames").expect("valid frames"));
        }
        frames
    }

    #[test]
    fn server_echoes_pongs_and_closes() {
        let mask = Some([9, 8, 7, 6]);
        let sent = serve(&[
            Frame::new(TEXT, "hi", mask),
            Frame::new(PING, "p", mask),
            Frame::new(BINARY, vec![0, 255], mask),
            Frame::new(CLOSE, [0x03, 0xe8, b'x'], mask),
            Frame::new(TEXT, "after close", mask),
        ]);
        let expected = [
            Frame::new(TEXT, "hi", None),
            Frame::new(PONG, "p", None),
            Frame::new(BINARY, vec![0, 255], None),
            Frame::new(CLOSE, [0x03, 0xe8], None),
        ];
        assert_eq!(sent, expected);
    }

    #[test]
    fn server_refuses_unmasked_fragmented_and_invalid_text() {
        let close_code = |frames: Vec<Frame>| frames.last().map(|f| (f.opcode, f.payload[..2].to_vec()));
        let unmasked = serve(&[Frame::new(TEXT, "hi", None)]);
        assert_eq!(close_code(unmasked), Some((CLOSE, PROTOCOL_ERROR.to_be_bytes().to_vec())));
        let first = Frame { fin: false, ..Frame::new(TEXT, "a", Some([1; 4])) };
        let fragmented = serve(&[first, Frame::new(CONTINUATION, "b", Some([1; 4]))]);
        assert_eq!(close_code(fragmented), Some((CLOSE, UNSUPPORTED.to_be_bytes().to_vec())));
        let invalid = serve(&[Frame::new(TEXT, vec![0xff], Some([1; 4]))]);
        assert_eq!(close_code(invalid), Some((CLOSE, INVALID_DATA.to_be_bytes().to_vec())));
    }

    #[test]
    fn report_json_round_trips() {
        let ok = WsReport { upgraded: true, echo: Some("a \"b\"".into()), error: None };
        assert_eq!(ok.to_json(), r#"{"upgraded":true,"echo":"a \"b\""}"#);
        assert_eq!(WsReport::from_json(&ok.to_json()), Ok(ok));
        let failed = WsReport { upgraded: false, echo: None, error: Some("connect: refused".into()) };
        assert_eq!(WsReport::from_json(&failed.to_json()), Ok(failed));
    }

    #[test]
    fn random_bytes_differ() {
        assert_ne!(random_bytes::<16>(), random_bytes::<16>());
    }
}
