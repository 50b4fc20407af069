//! HBONE (L4-1, L4-2): TCP tunnelled in HTTP/2 CONNECT streams inside mutual TLS, Istio's
//! ambient wire format, so any Istio ambient component is a valid peer.
//!
//! `client` keeps a pool of HTTP/2 connections and opens one CONNECT stream per proxied TCP
//! connection; `server` terminates TLS on port 15008 and hands each stream to the node's
//! inbound logic; `stream` copies bytes between a TCP socket and a stream.

pub mod client;
pub mod io;
pub mod server;
pub mod stream;

use std::net::IpAddr;

pub use client::{ConnectRequest, HbonePool, Tunnel};
pub use io::H2Stream;

/// Per-stream flow-control window. Large windows let one stream fill a fast link: with the
/// 64 KiB HTTP/2 default a single stream stalls every 64 KiB waiting for WINDOW_UPDATE.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Connection-wide window, shared by all streams of a pooled connection.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame we accept; fewer, larger frames cost less per byte.
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Streams one pooled connection may carry at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;

/// Header with the original client address (RFC 7239 `for=`).
pub const FORWARDED: &str = "forwarded";
pub const BAGGAGE: &str = "baggage";
pub const TRACEPARENT: &str = "traceparent";

/// `for=<ip>` as RFC 7239 writes it (IPv6 quoted and bracketed).
pub fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The client address in a `forwarded` header: the first `for=` of the first element.
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let first = value.split(',').next()?;
    let for_value = first
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case("for"))?
        .1
        .trim_matches('"');
    let host = match for_value.strip_prefix('[') {
        Some(rest) => rest.split(']').next()?,
        None => for_value.split(':').next()?,
    };
    host.parse().ok()
}

/// A fresh W3C `traceparent` with random trace and span ids, sampled.
pub fn new_traceparent() -> String {
    let mut ids = [0u8; 24];
    // A failure leaves zeros, which only makes the trace id less useful, never unsafe.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut ids);
    let hex: String = ids.iter().map(|b| format!("{b:02x}")).collect();
    format!("00-{}-{}-01", &hex[..32], &hex[32..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_round_trips() {
        for ip in ["10.1.0.10", "fd00::1"] {
            let ip: IpAddr = ip.parse().expect("ip");
            assert_eq!(parse_forwarded_for(&forwarded_for(ip)), Some(ip));
        }
        assert_eq!(
            parse_forwarded_for("proto=tcp; For=10.0.0.1:4000, for=1.1.1.1"),
            Some("10.0.0.1".parse().expect("ip"))
        );
        assert_eq!(parse_forwarded_for("by=10.0.0.1"), None);
        assert_eq!(parse_forwarded_for("for=unknown"), None);
    }

    #[test]
    fn traceparent_is_w3c_shaped() {
        let t = new_traceparent();
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [2, 32, 16, 2]);
        assert_ne!(new_traceparent(), t);
    }
}
