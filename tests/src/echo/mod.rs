//! The `strait-echo` test servers and clients, kept in the library so their parsing is unit-tested.
//!
//! Tests need servers that report who connected (to check the mesh preserved the client's
//! address) and who answered (named versions of a service, for routing), and clients that prove
//! byte-exact delivery, long-lived connections, WebSocket and gRPC round trips, and tally
//! thousands of requests, and hostile clients (slowloris, broken bodies, HTTP/2 rapid reset);
//! curl in a shell loop cannot do most of that. The HTTP/1.1 side is std
//! only; gRPC uses h2 and tokio, which the proxy already builds. See `bin/strait-echo.rs` for
//! the command line.

pub mod abuse;
pub mod base64;
pub mod client;
pub mod dns;
pub mod flood;
pub mod grpc;
pub mod http;
pub mod json;
pub mod rapid_reset;
pub mod sha1;
pub mod tcp;
pub mod tls;
pub mod websocket;
pub mod wire;

use std::sync::OnceLock;
use std::time::Duration;

/// How an `http` or `grpc` server presents itself, from its command line.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Answers `hello from <name>` (HTTP) or `<name>: <message>` (gRPC), and sends
    /// `x-served-by: <name>`.
    pub name: String,
    /// Added before every response, to make a slow version of a service.
    pub delay: Duration,
    /// Answer as an HTTP/1.0 server does (`HTTP/1.0` status line, `connection: close`, one
    /// request per connection), for tests of proxies in front of old servers. HTTP only.
    pub http10: bool,
}

/// FNV-1a, 64 bit: a digest for comparing bodies without a hashing crate. Not cryptographic,
/// which is fine for catching corruption in tests.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a64(u64);

impl Default for Fnv1a64 {
    fn default() -> Self {
        Fnv1a64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a64 {
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The digest as 16 lowercase hex digits, as printed by `strait-echo`.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Length of the repeating test pattern: a prime, so that a stream shifted, duplicated or
/// reordered by any power-of-two-sized buffer does not line up with the pattern again.
const PATTERN_LEN: usize = 1_000_003;

/// Pseudo-random bytes, generated once; byte `i` of a test stream is `pattern[i % PATTERN_LEN]`.
fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let mut state: u64 = 0x5eed_5eed;
        let mut bytes = Vec::with_capacity(PATTERN_LEN + 8);
        while bytes.len() < PATTERN_LEN {
            // splitmix64: fast and good enough to make accidental matches implausible.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            bytes.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        bytes.truncate(PATTERN_LEN);
        bytes
    })
}

/// The pattern bytes from stream offset `offset`, at most `max` of them, without copying (the
/// slice ends early where the pattern wraps).
pub fn pattern_slice(offset: u64, max: usize) -> &'static [u8] {
    let start = usize::try_from(offset % PATTERN_LEN as u64).unwrap_or(0);
    let rest = &pattern()[start..];
    &rest[..rest.len().min(max)]
}

/// Whether `data` is the pattern from stream offset `offset`; on a mismatch, the offset of the
/// first differing byte.
pub fn check_pattern(offset: u64, data: &[u8]) -> Result<(), u64> {
    let mut done = 0;
    while done < data.len() {
        let expected = pattern_slice(offset + done as u64, data.len() - done);
        let got = &data[done..done + expected.len()];
        if got != expected {
            let at = got.iter().zip(expected).position(|(a, b)| a != b).unwrap_or(0);
            return Err(offset + (done + at) as u64);
        }
        done += expected.len();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        let digest = |s: &[u8]| {
            let mut h = Fnv1a64::default();
            h.update(s);
            h.hex()
        };
        assert_eq!(digest(b""), "cbf29ce484222325");
        assert_eq!(digest(b"a"), "af63dc4c8601ec8c");
        assert_eq!(digest(b"foobar"), "85944171f73967e8");
    }

    #[test]
    fn pattern_wraps_and_detects_shifts() {
        let n = PATTERN_LEN as u64;
        assert_eq!(pattern_slice(n - 2, 10).len(), 2);
        assert_eq!(pattern_slice(n, 4), pattern_slice(0, 4));
        let mut stream = Vec::new();
        while stream.len() < PATTERN_LEN + 100 {
            let offset = stream.len() as u64;
            stream.extend_from_slice(pattern_slice(offset, 4096));
        }
        assert_eq!(check_pattern(0, &stream), Ok(()));
        assert_eq!(check_pattern(n - 50, &stream[PATTERN_LEN - 50..]), Ok(()));
        assert!(check_pattern(1, &stream[..1000]).is_err());
        stream[PATTERN_LEN + 7] ^= 1;
        assert_eq!(check_pattern(0, &stream), Err(n + 7));
    }
}
