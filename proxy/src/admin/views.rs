//! What the admin endpoints answer, built from the proxy's state by plain functions so each view
//! is testable without a server.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use http::StatusCode;
use serde::Serialize;

use strait_ebpf_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use super::{AdminState, OperatorEndpoints, Reply};
use crate::{
    capture::Capture,
    identity::{PendingCert, TlsSettings},
    model::{Model, Workload},
    telemetry::{canonical_revision, canonical_service, logging::LogControl, rfc3339, workload_name},
};

/// What `/server_info` answers, so tools can tell a strait proxy, and which kind, from anything
/// else listening on the admin port.
#[derive(Serialize)]
struct ServerInfo<'a> {
    /// Always `strait`.
    proxy: &'static str,
    version: &'static str,
    /// `node` or `waypoint`.
    role: &'static str,
    /// The node a node proxy serves.
    node: Option<&'a str>,
    /// `namespace/name` of the waypoint a waypoint proxy runs.
    waypoint: Option<String>,
    trust_domain: &'a str,
    /// Configurations applied since the proxy started (1 = the first).
    config_generation: u64,
    ready: bool,
    /// The sockets the proxy listens on.
    listeners: Vec<ListenerView>,
}

#[derive(Serialize)]
struct ListenerView {
    name: &'static str,
    address: SocketAddr,
    /// What arrives there, in a few words.
    purpose: &'static str,
}

/// The proxy's listeners: the data path's (fixed ports on every address, SPEC conventions) and
/// the operator endpoints.
fn listeners(waypoint: bool, endpoints: &OperatorEndpoints) -> Vec<ListenerView> {
    let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let mut out = Vec::new();
    if !waypoint {
        out.push(ListenerView {
            name: "outbound",
            address: any(OUTBOUND_PORT),
            purpose: "connections of captured pods, to their original destination (transparent)",
        });
        out.push(ListenerView {
            name: "inbound_plaintext",
            address: any(INBOUND_PLAINTEXT_PORT),
            purpose: "plaintext to captured pods; PeerAuthentication decides",
        });
    }
    out.push(ListenerView {
        name: "hbone",
        address: any(HBONE_PORT),
        purpose: if waypoint {
            "HBONE (mTLS, HTTP/2 CONNECT) from node proxies, to the L7 engine"
        } else {
            "HBONE (mTLS, HTTP/2 CONNECT) to captured pods"
        },
    });
    out.push(ListenerView { name: "admin", address: endpoints.admin, purpose: "this admin API" });
    out.push(ListenerView { name: "metrics", address: endpoints.metrics, purpose: "Prometheus metrics" });
    out.push(ListenerView { name: "readiness", address: endpoints.readiness, purpose: "readiness probe" });
    out
}

/// `/server_info`: what this proxy is.
pub(super) fn server_info(state: &AdminState, endpoints: &OperatorEndpoints) -> String {
    let info = ServerInfo {
        proxy: "strait",
        version: env!("CARGO_PKG_VERSION"),
        role: if state.waypoint.is_some() { "waypoint" } else { "node" },
        node: Some(state.node_name.as_str()).filter(|n| !n.is_empty()),
        waypoint: state.waypoint.as_ref().map(ToString::to_string),
        trust_domain: &state.trust_domain,
        config_generation: state.model.current().generation,
        ready: state.ready.is_ready(),
        listeners: listeners(state.waypoint.is_some(), endpoints),
    };
    serde_json::to_string_pretty(&info).unwrap_or_else(|e| error_json(&e))
}

/// How other proxies reach a workload, as Istio's `Address` resource says it: HBONE for a pod
/// in the mesh (its node proxy terminates the tunnel), plain TCP for anything else, waypoints
/// included (they are dialled on 15008 by name, not captured).
pub(super) fn workload_protocol(workload: &Workload) -> &'static str {
    if workload.captured { "HBONE" } else { "TCP" }
}

/// `/logging`: shows the filter, or sets it from `?level=<filter>`.
pub(super) fn logging(control: Option<&LogControl>, query: Option<&str>) -> Reply {
    let Some(control) = control else {
        return Reply::text(StatusCode::SERVICE_UNAVAILABLE, "this process has no run-time log control\n");
    };
    let Some(query) = query.filter(|q| !q.is_empty()) else {
        return Reply::text(StatusCode::OK, format!("{}\n", control.current()));
    };
    let Some(level) = query_param(query, "level") else {
        return Reply::text(
            StatusCode::BAD_REQUEST,
            "usage: /logging?level=<filter>, e.g. level=debug or level=info,strait=trace\n",
        );
    };
    match control.set(&level) {
        Ok(()) => Reply::text(StatusCode::OK, format!("{}\n", control.current())),
        Err(e) => Reply::text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// The value of `key` in a query string, percent-decoded.
fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').filter_map(|pair| pair.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| percent_decode(v))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/stats`: the capture programs' counters, one `name: value` line each.
pub(super) fn stats(capture: Option<&Mutex<Capture>>) -> String {
    let mut out = String::new();
    if let Some(Ok(capture)) = capture.map(Mutex::lock) {
        for (name, value) in capture.stats() {
            let _ = writeln!(out, "strait.capture.{name}: {value}");
        }
        let _ = writeln!(out, "strait.capture.attached_interfaces: {}", capture.attached_interfaces().len());
    }
    out
}

/// `/config_dump`: the compiled model, and under `xds` the state of the xDS client (CFG-2) when
/// the proxy follows a control plane.
pub(super) fn config_dump(model: &Model, xds: Option<&crate::xds::client::SharedStatus>) -> String {
    let dump = serde_json::to_value(model).and_then(|mut dump| {
        if let (Some(xds), Some(object)) = (xds, dump.as_object_mut()) {
            let status = xds.lock().unwrap_or_else(|p| p.into_inner()).clone();
            object.insert("xds".to_owned(), serde_json::to_value(status)?);
        }
        Ok(dump)
    });
    dump.and_then(|d| serde_json::to_string_pretty(&d)).unwrap_or_else(|e| error_json(&e))
}

#[derive(Serialize)]
struct WorkloadView<'a> {
    name: &'a str,
    namespace: &'a str,
    /// The workload as metrics name it (a Deployment's name for its pods).
    workload_name: &'a str,
    canonical_service: &'a str,
    canonical_revision: &'a str,
    service_account: &'a str,
    identity: String,
    ip: IpAddr,
    node: Option<&'a str>,
    /// `namespace/name` of the waypoint traffic to this pod's address goes through.
    waypoint: Option<String>,
    /// `HBONE` or `TCP`: how the mesh reaches the pod.
    protocol: &'static str,
    /// Runs on this node, so this proxy captures it when it is enrolled.
    local: bool,
    /// `captured`, `not_enrolled` or `host_network` (hostNetwork pods are never captured).
    capture: &'static str,
    labels: &'a BTreeMap<String, String>,
}

/// `/workloads`: every workload of the model, this node's first.
pub(super) fn workloads(model: &Model, node: &str, trust_domain: &str) -> String {
    let mut views: Vec<WorkloadView> = model
        .workloads
        .iter()
        .map(|w| WorkloadView {
            name: &w.name,
            namespace: &w.namespace,
            workload_name: workload_name(w),
            canonical_service: canonical_service(w),
            canonical_revision: canonical_revision(w),
            service_account: &w.service_account,
            identity: w.identity(trust_domain).to_string(),
            ip: w.ip,
            node: w.node.as_deref(),
            waypoint: w.waypoint.as_ref().map(ToString::to_string),
            protocol: workload_protocol(w),
            local: w.node.as_deref() == Some(node),
            capture: if w.host_network {
                "host_network"
            } else if w.captured {
                "captured"
            } else {
                "not_enrolled"
            },
            labels: &w.labels,
        })
        .collect();
    views.sort_by(|a, b| (!a.local, a.namespace, a.name).cmp(&(!b.local, b.namespace, b.name)));
    serde_json::to_string_pretty(&views).unwrap_or_else(|e| error_json(&e))
}

#[derive(Serialize)]
struct CertView<'a> {
    identity: String,
    serial: Option<&'a str>,
    not_before: Option<String>,
    not_after: Option<String>,
    /// When the certificate is renewed (half life, ID-1).
    refresh_at: Option<String>,
    /// `valid` or `expired`; for identities without a certificate (`?all`), `initializing`
    /// while the CA is asked, `unavailable` after it failed.
    state: &'static str,
    /// Certificates in the chain presented to peers, leaf included.
    chain_length: usize,
    /// The chain presented to peers (leaf, then intermediates) and the trust roots, each as
    /// read from the certificate itself.
    chain: Vec<CertDetail>,
    roots: Vec<CertDetail>,
    /// Why the CA gave no certificate, and when it is asked again.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_in_ms: Option<u64>,
}

/// One X.509 certificate of a chain or of the roots.
#[derive(Serialize)]
struct CertDetail {
    /// `Leaf`, `Intermediate` or `Root`.
    kind: &'static str,
    serial: String,
    subject: String,
    not_before: String,
    not_after: String,
}

impl CertDetail {
    /// Reads a DER certificate; `None` if it cannot be parsed (it came from our own CA or
    /// the CA client, which parsed it already, so this is not expected).
    fn parse(kind: &'static str, der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let time = |t: x509_parser::time::ASN1Time| {
            let secs = u64::try_from(t.timestamp()).unwrap_or_default();
            rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        };
        Some(CertDetail {
            kind,
            serial: cert.raw_serial_as_string().replace(':', ""),
            subject: cert.subject().to_string(),
            not_before: time(cert.validity().not_before),
            not_after: time(cert.validity().not_after),
        })
    }
}

/// `/certs`: the workload certificates held, by identity; `pending` adds the identities still
/// waiting for one.
pub(super) fn certs(held: &[Arc<TlsSettings>], pending: &[PendingCert]) -> String {
    let now = SystemTime::now();
    let mut views: Vec<CertView> = held
        .iter()
        .map(|s| {
            let cert = &s.cert;
            let chain = cert
                .chain
                .iter()
                .enumerate()
                .filter_map(|(i, der)| CertDetail::parse(if i == 0 { "Leaf" } else { "Intermediate" }, der))
                .collect();
            CertView {
                identity: cert.identity.to_string(),
                serial: Some(&cert.serial),
                not_before: Some(rfc3339(cert.not_before)),
                not_after: Some(rfc3339(cert.not_after)),
                refresh_at: Some(rfc3339(cert.refresh_at())),
                state: if cert.not_after > now { "valid" } else { "expired" },
                chain_length: cert.chain.len(),
                chain,
                roots: cert.roots.iter().filter_map(|der| CertDetail::parse("Root", der)).collect(),
                error: None,
                retry_in_ms: None,
            }
        })
        .collect();
    views.extend(pending.iter().map(|p| CertView {
        identity: p.identity.to_string(),
        serial: None,
        not_before: None,
        not_after: None,
        refresh_at: None,
        state: if p.failures > 0 { "unavailable" } else { "initializing" },
        chain_length: 0,
        chain: Vec::new(),
        roots: Vec::new(),
        error: p.last_error.clone(),
        retry_in_ms: p.retry_in.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    }));
    views.sort_by(|a, b| (&a.identity, a.serial.is_none()).cmp(&(&b.identity, b.serial.is_none())));
    serde_json::to_string_pretty(&views).unwrap_or_else(|e| error_json(&e))
}

pub(super) fn error_json(e: &serde_json::Error) -> String {
    serde_json::json!({ "error": e.to_string() }).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::identity::{Identity, LocalCa};

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(query_param("level=debug", "level").as_deref(), Some("debug"));
        assert_eq!(query_param("x=1&level=info%2Cstrait%3Dtrace", "level").as_deref(), Some("info,strait=trace"));
        assert_eq!(query_param("levels=debug", "level"), None);
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%41"), "%zzA");
    }

    fn model(yaml: &str) -> Model {
        crate::model::compile_clean(yaml)
    }

    #[test]
    fn workloads_show_identity_and_capture_state() {
        let model = model(
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: web-5f7c9-abcde, namespace: shop, labels: {pod-template-hash: 5f7c9, app: web}}\n\
             spec: {nodeName: node1, serviceAccountName: web}\nstatus: {podIP: 10.1.0.10}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: shop, labels: {istio.io/dataplane-mode: none}}\n\
             spec: {nodeName: node2}\nstatus: {podIP: 10.2.0.10}\n",
        );
        let json: serde_json::Value = serde_json::from_str(&workloads(&model, "node1", "cluster.local")).expect("JSON");
        let list = json.as_array().expect("a list");
        assert_eq!(list.len(), 2, "{json}");
        let web = &list[0];
        assert_eq!(web["name"], "web-5f7c9-abcde");
        assert_eq!(web["workload_name"], "web");
        assert_eq!(web["canonical_service"], "web");
        assert_eq!(web["identity"], "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!((web["local"].as_bool(), web["capture"].as_str()), (Some(true), Some("captured")));
        let db = &list[1];
        assert_eq!(db["identity"], "spiffe://cluster.local/ns/shop/sa/default");
        assert_eq!((db["local"].as_bool(), db["capture"].as_str()), (Some(false), Some("not_enrolled")));
    }

    #[test]
    fn certs_show_serial_and_validity() {
        let dir = std::env::temp_dir().join(format!("strait-admin-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = LocalCa::load_or_create(&dir, "cluster.local").expect("ca");
        let issued =
            ca.issue_local(&Identity::new("cluster.local", "shop", "web"), Duration::from_secs(3600)).expect("cert");
        let serial = issued.serial.clone();
        let settings = Arc::new(TlsSettings::new(Arc::new(issued)).expect("tls"));
        let json: serde_json::Value = serde_json::from_str(&certs(&[settings], &[])).expect("JSON");
        let _ = std::fs::remove_dir_all(&dir);
        let cert = &json[0];
        assert_eq!(cert["identity"], "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(cert["serial"], serial.as_str());
        assert_eq!(cert["state"], "valid");
        for field in ["not_before", "not_after", "refresh_at"] {
            assert!(cert[field].as_str().is_some_and(|t| t.ends_with('Z')), "{field}: {cert}");
        }
        assert!(cert["not_before"].as_str() < cert["refresh_at"].as_str());
        assert!(cert["refresh_at"].as_str() < cert["not_after"].as_str());
        assert_eq!(cert["chain"][0]["kind"], "Leaf");
        assert_eq!(cert["chain"][0]["serial"], serial.as_str(), "read back from the certificate");
        let seconds = |v: &serde_json::Value| v.as_str().and_then(|t| t.get(..19)).map(str::to_owned);
        assert_eq!(seconds(&cert["chain"][0]["not_after"]), seconds(&cert["not_after"]), "X.509 keeps whole seconds");
        assert_eq!(
            (cert["roots"][0]["kind"].as_str(), cert["roots"][0]["subject"].as_str()),
            (Some("Root"), Some("O=cluster.local, CN=strait root CA"))
        );
    }

    #[test]
    fn certs_of_pending_identities_say_why() {
        let pending = [
            PendingCert {
                identity: Identity::new("cluster.local", "shop", "new"),
                failures: 0,
                last_error: None,
                retry_in: None,
            },
            PendingCert {
                identity: Identity::new("cluster.local", "shop", "db"),
                failures: 2,
                last_error: Some("the CA refused".into()),
                retry_in: Some(Duration::from_millis(1500)),
            },
        ];
        let json: serde_json::Value = serde_json::from_str(&certs(&[], &pending)).expect("JSON");
        assert_eq!(json[0]["identity"], "spiffe://cluster.local/ns/shop/sa/db");
        assert_eq!(
            (json[0]["state"].as_str(), json[0]["error"].as_str()),
            (Some("unavailable"), Some("the CA refused"))
        );
        assert_eq!((json[0]["retry_in_ms"].as_u64(), json[0]["serial"].as_str()), (Some(1500), None));
        assert_eq!(json[1]["state"], "initializing");
        assert!(json[1].get("error").is_none(), "{json}");
    }
}
