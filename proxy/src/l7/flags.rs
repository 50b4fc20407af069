//! Envoy's response flags (L7-11): why a request got the answer it got, in access logs and the
//! `response_flags` metric label, spelled as Envoy spells them so dashboards and runbooks apply.

use std::fmt;

/// A set of response flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u16);

impl ResponseFlags {
    /// No healthy upstream: every endpoint is ejected or there is none.
    pub const UH: Self = Self(1);
    /// Upstream connection failure.
    pub const UF: Self = Self(1 << 1);
    /// Upstream overflow: a circuit breaker (connection pool limit) refused the request.
    pub const UO: Self = Self(1 << 2);
    /// No route matched.
    pub const NR: Self = Self(1 << 3);
    /// Retries exhausted.
    pub const URX: Self = Self(1 << 4);
    /// Upstream request timeout.
    pub const UT: Self = Self(1 << 5);
    /// The upstream closed or reset the connection before answering.
    pub const UC: Self = Self(1 << 6);
    /// Fault injection delayed the request.
    pub const DI: Self = Self(1 << 7);
    /// Fault injection aborted the request.
    pub const FI: Self = Self(1 << 8);
    /// The downstream connection went away before the response was complete.
    pub const DC: Self = Self(1 << 9);
    /// The route's destination is not a known service (or subset).
    pub const NC: Self = Self(1 << 10);
    /// The client's request broke the protocol (a malformed body): its fault, not the upstream's.
    pub const DPE: Self = Self(1 << 11);
    /// The client's request body went idle for longer than the body idle timeout.
    pub const SI: Self = Self(1 << 12);

    /// Envoy's order, so a combination always prints the same way.
    const NAMES: [(Self, &'static str); 13] = [
        (Self::UH, "UH"),
        (Self::UF, "UF"),
        (Self::UO, "UO"),
        (Self::NR, "NR"),
        (Self::URX, "URX"),
        (Self::DC, "DC"),
        (Self::UT, "UT"),
        (Self::UC, "UC"),
        (Self::DI, "DI"),
        (Self::FI, "FI"),
        (Self::NC, "NC"),
        (Self::SI, "SI"),
        (Self::DPE, "DPE"),
    ];

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }

    /// The label value: `-` for none, else the flags joined by commas.
    pub fn label(self) -> std::borrow::Cow<'static, str> {
        if self.is_empty() {
            return "-".into();
        }
        let mut names = Self::NAMES.iter().filter(|(f, _)| self.contains(*f)).map(|(_, n)| *n);
        match (names.next(), names.next()) {
            (Some(only), None) => only.into(),
            (Some(first), Some(second)) => {
                let mut text = format!("{first},{second}");
                for name in names {
                    text.push(',');
                    text.push_str(name);
                }
                text.into()
            }
            (None, _) => "-".into(),
        }
    }
}

impl std::ops::BitOr for ResponseFlags {
    type Output = Self;
    fn bitor(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_in_envoy_order() {
        assert_eq!(ResponseFlags::default().label(), "-");
        assert_eq!(ResponseFlags::UO.label(), "UO");
        assert_eq!((ResponseFlags::FI | ResponseFlags::DI).label(), "DI,FI");
        assert_eq!((ResponseFlags::UT | ResponseFlags::URX | ResponseFlags::UF).label(), "UF,URX,UT");
    }
}
