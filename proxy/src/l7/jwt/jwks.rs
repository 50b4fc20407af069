//! JSON Web Key Sets: where a rule's keys come from, fetching them over plain HTTP, and turning
//! the document into public keys that verify JWS signatures with ring.

use std::{path::PathBuf, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{Request, StatusCode, Uri, header, uri::Scheme};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use ring::signature::{self, EcdsaVerificationAlgorithm, RsaParameters, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::Value;
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::JwtRule;

/// Envoy caps a fetched JWKS too; real ones are a few KiB.
const MAX_JWKS_LEN: usize = 1024 * 1024;

/// Where a rule's JWKS comes from, as far as strait can get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// The rule's `jwks` field, which Istio prefers over `jwksUri`.
    Inline(String),
    /// `jwksUri: file:///path`, read from the proxy's file system.
    File(PathBuf),
    /// `jwksUri: http://...`, fetched with [`fetch_jwks`].
    Http(Uri),
    /// Why the keys cannot be had; the rule should still reject every token it finds (see
    /// `JwtProvider::unavailable`).
    Unsupported(String),
}

pub fn jwks_source(rule: &JwtRule) -> JwksSource {
    if let Some(jwks) = rule.jwks.as_deref().filter(|j| !j.trim().is_empty()) {
        return JwksSource::Inline(jwks.to_owned());
    }
    let Some(uri) = rule.jwks_uri.as_deref() else {
        return JwksSource::Unsupported(
            "neither `jwks` nor `jwksUri` is set, and strait does not discover keys through the issuer's \
             OpenID configuration"
                .to_owned(),
        );
    };
    if let Some(path) = uri.strip_prefix("file://") {
        return if path.starts_with('/') {
            JwksSource::File(PathBuf::from(path))
        } else {
            JwksSource::Unsupported(format!("`{uri}` is not an absolute file URI (file:///path)"))
        };
    }
    if uri.starts_with("https://") {
        return JwksSource::Unsupported(format!(
            "`{uri}`: strait has no public CA bundle to check a JWKS server's certificate; use `jwks` inline \
             or a file:// URI"
        ));
    }
    if !uri.starts_with("http://") {
        return JwksSource::Unsupported(format!("`{uri}` is not an http:// or file:// URI"));
    }
    match uri.parse::<Uri>() {
        Ok(parsed) if parsed.host().is_some() => JwksSource::Http(parsed),
        Ok(_) => JwksSource::Unsupported(format!("`{uri}` has no host")),
        Err(e) => JwksSource::Unsupported(format!("`{uri}` is not a valid URI: {e}")),
    }
}

/// GETs a JWKS over HTTP/1.1 (one connection, no redirects), giving up after `timeout`.
pub async fn fetch_jwks(uri: &Uri, timeout: Duration) -> Result<String, String> {
    tokio::time::timeout(timeout, fetch(uri))
        .await
        .map_err(|_| format!("fetching the JWKS from {uri} timed out after {timeout:?}"))?
}

async fn fetch(uri: &Uri) -> Result<String, String> {
    let fail = |what: String| format!("fetching the JWKS from {uri}: {what}");
    if uri.scheme() != Some(&Scheme::HTTP) {
        return Err(fail("only http:// is fetched".to_owned()));
    }
    let (Some(host), Some(authority)) = (uri.host(), uri.authority()) else {
        return Err(fail("no host".to_owned()));
    };
    // `Uri::host` keeps the brackets of an IPv6 literal, which name resolution does not accept.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host, port)).await.map_err(|e| fail(format!("cannot connect: {e}")))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(format!("HTTP handshake failed: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!("JWKS connection ended: {e}");
        }
    });
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(header::HOST, authority.as_str())
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(format!("bad request: {e}")))?;
    let response = sender.send_request(request).await.map_err(|e| fail(format!("request failed: {e}")))?;
    if response.status() != StatusCode::OK {
        return Err(fail(format!("the server answered {}", response.status())));
    }
    let body = Limited::new(response.into_body(), MAX_JWKS_LEN)
        .collect()
        .await
        .map_err(|e| fail(format!("reading the body failed (is it over 1 MiB?): {e}")))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| fail("the body is not UTF-8".to_owned()))
}

/// The signature algorithms strait verifies: Envoy's set minus HMAC (a shared secret has no place
/// in a public key set), ES512 (not in ring) and EdDSA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Algorithm {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
}

/// JWS names of [`Algorithm`]s.
const ALGORITHM_NAMES: [(&str, Algorithm); 8] = [
    ("RS256", Algorithm::Rs256),
    ("RS384", Algorithm::Rs384),
    ("RS512", Algorithm::Rs512),
    ("PS256", Algorithm::Ps256),
    ("PS384", Algorithm::Ps384),
    ("PS512", Algorithm::Ps512),
    ("ES256", Algorithm::Es256),
    ("ES384", Algorithm::Es384),
];

impl Algorithm {
    pub(super) fn from_name(name: &str) -> Option<Self> {
        ALGORITHM_NAMES.iter().find(|(n, _)| *n == name).map(|(_, alg)| *alg)
    }

    fn name(self) -> &'static str {
        ALGORITHM_NAMES.iter().find(|(_, alg)| *alg == self).map_or("?", |(n, _)| n)
    }

    fn verifier(self) -> Verifier {
        match self {
            Self::Rs256 => Verifier::Rsa(&signature::RSA_PKCS1_2048_8192_SHA256),
            Self::Rs384 => Verifier::Rsa(&signature::RSA_PKCS1_2048_8192_SHA384),
            Self::Rs512 => Verifier::Rsa(&signature::RSA_PKCS1_2048_8192_SHA512),
            Self::Ps256 => Verifier::Rsa(&signature::RSA_PSS_2048_8192_SHA256),
            Self::Ps384 => Verifier::Rsa(&signature::RSA_PSS_2048_8192_SHA384),
            Self::Ps512 => Verifier::Rsa(&signature::RSA_PSS_2048_8192_SHA512),
            Self::Es256 => Verifier::Ecdsa(Curve::P256, &signature::ECDSA_P256_SHA256_FIXED),
            Self::Es384 => Verifier::Ecdsa(Curve::P384, &signature::ECDSA_P384_SHA384_FIXED),
        }
    }
}

enum Verifier {
    Rsa(&'static RsaParameters),
    /// JWS carries ECDSA signatures as fixed-width r||s, not ASN.1.
    Ecdsa(Curve, &'static EcdsaVerificationAlgorithm),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

impl Curve {
    fn coordinate_len(self) -> usize {
        match self {
            Self::P256 => 32,
            Self::P384 => 48,
        }
    }
}

#[derive(Debug, Clone)]
enum PublicKey {
    /// Modulus and exponent, big-endian without leading zeros (as ring wants them).
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// The uncompressed point `0x04 || x || y`.
    Ec { curve: Curve, point: Vec<u8> },
}

#[derive(Debug, Clone)]
struct Jwk {
    kid: Option<String>,
    /// When the JWKS pins a key to one algorithm, a token signed with another does not use it.
    alg: Option<Algorithm>,
    key: PublicKey,
}

impl PublicKey {
    fn fits(&self, alg: Algorithm) -> bool {
        match (self, alg.verifier()) {
            (PublicKey::Rsa { .. }, Verifier::Rsa(_)) => true,
            (PublicKey::Ec { curve, .. }, Verifier::Ecdsa(wanted, _)) => *curve == wanted,
            _ => false,
        }
    }
}

impl Jwk {
    fn fits(&self, alg: Algorithm) -> bool {
        self.key.fits(alg) && self.alg.is_none_or(|pinned| pinned == alg)
    }

    fn verifies(&self, alg: Algorithm, message: &[u8], sig: &[u8]) -> bool {
        match (&self.key, alg.verifier()) {
            (PublicKey::Rsa { n, e }, Verifier::Rsa(params)) => {
                RsaPublicKeyComponents { n: n.as_slice(), e: e.as_slice() }.verify(params, message, sig).is_ok()
            }
            (PublicKey::Ec { point, .. }, Verifier::Ecdsa(_, ecdsa)) => {
                UnparsedPublicKey::new(ecdsa, point).verify(message, sig).is_ok()
            }
            _ => false,
        }
    }
}

/// The usable keys of one JWKS, plus why the others were left out.
#[derive(Debug, Clone)]
pub(super) struct KeySet {
    keys: Vec<Jwk>,
    pub(super) skipped: Vec<String>,
}

impl KeySet {
    pub(super) fn parse(text: &str) -> Result<KeySet, String> {
        let doc: Value = serde_json::from_str(text).map_err(|e| format!("the JWKS is not valid JSON: {e}"))?;
        let Some(entries) = doc.get("keys").and_then(Value::as_array) else {
            return Err("the JWKS has no `keys` array".to_owned());
        };
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let kid = entry.get("kid").and_then(Value::as_str).map(str::to_owned);
            match parse_key(entry) {
                Ok((alg, key)) => keys.push(Jwk { kid, alg, key }),
                Err(why) => skipped.push(match &kid {
                    Some(kid) => format!("key {i} (kid {kid:?}) skipped: {why}"),
                    None => format!("key {i} skipped: {why}"),
                }),
            }
        }
        if keys.is_empty() {
            let why = if skipped.is_empty() { "it is empty".to_owned() } else { skipped.join("; ") };
            return Err(format!("the JWKS has no usable key: {why}"));
        }
        Ok(KeySet { keys, skipped })
    }

    /// Keys with the token's `kid` are tried first; when none has it (or the token names none),
    /// every key that fits the algorithm is, so a rotated or unnamed key still verifies.
    pub(super) fn verify(&self, alg: Algorithm, kid: Option<&str>, message: &[u8], sig: &[u8]) -> bool {
        let fitting: Vec<&Jwk> = self.keys.iter().filter(|k| k.fits(alg)).collect();
        let named: Vec<&Jwk> = fitting.iter().copied().filter(|k| kid.is_some() && k.kid.as_deref() == kid).collect();
        let candidates = if named.is_empty() { fitting } else { named };
        candidates.iter().any(|k| k.verifies(alg, message, sig))
    }
}

fn parse_key(entry: &Value) -> Result<(Option<Algorithm>, PublicKey), String> {
    let field = |name: &str| entry.get(name).and_then(Value::as_str);
    let alg = match field("alg") {
        None => None,
        Some(name) => Some(Algorithm::from_name(name).ok_or_else(|| format!("alg {name:?} is not supported"))?),
    };
    let bytes = |name: &str| -> Result<Vec<u8>, String> {
        let text = field(name).ok_or_else(|| format!("no `{name}`"))?;
        decode_base64url(text).map_err(|_| format!("`{name}` is not base64url"))
    };
    let key = match field("kty") {
        Some("RSA") => {
            let n = strip_leading_zeros(bytes("n")?);
            let e = strip_leading_zeros(bytes("e")?);
            // ring verifies 2048- to 8192-bit moduli; a 2048-bit modulus is 256 bytes.
            if !(256..=1024).contains(&n.len()) {
                return Err(format!("an RSA modulus of {} bits (2048 to 8192 are supported)", n.len() * 8));
            }
            if e.is_empty() || e.len() > 4 {
                return Err("the RSA exponent is out of range".to_owned());
            }
            PublicKey::Rsa { n, e }
        }
        Some("EC") => {
            let curve = match field("crv") {
                Some("P-256") => Curve::P256,
                Some("P-384") => Curve::P384,
                Some(other) => return Err(format!("curve {other:?} is not supported (P-256 and P-384 are)")),
                None => return Err("no `crv`".to_owned()),
            };
            let (x, y) = (bytes("x")?, bytes("y")?);
            if x.len() != curve.coordinate_len() || y.len() != curve.coordinate_len() {
                return Err("the EC coordinates do not have the curve's length".to_owned());
            }
            PublicKey::Ec { curve, point: [&[0x04][..], &x, &y].concat() }
        }
        Some("oct") => return Err("symmetric keys (kty oct) are not supported".to_owned()),
        Some(other) => return Err(format!("key type {other:?} is not supported (RSA and EC are)")),
        None => return Err("no `kty`".to_owned()),
    };
    if let Some(alg) = alg
        && !key.fits(alg)
    {
        return Err(format!("alg {} does not fit the key type", alg.name()));
    }
    Ok((alg, key))
}

fn strip_leading_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros);
    bytes
}

/// JWS forbids padding, but some key sets and token minters add it anyway.
pub(super) fn decode_base64url(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    URL_SAFE_NO_PAD.decode(text.trim_end_matches('='))
}
