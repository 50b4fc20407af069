//! RequestAuthentication (L7-10): finds a request's JWTs where each rule says, verifies them
//! against the rule's JWKS, and yields the identity and claims AuthorizationPolicy matches on.

mod jwks;
#[cfg(test)]
mod tests;
mod token;

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderMap, HeaderName};
use serde_json::Value;

pub use jwks::{JwksSource, fetch_jwks, jwks_source};
pub use token::{TokenLocation, strip_query_param, strip_token};

use crate::{authz::HttpRequest, config::JwtRule};
use jwks::{Algorithm, KeySet};
use token::{Jwt, Location, flatten_claims};

/// The body of the 401 for an invalid token: Envoy's words for a failed signature, sent for
/// every failure so that a client learns no more than that (the reason goes to the access log).
pub const UNAUTHORIZED_BODY: &str = "Jwt verification fails";

/// Envoy's default `clock_skew_seconds`: `exp` and `nbf` are this lenient.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Real tokens are a few KiB; anything far bigger is refused before any decoding.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// One compiled `jwtRules` entry.
#[derive(Debug, Clone)]
pub struct JwtProvider {
    issuer: String,
    /// When non-empty, a token's `aud` must name one of these.
    audiences: Vec<String>,
    /// `Err` holds why the JWKS could not be had: the rule then rejects every token it finds.
    keys: Result<KeySet, String>,
    locations: Vec<Location>,
    forward_original_token: bool,
    output_payload_to_header: Option<HeaderName>,
}

impl JwtProvider {
    /// Compiles `rule` with the JWKS text the caller obtained from [`jwks_source`]. Keys of
    /// unsupported types are skipped (see [`JwtProvider::skipped_keys`]); no usable key is an error.
    pub fn from_rule(rule: &JwtRule, jwks: &str) -> Result<JwtProvider, String> {
        let keys = KeySet::parse(jwks)?;
        Self::build(rule, Ok(keys))
    }

    /// A provider for a rule whose JWKS is unavailable (`reason`). Istio does the same by
    /// substituting a key nothing verifies against: tokens in the rule's locations must not
    /// pass as "no token" just because the keys are missing.
    pub fn unavailable(rule: &JwtRule, reason: String) -> Result<JwtProvider, String> {
        Self::build(rule, Err(reason))
    }

    fn build(rule: &JwtRule, keys: Result<KeySet, String>) -> Result<JwtProvider, String> {
        if rule.issuer.is_empty() {
            return Err("the issuer is empty".to_owned());
        }
        let output_payload_to_header = match rule.output_payload_to_header.as_deref() {
            None | Some("") => None,
            Some(name) => Some(
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("outputPayloadToHeader `{name}` is not a valid header name"))?,
            ),
        };
        Ok(JwtProvider {
            issuer: rule.issuer.clone(),
            audiences: rule.audiences.clone(),
            keys,
            locations: Location::from_rule(rule)?,
            forward_original_token: rule.forward_original_token,
            output_payload_to_header,
        })
    }

    /// Why keys of the JWKS were left out, for the operator.
    pub fn skipped_keys(&self) -> &[String] {
        self.keys.as_ref().map_or(&[], |k| &k.skipped)
    }

    /// Checks a token whose `iss` is this provider's issuer.
    fn check(&self, jwt: &Jwt<'_>, now: SystemTime) -> Result<(), String> {
        let keys = self.keys.as_ref().map_err(|why| format!("Jwks is unavailable: {why}"))?;
        let alg = match jwt.header.get("alg") {
            Some(Value::String(name)) => {
                Algorithm::from_name(name).ok_or_else(|| format!("Jwt header [alg] {name:?} is not supported"))?
            }
            _ => return Err("Jwt header [alg] field is missing or not a string".to_owned()),
        };
        let kid = match jwt.header.get("kid") {
            None => None,
            Some(Value::String(kid)) => Some(kid.as_str()),
            Some(_) => return Err("Jwt header [kid] field is not a string".to_owned()),
        };
        // Envoy refuses a token whose `sub` is not a string, as it would make no principal.
        jwt.string_claim("sub")?;
        if !keys.verify(alg, kid, jwt.signed.as_bytes(), &jwt.signature) {
            return Err("Jwt verification fails: no key of the JWKS verifies the signature".to_owned());
        }
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let skew = CLOCK_SKEW.as_secs_f64();
        if jwt.time_claim("exp")?.is_some_and(|exp| now > exp + skew) {
            return Err("Jwt is expired".to_owned());
        }
        if jwt.time_claim("nbf")?.is_some_and(|nbf| now + skew < nbf) {
            return Err("Jwt not yet valid".to_owned());
        }
        let audiences = jwt.audiences()?;
        if !self.audiences.is_empty() && !audiences.iter().any(|a| self.audiences.contains(a)) {
            return Err("Audiences in Jwt are not allowed".to_owned());
        }
        Ok(())
    }
}

/// The parts of a request that may carry tokens.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    pub headers: &'a HeaderMap,
    /// The query string, without `?`.
    pub query: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtOutcome {
    /// No rule found a token: the request goes on without a request principal.
    NoToken,
    Valid(Box<ValidatedJwt>),
    /// Why, for the access log; the client only gets [`UNAUTHORIZED_BODY`].
    Invalid(String),
}

/// A verified token: what authorization sees, and what the engine does with the token next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedJwt {
    pub issuer: String,
    /// `sub`, empty when the token has none.
    pub subject: String,
    /// `iss/sub`, what `requestPrincipals` matches.
    pub principal: String,
    /// `aud`, always as a list.
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    /// Every claim, keyed as `request.auth.claims[...]` asks (see `crate::authz::HttpRequest`).
    pub claims: BTreeMap<String, Vec<String>>,
    /// The decoded payload, exactly as the token carried it.
    pub payload_json: String,
    pub location: TokenLocation,
    /// When false, the engine removes the token ([`strip_token`], [`strip_query_param`]).
    pub forward_original_token: bool,
    /// Header to set to [`ValidatedJwt::payload_header_value`] before forwarding.
    pub output_payload_to_header: Option<HeaderName>,
}

impl ValidatedJwt {
    pub fn fill(&self, http: &mut HttpRequest) {
        http.request_principal = Some(self.principal.clone());
        http.audiences = self.audiences.clone();
        http.presenter = self.presenter.clone();
        http.claims = self.claims.clone();
    }

    /// The payload base64url-encoded without padding, as Envoy writes `forward_payload_header`.
    pub fn payload_header_value(&self) -> String {
        URL_SAFE_NO_PAD.encode(&self.payload_json)
    }
}

/// Decides a request's tokens against every rule that applies to its destination, with Envoy's
/// `jwt_authn` semantics as Istio configures them: each rule is a provider, and the requirement
/// is "any provider, or no token at all". So a request without a token passes (a policy may still
/// demand `requestPrincipals`), while a token that is present must verify: one whose issuer no
/// rule reading that location names is rejected like a bad signature.
///
/// Each distinct token found (in rule order, then location order) must verify with a rule that
/// has its issuer and reads that location; the first one is the request's identity. Istio calls
/// several tokens in one request undefined; strait rejects the request if any of them fails.
/// The engine answers [`JwtOutcome::Invalid`] with 401 and [`UNAUTHORIZED_BODY`].
pub fn authenticate(providers: &[JwtProvider], request: &RequestParts<'_>, now: SystemTime) -> JwtOutcome {
    let mut found: Vec<(TokenLocation, &str, Vec<&JwtProvider>)> = Vec::new();
    for provider in providers {
        for location in &provider.locations {
            let at = location.public();
            for token in location.extract(request.headers, request.query) {
                match found.iter_mut().find(|(l, t, _)| *l == at && *t == token) {
                    Some((_, _, readers)) => readers.push(provider),
                    None => found.push((at.clone(), token, vec![provider])),
                }
            }
        }
    }
    let mut first = None;
    for (location, token, readers) in found {
        match verify(token, &readers, now) {
            Ok((provider, jwt)) => {
                first.get_or_insert_with(|| validated(provider, &jwt, location));
            }
            Err(reason) => return JwtOutcome::Invalid(reason),
        }
    }
    first.map_or(JwtOutcome::NoToken, |valid| JwtOutcome::Valid(Box::new(valid)))
}

/// Verifies one token with the rules that found it, returning the one that accepted it.
fn verify<'p, 't>(
    token: &'t str,
    readers: &[&'p JwtProvider],
    now: SystemTime,
) -> Result<(&'p JwtProvider, Jwt<'t>), String> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(format!("Jwt is {} bytes, over the limit of {MAX_TOKEN_LEN}", token.len()));
    }
    let jwt = Jwt::parse(token)?;
    let issuer = jwt.string_claim("iss")?.unwrap_or_default();
    let mut first_error = None;
    for provider in readers.iter().filter(|p| p.issuer == issuer) {
        match provider.check(&jwt, now) {
            Ok(()) => return Ok((provider, jwt)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    // Debug quoting keeps a hostile issuer from forging lines in the log.
    Err(first_error.unwrap_or_else(|| format!("Jwt issuer {issuer:?} is not configured")))
}

fn validated(provider: &JwtProvider, jwt: &Jwt<'_>, location: TokenLocation) -> ValidatedJwt {
    let text = |name: &str| jwt.string_claim(name).ok().flatten().map(str::to_owned);
    let issuer = provider.issuer.clone();
    let subject = text("sub").unwrap_or_default();
    ValidatedJwt {
        principal: format!("{issuer}/{subject}"),
        issuer,
        subject,
        audiences: jwt.audiences().unwrap_or_default(),
        presenter: text("azp"),
        claims: flatten_claims(&jwt.payload),
        payload_json: jwt.payload_json.clone(),
        location,
        forward_original_token: provider.forward_original_token,
        output_payload_to_header: provider.output_payload_to_header.clone(),
    }
}
