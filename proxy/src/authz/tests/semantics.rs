//! Istio's matching and evaluation rules, one table each.

use super::*;

/// An ALLOW or DENY policy on products with one rule, written inline.
fn on_products(name: &str, action: &str, rule: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  selector:\n    matchLabels: {{app: products}}\n  action: {action}\n  rules:\n  - {rule}\n---\n"
    )
}

// Value matching (AUTHZ-2): exact, prefix, suffix, presence, and the not-forms.
#[test]
fn principal_and_namespace_matching() {
    let cases: &[(&str, &[(Caller, bool)])] = &[
        (
            "from: [{source: {principals: [\"cluster.local/ns/default/*\"]}}]",
            &[(SLEEP, true), (DEV, false), (PLAIN, false)],
        ),
        ("from: [{source: {principals: [\"*/sa/dev-app\"]}}]", &[(DEV, true), (SLEEP, false), (PLAIN, false)]),
        ("from: [{source: {principals: [\"*\"]}}]", &[(FOO, true), (PLAIN, false)]),
        (
            "from: [{source: {notPrincipals: [\"cluster.local/ns/default/sa/sleep\"]}}]",
            &[(SLEEP, false), (DEV, true), (PLAIN, true)],
        ),
        ("from: [{source: {namespaces: [\"*\"]}}]", &[(DEV, true), (PLAIN, false)]),
        ("from: [{source: {namespaces: [\"de*\"]}}]", &[(DEV, true), (SLEEP, true), (FOO, false)]),
        ("from: [{source: {notNamespaces: [\"dev\"]}}]", &[(DEV, false), (FOO, true), (PLAIN, true)]),
        (
            "from: [{source: {serviceAccounts: [\"sleep\", \"dev/dev-app\"]}}]",
            &[(SLEEP, true), (DEV, true), (FOO, false)],
        ),
        // Fields of one source AND; values of one field OR.
        (
            "from: [{source: {namespaces: [\"default\"], notPrincipals: [\"*/sa/sleep\"]}}]",
            &[(SLEEP, false), (RATINGS, true), (DEV, false)],
        ),
    ];
    for (rule, expectations) in cases {
        let model = world(&on_products("p", "ALLOW", rule), &CompileOptions::default());
        for (from, allowed) in expectations.iter() {
            assert_eq!(decide(&model, "products", *from, 80, None).allowed, *allowed, "{rule} from {:?}", from.0);
        }
    }
}

#[test]
fn ip_port_and_l4_when_matching() {
    type Expect = (Caller, u16, bool);
    let cases: &[(&str, &[Expect])] = &[
        ("from: [{source: {ipBlocks: [\"10.0.9.1\"]}}]", &[(SLEEP, 80, true), (DEV, 80, false)]),
        (
            "from: [{source: {ipBlocks: [\"10.0.9.0/30\"]}}]",
            &[(SLEEP, 80, true), (FOO, 80, true), (RATINGS, 80, false)],
        ),
        ("from: [{source: {notIpBlocks: [\"192.168.0.0/16\"]}}]", &[(SLEEP, 80, true), (PLAIN, 80, false)]),
        ("to: [{operation: {ports: [\"80\", 8080]}}]", &[(SLEEP, 80, true), (SLEEP, 8080, true), (SLEEP, 81, false)]),
        ("to: [{operation: {notPorts: [\"22\"]}}]", &[(SLEEP, 80, true), (SLEEP, 22, false)]),
        ("when: [{key: source.ip, values: [\"192.168.1.0/24\"]}]", &[(PLAIN, 80, true), (SLEEP, 80, false)]),
        ("when: [{key: source.namespace, notValues: [\"dev\"]}]", &[(SLEEP, 80, true), (DEV, 80, false)]),
        ("when: [{key: source.principal, values: [\"*/sa/sleep\"]}]", &[(SLEEP, 80, true), (PLAIN, 80, false)]),
        ("when: [{key: destination.ip, values: [\"10.0.2.0/24\"]}]", &[(SLEEP, 80, true)]),
        ("when: [{key: destination.ip, notValues: [\"10.0.2.1\"]}]", &[(SLEEP, 80, false)]),
        (
            "when: [{key: destination.port, values: [443, \"8443\"]}]",
            &[(SLEEP, 443, true), (SLEEP, 8443, true), (SLEEP, 80, false)],
        ),
        // from AND to; `to` alternatives OR.
        (
            "{from: [{source: {namespaces: [dev]}}], to: [{operation: {ports: [\"1\"]}}, {operation: {ports: [\"2\"]}}]}",
            &[(DEV, 2, true), (DEV, 3, false), (SLEEP, 1, false)],
        ),
    ];
    for (rule, expectations) in cases {
        let model = world(&on_products("p", "ALLOW", rule), &CompileOptions::default());
        for (from, port, allowed) in expectations.iter() {
            assert_eq!(decide(&model, "products", *from, *port, None).allowed, *allowed, "{rule} port {port}");
        }
    }
}

// AUTHZ-1: DENY beats ALLOW; no policy allows; dry-run never decides.
#[test]
fn evaluation_order_and_dry_run() {
    let deny_dev = on_products("deny-dev", "DENY", "from: [{source: {namespaces: [dev]}}]");
    let allow_dev = on_products("allow-dev", "ALLOW", "from: [{source: {namespaces: [dev]}}]");
    let model = world(&format!("{deny_dev}{allow_dev}"), &CompileOptions::default());
    let d = decide(&model, "products", DEV, 80, None);
    assert_eq!((d.allowed, d.policy.as_deref()), (false, Some("default/deny-dev")), "{d:?}");
    assert_eq!(d.reason, "denied by DENY policy default/deny-dev");
    assert!(!decide(&model, "products", SLEEP, 80, None).allowed, "an ALLOW applies and does not match");

    let model = world("", &CompileOptions::default());
    let d = decide(&model, "products", PLAIN, 80, None);
    assert_eq!((d.allowed, d.reason.as_str()), (true, "no ALLOW policy applies"));

    let dry = |yaml: String| {
        yaml.replacen(
            "  namespace: default\n",
            "  namespace: default\n  annotations: {istio.io/dry-run: \"true\"}\n",
            1,
        )
    };
    let model = world(&format!("{}{}", dry(deny_dev.clone()), dry(allow_dev.clone())), &CompileOptions::default());
    let d = decide(&model, "products", DEV, 80, None);
    assert!(d.allowed, "dry-run policies do not decide: {d:?}");
    assert_eq!(d.dry_run, vec![("default/deny-dev".to_owned(), true), ("default/allow-dev".to_owned(), true)]);
    let d = decide(&model, "products", SLEEP, 80, None);
    assert_eq!((d.allowed, d.reason.as_str()), (true, "no ALLOW policy applies"), "a dry-run ALLOW is no ALLOW");
    assert_eq!(d.dry_run, vec![("default/deny-dev".to_owned(), false), ("default/allow-dev".to_owned(), false)]);

    let with_allow = world(&format!("{}{allow_dev}", dry(deny_dev)), &CompileOptions::default());
    let d = decide(&with_allow, "products", DEV, 80, None);
    assert_eq!((d.allowed, d.policy.as_deref()), (true, Some("default/allow-dev")), "{d:?}");
}

// AUTHZ-3 corners: L7 in one alternative drops the whole ALLOW rule; a DENY loses only its
// L7 conditions; a waypoint request sees them all.
#[test]
fn l7_fields_at_the_node_proxy() {
    let allow =
        on_products("mixed", "ALLOW", "from: [{source: {namespaces: [dev]}}, {source: {requestPrincipals: [\"*\"]}}]");
    let model = world(&allow, &CompileOptions::default());
    assert!(!decide(&model, "products", DEV, 80, None).allowed);
    assert!(decide(&model, "products", DEV, 80, get("/")).allowed);

    let deny = on_products(
        "deny",
        "DENY",
        "{from: [{source: {namespaces: [dev]}}], when: [{key: \"request.headers[x-test]\", values: [\"1\"]}]}",
    );
    let model = world(&deny, &CompileOptions::default());
    assert!(!decide(&model, "products", DEV, 80, None).allowed, "the header condition is dropped at L4");
    assert!(decide(&model, "products", SLEEP, 80, None).allowed, "the L4 part still has to match");
    assert!(decide(&model, "products", DEV, 80, get("/")).allowed, "at L7 the header is checked");
}

// AUTHZ-1 scoping: root namespace is mesh-wide (and configurable); selectors narrow.
#[test]
fn scoping_by_namespace_and_selector() {
    let deny_in = |ns: &str, selector: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-dev\n  namespace: {ns}\nspec:\n  {selector}action: DENY\n  rules:\n  - from: [{{source: {{namespaces: [dev]}}}}]\n"
        )
    };
    let denied_pods = |policy: &str, options: &CompileOptions| {
        let model = world(policy, options);
        let mut pods: Vec<String> = model
            .workloads
            .iter()
            .filter(|w| !evaluate(model.authorization_for(w), &connection(DEV, w.ip, 80, None)).allowed)
            .map(|w| w.name.clone())
            .collect();
        pods.sort();
        pods.join(",")
    };
    let default = CompileOptions::default();
    let all = "admin-app,httpbin-v1,httpbin-v2,mongodb,products";
    assert_eq!(denied_pods(&deny_in("istio-system", ""), &default), all);
    assert_eq!(denied_pods(&deny_in("foo", ""), &default), "httpbin-v1,httpbin-v2");
    assert_eq!(denied_pods(&deny_in("foo", "selector: {matchLabels: {version: v2}}\n  "), &default), "httpbin-v2");
    assert_eq!(denied_pods(&deny_in("default", "selector: {matchLabels: {version: v2}}\n  "), &default), "");
    assert_eq!(
        denied_pods(&deny_in("istio-system", "selector: {matchLabels: {app: httpbin}}\n  "), &default),
        "httpbin-v1,httpbin-v2"
    );
    let custom_root = CompileOptions { root_namespace: "mesh-root".into() };
    assert_eq!(denied_pods(&deny_in("mesh-root", ""), &custom_root), all);
    assert_eq!(denied_pods(&deny_in("istio-system", ""), &custom_root), "");
    let target_ref = "targetRefs: [{kind: Service, group: \"\", name: products}]\n  ";
    assert_eq!(denied_pods(&deny_in("default", target_ref), &default), "", "targetRefs are for waypoints");
}

// PeerAuthentication STRICT as ztunnel enforces it: DENY notPrincipals ["*"] stops plaintext.
#[test]
fn not_principals_presence_denies_plaintext_only() {
    let model =
        world(&on_products("strict", "DENY", "from: [{source: {notPrincipals: [\"*\"]}}]"), &CompileOptions::default());
    assert!(!decide(&model, "products", PLAIN, 80, None).allowed);
    assert!(decide(&model, "products", SLEEP, 80, None).allowed);
}

// The waypoint's view (L7): hosts ignore case and port; not-forms of HTTP fields.
#[test]
fn http_fields_at_the_waypoint() {
    let cases: &[(&str, Option<Req>, bool)] = &[
        ("to: [{operation: {hosts: [\"HTTPBIN.foo\"]}}]", get("/"), true),
        ("to: [{operation: {hosts: [\"*.bar\"]}}]", get("/"), false),
        ("to: [{operation: {notHosts: [\"httpbin.*\"]}}]", get("/"), false),
        ("to: [{operation: {notMethods: [DELETE]}}]", post("/"), true),
        ("to: [{operation: {notMethods: [POST]}}]", post("/"), false),
        ("to: [{operation: {hosts: [\"httpbin.foo\"]}}]", None, false),
    ];
    for (rule, req, allowed) in cases {
        let model = world(&on_products("p", "ALLOW", rule), &CompileOptions::default());
        assert_eq!(decide(&model, "products", SLEEP, 80, *req).allowed, *allowed, "{rule}");
    }
}

// AUTHZ-2, Istio 1.30: `trustDomains`, `notTrustDomains` and the `source.trustDomain` key match
// the trust domain of the peer's verified identity, with the usual `*` forms; plaintext has none.
#[test]
fn trust_domains_match_the_peer_identity() {
    /// A peer's trust domain (`None`: plaintext) and whether it is allowed.
    type Expect = (Option<&'static str>, bool);
    let cases: &[(&str, &[Expect])] = &[
        (
            "from: [{source: {trustDomains: [cluster.local]}}]",
            &[(Some("cluster.local"), true), (Some("other.td"), false), (None, false)],
        ),
        ("from: [{source: {trustDomains: [\"cluster.*\"]}}]", &[(Some("cluster.east"), true), (Some("east"), false)]),
        (
            "from: [{source: {notTrustDomains: [old.td]}}]",
            &[(Some("cluster.local"), true), (Some("old.td"), false), (None, true)],
        ),
        (
            "when: [{key: source.trustDomain, values: [\"*.example\"]}]",
            &[(Some("a.example"), true), (Some("cluster.local"), false), (None, false)],
        ),
        (
            "when: [{key: source.trustDomain, notValues: [cluster.local]}]",
            &[(Some("a.example"), true), (Some("cluster.local"), false)],
        ),
    ];
    for (rule, expectations) in cases {
        let model = world(&on_products("p", "ALLOW", rule), &CompileOptions::default());
        let products = model.workloads.iter().find(|w| w.name == "products").expect("products");
        for (domain, allowed) in expectations.iter() {
            let mut conn = connection(SLEEP, products.ip, 80, None);
            conn.source = domain.map(|d| Identity::new(d, "default", "sleep"));
            let decision = evaluate(model.authorization_for(products), &conn);
            assert_eq!(decision.allowed, *allowed, "{rule} from {domain:?}: {decision:?}");
        }
    }
}

// A CUSTOM policy's external authorizer cannot be asked: what its rules match is denied (fail
// closed), the rest goes on to the other policies; HTTP-only rules at L4 deny everything.
#[test]
fn custom_policies_fail_closed() {
    let custom = |rule: &str| {
        on_products("ext", "CUSTOM", rule)
            .replace("  action: CUSTOM\n", "  action: CUSTOM\n  provider: {name: ext-authz}\n")
    };
    let by_source = world(&custom("from: [{source: {ipBlocks: [\"10.0.9.1\"]}}]"), &CompileOptions::default());
    let d = decide(&by_source, "products", SLEEP, 80, None);
    assert!(!d.allowed && d.reason.contains("fail closed"), "{d:?}");
    assert!(decide(&by_source, "products", DEV, 80, None).allowed, "not matched: no policy decides");
    let by_path = world(&custom("to: [{operation: {paths: [\"/admin*\"]}}]"), &CompileOptions::default());
    assert!(!decide(&by_path, "products", DEV, 80, None).allowed, "at L4 the path cannot be checked");
    assert!(!decide(&by_path, "products", DEV, 80, get("/admin/users")).allowed);
    assert!(decide(&by_path, "products", DEV, 80, get("/public")).allowed);
}
