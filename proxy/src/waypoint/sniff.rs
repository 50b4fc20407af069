//! Protocol detection (L7-1): which protocol a client speaks inside a tunnel, from its first
//! bytes: the HTTP/2 connection preface, an HTTP/1.1 request line, or anything else (TCP).

/// The HTTP/2 client connection preface (RFC 9113 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Methods an HTTP/1.1 request may start with (`CONNECT` is not proxied at L7).
const METHODS: [&[u8]; 8] = [b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"TRACE ", b"PATCH "];

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    Http2,
    /// Not HTTP: handled as TCP.
    Opaque,
    /// Too few bytes to tell.
    NeedMore,
}

pub fn sniff(bytes: &[u8]) -> Sniffed {
    if bytes.len() >= H2_PREFACE.len() {
        if bytes.starts_with(H2_PREFACE) {
            return Sniffed::Http2;
        }
    } else if H2_PREFACE.starts_with(bytes) {
        return Sniffed::NeedMore;
    }
    for method in METHODS {
        if bytes.starts_with(method) {
            return Sniffed::Http1;
        }
        if method.starts_with(bytes) {
            return Sniffed::NeedMore;
        }
    }
    Sniffed::Opaque
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_protocols_apart() {
        let cases: [(&[u8], Sniffed); 9] = [
            (b"GET / HTTP/1.1\r\n", Sniffed::Http1),
            (b"POST /x HTTP/1.1\r\n", Sniffed::Http1),
            (b"PO", Sniffed::NeedMore),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00", Sniffed::Http2),
            (b"PRI * HT", Sniffed::NeedMore),
            (b"P", Sniffed::NeedMore),
            (b"\x16\x03\x01\x02\x00", Sniffed::Opaque),
            (b"hello", Sniffed::Opaque),
            (b"GET/ HTTP/1.1", Sniffed::Opaque),
        ];
        for (bytes, expected) in cases {
            assert_eq!(sniff(bytes), expected, "{:?}", String::from_utf8_lossy(bytes));
        }
    }
}
