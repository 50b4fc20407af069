//! Entry points of the fuzz targets in `fuzz/` (cargo feature `fuzzing`): each feeds untrusted
//! bytes to code that reads them from the network or from users, in process and without I/O.
//!
//! A panic in any of them is a bug in the proxy (OPS-4): bad input from a client or a user must
//! end in an error, a refusal or a closed stream, never in a crash.

mod mesh;
mod streams;

use std::{
    path::Path,
    sync::OnceLock,
    time::{Duration, UNIX_EPOCH},
};

use http::{HeaderMap, HeaderValue, header};

pub use mesh::{MODEL_YAML, Peer};
pub use streams::{HboneSetup, HboneSide, L7Setup, L7Target, hbone, l7_http, serve_hbone, serve_l7};

use crate::{
    config,
    l7::jwt::{self, JwksSource, JwtOutcome, JwtProvider, RequestParts, TokenLocation},
    model,
};

/// The name fuzzed configuration is reported under.
const CONFIG_FILE: &str = "fuzz.yaml";

/// The clock of the JWT target, so that whether a token has expired does not depend on the day
/// (2025-01-01; the fixture tokens expire in 2100).
const JWT_NOW: Duration = Duration::from_secs(1_735_689_600);

/// The configuration loader (CFG-1): one YAML file through `config::parse_file` and
/// `model::compile`, as a reload runs them, then what reads the result: `/config_dump`, and the
/// inline JWKS of each RequestAuthentication, as the waypoint loads them.
pub fn config(data: &[u8]) {
    // A reload reads files with `read_to_string`, which refuses what is not UTF-8.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (resources, _) = config::parse_file(Path::new(CONFIG_FILE), text);
    let (model, _) = model::compile(&resources);
    let _ = serde_json::to_string_pretty(&model);
    for authn in &model.security.request_authentications {
        for rule in &authn.jwt_rules {
            if let JwksSource::Inline(jwks) = jwt::jwks_source(rule) {
                let _ = JwtProvider::from_rule(rule, &jwks);
            }
        }
    }
}

/// JWT parsing and verification (L7-10). The input is `JWKS NUL TOKEN`: the key set the fuzzing
/// mesh's rule is compiled with (a key set that does not parse makes the rule refuse every
/// token, as at the waypoint), and a token presented as `authorization: Bearer`, or as the
/// `access_token` query parameter when it cannot be a header. Without a NUL the whole input is
/// a token, checked against the fixture keys of `model.yaml`.
pub fn jwt(data: &[u8]) {
    let rule = mesh::jwt_rule();
    let compiled;
    let (providers, token): (&[JwtProvider], &[u8]) = match data.iter().position(|b| *b == 0) {
        Some(at) => {
            let jwks = String::from_utf8_lossy(&data[..at]);
            let provider = JwtProvider::from_rule(rule, &jwks).or_else(|why| JwtProvider::unavailable(rule, why));
            let Ok(provider) = provider else { return };
            compiled = [provider];
            (&compiled, &data[at + 1..])
        }
        None => (fixture_providers(), data),
    };
    let mut headers = HeaderMap::new();
    let mut query = None;
    let bearer = [b"Bearer ".as_slice(), token].concat();
    match HeaderValue::from_bytes(&bearer) {
        Ok(value) => {
            headers.insert(header::AUTHORIZATION, value);
        }
        Err(_) => query = std::str::from_utf8(token).ok().map(|t| format!("access_token={t}")),
    }
    let request = RequestParts { headers: &headers, query: query.as_deref() };
    if let JwtOutcome::Valid(valid) = jwt::authenticate(providers, &request, UNIX_EPOCH + JWT_NOW) {
        // What the engine does with a verified token before forwarding the request.
        let _ = valid.payload_header_value();
        match &valid.location {
            TokenLocation::Param(name) => {
                let _ = jwt::strip_query_param(&format!("/path?{}", query.unwrap_or_default()), name);
            }
            location => jwt::strip_token(&mut headers, location),
        }
    }
}

/// The rule of `model.yaml` with its inline keys, compiled once.
fn fixture_providers() -> &'static [JwtProvider] {
    static PROVIDERS: OnceLock<Vec<JwtProvider>> = OnceLock::new();
    PROVIDERS.get_or_init(|| {
        let rule = mesh::jwt_rule();
        let jwks = match jwt::jwks_source(rule) {
            JwksSource::Inline(jwks) => jwks,
            other => panic!("the JWT rule of the fuzzing mesh must have inline keys, not {other:?}"),
        };
        vec![JwtProvider::from_rule(rule, &jwks).unwrap_or_else(|e| panic!("the fuzzing mesh's JWKS: {e}"))]
    })
}

/// When the stream targets stop waiting for what their input started (faults, retries, mirrors):
/// later than any timer the engine sets for one request. The clock is paused, so this costs
/// no real time.
const SETTLE: Duration = Duration::from_secs(120);

/// Runs one input's future on a fresh runtime with a paused clock (a fault delay or a retry
/// back-off elapses at once, and the same input always takes the same path), then lets what it
/// spawned run out before the runtime, and every task left, is dropped.
fn run<F: Future<Output = ()>>(future: F) {
    // Weighted routes and percentages roll dice: the same input must take the same path.
    fastrand::seed(0);
    runtime().block_on(async {
        future.await;
        tokio::time::sleep(SETTLE).await;
    });
}

/// A runtime whose clock moves only when every task waits. It has no I/O driver: nothing the
/// targets run needs one, as no input may reach a socket.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap_or_else(|e| panic!("cannot build a tokio runtime: {e}"))
}
