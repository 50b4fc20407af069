//! Waypoints in the model (L4-3): which pods are waypoints, and which services and
//! workloads send their traffic through one.
//!
//! A waypoint named `NAME` in namespace `NS` is the set of pods of `NS` labelled
//! `gateway.networking.k8s.io/gateway-name: NAME`, the label Istio gives the pods of a waypoint
//! Gateway. Those pods are never captured: they speak HBONE themselves. Traffic uses a waypoint
//! when its destination is labelled `istio.io/use-waypoint: NAME` (a service for traffic to its
//! VIP, a pod for traffic to its IP), or else its namespace is; `none` opts out of a namespace's
//! waypoint. `istio.io/use-waypoint-namespace` names a waypoint in another namespace.
//!
//! A Gateway API `Gateway` of a waypoint class (as `strait ctl waypoint apply` writes, and as
//! `strait control --kubernetes` reconciles into a Deployment and a Service named after it)
//! declares the waypoint of its name, and its `istio.io/waypoint-for` label says which traffic
//! it takes, as in Istio: `service` (the default: traffic to service VIPs), `workload` (traffic
//! to pod IPs), `all` or `none`. A waypoint no Gateway declares (pods only, the directory's
//! older way) takes both.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use serde::Serialize;

use super::Workload;
use crate::config::{Diagnostic, Located, Resource};

pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// The label on a waypoint's pods naming their waypoint (set by Istio's waypoint deployment).
pub const WAYPOINT_POD_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The value of `istio.io/use-waypoint` that opts out of the namespace's waypoint.
pub const NO_WAYPOINT: &str = "none";
/// On a waypoint's Gateway: which traffic the waypoint takes.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";

/// Which traffic a waypoint takes (`istio.io/waypoint-for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    pub fn services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }

    pub fn workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

/// The waypoints declared by Gateways, and what each takes. An unknown `istio.io/waypoint-for`
/// is a warning naming the label, and the waypoint takes service traffic, Istio's default.
pub fn declared_waypoints(
    resources: &[Located<Resource>],
    diagnostics: &mut Vec<Diagnostic>,
) -> HashMap<WaypointName, WaypointFor> {
    let mut declared = HashMap::new();
    for located in resources {
        let Resource::Gateway(gateway) = &located.resource else { continue };
        let name = WaypointName {
            namespace: gateway.metadata.namespace_or_default().to_owned(),
            name: gateway.metadata.name.clone(),
        };
        let takes = match gateway.metadata.labels.get(WAYPOINT_FOR_LABEL).map(String::as_str) {
            None | Some("service") => WaypointFor::Service,
            Some("workload") => WaypointFor::Workload,
            Some("all") => WaypointFor::All,
            Some("none") => WaypointFor::None,
            Some(other) => {
                diagnostics.push(Diagnostic::warning(
                    located.origin.clone(),
                    Some(&format!("metadata.labels.{WAYPOINT_FOR_LABEL}")),
                    format!(
                        "unknown value `{other}` (service, workload, all or none); the waypoint takes service traffic"
                    ),
                ));
                WaypointFor::Service
            }
        };
        declared.insert(name, takes);
    }
    declared
}

/// A waypoint's name: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct WaypointName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for WaypointName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One waypoint and the pods that run it.
#[derive(Debug, Serialize)]
pub struct Waypoint {
    pub name: WaypointName,
    pub pods: Vec<Arc<Workload>>,
    /// Round-robin cursor over `pods`.
    #[serde(skip)]
    next: AtomicUsize,
}

impl Waypoint {
    /// The next pod to send to, round robin; `None` when no pod runs the waypoint.
    pub fn pick(&self) -> Option<&Arc<Workload>> {
        if self.pods.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pods.len();
        self.pods.get(i)
    }
}

/// The waypoint a pod belongs to, if it is a waypoint pod.
pub fn waypoint_of_pod(namespace: &str, labels: &BTreeMap<String, String>) -> Option<WaypointName> {
    let name = labels.get(WAYPOINT_POD_LABEL).filter(|n| !n.is_empty())?;
    Some(WaypointName { namespace: namespace.to_owned(), name: name.clone() })
}

/// The waypoint traffic to an object with `labels` in `namespace` (whose labels are
/// `ns_labels`) goes through: the object's own label wins, then the namespace's.
pub fn waypoint_for(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    ns_labels: Option<&BTreeMap<String, String>>,
) -> Option<WaypointName> {
    let chosen = if labels.contains_key(USE_WAYPOINT_LABEL) { Some(labels) } else { ns_labels };
    let labels = chosen?;
    let name = labels.get(USE_WAYPOINT_LABEL).filter(|n| !n.is_empty() && n.as_str() != NO_WAYPOINT)?;
    let namespace = labels.get(USE_WAYPOINT_NAMESPACE_LABEL).map_or(namespace, String::as_str);
    Some(WaypointName { namespace: namespace.to_owned(), name: name.clone() })
}

/// Groups waypoint pods by waypoint.
pub fn collect_waypoints(workloads: &[Arc<Workload>]) -> HashMap<WaypointName, Arc<Waypoint>> {
    let mut pods: BTreeMap<WaypointName, Vec<Arc<Workload>>> = BTreeMap::new();
    for w in workloads {
        if let Some(name) = &w.waypoint_role {
            pods.entry(name.clone()).or_default().push(w.clone());
        }
    }
    pods.into_iter()
        .map(|(name, pods)| (name.clone(), Arc::new(Waypoint { name, pods, next: AtomicUsize::new(0) })))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn object_label_beats_namespace_label() {
        let ns = labels(&[(USE_WAYPOINT_LABEL, "ns-wp")]);
        let name = |n: &str| Some(WaypointName { namespace: "shop".into(), name: n.into() });
        assert_eq!(waypoint_for("shop", &labels(&[]), Some(&ns)), name("ns-wp"));
        assert_eq!(waypoint_for("shop", &labels(&[(USE_WAYPOINT_LABEL, "own")]), Some(&ns)), name("own"));
        assert_eq!(waypoint_for("shop", &labels(&[(USE_WAYPOINT_LABEL, NO_WAYPOINT)]), Some(&ns)), None);
        assert_eq!(waypoint_for("shop", &labels(&[]), None), None);
        let elsewhere = labels(&[(USE_WAYPOINT_LABEL, "shared"), (USE_WAYPOINT_NAMESPACE_LABEL, "infra")]);
        assert_eq!(
            waypoint_for("shop", &elsewhere, None),
            Some(WaypointName { namespace: "infra".into(), name: "shared".into() })
        );
    }

    const MESH: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: reviews\n  namespace: shop\n  labels: {app: reviews}\nstatus:\n  podIP: 10.1.0.10\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: wp-0\n  namespace: shop\n  labels: {gateway.networking.k8s.io/gateway-name: wp}\nstatus:\n  podIP: 10.1.0.20\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\n  namespace: shop\nspec:\n  clusterIP: 10.96.0.30\n  selector: {app: reviews}\n  ports:\n  - {name: http, port: 9080}\n";

    fn gateway(class: &str, waypoint_for: Option<&str>) -> String {
        let labels = waypoint_for.map_or(String::new(), |f| format!("\n  labels: {{istio.io/waypoint-for: {f}}}"));
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: wp\n  namespace: shop{labels}\n\
             spec:\n  gatewayClassName: {class}\n  listeners:\n  - {{name: mesh, port: 15008, protocol: HBONE}}\n"
        )
    }

    /// Whether traffic to the service's VIP, and to the pod's IP, goes through the waypoint.
    fn through_waypoint(yaml: &str) -> (bool, bool) {
        let model = crate::model::compile_clean(yaml);
        let service = model.service_by_host("reviews.shop.svc.cluster.local").expect("the service");
        let pod = model.workload_by_ip("10.1.0.10".parse().expect("ip")).expect("the pod");
        (service.waypoint.is_some(), pod.waypoint.is_some())
    }

    // L4-3: a waypoint's Gateway says which traffic it takes (istio.io/waypoint-for, `service`
    // by default, as istioctl writes it); a waypoint of pods only takes both, as before.
    #[test]
    fn the_gateway_says_which_traffic_the_waypoint_takes() {
        assert_eq!(through_waypoint(MESH), (true, true), "no Gateway: both");
        assert_eq!(through_waypoint(&[MESH, &gateway("istio-waypoint", None)].concat()), (true, false));
        assert_eq!(through_waypoint(&[MESH, &gateway("strait-waypoint", Some("service"))].concat()), (true, false));
        assert_eq!(through_waypoint(&[MESH, &gateway("istio-waypoint", Some("workload"))].concat()), (false, true));
        assert_eq!(through_waypoint(&[MESH, &gateway("istio-waypoint", Some("all"))].concat()), (true, true));
        assert_eq!(through_waypoint(&[MESH, &gateway("istio-waypoint", Some("none"))].concat()), (false, false));
    }

    // A Gateway of another class is not a waypoint's (ignored with a warning, GWAPI-1); an
    // unknown waypoint-for is a warning naming the label.
    #[test]
    fn other_gateways_and_bad_labels_are_told() {
        let path = std::path::Path::new("gw.yaml");
        let (resources, diagnostics) = crate::config::parse_file(path, &[MESH, &gateway("nginx", None)].concat());
        assert!(matches!(resources.last().map(|r| &r.resource), Some(Resource::Other { .. })));
        assert!(diagnostics.iter().any(|d| d.message.contains("not supported yet")), "{diagnostics:?}");
        let (resources, _) =
            crate::config::parse_file(path, &[MESH, &gateway("istio-waypoint", Some("pods"))].concat());
        let (model, diagnostics) = crate::model::compile(&resources);
        let warning = diagnostics.iter().find(|d| d.message.contains("`pods`")).expect("a warning");
        assert_eq!(warning.field.as_deref(), Some("metadata.labels.istio.io/waypoint-for"));
        let service = model.service_by_host("reviews.shop.svc.cluster.local").expect("the service");
        assert!(service.waypoint.is_some(), "service traffic, Istio's default");
    }
}
