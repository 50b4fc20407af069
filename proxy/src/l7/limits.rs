//! The limits every HTTP listener of the L7 engine enforces on its clients (OPS-4), with their
//! defaults and why: head, idle and body timeouts, and the budget of buffered request bodies.

use std::time::Duration;

/// A client that started a request head has this long to finish it (Envoy's
/// `request_headers_timeout`, counted from the head's first byte). Heads are a few hundred
/// bytes sent at once: seconds are already generous, and each slow head holds a connection
/// and a stream of the HBONE connection it came on.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request in flight is closed after this long (HTTP/1.1 keep-alive,
/// HTTP/2 without open streams). Clients keep pooled connections idle for tens of seconds
/// (Go's and Envoy's pools, browsers); closing sooner races their next request, keeping them
/// for an hour (Envoy's default) lets idle connections pile up.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A request body that sends nothing for this long fails as the client's fault (408). Uploads
/// from a working client never pause this long; a client-streaming gRPC call that can go
/// quiet for longer needs a larger value (or 0, no limit).
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of request bodies held for retries and mirrors, all requests together. 300 clients
/// each holding a 1 MiB unfinished body on a retried route took 450 MB without a cap; at 64
/// MiB a waypoint stays within a typical 128-256 MiB pod limit, and requests beyond the cap
/// are still served, streamed without retries or mirrors (Envoy's behaviour at its buffer
/// limit).
pub const BODY_BUFFER_BUDGET: usize = 64 * 1024 * 1024;
/// A request body larger than this is never buffered: it streams without retries or mirrors.
pub const BODY_BUFFER_PER_REQUEST: usize = 1024 * 1024;

/// The limits of one proxy's HTTP listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// `None`: request bodies may pause for any time.
    pub body_idle_timeout: Option<Duration>,
    /// Bytes of request bodies all requests together may hold for retries and mirrors.
    pub body_buffer_budget: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: HEADER_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            body_idle_timeout: Some(BODY_IDLE_TIMEOUT),
            body_buffer_budget: BODY_BUFFER_BUDGET,
        }
    }
}

/// A size as written on the command line: `67108864`, `64Mi`, `64MiB`, `512Ki`, `1Gi`
/// (binary units, as Kubernetes quantities write them).
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: usize = number.parse().map_err(|_| format!("`{text}` is not a size (e.g. 64Mi)"))?;
    let factor: usize = match unit.trim().trim_end_matches('B') {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(format!("`{text}`: the unit must be Ki, Mi or Gi")),
    };
    number.checked_mul(factor).ok_or_else(|| format!("`{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        let cases = [
            ("67108864", Ok(64 << 20)),
            ("64Mi", Ok(64 << 20)),
            ("64MiB", Ok(64 << 20)),
            ("512Ki", Ok(512 << 10)),
            ("1Gi", Ok(1 << 30)),
            ("0", Ok(0)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_size(text), expected, "{text}");
        }
        for bad in ["", "Mi", "64MB", "-1", "1.5Mi", "99999999999999999999Gi"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
