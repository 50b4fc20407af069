//! Writes the hand-made seeds of the corpus (`fuzz/corpus/<target>/seed-*`): real client sessions
//! recorded against the fuzz targets' own servers (HBONE CONNECT streams from an h2 client with
//! the node proxy's settings, HTTP/1.1 and HTTP/2 requests for every route of the fuzzing mesh),
//! the JWT fixtures, and the fuzzing mesh's YAML.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example seeds`; YAML from the docs is added by
//! hand (see fuzz/README.md).

use std::{
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request};
use strait::{
    fuzzing::{HboneSetup, HboneSide, L7Setup, L7Target, MODEL_YAML, Peer, serve_hbone, serve_l7},
    l7::HttpVersion,
};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

const JWKS: &str = include_str!("../../tests/tests/fixtures/jwt/jwks.json");
const TOKENS: [(&str, &str); 5] = [
    ("valid-rs256", include_str!("../../tests/tests/fixtures/jwt/valid-rs256.jwt")),
    ("valid-es256", include_str!("../../tests/tests/fixtures/jwt/valid-es256.jwt")),
    ("expired", include_str!("../../tests/tests/fixtures/jwt/expired.jwt")),
    ("other-issuer", include_str!("../../tests/tests/fixtures/jwt/other-issuer.jwt")),
    ("bad-signature", include_str!("../../tests/tests/fixtures/jwt/bad-signature.jwt")),
];

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One HTTP/2 request: method, URI, headers and body.
type Exchange<'a> = (Method, &'a str, Vec<(&'a str, &'a str)>, &'a [u8]);

/// A session that has not finished by then (in paused time) is recorded as it is.
const SESSION: Duration = Duration::from_secs(60);

fn main() -> io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build()?;
    let mut seeds = Seeds { corpus, written: 0 };
    runtime.block_on(hbone_seeds(&mut seeds))?;
    runtime.block_on(l7_seeds(&mut seeds))?;
    jwt_seeds(&mut seeds)?;
    seeds.write("config", "fuzzing-mesh.yaml", MODEL_YAML.as_bytes())?;
    println!("wrote {} seeds", seeds.written);
    Ok(())
}

struct Seeds {
    corpus: PathBuf,
    written: usize,
}

impl Seeds {
    fn write(&mut self, target: &str, name: &str, bytes: &[u8]) -> io::Result<()> {
        let dir = self.corpus.join(target);
        fs::create_dir_all(&dir)?;
        fs::File::create(dir.join(format!("seed-{name}")))?.write_all(bytes)?;
        self.written += 1;
        Ok(())
    }
}

/// One CONNECT stream of an HBONE session: its target, the client address it claims, and what
/// it sends inside the tunnel.
struct Tunnel {
    method: Method,
    /// The CONNECT target (`ip:port`); a full URI for other methods.
    uri: &'static str,
    forwarded: &'static str,
    payload: &'static [u8],
}

fn connect(uri: &'static str, payload: &'static [u8]) -> Tunnel {
    Tunnel { method: Method::CONNECT, uri, forwarded: "for=127.77.0.10", payload }
}

async fn hbone_seeds(seeds: &mut Seeds) -> io::Result<()> {
    let http1 = b"GET /api/reviews?v=1 HTTP/1.1\r\nHost: reviews:9080\r\nend-user: jason\r\n\r\n";
    let sessions: Vec<(&str, HboneSetup, Vec<Tunnel>)> = vec![
        ("node-echo", hbone_setup(HboneSide::Node, Peer::Waypoint), vec![connect("127.77.0.11:9080", b"hello pod")]),
        ("node-denied", hbone_setup(HboneSide::Node, Peer::Client), vec![connect("127.77.0.12:9080", b"x")]),
        (
            "node-bad-targets",
            hbone_setup(HboneSide::Node, Peer::Reviews),
            vec![
                connect("127.77.0.11:15008", b""),
                connect("127.77.0.13:3306", b""),
                Tunnel { method: Method::POST, ..connect("http://127.77.0.11:9080/", b"") },
                Tunnel { forwarded: "for=\"[::1]\";proto=tcp, for=127.0.0.1", ..connect("127.77.0.12:9080", b"y") },
            ],
        ),
        ("waypoint-http1", hbone_setup(HboneSide::Waypoint, Peer::Client), vec![connect("127.96.0.10:9080", http1)]),
        (
            "waypoint-detect",
            hbone_setup(HboneSide::Waypoint, Peer::Client),
            vec![connect("127.96.0.11:7000", http1), connect("127.77.0.13:7000", b"\x16\x03\x01 opaque")],
        ),
        (
            "waypoint-tcp",
            hbone_setup(HboneSide::Waypoint, Peer::Client),
            vec![connect("127.96.0.11:3306", b"select 1"), connect("127.96.0.99:80", b"")],
        ),
        (
            "waypoint-tcp-denied",
            hbone_setup(HboneSide::Waypoint, Peer::Stranger),
            vec![connect("127.96.0.11:3306", b"select 1")],
        ),
    ];
    for (name, setup, tunnels) in sessions {
        // The node proxy's pod echoes until the client half-closes; the waypoint's HTTP server
        // would drop a request whose client half-closed.
        let half_close = setup.side == HboneSide::Node;
        let recorded = record(|io| serve_hbone(io, setup), |io| hbone_client(io, tunnels, half_close)).await;
        seeds.write("hbone", name, &[&[setup.to_byte()], recorded.as_slice()].concat())?;
    }
    Ok(())
}

fn hbone_setup(side: HboneSide, peer: Peer) -> HboneSetup {
    HboneSetup { side, peer }
}

/// An HBONE client as the node proxy's pool opens them: one stream per tunnel, each sending its
/// payload (then half-closing, if asked) and reading the answer to its end.
async fn hbone_client(io: DuplexStream, tunnels: Vec<Tunnel>, half_close: bool) -> Result<(), BoxError> {
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_frame_size(1024 * 1024)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    tokio::spawn(connection);
    let mut streams = Vec::new();
    for tunnel in tunnels {
        let request = Request::builder()
            .method(tunnel.method)
            .uri(tunnel.uri)
            .header("forwarded", tunnel.forwarded)
            .header("baggage", "k8s.namespace.name=shop")
            .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .body(())?;
        let (response, mut send) = sender.clone().ready().await?.send_request(request, false)?;
        send.send_data(Bytes::from_static(tunnel.payload), half_close)?;
        streams.push(async move {
            let mut body = response.await?.into_body();
            while let Some(chunk) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk?.len());
            }
            Ok::<_, h2::Error>(())
        });
    }
    for stream in streams {
        let _ = stream.await;
    }
    Ok(())
}

async fn l7_seeds(seeds: &mut Seeds) -> io::Result<()> {
    let reviews = |peer| L7Setup { target: L7Target::Reviews, peer };
    let http1: [(&str, L7Setup, &[u8]); 8] = [
        ("get-jason", reviews(Peer::Client), b"GET /reviews/1?v=2 HTTP/1.1\r\nHost: reviews\r\nend-user: jason\r\n\r\n"),
        (
            "post-chunked",
            reviews(Peer::Client),
            b"POST /v2/ratings HTTP/1.1\r\nHost: reviews:9080\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "api-retry-mirror",
            reviews(Peer::Client),
            b"PUT /api/items/7 HTTP/1.1\r\nHost: reviews.shop\r\nContent-Length: 4\r\nx-user: alice\r\ncookie: a=b\r\n\r\nbody\
              GET /old/Page?q=1 HTTP/1.1\r\nHost: reviews\r\n\r\n",
        ),
        (
            "fault-static",
            reviews(Peer::Stranger),
            b"GET /slow/path HTTP/1.1\r\nHost: reviews\r\nx-envoy-upstream-rq-timeout-ms: 500\r\n\r\n\
              GET /static HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n",
        ),
        (
            "policy",
            reviews(Peer::Waypoint),
            b"DELETE /admin/users HTTP/1.1\r\nHost: reviews\r\n\r\nGET /secure/x HTTP/1.1\r\nHost: reviews\r\nx-block: 1\r\n\r\n",
        ),
        (
            "websocket",
            L7Setup { target: L7Target::RatingsOther, peer: Peer::Client },
            b"GET /chat HTTP/1.1\r\nHost: ratings:7000\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        ),
        ("http10", reviews(Peer::Client), b"GET / HTTP/1.0\r\n\r\n"),
        ("jwt", reviews(Peer::Client), b"GET /secure/data?access_token=x.y.z HTTP/1.1\r\nHost: reviews\r\n\r\n"),
    ];
    for (name, setup, bytes) in http1 {
        seeds.write("l7_http", &format!("http1-{name}"), &[&[setup.to_byte()], bytes].concat())?;
    }
    let token = TOKENS[0].1.trim();
    let bearer = format!("Bearer {token}");
    let http2: [(&str, L7Setup, Vec<Exchange<'_>>); 3] = [
        (
            "reviews",
            reviews(Peer::Client),
            vec![
                (Method::GET, "http://reviews:9080/reviews/1?v=3", vec![("end-user", "jason")], b""),
                (Method::POST, "http://reviews:9080/api/x", vec![("x-user", "bob")], b"payload"),
                (Method::GET, "http://reviews:9080/secure/data", vec![("authorization", bearer.as_str())], b""),
            ],
        ),
        (
            "grpc",
            L7Setup { target: L7Target::RatingsGrpc, peer: Peer::Client },
            vec![(
                Method::POST,
                "http://ratings:9090/ratings.Ratings/Get",
                vec![("content-type", "application/grpc"), ("te", "trailers")],
                b"\x00\x00\x00\x00\x02\x08\x01",
            )],
        ),
        (
            "detected",
            L7Setup { target: L7Target::RatingsOther, peer: Peer::Stranger },
            vec![(Method::GET, "http://ratings:7000/", vec![], b"")],
        ),
    ];
    for (name, setup, requests) in http2 {
        let recorded = record(|io| serve_l7(io, setup, HttpVersion::Http2), |io| h2_client(io, requests)).await;
        seeds.write("l7_http", &format!("http2-{name}"), &[&[setup.to_byte()], recorded.as_slice()].concat())?;
    }
    Ok(())
}

/// An HTTP/2 client with prior knowledge: every request on one connection, answers read to
/// their end.
async fn h2_client(io: DuplexStream, requests: Vec<Exchange<'_>>) -> Result<(), BoxError> {
    let (sender, connection) = h2::client::handshake(io).await?;
    tokio::spawn(connection);
    for (method, uri, headers, body) in requests {
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request.body(())?;
        let (response, mut send) = sender.clone().ready().await?.send_request(request, body.is_empty())?;
        if !body.is_empty() {
            send.send_data(Bytes::copy_from_slice(body), true)?;
        }
        let mut answer = response.await?.into_body();
        while let Some(chunk) = answer.data().await {
            let _ = answer.flow_control().release_capacity(chunk?.len());
        }
    }
    Ok(())
}

fn jwt_seeds(seeds: &mut Seeds) -> io::Result<()> {
    for (name, token) in TOKENS {
        let token = token.trim();
        seeds.write("jwt", name, token.as_bytes())?;
        seeds.write("jwt", &format!("jwks-{name}"), format!("{JWKS}\0{token}").as_bytes())?;
    }
    let ec_only = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"strait-test-ec","x":"iJ_2cXbXaEnLb5QquWkD3p6_ytr7H4rmqqUR1KZ2HRk","y":"sjnbhDH-BxDpNK-0-HHjMFnxlNbraX0RsYfKAccQnt0","alg":"ES256"}]}"#;
    seeds.write("jwt", "jwks-ec-only", format!("{ec_only}\0{}", TOKENS[1].1.trim()).as_bytes())?;
    seeds.write("jwt", "jwks-empty", b"{\"keys\":[]}\0a.b.c")?;
    Ok(())
}

/// Runs `client` against `server` over an in-memory pipe and returns what the server read.
async fn record<S, SF, C, CF, E>(server: S, client: C) -> Vec<u8>
where
    S: FnOnce(Recorder) -> SF,
    SF: Future<Output = ()>,
    C: FnOnce(DuplexStream) -> CF,
    CF: Future<Output = Result<(), E>>,
{
    let (client_io, server_io) = tokio::io::duplex(1024 * 1024);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorder = Recorder { io: server_io, seen: seen.clone() };
    let session = async {
        let _ = client(client_io).await;
    };
    let _ = tokio::time::timeout(SESSION, async { tokio::join!(server(recorder), session) }).await;
    seen.lock().map(|s| s.clone()).unwrap_or_default()
}

/// The server's end of the pipe, keeping a copy of every byte read from it.
struct Recorder {
    io: DuplexStream,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl AsyncRead for Recorder {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Ok(mut seen) = self.seen.lock() {
            seen.extend_from_slice(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
