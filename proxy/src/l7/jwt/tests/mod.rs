//! Table tests of L7-10. Tokens come from the committed fixtures (`tests/tests/fixtures/jwt`) or
//! are minted here with the fixtures' test-only keys.

mod keys;
mod verify;

use std::{
    fs,
    path::Path,
    sync::OnceLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use http::{HeaderMap, HeaderValue};
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair, RsaEncoding, RsaKeyPair, RsaPublicKeyComponents},
};
use serde_json::{Value, json};

use super::*;

const JWKS: &str = include_str!("../../../../../tests/tests/fixtures/jwt/jwks.json");
const RSA_KEY: &str = include_str!("../../../../../tests/tests/fixtures/jwt/rsa-key.pem");
const EC_KEY: &str = include_str!("../../../../../tests/tests/fixtures/jwt/ec-key.pem");
const VALID_RS256: &str = include_str!("../../../../../tests/tests/fixtures/jwt/valid-rs256.jwt");
const VALID_ES256: &str = include_str!("../../../../../tests/tests/fixtures/jwt/valid-es256.jwt");
const EXPIRED: &str = include_str!("../../../../../tests/tests/fixtures/jwt/expired.jwt");
const OTHER_ISSUER: &str = include_str!("../../../../../tests/tests/fixtures/jwt/other-issuer.jwt");
const BAD_SIGNATURE: &str = include_str!("../../../../../tests/tests/fixtures/jwt/bad-signature.jwt");

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/tests/fixtures/jwt");

const ISSUER: &str = "testing@strait.local";
/// 2100-01-01T00:00:00Z and 2001-01-01T00:00:00Z.
const EXP_2100: u64 = 4_102_444_800;
const EXP_2001: u64 = 978_307_200;

/// The claims of the fixture tokens.
fn claims() -> Value {
    json!({"iss": ISSUER, "sub": ISSUER, "aud": "strait", "groups": ["group1", "group2"], "exp": EXP_2100})
}

/// 2025-01-01T00:00:00Z: the tests' clock, so expiry cases do not age.
const NOW: u64 = 1_735_689_600;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(NOW)
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys::load(RSA_KEY, EC_KEY))
}

/// A rule for the fixtures' issuer, tokens in the default location.
fn rule() -> JwtRule {
    JwtRule { issuer: ISSUER.to_owned(), ..JwtRule::default() }
}

fn provider(rule: &JwtRule) -> JwtProvider {
    JwtProvider::from_rule(rule, JWKS).expect("provider")
}

fn run(providers: &[JwtProvider], headers: &[(&str, &str)], query: Option<&str>) -> JwtOutcome {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let name = http::HeaderName::from_bytes(name.as_bytes()).expect("header name");
        map.append(name, HeaderValue::from_str(value).expect("header value"));
    }
    authenticate(providers, &RequestParts { headers: &map, query }, now())
}

fn bearer(providers: &[JwtProvider], token: &str) -> JwtOutcome {
    run(providers, &[("authorization", &format!("Bearer {token}"))], None)
}

#[derive(Debug, Clone, Copy)]
enum Want {
    Valid,
    NoToken,
    /// Invalid, with this in the reason.
    Invalid(&'static str),
}

fn check(case: &str, outcome: &JwtOutcome, want: Want) {
    let fine = match (outcome, want) {
        (JwtOutcome::Valid(_), Want::Valid) | (JwtOutcome::NoToken, Want::NoToken) => true,
        (JwtOutcome::Invalid(reason), Want::Invalid(part)) => reason.contains(part),
        _ => false,
    };
    assert!(fine, "{case}: got {outcome:?}, want {want:?}");
}

fn valid(outcome: JwtOutcome) -> ValidatedJwt {
    match outcome {
        JwtOutcome::Valid(jwt) => *jwt,
        other => panic!("want a valid token, got {other:?}"),
    }
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWS of `header` and `claims`, signed by `sign` over `header.payload`.
fn mint(header: &Value, claims: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let signed = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
    let signature = sign(signed.as_bytes());
    format!("{signed}.{}", b64(signature))
}

fn jws_header(alg: &str, kid: Option<&str>) -> Value {
    let mut header = json!({"alg": alg, "typ": "JWT"});
    if let Some(kid) = kid {
        header["kid"] = json!(kid);
    }
    header
}

/// The two test-only key pairs behind `jwks.json`.
struct Keys {
    rsa: RsaKeyPair,
    ec: EcdsaKeyPair,
}

impl Keys {
    fn load(rsa_pem: &str, ec_pem: &str) -> Keys {
        let der = |text: &str| pem::parse(text).expect("PEM").into_contents();
        let rsa = RsaKeyPair::from_pkcs8(&der(rsa_pem)).expect("RSA PKCS#8");
        let ec =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &der(ec_pem), &SystemRandom::new())
                .expect("EC PKCS#8");
        Keys { rsa, ec }
    }

    fn rsa_jwk(&self) -> Value {
        let c = RsaPublicKeyComponents::<Vec<u8>>::from(self.rsa.public());
        json!({"kty": "RSA", "kid": "strait-test", "alg": "RS256", "use": "sig", "n": b64(c.n), "e": b64(c.e)})
    }

    fn ec_jwk(&self) -> Value {
        ec_jwk(&self.ec, "P-256", "strait-test-ec")
    }

    /// A token signed with the RSA key (`RS*`, `PS*`) or the P-256 key (`ES256`).
    fn token(&self, alg: &str, kid: Option<&str>, claims: &Value) -> String {
        let padding: &'static dyn RsaEncoding = match alg {
            "ES256" => return ec_token(&self.ec, alg, kid, claims),
            "RS256" => &signature::RSA_PKCS1_SHA256,
            "RS384" => &signature::RSA_PKCS1_SHA384,
            "RS512" => &signature::RSA_PKCS1_SHA512,
            "PS256" => &signature::RSA_PSS_SHA256,
            "PS384" => &signature::RSA_PSS_SHA384,
            "PS512" => &signature::RSA_PSS_SHA512,
            _ => panic!("no test key for {alg}"),
        };
        mint(&jws_header(alg, kid), claims, |message| {
            let mut sig = vec![0; self.rsa.public().modulus_len()];
            self.rsa.sign(padding, &SystemRandom::new(), message, &mut sig).expect("RSA signature");
            sig
        })
    }
}

fn ec_jwk(key: &EcdsaKeyPair, crv: &str, kid: &str) -> Value {
    let point = key.public_key().as_ref();
    let half = (point.len() - 1) / 2;
    json!({"kty": "EC", "crv": crv, "kid": kid, "x": b64(&point[1..=half]), "y": b64(&point[half + 1..])})
}

fn ec_token(key: &EcdsaKeyPair, alg: &str, kid: Option<&str>, claims: &Value) -> String {
    mint(&jws_header(alg, kid), claims, |message| {
        key.sign(&SystemRandom::new(), message).expect("ECDSA signature").as_ref().to_vec()
    })
}

/// Regenerates the fixtures from the committed keys (creating the EC key when it is missing;
/// the RSA key comes from `openssl genpkey`, as ring cannot generate one).
#[test]
#[ignore = "rewrites tests/tests/fixtures/jwt; run by hand and commit the result"]
fn write_fixtures() {
    let dir = Path::new(FIXTURES);
    let ec_path = dir.join("ec-key.pem");
    if !ec_path.exists() {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("EC key");
        fs::write(&ec_path, pem::encode(&pem::Pem::new("PRIVATE KEY", doc.as_ref()))).expect("write EC key");
    }
    let read = |name: &str| fs::read_to_string(dir.join(name)).expect("read key");
    let keys = Keys::load(&read("rsa-key.pem"), &read("ec-key.pem"));
    let jwks = json!({"keys": [keys.rsa_jwk(), keys.ec_jwk()]});
    let jwks = serde_json::to_string_pretty(&jwks).expect("JWKS") + "\n";
    fs::write(dir.join("jwks.json"), jwks).expect("write JWKS");

    let valid = keys.token("RS256", Some("strait-test"), &claims());
    let mut expired = claims();
    expired["exp"] = json!(EXP_2001);
    let mut other = claims();
    other["iss"] = json!("evil@strait.local");
    // Flip bits in the middle of the signature: editing its last character could only touch the
    // padding bits and make a base64 error instead of a signature failure.
    let (signed, sig) = valid.rsplit_once('.').expect("three parts");
    let mut sig = URL_SAFE_NO_PAD.decode(sig).expect("signature");
    sig[100] ^= 0xff;
    let tokens = [
        ("valid-rs256.jwt", valid.clone()),
        ("valid-es256.jwt", keys.token("ES256", Some("strait-test-ec"), &claims())),
        ("expired.jwt", keys.token("RS256", Some("strait-test"), &expired)),
        ("other-issuer.jwt", keys.token("RS256", Some("strait-test"), &other)),
        ("bad-signature.jwt", format!("{signed}.{}", b64(sig))),
    ];
    for (name, token) in tokens {
        fs::write(dir.join(name), token).expect("write token");
    }
}
