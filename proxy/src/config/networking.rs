//! Istio's traffic resources (`networking.istio.io/v1alpha3|v1beta1|v1`) as users write them:
//! VirtualService (L7-2, L7-3, L7-5..L7-8) and DestinationRule (L7-4).
//!
//! As in `security.rs`, unknown fields are rejected and values whose form the schema fixes
//! (durations, percentages, statuses, regexes, enum names, header names) are checked while
//! deserializing, so a mistake is reported at its own line and field path. Rules that tie the
//! fields of one object together (`route` or `redirect`, one hash key per `consistentHash`) are
//! checked as soon as that object is read, while the parser still knows where it starts, so they
//! point at the object's first line. Everything that needs other resources (hosts, subsets,
//! ports) is checked later, by `model::routes`. Older spellings still found in the docs
//! (`mirror_percent`, `percent`, `consecutiveErrors`, `sni_hosts`, `round_robin`) are accepted.

use std::{collections::BTreeMap, fmt, net::IpAddr, time::Duration};

use serde::{Deserialize, Deserializer, de};

use super::parse_duration;

/// Rules across the fields of one object, run right after the object is read (see module docs).
trait Check {
    fn check(&self) -> Result<(), String>;
}

/// Implements `Deserialize` for types that derive it with `#[serde(remote = "Self")]` (which
/// turns the derived code into an inherent `deserialize`) and implement `Check`: the derived
/// code reads the fields inside our own map visitor, so that a failed check is reported at the
/// object's line and path rather than at its parent's.
macro_rules! checked {
    ($($ty:ident),* $(,)?) => {$(
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Fields;
                impl<'de> serde::de::Visitor<'de> for Fields {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a mapping")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<$ty, A::Error> {
                        let value = $ty::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                        $crate::config::networking::Check::check(&value).map_err(serde::de::Error::custom)?;
                        Ok(value)
                    }
                }
                d.deserialize_map(Fields)
            }
        }
    )*};
}

mod destination_rule;
mod resilience;
mod service_entry;
mod virtual_service;

pub use destination_rule::{
    ClientTlsSettings, ConnectionPoolSettings, ConsistentHash, DestinationRule, DestinationRuleSpec,
    LoadBalancerSettings, OutlierDetectionSettings, SimpleLb, SubsetSpec, TlsMode, TrafficPolicySpec,
};
pub use resilience::{HttpRetry, RetryOnToken};
pub use service_entry::{
    EntryEndpoint, EntryWorkloadSelector, Location, Resolution, ServiceEntry, ServiceEntryPort, ServiceEntrySpec,
};
pub use virtual_service::{
    DestinationSpec, HeaderOperations, Headers, HttpMatch, HttpRoute, L4MatchAttributes, RouteDestination, StringMatch,
    VirtualService, VirtualServiceSpec,
};
#[cfg(feature = "crd-schema")]
pub(super) use {destination_rule::H2UpgradePolicy, resilience::GrpcStatus, virtual_service::DerivePort};

/// `percentage: {value: 0.1}`: a share of requests in percent, 0 to 100.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Percent {
    #[cfg_attr(feature = "crd-schema", schemars(with = "f64"))]
    #[serde(deserialize_with = "percent_value")]
    pub value: f64,
}

/// Reads one scalar (string, number or boolean, as text) and converts it inside the visitor, so
/// that a conversion error carries the scalar's own line and field path.
fn scalar<'de, D, T, F>(d: D, expecting: &'static str, convert: F) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    F: FnOnce(&str) -> Result<T, String>,
{
    struct Visitor<F> {
        expecting: &'static str,
        convert: F,
    }
    impl<T, F: FnOnce(&str) -> Result<T, String>> de::Visitor<'_> for Visitor<F> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.convert)(v).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            self.visit_str(&v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            self.visit_str(&v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
            self.visit_str(&v.to_string())
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<T, E> {
            self.visit_str(&v.to_string())
        }
    }
    d.deserialize_any(Visitor { expecting, convert })
}

/// An Istio enum value (`ROUND_ROBIN`), in any case: older docs write `round_robin`.
fn enum_value<'de, D: Deserializer<'de>, T: Copy>(
    d: D,
    what: &'static str,
    values: &'static [(&'static str, T)],
) -> Result<T, D::Error> {
    scalar(d, what, |text| {
        let upper = text.trim().to_ascii_uppercase();
        values.iter().find(|(name, _)| *name == upper).map(|(_, v)| *v).ok_or_else(|| {
            let names: Vec<&str> = values.iter().map(|(name, _)| *name).collect();
            format!("unknown {what} `{text}`; expected one of {}", names.join(", "))
        })
    })
}

/// A duration Istio requires to be at least 1 ms (`perTryTimeout`, `fixedDelay`, `interval`, ...).
fn required_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    scalar(d, "a duration such as 10s", |text| {
        let value = parse_duration(text)?;
        if value < Duration::from_millis(1) {
            return Err(format!("`{text}` is too short; durations must be at least 1ms"));
        }
        Ok(value)
    })
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    required_duration(d).map(Some)
}

/// A count (connections, requests, errors): a non-negative integer, as a number or a string.
fn count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    scalar(d, "a non-negative integer", |text| {
        text.trim().parse::<u32>().map(Some).map_err(|_| format!("`{text}` is not a non-negative integer"))
    })
}

/// A port number (1-65535), as a number or a string.
fn required_port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    scalar(d, "a port number", super::parse_port)
}

fn port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    required_port(d).map(Some)
}

/// `port: {number: 9080}`, Istio's PortSelector.
fn port_selector<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PortSelector {
        #[serde(deserialize_with = "required_port")]
        number: u16,
    }
    Ok(PortSelector::deserialize(d)?.number)
}

fn opt_port_selector<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    port_selector(d).map(Some)
}

/// A subset name: Istio requires a DNS-1123 label (`v1`, `canary-2`).
fn subset_name(text: &str) -> Result<String, String> {
    let valid = !text.is_empty()
        && text.len() <= 63
        && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-');
    if valid {
        Ok(text.to_owned())
    } else {
        Err(format!("`{text}` is not a valid subset name (lower-case letters, digits and `-`, at most 63)"))
    }
}

/// The legacy integer `percent` / `mirror_percent` (0-100).
fn percent_integer<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    scalar(d, "an integer percentage", |text| match text.trim().parse::<u32>() {
        Ok(n @ 0..=100) => Ok(Some(n)),
        _ => Err(format!("`{text}` is not a percentage; write an integer from 0 to 100")),
    })
}

fn percent_value<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    scalar(d, "a percentage", |text| match text.trim().parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => Err(format!("`{text}` is not a percentage; write a number from 0 to 100 (0.1 is 1 request in 1000)")),
    })
}

/// A status strait can answer with.
fn http_status<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    scalar(d, "an HTTP status", |text| match text.trim().parse::<u16>() {
        Ok(status @ 200..=599) => Ok(status),
        _ => Err(format!("`{text}` is not an HTTP status strait can answer with (200-599)")),
    })
}

/// A host as VirtualServices and DestinationRules write it: a DNS name, possibly short
/// (`reviews`) or starting with `*.`, the wildcard `*`, or an IP address (gateway hosts).
fn host_name(text: &str) -> Result<String, String> {
    let name = text.strip_prefix("*.").unwrap_or(text);
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    if text == "*" || text.parse::<IpAddr>().is_ok() || (name.len() <= 253 && name.split('.').all(label_ok)) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "`{text}` is not a valid host; write a DNS name such as reviews or reviews.shop.svc.cluster.local, \
             optionally starting with `*.`"
        ))
    }
}

fn host<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    scalar(d, "a host name", host_name)
}

fn hosts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Host(String);
    impl<'de> Deserialize<'de> for Host {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            host(d).map(Host)
        }
    }
    Ok(Vec::<Host>::deserialize(d)?.into_iter().map(|h| h.0).collect())
}

/// A header name, lower case; the pseudo-header `:authority` is the `host` header to strait.
fn header_name(text: &str) -> Result<String, String> {
    let lower = text.trim().to_ascii_lowercase();
    if lower == ":authority" {
        return Ok("host".to_owned());
    }
    http::HeaderName::from_bytes(lower.as_bytes())
        .map(|_| lower)
        .map_err(|_| format!("`{text}` is not a valid HTTP header name"))
}

/// A header name as a map key, checked where it is written.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct HeaderKey(String);

impl<'de> Deserialize<'de> for HeaderKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "an HTTP header name", |text| header_name(text).map(HeaderKey))
    }
}

/// A header value: any scalar (`test: true` sets the text `true`), without control characters.
struct HeaderValueText(String);

impl<'de> Deserialize<'de> for HeaderValueText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        scalar(d, "an HTTP header value", |text| {
            http::HeaderValue::from_str(text)
                .map(|_| HeaderValueText(text.to_owned()))
                .map_err(|_| format!("`{text}` is not a valid HTTP header value"))
        })
    }
}

/// A map keyed by header name (match conditions).
fn header_keyed<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<BTreeMap<String, T>, D::Error> {
    Ok(BTreeMap::<HeaderKey, T>::deserialize(d)?.into_iter().map(|(k, v)| (k.0, v)).collect())
}

/// `set` / `add`: header name to value.
fn header_values<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let map = BTreeMap::<HeaderKey, HeaderValueText>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, v)| (k.0, v.0)).collect())
}

/// `remove`: header names.
fn header_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Vec::<HeaderKey>::deserialize(d)?.into_iter().map(|k| k.0).collect())
}

/// `spec:` with nothing after it is YAML null; treat it like `spec: {}`.
fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// "set at most one of": the names of the fields of a oneof that are set, for error messages.
fn at_most_one(fields: &[(&str, bool)]) -> Result<(), String> {
    let set: Vec<&str> = fields.iter().filter(|(_, set)| *set).map(|(name, _)| *name).collect();
    if set.len() > 1 {
        let names: Vec<String> = fields.iter().map(|(name, _)| format!("`{name}`")).collect();
        return Err(format!("set only one of {}; found {}", names.join(", "), set.join(" and ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_are_checked_and_lower_cased() {
        assert_eq!(header_name("End-User"), Ok("end-user".to_owned()));
        assert_eq!(header_name(":authority"), Ok("host".to_owned()));
        for bad in ["bad header", "", "x:y", ":path", "é"] {
            assert!(header_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts_are_dns_names_or_wildcards() {
        for good in ["reviews", "Reviews.shop", "reviews.shop.svc.cluster.local", "*.example.com", "*", "10.0.0.1"] {
            assert!(host_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "*.", "a..b", "a.b.", "*foo.com", "a.*.com", "under_score", "-a", "a b"] {
            assert!(host_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn at_most_one_names_the_conflict() {
        assert!(at_most_one(&[("a", true), ("b", false)]).is_ok());
        let e = at_most_one(&[("exact", true), ("prefix", true), ("regex", false)]).expect_err("two set");
        assert!(e.contains("found exact and prefix"), "{e}");
    }
}
