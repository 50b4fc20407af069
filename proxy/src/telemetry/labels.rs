//! Istio's standard metric labels (OBS-1), derived from what a `ConnectionRecord` knows.
//!
//! Dashboards and Kiali group traffic by these labels, so their names and values follow Istio:
//! a workload is named after its controller (a Deployment, not the pod), a canonical service and
//! revision come from the well-known labels, and whatever is not known is `unknown`.

use std::fmt;

use prometheus_client::encoding::{EncodeLabel as _, EncodeLabelSet, LabelSetEncoder};

use super::{ConnectionRecord, Outcome};
use crate::model::{Service, Workload};

/// What Istio writes for a label whose value is not known.
pub const UNKNOWN: &str = "unknown";
/// Response flags of a connection the proxy served as asked.
pub const NO_FLAGS: &str = "-";
/// The cluster name Istio uses when none is configured (`CLUSTER_ID`).
pub const DEFAULT_CLUSTER: &str = "Kubernetes";

/// Which proxy reports the connection: the client's (`source`) or the server's (`destination`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
    /// A waypoint, between the two (Istio ambient's `reporter="waypoint"`).
    Waypoint,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Waypoint => "waypoint",
        }
    }
}

/// Labels describing one end of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerLabels {
    pub workload: String,
    pub namespace: String,
    /// The SPIFFE identity (`spiffe://td/ns/x/sa/y`), as Istio writes principals in metrics.
    pub principal: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: &'static str,
}

impl PeerLabels {
    pub fn new(workload: Option<&Workload>, identity: Option<&str>) -> Self {
        let principal = identity.unwrap_or(UNKNOWN).to_owned();
        match workload {
            Some(w) => Self {
                workload: workload_name(w).to_owned(),
                namespace: w.namespace.clone(),
                principal,
                canonical_service: canonical_service(w).to_owned(),
                canonical_revision: canonical_revision(w).to_owned(),
                cluster: DEFAULT_CLUSTER,
            },
            None => Self {
                workload: UNKNOWN.to_owned(),
                namespace: UNKNOWN.to_owned(),
                principal,
                canonical_service: UNKNOWN.to_owned(),
                canonical_revision: UNKNOWN.to_owned(),
                cluster: UNKNOWN,
            },
        }
    }
}

/// The full label set of Istio's TCP metrics for one connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    pub source: PeerLabels,
    pub destination: PeerLabels,
    /// Hostname, namespace and name of the service the client addressed.
    pub destination_service: [String; 3],
    pub response_flags: &'static str,
    /// `mutual_tls` or `none`.
    pub security_policy: &'static str,
}

impl TrafficLabels {
    /// Labels for `record` as its connection opens: response flags `-` (the closed counter
    /// gets the final ones).
    pub fn of(record: &ConnectionRecord) -> Self {
        let reporter = Self::reporter_of(record);
        let destination_service = match &record.destination_service {
            Some(s) => service_labels(s),
            None => [UNKNOWN.to_owned(), UNKNOWN.to_owned(), UNKNOWN.to_owned()],
        };
        Self {
            reporter,
            source: PeerLabels::new(record.source_workload.as_deref(), record.source_identity.as_deref()),
            destination: PeerLabels::new(
                record.destination_workload.as_deref(),
                record.destination_identity.as_deref(),
            ),
            destination_service,
            response_flags: NO_FLAGS,
            security_policy: record.security,
        }
    }
}

impl TrafficLabels {
    /// Who reports a connection: the destination's proxy for inbound ones.
    pub fn reporter_of(record: &ConnectionRecord) -> Reporter {
        match record.direction {
            "inbound" => Reporter::Destination,
            "waypoint" => Reporter::Waypoint,
            _ => Reporter::Source,
        }
    }
}

fn service_labels(service: &Service) -> [String; 3] {
    [service.hostname.clone(), service.namespace.clone(), service.name.clone()]
}

/// The labels Istio's TCP and request metrics share, in Istio's order; `app` and `version`
/// repeat the canonical service and revision as ztunnel does.
pub(super) fn endpoint_labels<'a>(
    reporter: Reporter,
    s: &'a PeerLabels,
    d: &'a PeerLabels,
    destination_service: &'a [String; 3],
) -> [(&'static str, &'a str); 20] {
    let [service, service_namespace, service_name] = destination_service;
    [
        ("reporter", reporter.as_str()),
        ("source_workload", &s.workload),
        ("source_canonical_service", &s.canonical_service),
        ("source_canonical_revision", &s.canonical_revision),
        ("source_workload_namespace", &s.namespace),
        ("source_principal", &s.principal),
        ("source_app", &s.canonical_service),
        ("source_version", &s.canonical_revision),
        ("source_cluster", s.cluster),
        ("destination_service", service),
        ("destination_service_namespace", service_namespace),
        ("destination_service_name", service_name),
        ("destination_workload", &d.workload),
        ("destination_canonical_service", &d.canonical_service),
        ("destination_canonical_revision", &d.canonical_revision),
        ("destination_workload_namespace", &d.namespace),
        ("destination_principal", &d.principal),
        ("destination_app", &d.canonical_service),
        ("destination_version", &d.canonical_revision),
        ("destination_cluster", d.cluster),
    ]
}

impl EncodeLabelSet for TrafficLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        let shared = endpoint_labels(self.reporter, &self.source, &self.destination, &self.destination_service);
        let own = [
            ("request_protocol", "tcp"),
            ("response_flags", self.response_flags),
            ("connection_security_policy", self.security_policy),
        ];
        for label in shared.into_iter().chain(own) {
            label.encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

impl Outcome {
    /// Response flags as ztunnel reports them: `-` when the proxy did its job (a connection
    /// that breaks later is the peers' business), `DENY` when it refused, `CONNECT` when the
    /// upstream could not be reached.
    pub fn response_flags(&self) -> &'static str {
        match self {
            Outcome::Completed | Outcome::Broken(_) => NO_FLAGS,
            Outcome::Refused(_) => "DENY",
            Outcome::UpstreamConnectFailed(_) => "CONNECT",
        }
    }
}

/// The workload a pod belongs to, as Istio names it: the Deployment for a pod of a ReplicaSet
/// (`web-7d4b9c8f6-x2x9z` with `pod-template-hash=7d4b9c8f6` → `web`), else the pod itself.
pub fn workload_name(w: &Workload) -> &str {
    w.labels
        .get("pod-template-hash")
        .filter(|hash| !hash.is_empty())
        .and_then(|hash| {
            let cut = w.name.find(&format!("-{hash}-"))?;
            Some(&w.name[..cut]).filter(|name| !name.is_empty())
        })
        .unwrap_or(&w.name)
}

/// Istio's canonical service: the first of its own label, `app.kubernetes.io/name` and `app`,
/// falling back to the workload name.
pub fn canonical_service(w: &Workload) -> &str {
    ["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|key| w.labels.get(*key))
        .map_or_else(|| workload_name(w), String::as_str)
}

/// Istio's canonical revision: its own label, `app.kubernetes.io/version` or `version`, else
/// `latest`.
pub fn canonical_revision(w: &Workload) -> &str {
    ["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"]
        .iter()
        .find_map(|key| w.labels.get(*key))
        .map_or("latest", String::as_str)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    type Labels<'a> = &'a [(&'a str, &'a str)];

    fn pod(name: &str, labels: Labels) -> Workload {
        Workload {
            service_account: "web".into(),
            node: Some("node1".into()),
            labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            ..crate::telemetry::test_workload("shop", name)
        }
    }

    #[test]
    fn workload_names_follow_the_controller() {
        let cases: [(&str, Labels, &str); 5] = [
            ("web-7d4b9c8f6-x2x9z", &[("pod-template-hash", "7d4b9c8f6")], "web"),
            ("my-web-7d4b9c8f6-x2x9z", &[("pod-template-hash", "7d4b9c8f6")], "my-web"),
            ("web-x2x9z", &[("pod-template-hash", "7d4b9c8f6")], "web-x2x9z"),
            ("client", &[], "client"),
            ("7d4b9c8f6-x", &[("pod-template-hash", "7d4b9c8f6")], "7d4b9c8f6-x"),
        ];
        for (name, labels, expected) in cases {
            assert_eq!(workload_name(&pod(name, labels)), expected, "{name} {labels:?}");
        }
    }

    #[test]
    fn canonical_service_and_revision_prefer_istio_labels() {
        let cases: [(Labels, &str, &str); 4] = [
            (&[], "web-0", "latest"),
            (&[("app", "web"), ("version", "v1")], "web", "v1"),
            (
                &[("app", "web"), ("app.kubernetes.io/name", "shop-web"), ("app.kubernetes.io/version", "2")],
                "shop-web",
                "2",
            ),
            (
                &[
                    ("app", "web"),
                    ("service.istio.io/canonical-name", "front"),
                    ("service.istio.io/canonical-revision", "r3"),
                ],
                "front",
                "r3",
            ),
        ];
        for (labels, service, revision) in cases {
            let w = pod("web-0", labels);
            assert_eq!((canonical_service(&w), canonical_revision(&w)), (service, revision), "{labels:?}");
        }
    }

    #[test]
    fn labels_of_an_outbound_mesh_connection() {
        let mut r = ConnectionRecord::start(
            "outbound",
            "10.1.0.10:40000".parse().expect("addr"),
            "10.2.0.10:80".parse().expect("addr"),
        );
        r.source_workload =
            Some(Arc::new(pod("client-5f7c9-abcde", &[("pod-template-hash", "5f7c9"), ("app", "client")])));
        r.source_identity = Some("spiffe://cluster.local/ns/shop/sa/client".into());
        r.destination_identity = Some("spiffe://cluster.local/ns/shop/sa/web".into());
        r.security = "mutual_tls";
        let labels = TrafficLabels::of(&r);
        assert_eq!(labels.reporter, Reporter::Source);
        assert_eq!(labels.source.workload, "client");
        assert_eq!(labels.source.namespace, "shop");
        assert_eq!(labels.source.canonical_service, "client");
        assert_eq!(labels.source.cluster, DEFAULT_CLUSTER);
        assert_eq!(labels.source.principal, "spiffe://cluster.local/ns/shop/sa/client");
        assert_eq!(labels.destination.workload, UNKNOWN);
        assert_eq!(labels.destination.principal, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(labels.destination_service, [UNKNOWN, UNKNOWN, UNKNOWN]);
        assert_eq!((labels.response_flags, labels.security_policy), ("-", "mutual_tls"));

        r.direction = "inbound";
        r.outcome = Outcome::Refused("no".into());
        let refused = TrafficLabels::of(&r);
        assert_eq!((refused.reporter, refused.response_flags), (Reporter::Destination, "-"), "flags come at close");
    }

    #[test]
    fn response_flags_as_ztunnel() {
        let cases = [
            (Outcome::Completed, "-"),
            (Outcome::Broken("reset".into()), "-"),
            (Outcome::Refused("reserved port".into()), "DENY"),
            (Outcome::UpstreamConnectFailed("connection refused".into()), "CONNECT"),
        ];
        for (outcome, flags) in cases {
            assert_eq!(outcome.response_flags(), flags, "{outcome:?}");
        }
    }

    #[test]
    fn encodes_every_istio_label_in_order() {
        let r = ConnectionRecord::start(
            "outbound",
            "10.1.0.10:40000".parse().expect("addr"),
            "10.2.0.10:80".parse().expect("addr"),
        );
        let mut text = String::new();
        let mut registry = prometheus_client::registry::Registry::default();
        let family = prometheus_client::metrics::family::Family::<
            TrafficLabels,
            prometheus_client::metrics::counter::Counter,
        >::default();
        registry.register("istio_tcp_connections_opened", "help", family.clone());
        family.get_or_create(&TrafficLabels::of(&r)).inc();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let sample = text.lines().find(|l| l.starts_with("istio_tcp_connections_opened_total{")).expect(&text);
        let keys: Vec<&str> =
            sample.split(['{', ',']).skip(1).filter_map(|kv| kv.split_once('=').map(|(k, _)| k)).collect();
        assert_eq!(keys.len(), 23, "{sample}");
        assert_eq!(keys[0], "reporter");
        assert!(sample.contains("reporter=\"source\""), "{sample}");
        assert!(sample.contains("request_protocol=\"tcp\""), "{sample}");
        assert!(sample.contains("connection_security_policy=\"none\""), "{sample}");
        assert!(sample.ends_with("} 1"), "{sample}");
    }
}
