//! End to end: L7 authorization, JWT authentication and request telemetry at the waypoint
//! (SPEC AUTHZ-3, AUTHZ-4, L7-9, L7-10, OBS-1, OBS-2). Needs root.

mod common;

use std::io;

use common::{APP_NS, WaypointMesh, reviews_config, start_backends, wait_request_lines};

const REVIEWS: &str = "http://10.96.0.30:9080";
const VALID: &str = include_str!("fixtures/jwt/valid-rs256.jwt");
const EXPIRED: &str = include_str!("fixtures/jwt/expired.jwt");
const OTHER_ISSUER: &str = include_str!("fixtures/jwt/other-issuer.jwt");
const JWKS: &str = include_str!("fixtures/jwt/jwks.json");

fn policy(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {APP_NS}\nspec:\n  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: reviews\n{spec}"
    )
}

fn status(m: &WaypointMesh, args: &[&str]) -> io::Result<u16> {
    Ok(m.client.curl_args(args)?.status)
}

// AUTHZ-3, AUTHZ-4: a policy bound to the service allows GET on `/api/*` and `*.json`; POST,
// other paths and other methods get 403 `RBAC: access denied`.
#[test]
fn methods_and_paths_are_enforced() -> io::Result<()> {
    let m = WaypointMesh::new("wp::authz", &["reviews-v1"])?;
    let allow = "  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        methods: [GET]\n        paths: [\"/api/*\", \"*.json\"]\n";
    m.topo.write_config("c.yaml", &(reviews_config(&m) + &policy("viewer", allow)))?;
    let servers = start_backends(&m, 9080)?;
    let (_p1, _p2, wp) = m.start()?;

    assert_eq!(status(&m, &[&format!("{REVIEWS}/api/reviews")])?, 200);
    assert_eq!(status(&m, &[&format!("{REVIEWS}/data/ratings.json")])?, 200);
    let denied = m.client.curl_args(&["-X", "POST", "-d", "x", &format!("{REVIEWS}/api/reviews")])?;
    assert_eq!((denied.status, denied.body.as_str()), (403, "RBAC: access denied"), "{denied:?}");
    assert_eq!(status(&m, &[&format!("{REVIEWS}/other")])?, 403);
    assert_eq!(status(&m, &["-X", "DELETE", &format!("{REVIEWS}/api/reviews")])?, 403);
    assert_eq!(servers[0].count_log_lines("request peer="), 2, "denied requests never reach the pod");
    let line = wait_request_lines(&wp, &["method=POST", "status=403"], 1)?.remove(0);
    assert!(line.contains("reason=\"denied: ALLOW policies apply but none matched\""), "{line}");
    Ok(())
}

// L7-10: with a RequestAuthentication, a bad token is 401 wherever it is sent, a missing token
// passes unless a policy requires a request principal, a valid token satisfies it.
#[test]
fn jwt_required_by_request_principals() -> io::Result<()> {
    let m = WaypointMesh::new("wp::jwt", &["reviews-v1"])?;
    let jwks: String = JWKS.lines().map(|l| format!("      {l}\n")).collect();
    let authn = format!(
        "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: jwt\n  namespace: {APP_NS}\nspec:\n  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: reviews\n  jwtRules:\n  - issuer: testing@strait.local\n    audiences: [strait]\n    jwks: |\n{jwks}"
    );
    let require = "  action: DENY\n  rules:\n  - from:\n    - source:\n        notRequestPrincipals: [\"*\"]\n    to:\n    - operation:\n        paths: [\"/secure/*\"]\n";
    m.topo.write_config("c.yaml", &(reviews_config(&m) + &authn + &policy("require-jwt", require)))?;
    let servers = start_backends(&m, 9080)?;
    let (_p1, _p2, wp) = m.start()?;
    let bearer = |token: &str| format!("Authorization: Bearer {}", token.trim());

    assert_eq!(status(&m, &[&format!("{REVIEWS}/open")])?, 200, "no token, no requirement");
    assert_eq!(status(&m, &[&format!("{REVIEWS}/secure/data")])?, 403, "no token where one is required");
    assert_eq!(status(&m, &["-H", &bearer(VALID), &format!("{REVIEWS}/secure/data")])?, 200);
    let expired = m.client.curl_args(&["-H", &bearer(EXPIRED), &format!("{REVIEWS}/open")])?;
    assert_eq!((expired.status, expired.body.as_str()), (401, "Jwt verification fails"), "{expired:?}");
    assert_eq!(status(&m, &["-H", &bearer(OTHER_ISSUER), &format!("{REVIEWS}/secure/data")])?, 401);
    assert_eq!(status(&m, &["-H", "Authorization: Bearer not.a.jwt", &format!("{REVIEWS}/open")])?, 401);
    // The verified token is not forwarded (forwardOriginalToken is false).
    let headers = m.client.curl_args(&["-H", &bearer(VALID), &format!("{REVIEWS}/headers")])?;
    assert!(headers.ok() && !headers.body.contains("authorization"), "{headers:?}");
    assert_eq!(servers[0].count_log_lines("request peer="), 3);
    wait_request_lines(&wp, &["status=401", "reason=\"Jwt is expired\""], 1)?;
    wait_request_lines(&wp, &["status=401", "is not configured"], 1)?;
    Ok(())
}

// OBS-1, OBS-2, L7-9: Istio's request metrics with the waypoint as reporter, the access line's
// fields, and the request id the client sent kept end to end.
#[test]
fn request_telemetry() -> io::Result<()> {
    let m = WaypointMesh::new("wp::telemetry", &["reviews-v1"])?;
    m.topo.write_config("c.yaml", &reviews_config(&m))?;
    let servers = start_backends(&m, 9080)?;
    let (_p1, _p2, wp) = m.start()?;

    let ok = m.client.curl_args(&["-H", "x-request-id: 7f3a9c-client-id", &format!("{REVIEWS}/reviews/1")])?;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.header("server"), Some("istio-envoy"), "{ok:?}");
    assert_eq!(status(&m, &[&format!("{REVIEWS}/status/503")])?, 503);
    assert!(servers[0].log().contains("request_id=7f3a9c-client-id"), "{}", servers[0].log());
    let line = wait_request_lines(&wp, &["request_id=7f3a9c-client-id"], 1)?.remove(0);
    for field in
        ["method=GET", "path=\"/reviews/1\"", "status=200", "flags=-", "upstream=10.2.0.10:9080", "protocol=HTTP/1.1"]
    {
        assert!(line.contains(field), "{field} in {line}");
    }
    wait_request_lines(&wp, &["path=\"/status/503\""], 1)?;
    let metrics = m.waypoint_pod.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"])?;
    let sample = |code: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("istio_requests_total{") && l.contains(&format!("response_code=\"{code}\"")))
            .unwrap_or_default()
            .to_owned()
    };
    let ok_sample = sample("200");
    for label in [
        "reporter=\"waypoint\"",
        "source_workload=\"client\"",
        "source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"",
        "destination_service=\"reviews.shop.svc.cluster.local\"",
        "destination_workload=\"reviews-v1\"",
        "destination_principal=\"spiffe://cluster.local/ns/shop/sa/reviews\"",
        "request_protocol=\"http\"",
        "response_flags=\"-\"",
        "connection_security_policy=\"mutual_tls\"",
    ] {
        assert!(ok_sample.contains(label), "{label} in {ok_sample}");
    }
    assert!(ok_sample.ends_with(" 1"), "{ok_sample}");
    assert!(sample("503").ends_with(" 1"), "{metrics}");
    for family in
        ["istio_request_duration_milliseconds_bucket{", "istio_request_bytes_count{", "istio_response_bytes_sum{"]
    {
        assert!(metrics.contains(family), "{family} in {metrics}");
    }
    Ok(())
}
