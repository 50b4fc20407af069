//! The seed's authorization examples, as written there, decided at L4 and at L7.

use super::*;

// Seed: `httpbin` allows principal sleep or namespace dev, GET only, with a Google JWT.
const HTTPBIN: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["dev"]
    to:
    - operation:
        methods: ["GET"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
"#;

#[test]
fn seed_httpbin() {
    let google_req = Req { method: "GET", path: "/ip", issuer: Some("https://accounts.google.com"), ..Req::default() };
    let google = Some(google_req);
    run_table(
        "httpbin",
        HTTPBIN,
        &[
            ("httpbin-v1", SLEEP, 8000, google, true),
            ("httpbin-v1", DEV, 8000, google, true),
            ("httpbin-v1", FOO, 8000, google, false),
            ("httpbin-v1", SLEEP, 8000, get("/ip"), false),
            ("httpbin-v1", SLEEP, 8000, Some(Req { method: "POST", ..google_req }), false),
            // AUTHZ-3: at L4 an ALLOW rule with methods/claims never matches, so all is denied.
            ("httpbin-v1", SLEEP, 8000, None, false),
            // The selector asks for version v1.
            ("httpbin-v2", FOO, 8000, None, true),
        ],
    );
}

// Seed: `httpbin-deny` rejects any source outside namespace foo.
const HTTPBIN_DENY: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: httpbin-deny
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: ["foo"]
"#;

#[test]
fn seed_httpbin_deny() {
    run_table(
        "httpbin-deny",
        HTTPBIN_DENY,
        &[
            ("httpbin-v1", FOO, 8000, None, true),
            ("httpbin-v1", DEV, 8000, None, false),
            ("httpbin-v1", SLEEP, 8000, get("/"), false),
            // No identity, no namespace: `notNamespaces` matches, as in ztunnel.
            ("httpbin-v1", PLAIN, 8000, None, false),
            ("httpbin-v2", DEV, 8000, None, true),
        ],
    );
}

// Seed: `allow-read` (GET/HEAD on products) and `tester` (path prefix and suffix).
const ALLOW_READ: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: allow-read
  namespace: default
spec:
  selector:
    matchLabels:
      app: products
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET", "HEAD"]
"#;

const TESTER: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: tester
  namespace: default
spec:
  selector:
    matchLabels:
      app: products
  action: ALLOW
  rules:
  - to:
    - operation:
        paths: ["/test/*", "*/info"]
"#;

#[test]
fn seed_allow_read_and_tester() {
    run_table(
        "allow-read",
        ALLOW_READ,
        &[
            ("products", PLAIN, 80, get("/anything"), true),
            ("products", SLEEP, 80, Some(Req { method: "HEAD", ..Req::default() }), true),
            ("products", SLEEP, 80, post("/anything"), false),
            ("products", SLEEP, 80, None, false),
            ("mongodb", SLEEP, 27017, None, true),
        ],
    );
    run_table(
        "tester",
        TESTER,
        &[
            ("products", SLEEP, 80, post("/test/a/b"), true),
            ("products", SLEEP, 80, get("/api/info?verbose=1"), true),
            ("products", SLEEP, 80, get("/testing"), false),
            ("products", SLEEP, 80, get("/info/more"), false),
            ("products", SLEEP, 80, None, false),
        ],
    );
}

// Seed: JWT exclusion for /healthz (ALLOW notPaths) and JWT required on /admin (DENY).
const JWT_EXCEPT_HEALTHZ: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: disable-jwt-for-healthz
  namespace: default
spec:
  selector:
    matchLabels:
      app: products
  action: ALLOW
  rules:
  - to:
    - operation:
        notPaths: ["/healthz"]
    from:
    - source:
        requestPrincipals: ["*"]
"#;

const JWT_FOR_ADMIN: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: enable-jwt-for-admin
  namespace: default
spec:
  selector:
    matchLabels:
      app: products
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin"]
    from:
    - source:
        notRequestPrincipals: ["*"]
"#;

#[test]
fn seed_request_principal_policies() {
    let with_jwt = |path| Some(Req { principal: Some("issuer/subject"), ..get(path).expect("req") });
    run_table(
        "disable-jwt-for-healthz",
        JWT_EXCEPT_HEALTHZ,
        &[
            ("products", SLEEP, 80, with_jwt("/orders"), true),
            ("products", SLEEP, 80, get("/orders"), false),
            ("products", SLEEP, 80, with_jwt("/healthz"), false),
        ],
    );
    run_table(
        "enable-jwt-for-admin",
        JWT_FOR_ADMIN,
        &[
            ("products", SLEEP, 80, get("/admin"), false),
            ("products", SLEEP, 80, with_jwt("/admin"), true),
            ("products", SLEEP, 80, get("/orders"), true),
            // AUTHZ-3: a DENY rule with only HTTP conditions loses them all at L4: denies all.
            ("products", SLEEP, 80, None, false),
            ("products", PLAIN, 80, None, false),
        ],
    );
}

// Seed: `allow-all` (`rules: [{}]`) and `deny-all` (`spec: {}`).
const ALLOW_ALL: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: allow-all
  namespace: default
spec:
  action: ALLOW
  rules:
  - {}
"#;

const DENY_ALL: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: admin
spec:
  {}
"#;

#[test]
fn seed_allow_all_and_deny_all() {
    let both = format!("{ALLOW_ALL}---{DENY_ALL}");
    run_table(
        "allow-all + deny-all",
        &both,
        &[
            ("products", PLAIN, 80, None, true),
            ("mongodb", SLEEP, 27017, post("/"), true),
            ("admin-app", SLEEP, 80, None, false),
            ("admin-app", PLAIN, 80, get("/"), false),
            ("httpbin-v1", DEV, 8000, None, true),
        ],
    );
    let model = world(DENY_ALL, &CompileOptions::default());
    let d = decide(&model, "admin-app", SLEEP, 80, None);
    assert_eq!((d.policy, d.reason.as_str()), (None, "ALLOW policies apply but none matched"));
}

// Seed: custom `when` on a request header, and public vs authenticated-only access.
const HEADER_CONDITION: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    to:
    - operation:
        methods: ["GET"]
    when:
    - key: request.headers[version]
      values: ["v1", "v2"]
"#;

fn public_or_authenticated(principals: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata:\n  name: httpbin\n  namespace: foo\nspec:\n  selector:\n    matchLabels:\n      app: httpbin\n      version: v1\n  action: ALLOW\n  rules:\n  - {principals}to:\n    - operation:\n        methods: [\"GET\", \"POST\"]\n"
    )
}

#[test]
fn seed_conditions_and_authenticated_sources() {
    let with_version = |v| Some(Req { header: Some(("Version", v)), ..get("/").expect("req") });
    run_table(
        "request.headers[version]",
        HEADER_CONDITION,
        &[
            ("httpbin-v1", SLEEP, 8000, with_version("v2"), true),
            ("httpbin-v1", SLEEP, 8000, with_version("v3"), false),
            ("httpbin-v1", SLEEP, 8000, get("/"), false),
            ("httpbin-v1", DEV, 8000, with_version("v1"), false),
        ],
    );
    run_table(
        "public",
        &public_or_authenticated(""),
        &[("httpbin-v1", PLAIN, 8000, post("/"), true), ("httpbin-v1", PLAIN, 8000, None, false)],
    );
    run_table(
        "authenticated only",
        &public_or_authenticated("from:\n    - source:\n        principals: [\"*\"]\n    "),
        &[("httpbin-v1", PLAIN, 8000, get("/"), false), ("httpbin-v1", DEV, 8000, get("/"), true)],
    );
}

// Seed: `mongodb-policy`, a plain TCP workload: principal and port, all L4.
const MONGODB: &str = r#"
apiVersion: "security.istio.io/v1beta1"
kind: AuthorizationPolicy
metadata:
  name: mongodb-policy
  namespace: default
spec:
  selector:
    matchLabels:
      app: mongodb
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-ratings-v2"]
    to:
    - operation:
        ports: ["27017"]
"#;

#[test]
fn seed_mongodb_ports() {
    run_table(
        "mongodb-policy",
        MONGODB,
        &[
            ("mongodb", RATINGS, 27017, None, true),
            ("mongodb", RATINGS, 27018, None, false),
            ("mongodb", SLEEP, 27017, None, false),
            ("mongodb", PLAIN, 27017, None, false),
        ],
    );
}
