//! HBONE (L4-1, L4-2): TCP tunnelled in HTTP/2 CONNECT streams inside mutual TLS, Istio's
//! ambient wire format, so any Istio ambient component is a valid peer.
//!
//! `client` keeps a pool of HTTP/2 connections and opens one CONNECT stream per proxied TCP
//! connection; `server` terminates TLS on port 15008 and hands each stream to the node's
//! inbound logic; `stream` copies bytes between a TCP socket and a stream.

pub mod client;
pub mod io;
pub mod server;
pub mod socket;
pub mod stream;

use std::net::{IpAddr, SocketAddr};

use crate::{identity::Identity, model::Model};

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

/// Streams this side reset whose late frames are still recognised (and ignored) rather than
/// answered with another reset. h2's default of 10 is far below what a pooled connection
/// carrying up to `MAX_CONCURRENT_STREAMS` clients' tunnels sees when many of them end at once.
pub const REMEMBERED_RESETS: usize = MAX_CONCURRENT_STREAMS as usize;

/// h2 ends a connection for good after 1,024 resets it sent because of the peer's frames, counted
/// over the connection's whole life (a defence of public servers against "MadeYouReset"). An
/// HBONE connection is long-lived, pooled, and its peer proved a mesh identity: measured in a
/// soak at 1,000 req/s with connection churn through a waypoint, the count reached 1,024 within
/// minutes and the GOAWAY failed every tunnel in flight. The limit is off between mesh peers;
/// `REMEMBERED_RESETS` keeps such resets rare to begin with.
pub const LOCAL_ERROR_RESETS: Option<usize> = None;

/// Header with the original client address (RFC 7239 `for=`).
pub const FORWARDED: &str = "forwarded";
pub const BAGGAGE: &str = "baggage";
pub const TRACEPARENT: &str = "traceparent";

/// `for=` with the original client's address, as RFC 7239 writes it: `for=10.1.0.10` without a
/// port, `for="10.1.0.10:43210"` with one (IPv6 bracketed). The port lets the destination's
/// access line name the client's own connection; Istio's ztunnel reads either form.
pub fn forwarded_for(client: SocketAddr) -> String {
    match (client.ip(), client.port()) {
        (IpAddr::V4(v4), 0) => format!("for={v4}"),
        (IpAddr::V6(v6), 0) => format!("for=\"[{v6}]\""),
        (IpAddr::V4(v4), port) => format!("for=\"{v4}:{port}\""),
        (IpAddr::V6(v6), port) => format!("for=\"[{v6}]:{port}\""),
    }
}

/// The client address in a `forwarded` header: the first `for=` of the first element, with
/// port 0 when it names none.
pub fn parse_forwarded_for(value: &str) -> Option<SocketAddr> {
    let first = value.split(',').next()?;
    let for_value = first
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case("for"))?
        .1
        .trim()
        .trim_matches('"');
    if let Ok(addr) = for_value.parse::<SocketAddr>() {
        return Some(addr);
    }
    let host = for_value.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')).unwrap_or(for_value);
    host.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
}

/// Who the client of an inbound CONNECT stream is (L4-6), from what the peer proved: `peer_addr`
/// is the TLS connection's TCP source, `forwarded` the address its `forwarded` header claims,
/// `owned(ip)` whether the peer's certificate identity owns that IP.
///
/// - The TCP source, when the peer's identity owns it: a peer that dials from the client pod's
///   own address (strait, Istio's in-pod ztunnel) or a waypoint's pod. The port of `forwarded`
///   is kept when it names the same IP with a port, so access lines name the client's own
///   connection rather than the tunnel's.
/// - Else `forwarded`, when owned: a peer that dials from its node's address (older strait,
///   `--hbone-source node`, a node-level ztunnel).
/// - Else none: nothing the peer proved names a client.
///
/// When both are owned and differ, the TCP source wins: it is what firewalls and the peer's
/// policy see, and `forwarded` adds nothing to it.
pub fn client_address(
    forwarded: Option<SocketAddr>,
    peer_addr: SocketAddr,
    owned: impl Fn(IpAddr) -> bool,
) -> Option<SocketAddr> {
    if owned(peer_addr.ip()) {
        return Some(forwarded.filter(|f| f.ip() == peer_addr.ip() && f.port() != 0).unwrap_or(peer_addr));
    }
    forwarded.filter(|f| owned(f.ip()))
}

/// Whether `identity` owns `ip`: a workload of the mesh with that address runs as it. A peer may
/// only be taken for (or claim) addresses of its own identity.
pub(crate) fn owns_ip(model: &Model, trust_domain: &str, ip: IpAddr, identity: &Identity) -> bool {
    model.workload_by_ip(ip).is_some_and(|w| &w.identity(trust_domain) == identity)
}

/// A fresh W3C `traceparent` with random trace and span ids, sampled. The ids only need to be
/// unique, not secret: they come from fastrand's per-thread generator (seeded from the OS), so
/// a connection costs no `getrandom` call and one allocation for them.
pub fn new_traceparent() -> String {
    // A W3C id of all zeros is invalid.
    let trace = fastrand::u128(1..);
    let span = fastrand::u64(1..);
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    push_hex(&mut out, trace, 32);
    out.push('-');
    push_hex(&mut out, u128::from(span), 16);
    out.push_str("-01");
    out
}

/// Appends the low `digits` hex digits of `value`, most significant first.
fn push_hex(out: &mut String, value: u128, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..digits).rev() {
        out.push(char::from(HEX[((value >> (4 * i)) & 0xf) as usize]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_round_trips() {
        for addr in ["10.1.0.10:0", "10.1.0.10:43210", "[fd00::1]:0", "[fd00::1]:8080"] {
            let addr: SocketAddr = addr.parse().expect("addr");
            assert_eq!(parse_forwarded_for(&forwarded_for(addr)), Some(addr), "{}", forwarded_for(addr));
        }
        assert_eq!(forwarded_for("10.1.0.10:43210".parse().expect("addr")), "for=\"10.1.0.10:43210\"");
        let parsed = |v| parse_forwarded_for(v).map(|a| a.to_string());
        assert_eq!(parsed("proto=tcp; For=10.0.0.1:4000, for=1.1.1.1").as_deref(), Some("10.0.0.1:4000"));
        assert_eq!(parsed("for=10.0.0.1").as_deref(), Some("10.0.0.1:0"));
        assert_eq!(parsed("for=\"[fd00::2]\"").as_deref(), Some("[fd00::2]:0"));
        assert_eq!(parse_forwarded_for("by=10.0.0.1"), None);
        assert_eq!(parse_forwarded_for("for=unknown"), None);
        assert_eq!(parse_forwarded_for("for=\"_hidden\""), None);
    }

    #[test]
    fn client_address_prefers_an_owned_tcp_source() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let (p11, p12, node) = (addr("10.1.1.11:40000"), addr("10.1.1.12:41000"), addr("10.200.0.1:52000"));
        let pods: [IpAddr; 2] = [p11.ip(), p12.ip()];
        let owned = |ip: IpAddr| pods.contains(&ip);
        // TCP source owned: it is the client; `forwarded` of the same IP lends its port.
        assert_eq!(client_address(None, p11, owned), Some(p11));
        assert_eq!(client_address(Some(addr("10.1.1.11:0")), p11, owned), Some(p11));
        assert_eq!(client_address(Some(addr("10.1.1.11:35000")), p11, owned), Some(addr("10.1.1.11:35000")));
        // Only `forwarded` owned (a peer dialling from its node's address): today's rule.
        assert_eq!(client_address(Some(p12), node, owned), Some(p12));
        // Both owned and different: the TCP source wins, with its own port.
        assert_eq!(client_address(Some(p12), p11, owned), Some(p11));
        // Neither owned: no client.
        assert_eq!(client_address(Some(addr("10.9.9.9:1")), node, owned), None);
        assert_eq!(client_address(None, node, owned), None);
    }

    // L4-1: a CONNECT carries `forwarded` and `traceparent`, and `baggage` only when there is some.
    #[test]
    fn connect_head_omits_empty_baggage() {
        let authority: SocketAddr = "10.1.2.21:9080".parse().expect("addr");
        let client: SocketAddr = "10.1.1.11:0".parse().expect("addr");
        let head = client::connect_head(authority, client, "", None).expect("head");
        assert_eq!(head.method(), http::Method::CONNECT);
        assert_eq!(head.uri().to_string(), "10.1.2.21:9080");
        assert_eq!(head.headers().get(FORWARDED).and_then(|v| v.to_str().ok()), Some("for=10.1.1.11"));
        assert!(head.headers().get(BAGGAGE).is_none(), "empty baggage is sent");
        assert!(head.headers().contains_key(TRACEPARENT));
        let head = client::connect_head(authority, client, "k8s.pod.name=p11", Some("00-1-2-01")).expect("head");
        assert_eq!(head.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok()), Some("00-1-2-01"));
        assert_eq!(head.headers().get(BAGGAGE).and_then(|v| v.to_str().ok()), Some("k8s.pod.name=p11"));
    }

    #[test]
    fn traceparent_is_w3c_shaped() {
        let t = new_traceparent();
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [2, 32, 16, 2]);
        assert_ne!(new_traceparent(), t);
    }
}
