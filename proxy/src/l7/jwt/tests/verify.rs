//! Finding and verifying tokens (L7-10), and what AuthorizationPolicy then sees (AUTHZ-2, AUTHZ-3).

use std::{net::IpAddr, path::Path};

use super::*;
use crate::authz::{Connection, compile_policy, evaluate};
use crate::config::{JwtHeader, Resource, parse_file};

fn remove(claims: &mut Value, name: &str) {
    if let Some(claims) = claims.as_object_mut() {
        claims.remove(name);
    }
}

/// `claims()` with `edit` applied, signed RS256 by the fixture key.
fn rs256_with(edit: impl FnOnce(&mut Value)) -> String {
    let mut c = claims();
    edit(&mut c);
    keys().token("RS256", Some("strait-test"), &c)
}

// L7-10: the committed fixtures, as the end-to-end tests will present them.
#[test]
fn fixture_outcomes() {
    let providers = [provider(&JwtRule { audiences: vec!["strait".to_owned()], ..rule() })];
    let cases = [
        ("valid-rs256.jwt", VALID_RS256, Want::Valid),
        ("valid-es256.jwt", VALID_ES256, Want::Valid),
        ("expired.jwt", EXPIRED, Want::Invalid("Jwt is expired")),
        ("other-issuer.jwt", OTHER_ISSUER, Want::Invalid("\"evil@strait.local\" is not configured")),
        ("bad-signature.jwt", BAD_SIGNATURE, Want::Invalid("Jwt verification fails")),
    ];
    for (name, token, want) in cases {
        check(name, &bearer(&providers, token), want);
    }
    assert!(providers[0].skipped_keys().is_empty(), "{:?}", providers[0].skipped_keys());
    // The end-to-end tests run on the real clock.
    let mut headers = HeaderMap::new();
    headers.insert(http::header::AUTHORIZATION, format!("Bearer {VALID_ES256}").parse().expect("value"));
    let parts = RequestParts { headers: &headers, query: None };
    check("valid-es256.jwt today", &authenticate(&providers, &parts, SystemTime::now()), Want::Valid);

    let jwt = valid(bearer(&providers, VALID_RS256));
    assert_eq!(jwt.issuer, ISSUER);
    assert_eq!(jwt.subject, ISSUER);
    assert_eq!(jwt.principal, "testing@strait.local/testing@strait.local");
    assert_eq!(jwt.audiences, ["strait"]);
    assert_eq!(jwt.presenter, None);
    assert_eq!(jwt.claims["groups"], ["group1", "group2"]);
    assert_eq!(jwt.location, TokenLocation::Header(http::header::AUTHORIZATION));
    assert!(!jwt.forward_original_token);
    assert_eq!(jwt.payload_header_value(), VALID_RS256.split('.').nth(1).expect("payload"));
}

// L7-10: `audiences` lists what a token's `aud` (string or list) must contain one of.
#[test]
fn audiences() {
    let cases: &[(&[&str], Option<Value>, Want)] = &[
        (&[], Some(json!("strait")), Want::Valid),
        (&[], None, Want::Valid),
        (&["strait"], Some(json!("strait")), Want::Valid),
        (&["other", "strait"], Some(json!(["x", "strait"])), Want::Valid),
        (&["other"], Some(json!("strait")), Want::Invalid("Audiences in Jwt are not allowed")),
        (&["other"], Some(json!(["x", "y"])), Want::Invalid("Audiences in Jwt are not allowed")),
        (&["strait"], None, Want::Invalid("Audiences in Jwt are not allowed")),
        (&["strait"], Some(json!(5)), Want::Invalid("[aud] field is not a string or string list")),
        (&[], Some(json!(["strait", 1])), Want::Invalid("[aud] field is not a string or string list")),
    ];
    for (allowed, aud, want) in cases {
        let rule = JwtRule { audiences: allowed.iter().map(|a| a.to_string()).collect(), ..rule() };
        let token = rs256_with(|c| match aud {
            Some(aud) => c["aud"] = aud.clone(),
            None => remove(c, "aud"),
        });
        check(&format!("{allowed:?} vs {aud:?}"), &bearer(&[provider(&rule)], &token), *want);
    }
}

/// `fromHeaders`, `fromParams` and `fromCookies` of a rule.
type Locations = (&'static [(&'static str, Option<&'static str>)], &'static [&'static str], &'static [&'static str]);

const DEFAULT: Locations = (&[], &[], &[]);
const HEADERS: Locations = (&[("x-jwt-assertion", None), ("x-auth", Some("Token "))], &[], &[]);
const PARAM: Locations = (&[], &["token"], &[]);
const COOKIE: Locations = (&[], &[], &["session"]);

fn describe(location: &TokenLocation) -> String {
    match location {
        TokenLocation::Header(name) => format!("header {name}"),
        TokenLocation::Param(name) => format!("param {name}"),
        TokenLocation::Cookie(name) => format!("cookie {name}"),
    }
}

// L7-10: token location. `TOKEN` in a header value or query stands for the valid fixture.
#[test]
fn token_locations() {
    type Case = (Locations, &'static [(&'static str, &'static str)], Option<&'static str>, Result<&'static str, Want>);
    let cases: &[Case] = &[
        (DEFAULT, &[("authorization", "Bearer TOKEN")], None, Ok("header authorization")),
        (DEFAULT, &[("Authorization", "bearer   TOKEN ")], None, Ok("header authorization")),
        (DEFAULT, &[], Some("a=1&access_token=TOKEN"), Ok("param access_token")),
        (DEFAULT, &[], None, Err(Want::NoToken)),
        (DEFAULT, &[("authorization", "Basic dXNlcjpwYXNz")], None, Err(Want::NoToken)),
        (DEFAULT, &[("authorization", "Bearer ")], None, Err(Want::NoToken)),
        (DEFAULT, &[("x-jwt-assertion", "TOKEN")], None, Err(Want::NoToken)),
        (DEFAULT, &[("authorization", "Bearer not-a-jwt")], None, Err(Want::Invalid("two dots"))),
        (HEADERS, &[("x-jwt-assertion", "TOKEN")], None, Ok("header x-jwt-assertion")),
        (HEADERS, &[("x-auth", "Token TOKEN")], None, Ok("header x-auth")),
        (HEADERS, &[("x-auth", "TOKEN")], None, Err(Want::NoToken)),
        (HEADERS, &[("authorization", "Bearer TOKEN")], None, Err(Want::NoToken)),
        (HEADERS, &[], Some("access_token=TOKEN"), Err(Want::NoToken)),
        (PARAM, &[], Some("a=1&token=TOKEN&b=2"), Ok("param token")),
        (PARAM, &[], Some("tokens=TOKEN"), Err(Want::NoToken)),
        (PARAM, &[("authorization", "Bearer TOKEN")], None, Err(Want::NoToken)),
        (COOKIE, &[("cookie", "theme=dark; session=TOKEN")], None, Ok("cookie session")),
        (COOKIE, &[("cookie", "theme=dark"), ("cookie", "session=\"TOKEN\"")], None, Ok("cookie session")),
        (COOKIE, &[("cookie", "session2=TOKEN")], None, Err(Want::NoToken)),
    ];
    for (i, ((headers, params, cookies), request, query, want)) in cases.iter().enumerate() {
        let rule = JwtRule {
            from_headers: headers
                .iter()
                .map(|(name, prefix)| JwtHeader { name: name.to_string(), prefix: prefix.map(str::to_owned) })
                .collect(),
            from_params: params.iter().map(|p| p.to_string()).collect(),
            from_cookies: cookies.iter().map(|c| c.to_string()).collect(),
            ..rule()
        };
        let request: Vec<(&str, String)> = request.iter().map(|(k, v)| (*k, v.replace("TOKEN", VALID_RS256))).collect();
        let request: Vec<(&str, &str)> = request.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let query = query.map(|q| q.replace("TOKEN", VALID_RS256));
        let outcome = run(&[provider(&rule)], &request, query.as_deref());
        match want {
            Ok(location) => assert_eq!(describe(&valid(outcome).location), *location, "case {i}"),
            Err(want) => check(&format!("case {i}"), &outcome, *want),
        }
    }
}

// L7-10: malformed tokens are rejected with a reason, never a panic.
#[test]
fn malformed_tokens() {
    let good = VALID_RS256;
    let mut parts = good.split('.');
    let (h, p, s) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let header = |v: Value| b64(v.to_string());
    let rsa = RsaPublicKeyComponents::<Vec<u8>>::from(keys().rsa.public());
    // The classic confusion: HMAC keyed with the public RSA modulus.
    let hs256 = mint(&jws_header("HS256", Some("strait-test")), &claims(), |m| {
        ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &rsa.n), m).as_ref().to_vec()
    });
    let other_ec = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .expect("EC key");
    let other_ec =
        EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, other_ec.as_ref(), &SystemRandom::new())
            .expect("EC key");
    let cases: Vec<(&str, String, &str)> = vec![
        ("one segment", "abc".to_owned(), "two dots"),
        ("two segments", format!("{h}.{p}"), "two dots"),
        ("four segments", format!("{good}.{s}"), "two dots"),
        ("header not base64", format!("!!.{p}.{s}"), "Jwt header is an invalid"),
        ("header not JSON", format!("{}.{p}.{s}", b64("not json")), "Jwt header is an invalid"),
        ("header a JSON array", format!("{}.{p}.{s}", b64("[1]")), "Jwt header is an invalid"),
        ("payload not base64", format!("{h}.%%.{s}"), "payload is an invalid Base64url"),
        ("payload not UTF-8", format!("{h}.{}.{s}", b64([0xff, 0xfe])), "payload is not UTF-8"),
        ("payload not JSON", format!("{h}.{}.{s}", b64("{")), "not a JSON object"),
        ("payload a JSON string", format!("{h}.{}.{s}", b64("\"x\"")), "not a JSON object"),
        ("signature not base64", format!("{h}.{p}.***"), "signature is an invalid"),
        ("huge", format!("{h}.{}.{s}", "A".repeat(17 * 1024)), "over the limit of 16384"),
        ("no alg", format!("{}.{p}.{s}", header(json!({"typ": "JWT"}))), "[alg] field is missing"),
        ("alg a number", format!("{}.{p}.{s}", header(json!({"alg": 256}))), "[alg] field is missing"),
        ("alg none", format!("{}.{p}.", header(json!({"alg": "none"}))), "[alg] \"none\" is not supported"),
        ("alg none, signature kept", format!("{}.{p}.{s}", header(json!({"alg": "none"}))), "\"none\""),
        ("HS256", hs256, "[alg] \"HS256\" is not supported"),
        ("ES512", format!("{}.{p}.{s}", header(json!({"alg": "ES512"}))), "\"ES512\" is not supported"),
        ("kid a number", format!("{}.{p}.{s}", header(json!({"alg": "RS256", "kid": 5}))), "[kid]"),
        ("signature truncated", format!("{h}.{p}.{}", &s[..20]), "Jwt verification fails"),
        ("signature of another payload", format!("{h}.{}.{s}", b64(r#"{"iss":"testing@strait.local"}"#)), "fails"),
        ("ES256 by a key not in the JWKS", ec_token(&other_ec, "ES256", None, &claims()), "verification fails"),
        ("no iss", rs256_with(|c| remove(c, "iss")), "Jwt issuer \"\" is not configured"),
        ("iss a number", rs256_with(|c| c["iss"] = json!(7)), "[iss] field is not a string"),
        ("sub a number", rs256_with(|c| c["sub"] = json!(7)), "[sub] field is not a string"),
        ("exp a string", rs256_with(|c| c["exp"] = json!("2100")), "[exp] field is not a number"),
        ("nbf a string", rs256_with(|c| c["nbf"] = json!("0")), "[nbf] field is not a number"),
    ];
    let providers = [provider(&rule())];
    for (name, token, reason) in cases {
        check(name, &bearer(&providers, &token), Want::Invalid(reason));
    }
}

// L7-10: a `kid` naming a fitting key picks it; otherwise every key of the algorithm's type is
// tried, so tokens from a rotated or unnamed key still verify.
#[test]
fn key_selection() {
    let second_ec = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .expect("EC key");
    let second_ec =
        EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, second_ec.as_ref(), &SystemRandom::new())
            .expect("EC key");
    let jwks = json!({"keys": [keys().rsa_jwk(), keys().ec_jwk(), ec_jwk(&second_ec, "P-256", "second")]}).to_string();
    let providers = [JwtProvider::from_rule(&rule(), &jwks).expect("provider")];
    let c = claims();
    let cases = [
        ("kid of the RSA key", keys().token("RS256", Some("strait-test"), &c), Want::Valid),
        ("no kid", keys().token("RS256", None, &c), Want::Valid),
        ("unknown kid", keys().token("RS256", Some("rotated-away"), &c), Want::Valid),
        ("kid of an EC key on RS256", keys().token("RS256", Some("strait-test-ec"), &c), Want::Valid),
        ("ES256 with the RSA key's kid", keys().token("ES256", Some("strait-test"), &c), Want::Valid),
        ("ES256 by the second EC key, no kid", ec_token(&second_ec, "ES256", None, &c), Want::Valid),
        ("a kid that names a key is trusted", keys().token("ES256", Some("second"), &c), Want::Invalid("fails")),
        ("PS256 with a key pinned to RS256", keys().token("PS256", Some("strait-test"), &c), Want::Invalid("fails")),
    ];
    for (name, token, want) in cases {
        check(name, &bearer(&providers, &token), want);
    }
}

// L7-10: every supported algorithm, with keys that do not pin one.
#[test]
fn algorithms() {
    let rng = SystemRandom::new();
    let p384 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &rng).expect("P-384 key");
    let p384 = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, p384.as_ref(), &rng).expect("key");
    let mut rsa = keys().rsa_jwk();
    rsa.as_object_mut().map(|k| k.remove("alg"));
    let jwks = json!({"keys": [rsa, ec_jwk(&p384, "P-384", "p384")]}).to_string();
    let providers = [JwtProvider::from_rule(&rule(), &jwks).expect("provider")];
    for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
        check(alg, &bearer(&providers, &keys().token(alg, None, &claims())), Want::Valid);
    }
    check("ES384", &bearer(&providers, &ec_token(&p384, "ES384", None, &claims())), Want::Valid);
    // A P-384 key does not verify ES256, and the fixture's P-256 key is not in this set.
    check("ES256", &bearer(&providers, VALID_ES256), Want::Invalid("verification fails"));
    check("ES384 on P-256", &bearer(&providers, &ec_token(&keys().ec, "ES384", None, &claims())), Want::Invalid(""));
}

// L7-10: `exp` and `nbf` with Envoy's 60 s of clock skew; both are optional, as in Envoy.
#[test]
fn token_lifetime() {
    let now = NOW as f64;
    let cases: &[(&str, Option<f64>, Want)] = &[
        ("exp", Some(now + 3600.0), Want::Valid),
        ("exp", Some(now - 30.0), Want::Valid),
        ("exp", Some(now - 60.0), Want::Valid),
        ("exp", Some(now - 61.0), Want::Invalid("Jwt is expired")),
        ("exp", Some(now - 30.5), Want::Valid),
        ("exp", None, Want::Valid),
        ("nbf", Some(now - 100.0), Want::Valid),
        ("nbf", Some(now + 60.0), Want::Valid),
        ("nbf", Some(now + 61.0), Want::Invalid("Jwt not yet valid")),
    ];
    let providers = [provider(&rule())];
    for (claim, value, want) in cases {
        let token = rs256_with(|c| match value {
            Some(t) => c[*claim] = json!(t),
            None => remove(c, claim),
        });
        check(&format!("{claim} {value:?}"), &bearer(&providers, &token), *want);
    }
}

// L7-10: a token belongs to the rule naming its issuer and reading where it was found.
#[test]
fn issuers() {
    let second = "second@strait.local";
    let header_only = "header-only@strait.local";
    let in_header = JwtHeader { name: "x-jwt".to_owned(), prefix: None };
    let providers = [
        provider(&JwtRule { audiences: vec!["strait".to_owned()], ..rule() }),
        provider(&JwtRule { issuer: second.to_owned(), ..rule() }),
        provider(&JwtRule { issuer: header_only.to_owned(), from_headers: vec![in_header], ..rule() }),
        // Same issuer again: a token passes if either rule accepts it.
        provider(&JwtRule { audiences: vec!["other".to_owned()], ..rule() }),
    ];
    let by = |iss: &str| rs256_with(|c| c["iss"] = json!(iss));
    let cases: &[(&str, String, &str, Result<&str, Want>)] = &[
        ("second issuer", by(second), "authorization", Ok("second@strait.local/testing@strait.local")),
        (
            "issuer of a rule reading another header",
            by(header_only),
            "authorization",
            Err(Want::Invalid("not configured")),
        ),
        ("its own header", by(header_only), "x-jwt", Ok("header-only@strait.local/testing@strait.local")),
        ("known issuer, header of another rule", by(ISSUER), "x-jwt", Err(Want::Invalid("not configured"))),
        ("aud of the second rule for one issuer", rs256_with(|c| c["aud"] = json!("other")), "authorization", Ok("")),
        (
            "aud of neither rule",
            rs256_with(|c| c["aud"] = json!("x")),
            "authorization",
            Err(Want::Invalid("Audiences")),
        ),
    ];
    for (name, token, header, want) in cases {
        let value = if *header == "authorization" { format!("Bearer {token}") } else { token.clone() };
        let outcome = run(&providers, &[(header, &value)], None);
        match want {
            Ok(principal) => assert!(valid(outcome).principal.starts_with(principal), "{name}"),
            Err(want) => check(name, &outcome, *want),
        }
    }
}

// L7-10: several tokens in one request (undefined in Istio): all must verify, the first wins.
#[test]
fn several_tokens() {
    let providers = [provider(&rule())];
    let bearer_rs = format!("Bearer {VALID_RS256}");
    let cases: &[(&str, Option<String>, Want)] = &[
        ("same token twice", Some(format!("access_token={VALID_RS256}")), Want::Valid),
        ("a second valid token", Some(format!("access_token={VALID_ES256}")), Want::Valid),
        ("a second invalid token", Some(format!("access_token={EXPIRED}")), Want::Invalid("expired")),
        ("a second malformed token", Some("access_token=x".to_owned()), Want::Invalid("two dots")),
    ];
    for (name, query, want) in cases {
        let outcome = run(&providers, &[("authorization", &bearer_rs)], query.as_deref());
        check(name, &outcome, *want);
        if let JwtOutcome::Valid(jwt) = outcome {
            assert_eq!(jwt.location, TokenLocation::Header(http::header::AUTHORIZATION), "{name}");
        }
    }
}

// L7-10: a rule whose keys could not be had still rejects the tokens it finds (as Istio does
// with its fake key), so they cannot pass as "no token".
#[test]
fn rule_without_keys() {
    let rule = JwtRule { from_headers: vec![JwtHeader { name: "x-jwt".to_owned(), prefix: None }], ..rule() };
    let providers = [JwtProvider::unavailable(&rule, "fetching timed out".to_owned()).expect("provider")];
    check("no token", &run(&providers, &[], None), Want::NoToken);
    let outcome = run(&providers, &[("x-jwt", VALID_RS256)], None);
    check("token", &outcome, Want::Invalid("Jwks is unavailable: fetching timed out"));
    assert!(providers[0].skipped_keys().is_empty());
}

#[test]
fn rule_errors() {
    let cases: &[(JwtRule, &str)] = &[
        (JwtRule { issuer: String::new(), ..rule() }, "the issuer is empty"),
        (
            JwtRule { from_headers: vec![JwtHeader { name: "bad header".to_owned(), prefix: None }], ..rule() },
            "fromHeaders[0].name `bad header` is not a valid header name",
        ),
        (JwtRule { output_payload_to_header: Some("a b".to_owned()), ..rule() }, "outputPayloadToHeader `a b`"),
    ];
    for (rule, error) in cases {
        let got = JwtProvider::from_rule(rule, JWKS).map(|_| ()).expect_err(error);
        assert!(got.contains(error), "{got}");
    }
}

// L7-10: what the engine does after verification: forward or strip the token, output the payload.
#[test]
fn forwarding() {
    let rule = JwtRule {
        forward_original_token: true,
        output_payload_to_header: Some("x-jwt-payload".to_owned()),
        from_params: vec!["token".to_owned()],
        ..rule()
    };
    let jwt = valid(run(&[provider(&rule)], &[], Some(&format!("token={VALID_RS256}"))));
    assert!(jwt.forward_original_token);
    assert_eq!(jwt.output_payload_to_header, Some(http::HeaderName::from_static("x-jwt-payload")));
    assert_eq!(jwt.location, TokenLocation::Param("token".to_owned()));
    let decoded = URL_SAFE_NO_PAD.decode(jwt.payload_header_value()).expect("base64url");
    assert_eq!(serde_json::from_slice::<Value>(&decoded).expect("JSON"), claims());

    let mut headers = HeaderMap::new();
    headers.append(http::header::AUTHORIZATION, HeaderValue::from_static("Bearer a"));
    headers.append(http::header::AUTHORIZATION, HeaderValue::from_static("Bearer b"));
    headers.insert("x-other", HeaderValue::from_static("kept"));
    strip_token(&mut headers, &TokenLocation::Param("access_token".to_owned()));
    assert_eq!(headers.len(), 3);
    strip_token(&mut headers, &TokenLocation::Header(http::header::AUTHORIZATION));
    assert_eq!(headers.len(), 1);

    let cases = [
        ("/p?access_token=t", "/p"),
        ("/p?a=1&access_token=t&b=2", "/p?a=1&b=2"),
        ("/p?access_token", "/p"),
        ("/p?access_tokens=1", "/p?access_tokens=1"),
        ("/p", "/p"),
    ];
    for (path, stripped) in cases {
        assert_eq!(strip_query_param(path, "access_token"), stripped, "{path}");
    }
}

// AUTHZ-2: claims keyed as `request.auth.claims[a][b]` compiles them (`a.b`), every list element.
#[test]
fn claims_flattening() {
    let payload = json!({
        "iss": "i",
        "groups": ["a", "b"],
        "nested": {"key": "v", "deeper": {"n": 1}},
        "num": 42,
        "float": 1.5,
        "flag": true,
        "nil": null,
        "empty": [],
        "roles": [{"name": "x"}, {"name": "y"}],
        "mixed": [1, "two", false, null],
    });
    let Value::Object(payload) = payload else { panic!("object") };
    let claims = token::flatten_claims(&payload);
    let want: BTreeMap<String, Vec<String>> = [
        ("iss", &["i"][..]),
        ("groups", &["a", "b"]),
        ("nested.key", &["v"]),
        ("nested.deeper.n", &["1"]),
        ("num", &["42"]),
        ("float", &["1.5"]),
        ("flag", &["true"]),
        ("roles.name", &["x", "y"]),
        ("mixed", &["1", "two", "false"]),
    ]
    .into_iter()
    .map(|(k, vs)| (k.to_owned(), vs.iter().map(|v| v.to_string()).collect()))
    .collect();
    assert_eq!(claims, want);
}

/// An ALLOW policy in `foo` with one rule, compiled as the model would.
fn allow(rule: &str) -> crate::authz::Policy {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: jwt, namespace: foo}}\nspec:\n  action: ALLOW\n  rules:\n  - {rule}\n"
    );
    let (resources, d) = parse_file(Path::new("policy.yaml"), &yaml);
    assert!(d.is_empty(), "{d:?}");
    let Resource::AuthorizationPolicy(policy) = &resources[0].resource else { panic!("not a policy") };
    let mut d = Vec::new();
    let compiled = compile_policy(&resources[0].origin, policy, "istio-system", &mut d);
    // Namespace-bound, so compile warns that the node proxy cannot check its HTTP attributes;
    // this test evaluates it as a waypoint would.
    assert!(d.iter().all(|d| !d.is_error()), "{d:?}");
    compiled.expect("policy")
}

// L7-10 with AUTHZ-2/3 at the waypoint: `fill` gives AuthorizationPolicy the principal and claims;
// a request without a token passes authentication but not a policy requiring a principal.
#[test]
fn fill_feeds_authorization() {
    let nested = rs256_with(|c| c["nested"] = json!({"team": "mesh"}));
    let policies = [
        allow("from: [{source: {requestPrincipals: [\"testing@strait.local/testing@strait.local\"]}}]"),
        allow("when: [{key: \"request.auth.claims[groups]\", values: [group2]}]"),
        allow("when: [{key: \"request.auth.claims[nested][team]\", values: [mesh]}]"),
        allow("when: [{key: request.auth.audiences, values: [strait]}]"),
    ];
    let providers = [provider(&rule())];
    let cases: &[(&str, Option<&str>, [bool; 4])] = &[
        ("valid-rs256.jwt", Some(VALID_RS256), [true, true, false, true]),
        ("nested claim", Some(&nested), [true, true, true, true]),
        ("no token", None, [false, false, false, false]),
    ];
    for (name, token, allowed) in cases {
        let mut http = HttpRequest { method: "GET".to_owned(), path: "/".to_owned(), ..HttpRequest::default() };
        match token {
            Some(token) => valid(bearer(&providers, token)).fill(&mut http),
            None => check(name, &run(&providers, &[], None), Want::NoToken),
        }
        let connection = Connection {
            source: None,
            source_ip: IpAddr::from([10, 0, 9, 1]),
            destination_ip: IpAddr::from([10, 0, 1, 1]),
            destination_port: 8000,
            http: Some(http),
        };
        for (policy, want) in policies.iter().zip(allowed) {
            let decision = evaluate([policy], &connection);
            assert_eq!(decision.allowed, *want, "{name}: {decision:?}");
        }
    }
}
