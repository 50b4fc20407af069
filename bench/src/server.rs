//! `strait-load server`: the test server every client mode talks to, on one or more ports.
//!
//! Each connection says what it is with its first bytes: an HTTP method starts keep-alive HTTP/1.1
//! (`GET /bytes/N` answers N bytes, anything else `ok`); anything else is the sink protocol of
//! `stream` mode. One server thus serves latency, connection-rate, throughput and idle-connection
//! runs through the same mesh ports. A connection that sends nothing (as `hold` opens them) holds
//! no buffer: only its task and socket, so the server's memory does not blur what the proxies hold.

use std::{
    io::{self, Write},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinSet,
};

use crate::{
    http::{self, MAX_HEAD, Protocol, RequestHead, Route},
    net::ZEROS,
    sink,
    tls::Stream,
};

/// Accept queue length: `hold` and `connections` open connections in bursts, and a SYN dropped
/// on a full queue costs a 1 s retransmit. The kernel caps it at `net.core.somaxconn` (4096).
const BACKLOG: u32 = 4096;

/// Bodies up to this size are copied behind the head and sent in one write; larger ones are
/// written straight from [`ZEROS`], where a copy would cost more than the extra syscall.
const SMALL_WRITE: usize = 16 * 1024;

/// Where the server listens.
#[derive(Clone)]
pub struct ServerConfig {
    pub bind: IpAddr,
    /// Ports to listen on; 0 picks a free one (the stderr line tells which).
    pub ports: Vec<u16>,
    /// Speak TLS (HTTP only, no sink) on every port: the direct baseline of the gateway benchmark.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Binds every port, announces each on stderr, then serves until the process is killed.
pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    let mut accept_loops = JoinSet::new();
    for port in config.ports {
        let listener = listen(SocketAddr::new(config.bind, port))
            .with_context(|| format!("could not listen on {}:{port}", config.bind))?;
        eprintln!("listening on {}", listener.local_addr()?);
        accept_loops.spawn(accept_loop(listener, config.tls.clone()));
    }
    // Accept loops never return; joining keeps the runtime alive until the process is killed.
    while let Some(joined) = accept_loops.join_next().await {
        joined.context("an accept loop panicked")?;
    }
    Ok(())
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // A restarted server must not wait out the TIME_WAIT of its previous run's connections.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

async fn accept_loop(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
    let mut last_warning: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match &tls {
                None => drop(tokio::spawn(serve_connection(stream))),
                Some(acceptor) => drop(tokio::spawn(serve_tls(acceptor.clone(), stream))),
            },
            Err(e) => {
                // Out of file descriptors (or a connection reset while queued) passes once
                // connections close; pause so the loop does not spin, and warn at most once a second.
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    eprintln!("strait-load server: accept failed: {e}");
                    last_warning = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Serves one connection; I/O errors just end it, since clients report what failed on their side.
async fn serve_connection(mut stream: TcpStream) {
    // Responses are one write each, but a large body's head and body are two: without this the
    // body would wait for the client's delayed ACK of the head.
    let _ = stream.set_nodelay(true);
    // Nothing is allocated until the peer speaks, so an idle held connection costs only its task.
    // (Peek, not `readable()`: that may report a fresh socket ready before any byte arrived.)
    if stream.peek(&mut [0u8; 1]).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; MAX_HEAD];
    let mut filled = 0;
    loop {
        match http::detect(&buf[..filled]) {
            Protocol::Http => {
                let _ = serve_http(&mut stream, buf, filled).await;
                return;
            }
            Protocol::Sink => break,
            Protocol::NeedMore => {}
        }
        match stream.read(&mut buf[filled..]).await {
            // EOF before a method showed: a sink stream of a few bytes, or a held connection
            // closing. Everything is counted already, so answer without a sink buffer: 100,000
            // held connections closing at once should not each allocate one.
            Ok(0) => {
                let _ = sink::answer(&mut stream, filled as u64).await;
                return;
            }
            Ok(n) => filled += n,
            Err(_) => return,
        }
    }
    drop(buf);
    // Sink reads are as large as the stream's writes, so a fast stream costs few syscalls.
    let mut sink_buf = vec![0u8; ZEROS.len()];
    let _ = sink::serve(&mut stream, filled as u64, &mut sink_buf).await;
}

/// Serves keep-alive HTTP/1.1 over TLS. As on plain connections, nothing is allocated for a
/// connection until its client speaks (here: sends its ClientHello).
async fn serve_tls(acceptor: tokio_rustls::TlsAcceptor, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    if stream.peek(&mut [0u8; 1]).await.is_err() {
        return;
    }
    let Ok(tls) = acceptor.accept(stream).await else { return };
    let mut stream = Stream::TlsServer(Box::new(tls));
    let _ = serve_http(&mut stream, vec![0u8; MAX_HEAD], 0).await;
}

/// Serves keep-alive HTTP/1.1; `buf[..filled]` holds what was read during protocol detection.
async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    mut buf: Vec<u8>,
    mut filled: usize,
) -> Result<(), http::HttpError> {
    // Reused for every response head (and small body) on this connection; it grows once to the
    // size the client's responses need, so a 64-byte exchange does not pay for a 16 KiB one.
    let mut out = Vec::new();
    loop {
        let head = loop {
            match http::parse_request_head(&buf[..filled]) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(e) => {
                    let status = match e {
                        http::HttpError::HeadTooLarge => "431 Request Header Fields Too Large",
                        _ => "400 Bad Request",
                    };
                    respond_error(stream, &mut out, status).await?;
                    return Err(e);
                }
            }
            let n = stream.read(&mut buf[filled..]).await?;
            if n == 0 {
                // The client closed between requests: the normal end of keep-alive.
                return Ok(());
            }
            filled += n;
        };
        let consumed = discard_body(stream, &mut buf, filled, &head).await?;
        respond(stream, &mut out, &head).await?;
        // Nothing for TCP; TLS may hold the last record until flushed.
        stream.flush().await?;
        if head.close {
            stream.shutdown().await?;
            return Ok(());
        }
        // The client does not pipeline, but keeping any early bytes of its next request costs
        // nothing and keeps us correct if one does.
        let consumed = consumed.min(filled);
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
    }
}

/// Reads and drops the request body; returns how much of `buf[..filled]` the request used.
///
/// A body longer than what is buffered streams through `buf`, whose content is then spent.
async fn discard_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    filled: usize,
    head: &RequestHead,
) -> io::Result<usize> {
    let buffered = (filled - head.head_len) as u64;
    if buffered >= head.content_length {
        return Ok(head.head_len + head.content_length as usize);
    }
    let mut left = head.content_length - buffered;
    while left > 0 {
        let want = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
        let n = stream.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        left -= n as u64;
    }
    Ok(filled)
}

async fn respond<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut Vec<u8>, head: &RequestHead) -> io::Result<()> {
    let (status, body): (&str, Body) = match head.route {
        Route::Bytes(n) => ("200 OK", Body::Zeros(n)),
        Route::Ok => ("200 OK", Body::Static(b"ok")),
        Route::TooLarge => ("400 Bad Request", Body::Static(b"body too large for /bytes/N\n")),
    };
    let len = match body {
        Body::Zeros(n) => n,
        Body::Static(b) => b.len() as u64,
    };
    out.clear();
    let connection = if head.close { "Connection: close\r\n" } else { "" };
    write!(out, "HTTP/1.1 {status}\r\nContent-Length: {len}\r\n{connection}\r\n")?;
    match body {
        Body::Static(b) => out.extend_from_slice(b),
        Body::Zeros(n) if n as usize <= SMALL_WRITE => out.extend_from_slice(&ZEROS[..n as usize]),
        Body::Zeros(mut n) => {
            stream.write_all(out).await?;
            while n > 0 {
                let chunk = usize::try_from(n).map_or(ZEROS.len(), |c| c.min(ZEROS.len()));
                stream.write_all(&ZEROS[..chunk]).await?;
                n -= chunk as u64;
            }
            return Ok(());
        }
    }
    stream.write_all(out).await
}

async fn respond_error<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut Vec<u8>, status: &str) -> io::Result<()> {
    out.clear();
    write!(out, "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    stream.write_all(out).await?;
    stream.shutdown().await
}

/// A response body: a fixed text, or N zero bytes sent from [`ZEROS`].
#[derive(Clone, Copy)]
enum Body {
    Static(&'static [u8]),
    Zeros(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A held idle connection costs the server one task of this size (plus its socket); buffers
    /// are allocated only once the peer sends. Keep it small, as ztunnel does for its proxies.
    #[tokio::test]
    async fn idle_connection_task_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("address")).await.expect("connect");
        let task = serve_connection(client);
        assert!(std::mem::size_of_val(&task) <= 1024, "{} bytes", std::mem::size_of_val(&task));
    }
}
