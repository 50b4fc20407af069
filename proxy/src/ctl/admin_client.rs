//! A small HTTP/1.1 client for a running proxy's admin API (OBS-3), for `strait ctl
//! proxy-config`. One request per connection: the tool asks two or three questions and exits.
//!
//! Its errors say which of the usual mistakes it was: nothing listening (the proxy is not
//! running, or runs in another network namespace), something listening that does not answer,
//! or something answering that is not a strait proxy.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use thiserror::Error;
use tokio::net::TcpStream;

/// How long connecting, and then answering, may each take.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest answer read: the admin views of a 10,000-pod mesh are a few MiB.
const MAX_ANSWER: usize = 256 << 20;

#[derive(Debug, Error)]
pub enum AdminError {
    #[error("`{0}` is not an admin address: give HOST:PORT or http://HOST:PORT (e.g. 127.0.0.1:15000)")]
    BadAddress(String),
    #[error("cannot resolve the admin address `{addr}`: {reason}")]
    Resolve { addr: String, reason: String },
    #[error(
        "nothing answers on {addr} ({reason}): is `strait node` or `strait waypoint` running? Its admin API \
         listens on --admin-addr (default 127.0.0.1:15000) in the proxy's own network namespace, so run this \
         command there (e.g. `ip netns exec NODE strait ctl ...`) or pass --addr"
    )]
    Unreachable { addr: String, reason: String },
    #[error("{addr} accepted the connection but did not answer GET {path} within {}s", ANSWER_TIMEOUT.as_secs())]
    Timeout { addr: String, path: String },
    #[error("{addr} is not the admin API of a strait proxy: {reason}")]
    NotStrait { addr: String, reason: String },
    #[error("{addr} answered GET {path} with {status}: {body}")]
    Status { addr: String, path: String, status: StatusCode, body: String },
    #[error("the answer of {addr} to GET {path} is not the JSON expected: {reason}")]
    BadAnswer { addr: String, path: String, reason: String },
}

/// A proxy's admin API at one address.
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// `host:port` as the user wrote it, for messages and the Host header.
    authority: String,
}

impl AdminClient {
    /// `addr` is `HOST:PORT`, optionally with `http://` in front and a `/` after.
    pub fn new(addr: &str) -> Result<Self, AdminError> {
        let authority = addr.strip_prefix("http://").unwrap_or(addr).trim_end_matches('/');
        let valid =
            authority.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid || authority.contains('/') {
            return Err(AdminError::BadAddress(addr.to_owned()));
        }
        Ok(Self { authority: authority.to_owned() })
    }

    pub fn addr(&self) -> &str {
        &self.authority
    }

    /// GET `path`: the status and body of the answer.
    pub async fn get(&self, path: &str) -> Result<(StatusCode, String), AdminError> {
        let addr = self.resolve().await?;
        let unreachable = |reason: String| AdminError::Unreachable { addr: self.authority.clone(), reason };
        let stream = match tokio::time::timeout(ANSWER_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => {
                return Err(unreachable(format!("no answer to the connection within {}s", ANSWER_TIMEOUT.as_secs())));
            }
        };
        let timeout = || AdminError::Timeout { addr: self.authority.clone(), path: path.to_owned() };
        let exchange = async {
            let not_http = |e: hyper::Error| AdminError::NotStrait {
                addr: self.authority.clone(),
                reason: format!("it does not answer HTTP/1.1 ({e})"),
            };
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(not_http)?;
            tokio::spawn(connection);
            let request = Request::get(path)
                .header(header::HOST, &self.authority)
                .header(header::ACCEPT, "application/json")
                .body(Empty::<Bytes>::new())
                .map_err(|e| AdminError::BadAddress(format!("{}{path}: {e}", self.authority)))?;
            let response = sender.send_request(request).await.map_err(not_http)?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER).collect().await.map_err(|e| {
                AdminError::BadAnswer { addr: self.authority.clone(), path: path.to_owned(), reason: e.to_string() }
            })?;
            Ok((status, String::from_utf8_lossy(&body.to_bytes()).into_owned()))
        };
        tokio::time::timeout(ANSWER_TIMEOUT, exchange).await.map_err(|_| timeout())?
    }

    /// GET `path`, expecting 200 and JSON.
    pub async fn get_json(&self, path: &str) -> Result<Value, AdminError> {
        let (status, body) = self.get(path).await?;
        if status != StatusCode::OK {
            return Err(AdminError::Status {
                addr: self.authority.clone(),
                path: path.to_owned(),
                status,
                body: body.trim().to_owned(),
            });
        }
        serde_json::from_str(&body).map_err(|e| AdminError::BadAnswer {
            addr: self.authority.clone(),
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Asks `/server_info` and checks that a strait proxy answered.
    pub async fn server_info(&self) -> Result<ServerInfo, AdminError> {
        let not_strait = |reason: String| AdminError::NotStrait { addr: self.authority.clone(), reason };
        let (status, body) = self.get("/server_info").await?;
        if status != StatusCode::OK {
            let first_line = body.lines().next().unwrap_or_default().trim().to_owned();
            return Err(not_strait(format!("GET /server_info answered {status} {first_line}")));
        }
        let info: Value = serde_json::from_str(&body)
            .map_err(|_| not_strait("GET /server_info answered something that is not JSON".to_owned()))?;
        if info["proxy"] != "strait" {
            return Err(not_strait(format!("GET /server_info answered {info} (no \"proxy\": \"strait\")")));
        }
        let text = |key: &str| info[key].as_str().map(str::to_owned);
        Ok(ServerInfo {
            version: text("version").unwrap_or_default(),
            role: match info["role"].as_str() {
                Some("waypoint") => Role::Waypoint(text("waypoint").unwrap_or_default()),
                _ => Role::Node(text("node").unwrap_or_default()),
            },
            raw: info,
        })
    }

    async fn resolve(&self) -> Result<SocketAddr, AdminError> {
        let resolve = |reason: String| AdminError::Resolve { addr: self.authority.clone(), reason };
        let mut addrs = tokio::net::lookup_host(self.authority.as_str()).await.map_err(|e| resolve(e.to_string()))?;
        addrs.next().ok_or_else(|| resolve("no address".to_owned()))
    }
}

/// What `/server_info` says about the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    pub version: String,
    pub role: Role,
    /// The whole answer.
    pub raw: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// `strait node`, with its node's name.
    Node(String),
    /// `strait waypoint`, with its `namespace/name`.
    Waypoint(String),
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Node(node) => write!(f, "strait node `{node}`"),
            Role::Waypoint(waypoint) => write!(f, "strait waypoint `{waypoint}`"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_host_and_port() {
        for good in ["127.0.0.1:15000", "http://127.0.0.1:15000/", "localhost:15000", "[::1]:15000"] {
            assert!(AdminClient::new(good).is_ok(), "{good}");
        }
        assert_eq!(AdminClient::new("http://10.0.0.1:15000").expect("valid").addr(), "10.0.0.1:15000");
        for bad in ["127.0.0.1", ":15000", "127.0.0.1:http", "https://127.0.0.1:15000", "127.0.0.1:15000/certs"] {
            let e = AdminClient::new(bad).expect_err(bad);
            assert!(e.to_string().contains("HOST:PORT"), "{e}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_closed_port_says_what_to_check() {
        // A port just released: nothing listens on it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let e = AdminClient::new(&addr).expect("valid").server_info().await.expect_err("nothing listens");
        let text = e.to_string();
        assert!(text.starts_with(&format!("nothing answers on {addr} (")), "{text}");
        assert!(text.contains("network namespace"), "{text}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn another_http_server_is_not_a_strait_proxy() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot here\n")
                    .await;
            }
        });
        let e = AdminClient::new(&addr).expect("valid").server_info().await.expect_err("not strait");
        assert_eq!(
            e.to_string(),
            format!("{addr} is not the admin API of a strait proxy: GET /server_info answered 404 Not Found not here")
        );
    }
}
