//! Mistakes in VirtualServices and DestinationRules (CFG-1, CFG-4): each reported at its line,
//! with its field path and a message saying what is wrong; errors where Istio's webhook rejects
//! the resource, warnings where `istioctl analyze` would only complain.

use super::{bookinfo, diagnostics};
use crate::config::{Diagnostic, Severity};

/// A VirtualService in `default` for `reviews` whose `http:` entries start on line 9, followed by
/// Bookinfo. Compiler diagnostics point at the document, line 1.
fn virtual_service(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: r\n  namespace: default\nspec:\n  hosts: [reviews]\n  http:\n{http}\n---\n{}",
        bookinfo()
    )
}

/// A DestinationRule in `default` for `reviews` whose `spec:` entries start on line 7.
fn destination_rule(spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: r\n  namespace: default\nspec:\n{spec}\n---\n{}",
        bookinfo().replace(
            "name: reviews\n  namespace: default\nspec:\n  host: reviews",
            "name: x\n  namespace: default\nspec:\n  host: x"
        )
    )
}

fn check(yaml: &str, severity: Severity, line: usize, field: &str, fragment: &str) {
    let d = diagnostics(yaml);
    let found = d.iter().find(|d| d.field.as_deref() == Some(field) && d.message.contains(fragment));
    let Some(found) = found else {
        panic!("no diagnostic on `{field}` with `{fragment}` in:\n{}\n{yaml}", render(&d));
    };
    assert_eq!((found.severity, found.origin.line), (severity, line), "{found}");
    if severity == Severity::Warning {
        assert!(d.iter().all(|d| !d.is_error()), "unexpected errors: {}", render(&d));
    }
}

fn render(d: &[Diagnostic]) -> String {
    d.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
}

const TO_REVIEWS: &str = "    route:\n    - destination:\n        host: reviews";

// Parse-time checks: the error is at the line of the value (or of the object it concerns).
#[test]
fn invalid_virtual_services_name_line_and_field() {
    use Severity::Error;
    let cases: Vec<(String, usize, &str, &str)> = vec![
        (
            "  - route:\n    - destination:\n        host: reviews\n      wieght: 50".into(),
            12,
            "spec.http[0].route[0]",
            "unknown field `wieght`",
        ),
        (
            format!("  - match:\n    - uri:\n        regex: \"/api/(v1\"\n{TO_REVIEWS}"),
            11,
            "spec.http[0].match[0].uri.regex",
            "`/api/(v1` is not a valid regular expression",
        ),
        (
            format!("  - match:\n    - uri:\n        exact: /a\n        prefix: /b\n{TO_REVIEWS}"),
            11,
            "spec.http[0].match[0].uri",
            "found exact and prefix",
        ),
        (format!("  - timeout: 10\n{TO_REVIEWS}"), 9, "spec.http[0].timeout", "`10` is not a duration"),
        (
            format!(
                "  - fault:\n      delay:\n        fixedDelay: 7s\n        percentage:\n          value: 150\n{TO_REVIEWS}"
            ),
            13,
            "spec.http[0].fault.delay.percentage.value",
            "`150` is not a percentage",
        ),
        (
            format!("  - fault:\n      delay:\n        fixedDelay: 7s\n        percent: 101\n{TO_REVIEWS}"),
            12,
            "spec.http[0].fault.delay.percent",
            "`101` is not a percentage",
        ),
        (
            format!("  - fault:\n      abort:\n        httpStatus: 99\n{TO_REVIEWS}"),
            11,
            "spec.http[0].fault.abort.httpStatus",
            "`99` is not an HTTP status",
        ),
        (
            format!("  - fault:\n      abort:\n        percentage:\n          value: 1\n{TO_REVIEWS}"),
            11,
            "spec.http[0].fault.abort",
            "needs `httpStatus` or `grpcStatus`",
        ),
        (
            format!("  - retries:\n      attempts: 3\n      retryOn: 5xx,bogus\n{TO_REVIEWS}"),
            11,
            "spec.http[0].retries.retryOn",
            "unknown retryOn condition `bogus`",
        ),
        (
            format!("  - retries:\n      perTryTimeout: 2s\n{TO_REVIEWS}"),
            10,
            "spec.http[0].retries",
            "retries are off when `attempts` is 0",
        ),
        (format!("  - redirect:\n      uri: /new\n{TO_REVIEWS}"), 9, "spec.http[0]", "found route and redirect"),
        ("  - name: nowhere".into(), 9, "spec.http[0]", "needs `route`, `redirect` or `directResponse`"),
        (
            "  - redirect:\n      uri: /new\n      redirectCode: 200".into(),
            11,
            "spec.http[0].redirect.redirectCode",
            "`200` is not a redirect status",
        ),
        ("  - directResponse:\n      status: 600".into(), 10, "spec.http[0].directResponse.status", "`600`"),
        (
            format!(
                "  - mirror:\n      host: reviews\n    mirrors:\n    - destination:\n        host: reviews\n{TO_REVIEWS}"
            ),
            9,
            "spec.http[0]",
            "found mirror and mirrors",
        ),
        (
            format!("  - headers:\n      request:\n        set:\n          \"bad header\": x\n{TO_REVIEWS}"),
            12,
            "spec.http[0].headers.request.set",
            "`bad header` is not a valid HTTP header name",
        ),
        (
            format!("  - match:\n    - headers:\n        \"x:y\":\n          exact: a\n{TO_REVIEWS}"),
            11,
            "spec.http[0].match[0].headers",
            "not a valid HTTP header name",
        ),
        (
            "  - route:\n    - destination:\n        host: reviews\n        subset: V1".into(),
            12,
            "spec.http[0].route[0].destination.subset",
            "`V1` is not a valid subset name",
        ),
        (
            "  - route:\n    - destination:\n        host: reviews\n        port:\n          number: 0".into(),
            13,
            "spec.http[0].route[0].destination.port.number",
            "`0` is not a port number",
        ),
        (
            "  - route:\n    - destination:\n        host: \"*\"".into(),
            11,
            "spec.http[0].route[0].destination.host",
            "`*` is not a destination",
        ),
    ];
    for (http, line, field, fragment) in cases {
        check(&virtual_service(&http), Error, line, field, fragment);
    }
    let bad_host = virtual_service(&format!("  - {}", &TO_REVIEWS[4..])).replace("[reviews]", "[reviews, rev_iews]");
    check(&bad_host, Error, 7, "spec.hosts[1]", "`rev_iews` is not a valid host");
}

#[test]
fn invalid_destination_rules_name_line_and_field() {
    use Severity::Error;
    let cases: Vec<(&str, usize, &str, &str)> = vec![
        (
            "  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      simple: FASTEST",
            10,
            "spec.trafficPolicy.loadBalancer.simple",
            "unknown load balancer `FASTEST`; expected one of",
        ),
        (
            "  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      consistentHash:\n        httpHeaderName: x-user\n        useSourceIp: true",
            11,
            "spec.trafficPolicy.loadBalancer.consistentHash",
            "found httpHeaderName and useSourceIp",
        ),
        (
            "  host: reviews\n  trafficPolicy:\n    outlierDetection:\n      consecutiveErrors: -1",
            10,
            "spec.trafficPolicy.outlierDetection.consecutiveErrors",
            "`-1` is not a non-negative integer",
        ),
        (
            "  host: reviews\n  trafficPolicy:\n    outlierDetection:\n      interval: 0s",
            10,
            "spec.trafficPolicy.outlierDetection.interval",
            "at least 1ms",
        ),
        (
            "  host: reviews\n  trafficPolicy:\n    outlierDetection:\n      baseEjectionTime: 3 minutes",
            10,
            "spec.trafficPolicy.outlierDetection.baseEjectionTime",
            "`3 minutes` is not a duration",
        ),
        (
            "  host: reviews\n  trafficPolicy:\n    tls:\n      mode: MUTUAL",
            10,
            "spec.trafficPolicy.tls",
            "MUTUAL TLS needs `clientCertificate` and `privateKey`",
        ),
        (
            "  host: reviews\n  trafficPolicy:\n    tls:\n      mode: STRICT",
            10,
            "spec.trafficPolicy.tls.mode",
            "unknown TLS mode `STRICT`",
        ),
        ("  host: reviews\n  trafficPolicy: {}", 8, "spec.trafficPolicy", "needs at least one of"),
        (
            "  host: reviews\n  subsets:\n  - name: v1\n    lables:\n      version: v1",
            10,
            "spec.subsets[0]",
            "unknown field `lables`",
        ),
        (
            "  host: reviews\n  trafficPolicy:\n    connectionPool: {}",
            9,
            "spec.trafficPolicy.connectionPool",
            "needs `tcp`",
        ),
    ];
    for (spec, line, field, fragment) in cases {
        check(&destination_rule(spec), Error, line, field, fragment);
    }
}

// Compile-time checks need the other resources; they point at the resource's first line.
#[test]
fn references_and_semantics_are_analyzed() {
    use Severity::{Error, Warning};
    let vs_cases: Vec<(String, Severity, &str, &str)> = vec![
        (
            "  - route:\n    - destination:\n        host: reviwes".into(),
            Warning,
            "spec.http[0].route[0].destination.host",
            "referenced host `reviwes.default.svc.cluster.local` is not a known service",
        ),
        (
            "  - route:\n    - destination:\n        host: reviews\n        subset: v9".into(),
            Warning,
            "spec.http[0].route[0].destination.subset",
            "DestinationRule default/reviews for `reviews.default.svc.cluster.local` has no subset `v9` (it has v1, v2, v3)",
        ),
        (
            "  - route:\n    - destination:\n        host: productpage\n        subset: v1\n      weight: 60\n    - destination:\n        host: reviews\n      weight: 60".into(),
            Warning,
            "spec.http[0].route",
            "add up to 120, not 100",
        ),
        (
            "  - route:\n    - destination:\n        host: reviews\n    - destination:\n        host: ratings".into(),
            Error,
            "spec.http[0].route",
            "add up to 0",
        ),
        (
            format!("  - match:\n    - port: 8080\n{TO_REVIEWS}"),
            Warning,
            "spec.http[0].match[0].port",
            "port 8080 is not a port of reviews.default.svc.cluster.local",
        ),
        (
            "  - route:\n    - destination:\n        host: reviews\n        port:\n          number: 80".into(),
            Warning,
            "spec.http[0].route[0].destination.port.number",
            "port 80 is not a port of service `reviews.default.svc.cluster.local` (it has 9080)",
        ),
        (
            format!("  - headers:\n      response:\n        remove: [Host]\n{TO_REVIEWS}"),
            Error,
            "spec.http[0].headers.response.remove",
            "Host header can only be set or added on requests",
        ),
        (
            format!("  - corsPolicy:\n      allowOrigins:\n      - exact: https://a.example\n{TO_REVIEWS}"),
            Warning,
            "spec.http[0].corsPolicy",
            "`corsPolicy` is not supported by strait; ignored",
        ),
        (
            "  - delegate:\n      name: reviews-routes".into(),
            Warning,
            "spec.http[0].delegate",
            "not supported by strait",
        ),
        (
            format!("  - mirror_percent: 50\n{TO_REVIEWS}"),
            Warning,
            "spec.http[0].mirrorPercentage",
            "has no effect without `mirror`",
        ),
    ];
    for (http, severity, field, fragment) in vs_cases {
        check(&virtual_service(&http), severity, 1, field, fragment);
    }
    let empty_hosts = virtual_service(&format!("  - {}", &TO_REVIEWS[4..])).replace("hosts: [reviews]", "hosts: []");
    check(&empty_hosts, Error, 1, "spec.hosts", "must name at least one host");
    let star = virtual_service(&format!("  - {}", &TO_REVIEWS[4..])).replace("hosts: [reviews]", "hosts: [\"*\"]");
    check(&star, Error, 1, "spec.hosts", "`*` is not allowed for VirtualServices bound to the mesh");
    let tls = virtual_service("  - route:\n    - destination:\n        host: reviews")
        .replace("  http:\n", "  tls:\n  - match:\n    - sniHosts: [login.example.com]\n    route:\n    - destination:\n        host: reviews\n  http:\n");
    check(&tls, Error, 1, "spec.tls[0].match[0].sniHosts[0]", "SNI host `login.example.com` is not within");

    let dr_cases: Vec<(&str, Severity, &str, &str)> = vec![
        (
            "  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      simple: PASSTHROUGH",
            Warning,
            "spec.trafficPolicy.loadBalancer.simple",
            "PASSTHROUGH (original destination) is not supported by strait; ROUND_ROBIN is used",
        ),
        (
            "  host: reviews\n  workloadSelector:\n    matchLabels:\n      app: productpage",
            Warning,
            "spec.workloadSelector",
            "not supported by strait",
        ),
        ("  host: revews", Warning, "spec.host", "host `revews.default.svc.cluster.local` is not a known service"),
        (
            "  host: reviews\n  trafficPolicy:\n    portLevelSettings:\n    - port:\n        number: 80\n      loadBalancer:\n        simple: RANDOM",
            Warning,
            "spec.trafficPolicy.portLevelSettings[0].port",
            "port 80 is not a port of the service",
        ),
    ];
    for (spec, severity, field, fragment) in dr_cases {
        check(&destination_rule(spec), severity, 1, field, fragment);
    }
}
