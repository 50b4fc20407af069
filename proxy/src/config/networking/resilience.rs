//! Retries and fault injection of an http route, as written (L7-5, L7-6).

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{Check, Percent, at_most_one, count, duration, http_status, percent_integer, required_duration, scalar};

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "HttpRetry"))]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRetry {
    /// Retries after the first try; `None` or 0 turns retries off.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub attempts: Option<u32>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::DurationText>"))]
    #[serde(default, deserialize_with = "duration")]
    pub per_try_timeout: Option<Duration>,
    /// `None` when not written: Istio's default conditions apply.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<String>"))]
    #[serde(default, deserialize_with = "retry_on")]
    pub retry_on: Option<Vec<RetryOnToken>>,
    /// Accepted and ignored: strait has no localities.
    #[serde(default)]
    pub retry_remote_localities: Option<bool>,
}

impl Check for HttpRetry {
    fn check(&self) -> Result<(), String> {
        let tuned = self.per_try_timeout.is_some() || self.retry_on.is_some() || self.retry_remote_localities.is_some();
        if self.attempts.unwrap_or(0) == 0 && tuned {
            return Err("retries are off when `attempts` is 0 or missing; set `attempts` or remove the other \
                        retry settings"
                .into());
        }
        Ok(())
    }
}

/// One condition of `retryOn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOnToken {
    ServerError,
    GatewayError,
    Reset,
    ConnectFailure,
    Retriable4xx,
    RefusedStream,
    RetriableStatusCodes,
    /// A bare status code such as `503`.
    Status(u16),
    /// A gRPC status by its numeric code (`unavailable` is 14).
    Grpc(u32),
}

const GRPC_RETRY_ON: [(&str, u32); 5] =
    [("cancelled", 1), ("deadline-exceeded", 4), ("resource-exhausted", 8), ("internal", 13), ("unavailable", 14)];

impl RetryOnToken {
    fn parse(token: &str) -> Result<RetryOnToken, String> {
        Ok(match token {
            "5xx" => RetryOnToken::ServerError,
            "gateway-error" => RetryOnToken::GatewayError,
            "reset" => RetryOnToken::Reset,
            "connect-failure" => RetryOnToken::ConnectFailure,
            "retriable-4xx" => RetryOnToken::Retriable4xx,
            "refused-stream" => RetryOnToken::RefusedStream,
            "retriable-status-codes" => RetryOnToken::RetriableStatusCodes,
            _ => match (token.parse::<u16>(), GRPC_RETRY_ON.iter().find(|(name, _)| *name == token)) {
                (Ok(code @ 100..=599), _) => RetryOnToken::Status(code),
                (_, Some((_, code))) => RetryOnToken::Grpc(*code),
                _ => {
                    return Err(format!(
                        "unknown retryOn condition `{token}`; strait knows 5xx, gateway-error, reset, \
                         connect-failure, retriable-4xx, refused-stream, retriable-status-codes, HTTP status codes \
                         and the gRPC statuses cancelled, deadline-exceeded, internal, resource-exhausted, unavailable"
                    ));
                }
            },
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "Fault"))]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Fault {
    #[serde(default)]
    pub delay: Option<Delay>,
    #[serde(default)]
    pub abort: Option<FaultAbort>,
}

impl Check for Fault {
    fn check(&self) -> Result<(), String> {
        match (&self.delay, &self.abort) {
            (None, None) => Err("a fault needs a `delay`, an `abort` or both".into()),
            _ => Ok(()),
        }
    }
}

/// `fault.delay`. Share of requests: `percentage`, else the legacy `percent`, else all.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delay {
    #[cfg_attr(feature = "crd-schema", schemars(with = "crate::config::schema::DurationText"))]
    #[serde(deserialize_with = "required_duration")]
    pub fixed_delay: Duration,
    #[serde(default)]
    pub percentage: Option<Percent>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "percent_integer")]
    pub percent: Option<u32>,
}

/// `fault.abort`: one of `httpStatus` and `grpcStatus`; the share as for `Delay`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "FaultAbort"))]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "opt_http_status")]
    pub http_status: Option<u16>,
    #[serde(default)]
    pub grpc_status: Option<GrpcStatus>,
    #[serde(default)]
    pub percentage: Option<Percent>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "percent_integer")]
    pub percent: Option<u32>,
}

impl Check for FaultAbort {
    fn check(&self) -> Result<(), String> {
        at_most_one(&[("httpStatus", self.http_status.is_some()), ("grpcStatus", self.grpc_status.is_some())])?;
        match (self.http_status, self.grpc_status) {
            (None, None) => Err("an abort needs `httpStatus` or `grpcStatus`".into()),
            _ => Ok(()),
        }
    }
}

/// A gRPC status code, written by name (`UNAVAILABLE`) or number (14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcStatus(pub u32);

const GRPC_STATUSES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl<'de> Deserialize<'de> for GrpcStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "a gRPC status", |text| {
            let upper = text.trim().to_ascii_uppercase();
            let by_name = GRPC_STATUSES.iter().position(|name| *name == upper).and_then(|i| u32::try_from(i).ok());
            let by_number = upper.parse::<u32>().ok().filter(|n| *n < 17);
            by_name.or(by_number).map(GrpcStatus).ok_or_else(|| {
                format!("`{text}` is not a gRPC status; write a name such as UNAVAILABLE or a code from 0 to 16")
            })
        })
    }
}

checked!(HttpRetry, Fault, FaultAbort);

fn opt_http_status<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    http_status(d).map(Some)
}

/// `retryOn`: comma-separated conditions, each checked.
fn retry_on<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<RetryOnToken>>, D::Error> {
    scalar(d, "retry conditions such as 5xx,connect-failure", |text| {
        let tokens = text.split(',').map(str::trim).filter(|t| !t.is_empty());
        tokens.map(RetryOnToken::parse).collect::<Result<Vec<_>, _>>().map(Some)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_tokens() {
        assert_eq!(RetryOnToken::parse("5xx"), Ok(RetryOnToken::ServerError));
        assert_eq!(RetryOnToken::parse("503"), Ok(RetryOnToken::Status(503)));
        assert_eq!(RetryOnToken::parse("unavailable"), Ok(RetryOnToken::Grpc(14)));
        for bad in ["5xxx", "99", "600", "Unavailable", "retriable-headers"] {
            let e = RetryOnToken::parse(bad).expect_err(bad);
            assert!(e.contains(&format!("`{bad}`")), "{e}");
        }
    }
}
