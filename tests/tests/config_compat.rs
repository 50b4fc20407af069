//! End to end: a directory written for Istio, with kinds strait does not implement yet, runs real
//! node proxies (CFG-1), which enforce the Istio 1.30 trust-domain conditions and fail closed on
//! CUSTOM policies on real mTLS connections (AUTHZ-1, AUTHZ-2).

mod common;

use std::{io, time::Duration};

use common::{MESH, TIMEOUT, TwoNodes, apply, wait_access_line};
use strait_testbed::EchoKind;

/// Istio resources strait ignores with a warning (Telemetry used to reject the whole directory;
/// ServiceEntry, read now, gave way to Sidecar, which ambient has no use for).
const ISTIO_EXTRAS: &str = "---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata:
  name: mesh-default
  namespace: istio-system
spec:
  accessLogging:
  - providers:
    - name: envoy
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata:
  name: default
  namespace: mesh
spec:
  egress:
  - hosts: [./*, istio-system/*]
";

fn policy(name: &str, action: &str, rule: &str) -> String {
    let provider = if action == "CUSTOM" { "  provider: {name: ext-authz}\n" } else { "" };
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {MESH}\nspec:\n  selector:\n    matchLabels: {{app: server}}\n  action: {action}\n{provider}  rules:\n  - {rule}\n"
    )
}

#[test]
fn istio_directory_loads_and_trust_domains_and_custom_are_enforced() -> io::Result<()> {
    let t = TwoNodes::new("compat::policy")?;
    t.topo.write_config("cluster.yaml", &format!("{}{ISTIO_EXTRAS}", t.config("server", &[])))?;
    let _server = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let (p1, p2) = t.start_proxies(&[])?;
    let proxies = [&p1, &p2];
    for proxy in proxies {
        proxy.wait_for_log("Telemetry istio-system/mesh-default: not supported yet; ignored", TIMEOUT)?;
        proxy.wait_for_log("Sidecar mesh/default: not supported yet; ignored", TIMEOUT)?;
    }
    let reaches = || -> io::Result<bool> {
        Ok(t.client.curl(&format!("http://{}:8080/", t.server.ip()), Duration::from_secs(3))?.ok())
    };
    assert!(reaches()?, "no policy yet");

    // trustDomains: the client's certificate is in cluster.local.
    let allow_local = policy("td", "ALLOW", "from: [{source: {trustDomains: [cluster.local]}}]");
    apply(&t.topo, &proxies, "policy.yaml", &allow_local)?;
    assert!(reaches()?, "the client's trust domain is allowed");
    let allow_other = policy("td", "ALLOW", "from: [{source: {trustDomains: [\"other.*\"]}}]");
    apply(&t.topo, &proxies, "policy.yaml", &allow_other)?;
    assert!(!reaches()?, "only another trust domain is allowed");
    wait_access_line(&p2, &["inbound", "ALLOW policies apply but none matched"], TIMEOUT)?;

    // The `source.trustDomain` condition in a DENY, and `notTrustDomains`.
    let deny_key = policy("td", "DENY", "when: [{key: source.trustDomain, values: [\"cluster.*\"]}]");
    apply(&t.topo, &proxies, "policy.yaml", &deny_key)?;
    assert!(!reaches()?, "denied by source.trustDomain");
    wait_access_line(&p2, &["inbound", "denied by AuthorizationPolicy mesh/td"], TIMEOUT)?;
    let deny_not = policy("td", "DENY", "from: [{source: {notTrustDomains: [cluster.local]}}]");
    apply(&t.topo, &proxies, "policy.yaml", &deny_not)?;
    assert!(reaches()?, "notTrustDomains does not match the client's own");

    // CUSTOM: its authorizer cannot be asked, so what its rule matches is denied.
    let custom = policy("ext", "CUSTOM", "from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]");
    apply(&t.topo, &proxies, "policy.yaml", &custom)?;
    assert!(!reaches()?, "CUSTOM fails closed");
    wait_access_line(&p2, &["inbound", "denied by AuthorizationPolicy mesh/ext", "fail closed"], TIMEOUT)?;
    let custom_elsewhere = policy("ext", "CUSTOM", "from: [{source: {principals: [cluster.local/ns/mesh/sa/nobody]}}]");
    apply(&t.topo, &proxies, "policy.yaml", &custom_elsewhere)?;
    assert!(reaches()?, "traffic the CUSTOM rules do not match is not its business");
    Ok(())
}
