//! VirtualService as written (L7-2, L7-3, L7-5 to L7-8): how requests and connections addressed
//! to some hosts are matched, and where they go.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Deserializer, de::IgnoredAny};

use super::{
    Check, Percent, at_most_one, count, enum_value, header_keyed, header_names, header_values, host_name, hosts,
    http_status, null_as_default, opt_port_selector, percent_integer, port,
    resilience::{Fault, HttpRetry},
    scalar, subset_name,
};
use crate::config::{Cidr, ObjectMeta, parse_duration};

/// `networking.istio.io` VirtualService.
#[derive(Debug, Clone, Deserialize)]
pub struct VirtualService {
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: VirtualServiceSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    #[serde(default, deserialize_with = "hosts")]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    /// Accepted for compatibility and ignored: strait has a single visibility scope.
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    #[serde(default)]
    pub tls: Vec<TlsRoute>,
}

/// One `http[]` entry. Exactly one of `route`, `redirect`, `directResponse` (or the unsupported
/// `delegate`) says where matching requests go.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "HttpRoute", transform = crate::config::schema::mirror_percent_alias))]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub route: Vec<HttpRouteDestination>,
    #[serde(default)]
    pub redirect: Option<HttpRedirect>,
    #[serde(default)]
    pub direct_response: Option<DirectResponse>,
    /// Not supported by strait; kept so that it can be reported.
    #[serde(default)]
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::Ignored>"))]
    pub delegate: Option<IgnoredAny>,
    #[serde(default)]
    pub rewrite: Option<HttpRewrite>,
    /// `0s` is Istio's way to write "no timeout"; it is read as `None`.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::DurationText>"))]
    #[serde(default, deserialize_with = "timeout")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub retries: Option<HttpRetry>,
    #[serde(default)]
    pub fault: Option<Fault>,
    #[serde(default)]
    pub mirror: Option<DestinationSpec>,
    #[serde(default)]
    pub mirrors: Vec<MirrorPolicy>,
    /// Share of requests `mirror` copies.
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    /// The legacy integer form of `mirrorPercentage`.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, alias = "mirror_percent", deserialize_with = "percent_integer")]
    pub mirror_percent: Option<u32>,
    /// Not supported by strait; kept so that it can be reported.
    #[serde(default)]
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::Ignored>"))]
    pub cors_policy: Option<IgnoredAny>,
    #[serde(default)]
    pub headers: Headers,
}

impl Check for HttpRoute {
    fn check(&self) -> Result<(), String> {
        let forwards = !self.route.is_empty();
        let answers = self.redirect.is_some() || self.direct_response.is_some();
        at_most_one(&[
            ("route", forwards),
            ("redirect", self.redirect.is_some()),
            ("directResponse", self.direct_response.is_some()),
            ("delegate", self.delegate.is_some()),
        ])?;
        if !forwards && !answers && self.delegate.is_none() {
            return Err("an http route needs `route`, `redirect` or `directResponse` to say where requests go".into());
        }
        if answers && self.fault.is_some() {
            return Err("`fault` only applies to forwarded requests; it cannot be combined with `redirect` or \
                        `directResponse`"
                .into());
        }
        if answers && self.rewrite.is_some() {
            return Err("`rewrite` only applies to forwarded requests; it cannot be combined with `redirect` or \
                        `directResponse`"
                .into());
        }
        at_most_one(&[("mirror", self.mirror.is_some()), ("mirrors", !self.mirrors.is_empty())])
    }
}

/// One `match[]` entry: all conditions must hold.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uri: Option<StringMatch>,
    #[serde(default)]
    pub scheme: Option<StringMatch>,
    #[serde(default)]
    pub method: Option<StringMatch>,
    #[serde(default)]
    pub authority: Option<StringMatch>,
    /// By header name, lower case; `{}` checks presence.
    #[serde(default, deserialize_with = "header_keyed")]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default, deserialize_with = "header_keyed")]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "port")]
    pub port: Option<u16>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub source_namespace: Option<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub ignore_uri_case: bool,
}

/// Istio's StringMatch: at most one of the three; none (`{}`) means "present, any value".
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "StringMatch"))]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct StringMatch {
    #[serde(default, deserialize_with = "text")]
    pub exact: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub prefix: Option<String>,
    /// Compiled and anchored: RE2 semantics, the whole value must match.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<String>"))]
    #[serde(default, deserialize_with = "regex")]
    pub regex: Option<regex::Regex>,
}

impl Check for StringMatch {
    fn check(&self) -> Result<(), String> {
        at_most_one(&[
            ("exact", self.exact.is_some()),
            ("prefix", self.prefix.is_some()),
            ("regex", self.regex.is_some()),
        ])
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteDestination {
    pub destination: DestinationSpec,
    /// `None` when not written (Istio reads it as 0, or 100 for a lone destination).
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub weight: Option<u32>,
    #[serde(default)]
    pub headers: Headers,
}

/// `destination`: a host as written (resolved later, in the resource's namespace).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DestinationSpec {
    #[serde(deserialize_with = "destination_host")]
    pub host: String,
    #[serde(default, deserialize_with = "opt_subset")]
    pub subset: Option<String>,
    /// `port: {number: 9080}`.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::PortSelector>"))]
    #[serde(default, deserialize_with = "opt_port_selector")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "HttpRedirect"))]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRedirect {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "port")]
    pub port: Option<u16>,
    #[serde(default, deserialize_with = "redirect_scheme")]
    pub scheme: Option<String>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "redirect_code")]
    pub redirect_code: Option<u16>,
    /// Not supported by strait; kept so that it can be reported.
    #[serde(default)]
    pub derive_port: Option<DerivePort>,
}

impl Check for HttpRedirect {
    fn check(&self) -> Result<(), String> {
        at_most_one(&[("port", self.port.is_some()), ("derivePort", self.derive_port.is_some())])?;
        let changes = [self.uri.is_some(), self.authority.is_some(), self.port.is_some(), self.scheme.is_some()];
        if !changes.contains(&true) && self.derive_port.is_none() {
            return Err("a redirect must change at least one of `uri`, `authority`, `port` and `scheme`".into());
        }
        Ok(())
    }
}

/// `redirect.derivePort`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DerivePort {
    FromProtocolDefault,
    FromRequestPort,
}

impl<'de> Deserialize<'de> for DerivePort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const VALUES: &[(&str, DerivePort)] = &[
            ("FROM_PROTOCOL_DEFAULT", DerivePort::FromProtocolDefault),
            ("FROM_REQUEST_PORT", DerivePort::FromRequestPort),
        ];
        enum_value(d, "derivePort value", VALUES)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    #[cfg_attr(feature = "crd-schema", schemars(with = "crate::config::schema::IntOrString"))]
    #[serde(deserialize_with = "http_status")]
    pub status: u16,
    #[serde(default)]
    pub body: Option<Body>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Body {
    pub string: String,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "HttpRewrite"))]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct HttpRewrite {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
}

impl Check for HttpRewrite {
    fn check(&self) -> Result<(), String> {
        match (&self.uri, &self.authority) {
            (None, None) => Err("a rewrite must set `uri`, `authority` or both".into()),
            _ => Ok(()),
        }
    }
}

/// One `mirrors[]` entry; the percentage defaults to 100.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MirrorPolicy {
    pub destination: DestinationSpec,
    #[serde(default)]
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Headers {
    #[serde(default)]
    pub request: HeaderOperations,
    #[serde(default)]
    pub response: HeaderOperations,
}

/// Names are lower case (`:authority` reads as `host`); values are text.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HeaderOperations {
    #[cfg_attr(
        feature = "crd-schema",
        schemars(with = "std::collections::BTreeMap<String, crate::config::schema::Scalar>")
    )]
    #[serde(default, deserialize_with = "header_values")]
    pub set: BTreeMap<String, String>,
    #[cfg_attr(
        feature = "crd-schema",
        schemars(with = "std::collections::BTreeMap<String, crate::config::schema::Scalar>")
    )]
    #[serde(default, deserialize_with = "header_values")]
    pub add: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "header_names")]
    pub remove: Vec<String>,
}

/// One `tcp[]` entry.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "TcpRoute"))]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct TcpRoute {
    #[serde(default, rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

impl Check for TcpRoute {
    fn check(&self) -> Result<(), String> {
        if self.matches.iter().any(|m| !m.sni_hosts.is_empty()) {
            return Err("`sniHosts` belongs to `tls` routes; a tcp match cannot read the SNI".into());
        }
        if self.route.is_empty() {
            return Err("a tcp route needs a `route` (where connections go)".into());
        }
        Ok(())
    }
}

/// One `tls[]` entry: routed by SNI without terminating TLS.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "TlsRoute"))]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct TlsRoute {
    #[serde(default, rename = "match")]
    pub matches: Vec<L4MatchAttributes>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

impl Check for TlsRoute {
    fn check(&self) -> Result<(), String> {
        if self.matches.is_empty() || self.matches.iter().any(|m| m.sni_hosts.is_empty()) {
            return Err("a tls route needs `match` entries, each with `sniHosts`".into());
        }
        if self.route.is_empty() {
            return Err("a tls route needs a `route` (where connections go)".into());
        }
        Ok(())
    }
}

/// Match conditions of `tcp[]` and `tls[]` (`sniHosts` only in `tls[]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(transform = crate::config::schema::sni_hosts_alias))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4MatchAttributes {
    #[serde(default)]
    pub destination_subnets: Vec<Cidr>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "port")]
    pub port: Option<u16>,
    #[serde(default)]
    pub source_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub source_namespace: Option<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default, alias = "sni_hosts", deserialize_with = "hosts")]
    pub sni_hosts: Vec<String>,
}

/// A weighted destination of a tcp or tls route.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RouteDestination {
    pub destination: DestinationSpec,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub weight: Option<u32>,
}

checked!(HttpRoute, StringMatch, HttpRedirect, HttpRewrite, TcpRoute, TlsRoute);

/// A destination names one host: a wildcard would leave the destination undecided.
fn destination_host<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    scalar(d, "a host name", |text| match text {
        "*" => Err("`*` is not a destination; name the service to send to".into()),
        _ => host_name(text),
    })
}

fn opt_subset<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    scalar(d, "a subset name", |text| subset_name(text).map(Some))
}

fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    scalar(d, "a string", |text| Ok(Some(text.to_owned())))
}

/// A regex as Istio takes it (RE2), compiled anchored because RE2 matches the whole value.
fn regex<'de, D: Deserializer<'de>>(d: D) -> Result<Option<regex::Regex>, D::Error> {
    scalar(d, "a regular expression", |text| {
        // Checked unanchored first so that the error quotes the user's pattern, not our wrapper.
        regex::Regex::new(text).map_err(|e| {
            let reason = e.to_string();
            let reason = reason.lines().last().unwrap_or_default().trim_start_matches("error: ").to_owned();
            format!("`{text}` is not a valid regular expression (RE2 syntax): {reason}")
        })?;
        regex::Regex::new(&format!("^(?:{text})$")).map(Some).map_err(|e| format!("`{text}`: {e}"))
    })
}

/// `timeout`: `0s` means none; otherwise at least 1 ms, like every Istio duration.
fn timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    scalar(d, "a duration such as 10s", |text| match parse_duration(text)? {
        Duration::ZERO => Ok(None),
        short if short < Duration::from_millis(1) => Err(format!("`{text}` is too short; write 0s or at least 1ms")),
        timeout => Ok(Some(timeout)),
    })
}

fn redirect_code<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    scalar(d, "a redirect status", |text| match text.trim().parse::<u16>() {
        Ok(code @ 300..=399) => Ok(Some(code)),
        _ => Err(format!("`{text}` is not a redirect status; write a 3xx code such as 301, 302, 307 or 308")),
    })
}

fn redirect_scheme<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    scalar(d, "a scheme", |text| match text {
        "http" | "https" => Ok(Some(text.to_owned())),
        _ => Err(format!("`{text}` is not a redirect scheme; write http or https")),
    })
}
