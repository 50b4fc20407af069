//! Table tests of AUTHZ-1..3: every example policy of the seed's authorization section
//! (`seed.rs`), plus the corners of Istio's semantics (`semantics.rs`). Policies go through
//! `config::parse_file` and `model::compile_with` exactly as a configuration directory would.

mod seed;
mod semantics;

use std::{net::IpAddr, path::Path};

use super::*;
use crate::config::parse_file;
use crate::model::{CompileOptions, Model, compile_with};

/// Namespaces and pods the policies apply to.
const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: foo}
---
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: admin}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin-v1, namespace: foo, labels: {app: httpbin, version: v1}}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin-v2, namespace: foo, labels: {app: httpbin, version: v2}}
status: {podIP: 10.0.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: products, namespace: default, labels: {app: products}}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: mongodb, namespace: default, labels: {app: mongodb}}
status: {podIP: 10.0.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: admin-app, namespace: admin, labels: {app: admin}}
status: {podIP: 10.0.3.1}
---
"#;

/// A calling workload: its identity (`None` = plaintext) and address.
#[derive(Clone, Copy)]
struct Caller(Option<(&'static str, &'static str)>, &'static str);

const SLEEP: Caller = Caller(Some(("default", "sleep")), "10.0.9.1");
const DEV: Caller = Caller(Some(("dev", "dev-app")), "10.0.9.2");
const FOO: Caller = Caller(Some(("foo", "client")), "10.0.9.3");
const RATINGS: Caller = Caller(Some(("default", "bookinfo-ratings-v2")), "10.0.9.4");
const PLAIN: Caller = Caller(None, "192.168.1.5");

/// An HTTP request for the waypoint cases; `None` means the node proxy (L4).
#[derive(Clone, Copy, Default)]
struct Req {
    method: &'static str,
    path: &'static str,
    header: Option<(&'static str, &'static str)>,
    principal: Option<&'static str>,
    issuer: Option<&'static str>,
}

const fn get(path: &'static str) -> Option<Req> {
    Some(Req { method: "GET", path, header: None, principal: None, issuer: None })
}

const fn post(path: &'static str) -> Option<Req> {
    Some(Req { method: "POST", path, header: None, principal: None, issuer: None })
}

fn world(policies: &str, options: &CompileOptions) -> Model {
    let (resources, d) = parse_file(Path::new("authz.yaml"), &format!("{WORLD}{policies}"));
    assert!(d.is_empty(), "{d:?}");
    let (model, d) = compile_with(&resources, options);
    assert!(d.iter().all(|d| !d.is_error()), "{d:?}");
    model
}

fn connection(from: Caller, to: IpAddr, port: u16, req: Option<Req>) -> Connection {
    Connection {
        source: from.0.map(|(ns, sa)| Identity::new("cluster.local", ns, sa)),
        source_ip: from.1.parse().expect("source ip"),
        destination_ip: to,
        destination_port: port,
        http: req.map(|r| HttpRequest {
            host: Some("httpbin.foo:8000".into()),
            method: r.method.into(),
            path: r.path.into(),
            headers: r.header.map(|(k, v)| (k.to_owned(), v.to_owned())).into_iter().collect(),
            request_principal: r.principal.map(str::to_owned),
            claims: r.issuer.map(|i| ("iss".to_owned(), vec![i.to_owned()])).into_iter().collect(),
            ..HttpRequest::default()
        }),
    }
}

fn decide(model: &Model, pod: &str, from: Caller, port: u16, req: Option<Req>) -> Decision {
    let w = model.workloads.iter().find(|w| w.name == pod).expect("pod in WORLD");
    evaluate(model.authorization_for(w), &connection(from, w.ip, port, req))
}

/// One case: who calls which pod on which port, with which request, and whether it passes.
type Case = (&'static str, Caller, u16, Option<Req>, bool);

fn run_table(name: &str, policies: &str, cases: &[Case]) {
    let model = world(policies, &CompileOptions::default());
    for (i, (pod, from, port, req, allowed)) in cases.iter().enumerate() {
        let d = decide(&model, pod, *from, *port, *req);
        assert_eq!(d.allowed, *allowed, "{name} case {i} ({pod}:{port}): {d:?}");
    }
}
