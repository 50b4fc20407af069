//! Where tokens sit in a request (headers, query parameters, cookies) and what one is made of:
//! the decoded JOSE header and payload, and the claims flattened for AuthorizationPolicy.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, header};
use serde_json::{Map, Value};

use super::jwks::decode_base64url;

/// Envoy's default when a rule names no location: the bearer scheme, or this query parameter.
const DEFAULT_PARAM: &str = "access_token";

/// Where a verified token was found, so the engine can remove it before forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenLocation {
    Header(HeaderName),
    Param(String),
    Cookie(String),
}

/// One place a rule looks for its tokens.
#[derive(Debug, Clone)]
pub(super) enum Location {
    /// A header whose value is the token after `prefix` (empty for the whole value).
    Header {
        name: HeaderName,
        prefix: String,
    },
    Param(String),
    Cookie(String),
}

impl Location {
    /// Istio's `fromHeaders`, `fromParams` and `fromCookies`, or the default when all are empty.
    pub(super) fn from_rule(rule: &crate::config::JwtRule) -> Result<Vec<Location>, String> {
        let mut locations = Vec::new();
        for (i, h) in rule.from_headers.iter().enumerate() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("fromHeaders[{i}].name `{}` is not a valid header name", h.name))?;
            locations.push(Location::Header { name, prefix: h.prefix.clone().unwrap_or_default() });
        }
        locations.extend(rule.from_params.iter().cloned().map(Location::Param));
        locations.extend(rule.from_cookies.iter().cloned().map(Location::Cookie));
        if locations.is_empty() {
            locations.push(Location::Header { name: header::AUTHORIZATION, prefix: "Bearer ".to_owned() });
            locations.push(Location::Param(DEFAULT_PARAM.to_owned()));
        }
        Ok(locations)
    }

    pub(super) fn public(&self) -> TokenLocation {
        match self {
            Location::Header { name, .. } => TokenLocation::Header(name.clone()),
            Location::Param(name) => TokenLocation::Param(name.clone()),
            Location::Cookie(name) => TokenLocation::Cookie(name.clone()),
        }
    }

    /// Every token at this location. A header without the prefix holds none: that is how
    /// `Authorization: Basic ...` passes a bearer-token rule, as in Envoy.
    pub(super) fn extract<'r>(&self, headers: &'r HeaderMap, query: Option<&'r str>) -> Vec<&'r str> {
        let mut tokens = Vec::new();
        match self {
            Location::Header { name, prefix } => {
                for value in headers.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
                    let value = value.trim();
                    // Authentication schemes are case-insensitive (RFC 9110), so prefixes are too.
                    let rest = match value.get(..prefix.len()) {
                        Some(head) if head.eq_ignore_ascii_case(prefix) => &value[prefix.len()..],
                        _ => continue,
                    };
                    tokens.push(rest.trim());
                }
            }
            Location::Param(name) => {
                let pairs = query.unwrap_or_default().split('&').filter_map(|pair| pair.split_once('='));
                tokens.extend(pairs.filter(|(key, _)| key == name).map(|(_, value)| value));
            }
            Location::Cookie(name) => {
                for value in headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()) {
                    let pairs = value.split(';').filter_map(|pair| pair.trim().split_once('='));
                    tokens.extend(pairs.filter(|(key, _)| key == name).map(|(_, v)| v.trim_matches('"')));
                }
            }
        }
        tokens.retain(|t| !t.is_empty());
        tokens
    }
}

/// Removes a token's header (all its values, as Envoy does) when the rule does not forward it.
/// A query parameter is part of the request target, which the engine rewrites with
/// [`strip_query_param`]; a cookie stays, as in Envoy.
pub fn strip_token(headers: &mut HeaderMap, location: &TokenLocation) {
    if let TokenLocation::Header(name) = location {
        headers.remove(name);
    }
}

/// `path_and_query` without the parameter `name` (and without `?` when nothing is left).
pub fn strip_query_param(path_and_query: &str, name: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_owned();
    };
    let kept: Vec<&str> = query.split('&').filter(|pair| pair.split('=').next() != Some(name)).collect();
    if kept.iter().all(|pair| pair.is_empty()) { path.to_owned() } else { format!("{path}?{}", kept.join("&")) }
}

/// A token split and decoded, not yet verified.
pub(super) struct Jwt<'t> {
    pub(super) header: Map<String, Value>,
    pub(super) payload: Map<String, Value>,
    pub(super) payload_json: String,
    /// `header.payload` as sent: the bytes the signature covers.
    pub(super) signed: &'t str,
    pub(super) signature: Vec<u8>,
}

impl<'t> Jwt<'t> {
    pub(super) fn parse(token: &'t str) -> Result<Self, String> {
        let (signed, signature) = token.rsplit_once('.').ok_or_else(bad_format)?;
        let (header, payload) = signed.split_once('.').ok_or_else(bad_format)?;
        if payload.contains('.') {
            return Err(bad_format());
        }
        let header = decode_object(header).ok_or("Jwt header is an invalid Base64url input or an invalid JSON")?;
        let payload_bytes =
            decode_base64url(payload).map_err(|_| "Jwt payload is an invalid Base64url input".to_owned())?;
        let payload_json = String::from_utf8(payload_bytes).map_err(|_| "Jwt payload is not UTF-8".to_owned())?;
        let Ok(Value::Object(payload)) = serde_json::from_str(&payload_json) else {
            return Err("Jwt payload is not a JSON object".to_owned());
        };
        let signature =
            decode_base64url(signature).map_err(|_| "Jwt signature is an invalid Base64url input".to_owned())?;
        Ok(Jwt { header, payload, payload_json, signed, signature })
    }

    /// A string claim; `Err` when present with another type.
    pub(super) fn string_claim(&self, name: &str) -> Result<Option<&str>, String> {
        match self.payload.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("Jwt payload [{name}] field is not a string")),
        }
    }

    /// A NumericDate claim (`exp`, `nbf`) in seconds since the epoch.
    pub(super) fn time_claim(&self, name: &str) -> Result<Option<f64>, String> {
        match self.payload.get(name) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| format!("Jwt payload [{name}] field is not a number")),
        }
    }

    /// `aud` as a list: RFC 7519 allows one string or an array of them.
    pub(super) fn audiences(&self) -> Result<Vec<String>, String> {
        let invalid = || "Jwt payload [aud] field is not a string or string list".to_owned();
        match self.payload.get("aud") {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => {
                items.iter().map(|v| v.as_str().map(str::to_owned).ok_or_else(invalid)).collect()
            }
            Some(_) => Err(invalid()),
        }
    }
}

fn bad_format() -> String {
    "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections".to_owned()
}

fn decode_object(segment: &str) -> Option<Map<String, Value>> {
    match serde_json::from_slice(&decode_base64url(segment).ok()?) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// Claims keyed as AuthorizationPolicy asks for them: nested objects by dotted path
/// (`request.auth.claims[a][b]` is `a.b`), every element of a list, numbers and booleans as text.
pub(super) fn flatten_claims(payload: &Map<String, Value>) -> BTreeMap<String, Vec<String>> {
    let mut claims = BTreeMap::new();
    for (name, value) in payload {
        flatten(name, value, &mut claims);
    }
    claims
}

/// Recursion is bounded by serde_json's nesting limit (128), which parsing already enforced.
fn flatten(key: &str, value: &Value, claims: &mut BTreeMap<String, Vec<String>>) {
    let text = match value {
        Value::Null => return,
        Value::Object(map) => {
            for (name, inner) in map {
                flatten(&format!("{key}.{name}"), inner, claims);
            }
            return;
        }
        Value::Array(items) => {
            for item in items {
                flatten(key, item, claims);
            }
            return;
        }
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
    };
    claims.entry(key.to_owned()).or_default().push(text);
}
