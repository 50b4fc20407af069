//! Waypoints in the model (L4-3): which pods are waypoints, and which services and
//! workloads send their traffic through one.
//!
//! A waypoint named `NAME` in namespace `NS` is the set of pods of `NS` labelled
//! `gateway.networking.k8s.io/gateway-name: NAME`, the label Istio gives the pods of a waypoint
//! Gateway. Those pods are never captured: they speak HBONE themselves. Traffic uses a waypoint
//! when its destination is labelled `istio.io/use-waypoint: NAME` (a service for traffic to its
//! VIP, a pod for traffic to its IP), or else its namespace is; `none` opts out of a namespace's
//! waypoint. `istio.io/use-waypoint-namespace` names a waypoint in another namespace.

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

pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// The label on a waypoint's pods naming their waypoint (set by Istio's waypoint deployment).
pub const WAYPOINT_POD_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The value of `istio.io/use-waypoint` that opts out of the namespace's waypoint.
pub const NO_WAYPOINT: &str = "none";

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
}
