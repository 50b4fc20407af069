//! JWKS documents, where they come from, and fetching them (L7-10).

use http::Uri;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::oneshot,
};

use super::*;

// L7-10: unsupported keys are skipped with a reason; a set without a usable key is an error.
#[test]
fn jwks_documents() {
    let rsa = keys().rsa_jwk();
    let ec = keys().ec_jwk();
    let with = |base: &Value, field: &str, value: Value| {
        let mut key = base.clone();
        key[field] = value;
        key
    };
    let without = |base: &Value, field: &str| {
        let mut key = base.clone();
        key.as_object_mut().map(|k| k.remove(field));
        key
    };
    let oct = json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"});
    let okp = json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"});
    let padded_n = format!("{}==", rsa["n"].as_str().unwrap_or_default());
    let keys = |list: Vec<Value>| json!({ "keys": list }).to_string();
    let cases: Vec<(&str, String, Result<usize, &str>)> = vec![
        ("the fixture", JWKS.to_owned(), Ok(0)),
        ("not JSON", "{".to_owned(), Err("the JWKS is not valid JSON")),
        ("no keys", "{}".to_owned(), Err("no `keys` array")),
        ("keys not a list", r#"{"keys": {}}"#.to_owned(), Err("no `keys` array")),
        ("empty", keys(vec![]), Err("no usable key: it is empty")),
        ("only a symmetric key", keys(vec![oct.clone()]), Err("key 0 (kid \"hmac\") skipped: symmetric keys")),
        ("symmetric beside RSA", keys(vec![oct, rsa.clone()]), Ok(1)),
        ("Ed25519 beside EC", keys(vec![okp, ec.clone()]), Ok(1)),
        ("EC without crv", keys(vec![without(&ec, "crv")]), Err("no `crv`")),
        ("no kty", keys(vec![without(&rsa, "kty")]), Err("no `kty`")),
        ("1024-bit RSA", keys(vec![with(&rsa, "n", json!(b64([0xc5; 128])))]), Err("modulus of 1024 bits")),
        ("RSA without e", keys(vec![without(&rsa, "e")]), Err("no `e`")),
        ("n not base64url", keys(vec![with(&rsa, "n", json!("a+b/"))]), Err("`n` is not base64url")),
        ("exponent too long", keys(vec![with(&rsa, "e", json!(b64([1; 9])))]), Err("exponent is out of range")),
        ("padded base64", keys(vec![with(&rsa, "n", json!(padded_n))]), Ok(0)),
        ("P-521", keys(vec![with(&ec, "crv", json!("P-521"))]), Err("curve \"P-521\" is not supported")),
        ("P-384 with P-256 coordinates", keys(vec![with(&ec, "crv", json!("P-384"))]), Err("curve's length")),
        ("EC without y", keys(vec![without(&ec, "y")]), Err("no `y`")),
        ("encryption alg", keys(vec![with(&rsa, "alg", json!("RSA-OAEP"))]), Err("alg \"RSA-OAEP\" is not supported")),
        ("alg of another key type", keys(vec![with(&rsa, "alg", json!("ES256"))]), Err("alg ES256 does not fit")),
        ("P-256 pinned to ES384", keys(vec![with(&ec, "alg", json!("ES384"))]), Err("alg ES384 does not fit")),
    ];
    for (name, text, want) in cases {
        match (JwtProvider::from_rule(&rule(), &text), want) {
            (Ok(p), Ok(skipped)) => {
                assert_eq!(p.skipped_keys().len(), skipped, "{name}: {:?}", p.skipped_keys());
                let providers = [p];
                let verifies =
                    [VALID_RS256, VALID_ES256].iter().any(|t| matches!(bearer(&providers, t), JwtOutcome::Valid(_)));
                assert!(verifies, "{name}: no fixture token verifies");
            }
            (Err(e), Err(part)) => assert!(e.contains(part), "{name}: {e}"),
            (got, want) => panic!("{name}: got {:?}, want {want:?}", got.map(|p| p.skipped_keys().to_vec())),
        }
    }
}

// L7-10: `jwks` wins over `jwksUri`; file:// and http:// are read, https:// is refused with advice.
#[test]
fn jwks_sources() {
    let source = |jwks: Option<&str>, uri: Option<&str>| {
        jwks_source(&JwtRule { jwks: jwks.map(str::to_owned), jwks_uri: uri.map(str::to_owned), ..rule() })
    };
    let unsupported = |source: JwksSource, part: &str| match source {
        JwksSource::Unsupported(why) => assert!(why.contains(part), "{why}"),
        other => panic!("want Unsupported({part}), got {other:?}"),
    };
    assert_eq!(source(Some("{}"), None), JwksSource::Inline("{}".to_owned()));
    assert_eq!(source(Some("{}"), Some("https://idp/keys")), JwksSource::Inline("{}".to_owned()));
    assert_eq!(source(None, Some("file:///etc/strait/jwks.json")), JwksSource::File("/etc/strait/jwks.json".into()));
    assert_eq!(
        source(Some(" "), Some("http://idp.example:8080/keys?v=1")),
        JwksSource::Http("http://idp.example:8080/keys?v=1".parse().expect("uri"))
    );
    unsupported(source(None, Some("file://relative/jwks.json")), "not an absolute file URI");
    unsupported(source(None, Some("https://idp/keys")), "use `jwks` inline or a file:// URI");
    unsupported(source(None, Some("ftp://idp/keys")), "not an http:// or file:// URI");
    unsupported(source(None, Some("http://")), "`http://`");
    unsupported(source(None, None), "OpenID");
}

/// Serves one connection with `response`, handing back the request head it read.
async fn serve_once(response: Vec<u8>) -> (Uri, oneshot::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("accept");
        let mut head = vec![0; 4096];
        let n = stream.read(&mut head).await.unwrap_or(0);
        let _ = tx.send(String::from_utf8_lossy(&head[..n]).into_owned());
        // A client that gives up mid-body resets the connection; nothing to check here.
        let _ = stream.write_all(&response).await;
    });
    (format!("http://{addr}/keys/jwks.json").parse().expect("uri"), rx)
}

fn http_response(status: &str, body: &[u8]) -> Vec<u8> {
    [format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes(), body].concat()
}

// L7-10: a JWKS over plain HTTP: GET with the right Host, 200 only, at most 1 MiB, on time.
#[tokio::test]
async fn fetching() {
    let (uri, head) = serve_once(http_response("200 OK", JWKS.as_bytes())).await;
    assert_eq!(fetch_jwks(&uri, Duration::from_secs(5)).await, Ok(JWKS.to_owned()));
    let head = head.await.expect("request head");
    assert!(head.starts_with("GET /keys/jwks.json HTTP/1.1\r\n"), "{head}");
    let authority = uri.authority().expect("authority").as_str();
    assert!(head.to_ascii_lowercase().contains(&format!("host: {authority}\r\n")), "{head}");

    let (uri, _) = serve_once(http_response("404 Not Found", b"no")).await;
    let err = fetch_jwks(&uri, Duration::from_secs(5)).await.expect_err("404");
    assert!(err.contains("the server answered 404 Not Found"), "{err}");

    let (uri, _) = serve_once(http_response("200 OK", &vec![b' '; 1024 * 1024 + 1])).await;
    let err = fetch_jwks(&uri, Duration::from_secs(5)).await.expect_err("too big");
    assert!(err.contains("over 1 MiB"), "{err}");

    let (uri, _) = serve_once(http_response("200 OK", &[0xff, 0xfe])).await;
    let err = fetch_jwks(&uri, Duration::from_secs(5)).await.expect_err("binary");
    assert!(err.contains("not UTF-8"), "{err}");

    // The kernel completes the connection, but nobody ever answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_uri: Uri = format!("http://{}/", silent.local_addr().expect("address")).parse().expect("uri");
    let err = fetch_jwks(&silent_uri, Duration::from_millis(200)).await.expect_err("timeout");
    assert!(err.contains("timed out after 200ms"), "{err}");

    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed_uri: Uri = format!("http://{}/", closed.local_addr().expect("address")).parse().expect("uri");
    drop(closed);
    let err = fetch_jwks(&closed_uri, Duration::from_secs(5)).await.expect_err("refused");
    assert!(err.contains("cannot connect"), "{err}");

    let err = fetch_jwks(&"https://idp/keys".parse().expect("uri"), Duration::from_secs(1)).await.expect_err("https");
    assert!(err.contains("only http://"), "{err}");
}
