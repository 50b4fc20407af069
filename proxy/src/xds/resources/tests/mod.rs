//! The mapping's tests: a representative directory goes through compile → snapshot → bytes →
//! `model_from_xds` and must give the same decisions (`roundtrip.rs`); resources shaped as
//! istiod sends them decode to a sensible model, bad ones are named (`istiod.rs`); versions
//! follow content and a one-pod change is one resource (`versions.rs`).

mod istiod;
mod roundtrip;
mod versions;

use std::{collections::HashMap, path::Path};

use strait_proto::{prost::Message, prost_types::Any};

use super::*;
use crate::{
    config::{Located, Resource, parse_file},
    model::{Model, compile},
    xds::{Received, Snapshot, Subscriber},
};

/// Two nodes, four namespaces (one with a waypoint), pods in and out of the mesh, services with
/// named target ports, policies at every scope, PeerAuthentication at every level, and the L7
/// resources of the waypoint.
const DIRECTORY: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
---
apiVersion: v1
kind: Namespace
metadata:
  name: bank
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, version: v1}}
spec:
  nodeName: n1
  serviceAccountName: web
  containers: [{name: web, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.1.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web, version: v2}}
spec:
  nodeName: n2
  serviceAccountName: web
  containers: [{name: web, ports: [{name: http, containerPort: 8081}]}]
status: {podIP: 10.2.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 10.1.0.12}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {nodeName: n1, serviceAccountName: waypoint}
status: {podIP: 10.1.0.20}
---
apiVersion: v1
kind: Pod
metadata: {name: ingress-0, namespace: shop, labels: {istio: ingressgateway, strait.io/gateway: "true"}}
spec: {nodeName: n1, serviceAccountName: istio-ingressgateway}
status: {podIP: 10.1.0.30}
---
apiVersion: v1
kind: Pod
metadata: {name: ledger-1, namespace: bank, labels: {app: ledger, version: v1}}
spec: {nodeName: n2, serviceAccountName: ledger}
status: {podIP: 10.2.0.21}
---
apiVersion: v1
kind: Pod
metadata: {name: ledger-2, namespace: bank, labels: {app: ledger, version: v2}}
spec: {nodeName: n1, serviceAccountName: ledger}
status: {podIP: 10.1.0.21}
---
apiVersion: v1
kind: Pod
metadata: {name: audit, namespace: bank, labels: {app: audit, istio.io/dataplane-mode: none}}
spec: {nodeName: n2, serviceAccountName: audit}
status: {podIP: 10.2.0.22}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy, labels: {app: old}}
spec: {nodeName: n2}
status: {podIP: 10.2.0.30}
---
apiVersion: v1
kind: Pod
metadata: {name: host-agent, namespace: legacy, labels: {app: agent}}
spec: {nodeName: n1, hostNetwork: true}
status: {podIP: 192.168.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: ledger, namespace: bank, labels: {team: money}}
spec:
  clusterIP: 10.96.0.20
  selector: {app: ledger}
  ports:
  - {name: tcp-ledger, port: 9000, targetPort: 9000}
  - {name: api, port: 9100, targetPort: 9100, appProtocol: grpc}
---
apiVersion: v1
kind: Service
metadata: {name: old, namespace: legacy}
spec:
  clusterIP: 10.96.0.30
  selector: {app: old}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-blocked, namespace: istio-system}
spec:
  action: DENY
  rules: [{from: [{source: {ipBlocks: [10.66.0.0/16]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-from-bank, namespace: istio-system}
spec:
  selector: {matchLabels: {app: audit}}
  rules: [{from: [{source: {namespaces: [bank]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-shop, namespace: shop}
spec:
  rules:
  - from: [{source: {namespaces: [shop, bank]}}]
  - to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ledger-allow, namespace: bank}
spec:
  selector: {matchLabels: {app: ledger}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/waypoint, "cluster.local/ns/shop/sa/cli*"]}}]
    to: [{operation: {ports: ["9000", "9100"]}}]
  - from: [{source: {serviceAccounts: [shop/web]}}, {source: {ipBlocks: [10.2.0.0/16], notPrincipals: ["*"]}}]
    when: [{key: destination.port, values: ["9000"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ledger-deny, namespace: bank}
spec:
  selector: {matchLabels: {app: ledger}}
  action: DENY
  rules:
  - when: [{key: source.ip, values: [10.1.0.99]}]
  - from: [{source: {notNamespaces: [bank, shop]}}]
    to: [{operation: {ports: ["9100"], methods: [POST]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: dry
  namespace: bank
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [shop]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web-pa, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: DISABLE}
  portLevelMtls: {8081: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ledger-pa, namespace: bank}
spec:
  selector: {matchLabels: {app: ledger}}
  portLevelMtls: {9100: {mode: PERMISSIVE}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http:
  - match: [{headers: {x-canary: {exact: "1"}}}]
    route: [{destination: {host: web, subset: v2}}]
  - route:
    - {destination: {host: web, subset: v1}, weight: 90}
    - {destination: {host: web, subset: v2}, weight: 10}
    timeout: 3s
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ledger, namespace: bank}
spec:
  host: ledger
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-get-only, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  jwtRules: [{issuer: "https://issuer.example", jwks: '{"keys":[]}'}]
"#;

fn directory() -> (Vec<Located<Resource>>, Model) {
    directory_from(DIRECTORY)
}

fn directory_from(yaml: &str) -> (Vec<Located<Resource>>, Model) {
    let (resources, d) = parse_file(Path::new("mesh.yaml"), yaml);
    assert!(d.is_empty(), "{d:?}");
    let (model, d) = compile(&resources);
    assert!(d.iter().all(|d| !d.is_error()), "{d:?}");
    (resources, model)
}

/// What `subscriber` would hold after receiving every visible resource of `snapshot`, each body
/// encoded to bytes and decoded again, as it crosses the wire.
fn received_by(snapshot: &Snapshot, subscriber: &Subscriber) -> Received {
    let mut received = Received::new();
    for (type_url, resources) in snapshot {
        let held = received.entry(type_url.clone()).or_default();
        for (name, resource) in resources {
            if visible(subscriber, type_url, resource) {
                let bytes = resource.body.encode_to_vec();
                held.insert(name.clone(), Any::decode(bytes.as_slice()).expect("decode Any"));
            }
        }
    }
    received
}

fn node_proxy(node: &str) -> Subscriber {
    Subscriber { id: format!("sidecar~10.0.0.1~{node}"), node_name: Some(node.to_owned()), ..Subscriber::default() }
}

fn waypoint_proxy(namespace: &str, name: &str) -> Subscriber {
    let metadata = HashMap::from([(WAYPOINT_METADATA.to_owned(), format!("{namespace}/{name}"))]);
    Subscriber { id: format!("waypoint~10.1.0.20~{name}.{namespace}"), metadata, ..Subscriber::default() }
}
