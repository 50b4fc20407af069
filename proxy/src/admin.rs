//! The admin endpoint on 127.0.0.1:15000 (OBS-3): what the proxy knows and counts.
//!
//! Requests are tiny and rare, so this is a minimal HTTP/1.1 responder (one request per
//! connection) rather than a full server stack.

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

use crate::{capture::Capture, model::ModelHandle};

const MAX_REQUEST: usize = 8 * 1024;

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct AdminState {
    pub model: ModelHandle,
    pub capture: Arc<Mutex<Capture>>,
}

pub async fn serve(listener: TcpListener, state: AdminState) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &state).await {
                debug!("admin request failed: {e}");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await??;
        if n == 0 || request.len() + n > MAX_REQUEST {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&request);
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/stats") => ("200 OK", "text/plain", stats(state)),
        ("GET", "/config_dump") => ("200 OK", "application/json", config_dump(state)),
        ("GET", "/healthz/ready") => ("200 OK", "text/plain", "ready\n".to_owned()),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn stats(state: &AdminState) -> String {
    let mut out = String::new();
    if let Ok(capture) = state.capture.lock() {
        for (name, value) in capture.stats() {
            let _ = writeln!(out, "strait.capture.{name}: {value}");
        }
        let _ = writeln!(out, "strait.capture.attached_interfaces: {}", capture.attached_interfaces().len());
    }
    out
}

fn config_dump(state: &AdminState) -> String {
    let model = state.model.current();
    serde_json::to_string_pretty(&*model).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
