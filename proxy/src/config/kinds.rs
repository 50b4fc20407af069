//! What strait makes of each `apiVersion`/`kind` it does not read: the kinds of Istio and of
//! the Gateway API it does not implement yet are ignored with one warning each (never silently,
//! and never by rejecting the whole directory, CFG-1); a misspelt kind or version of a group it
//! reads is an error, as Istio's API server would refuse it; foreign kinds pass quietly, so a
//! directory shared with other tools still loads.

/// API versions strait reads (SPEC conventions).
pub const NETWORKING: [&str; 3] =
    ["networking.istio.io/v1alpha3", "networking.istio.io/v1beta1", "networking.istio.io/v1"];
pub const SECURITY: [&str; 2] = ["security.istio.io/v1beta1", "security.istio.io/v1"];
/// The versions of the Gateway API's `Gateway` read when its class is a waypoint's.
pub const GATEWAY_API: [&str; 3] =
    ["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1", "gateway.networking.k8s.io/v1alpha2"];

/// Istio kinds, by API group, with the versions Istio serves them in. The ones strait reads
/// are matched before this table is consulted.
const ISTIO_GROUPS: [(&str, &[&str], &[&str]); 5] = [
    (
        "networking.istio.io",
        &["v1alpha3", "v1beta1", "v1"],
        &[
            "VirtualService",
            "DestinationRule",
            "Gateway",
            "ServiceEntry",
            "Sidecar",
            "EnvoyFilter",
            "WorkloadEntry",
            "WorkloadGroup",
            "ProxyConfig",
        ],
    ),
    ("security.istio.io", &["v1beta1", "v1"], &["AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication"]),
    ("telemetry.istio.io", &["v1alpha1", "v1"], &["Telemetry"]),
    ("extensions.istio.io", &["v1alpha1"], &["WasmPlugin"]),
    // istioctl's installation resources (IstioOperator; IstioControlPlane before Istio 1.5).
    ("install.istio.io", &["v1alpha1", "v1alpha2"], &["IstioOperator", "IstioControlPlane"]),
];

/// Istio APIs that no longer exist, with what replaced them. Their resources are errors, not
/// warnings: an ignored `ServiceRole` or mTLS `Policy` would leave a hole the user believes
/// closed.
const REMOVED_GROUPS: [(&str, &str); 3] = [
    ("rbac.istio.io", "was removed in Istio 1.6; write an AuthorizationPolicy (security.istio.io/v1) instead"),
    (
        "authentication.istio.io",
        "was removed in Istio 1.6; write a PeerAuthentication or RequestAuthentication (security.istio.io/v1) \
         instead",
    ),
    ("config.istio.io", "belongs to Mixer, which was removed in Istio 1.8; use Telemetry and AuthorizationPolicy"),
];

/// The Kubernetes Gateway API (stable and experimental groups): not implemented yet (GWAPI-1).
const GATEWAY_API_GROUPS: [&str; 2] = ["gateway.networking.k8s.io", "gateway.networking.x-k8s.io"];

/// Kubernetes controllers that create pods. The local directory describes pods directly, so a
/// controller in it is most likely a manifest copied from a tutorial.
const POD_CONTROLLERS: [(&str, &str); 7] = [
    ("apps", "Deployment"),
    ("apps", "StatefulSet"),
    ("apps", "DaemonSet"),
    ("apps", "ReplicaSet"),
    ("batch", "Job"),
    ("batch", "CronJob"),
    ("", "ReplicationController"),
];

/// What to do with a document of a kind strait does not read.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep quietly: a kind of another tool.
    Foreign,
    /// Keep, with this warning (its text follows "<Kind> ns/name: ").
    Ignored(String),
    /// Reject the document, naming the field (`apiVersion` or `kind`).
    Invalid { field: &'static str, message: String },
}

/// Decides for `apiVersion`/`kind`, given the versions and kinds strait reads already matched.
pub fn classify(api_version: &str, kind: &str) -> Verdict {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    if let Some((_, versions, kinds)) = ISTIO_GROUPS.iter().find(|(g, ..)| *g == group) {
        if !versions.contains(&version) {
            let served: Vec<String> = versions.iter().map(|v| format!("{group}/{v}")).collect();
            return Verdict::Invalid {
                field: "apiVersion",
                message: format!("unknown API version `{api_version}`; Istio serves {}", served.join(", ")),
            };
        }
        if !kinds.contains(&kind) {
            return Verdict::Invalid {
                field: "kind",
                message: format!("unknown kind `{kind}` in {api_version}; it has {}", kinds.join(", ")),
            };
        }
        if group == "install.istio.io" {
            return Verdict::Ignored("installs Istio with istioctl; strait does not read it; ignored".into());
        }
        return Verdict::Ignored(not_yet(group, kind));
    }
    if let Some((_, why)) = REMOVED_GROUPS.iter().find(|(g, _)| *g == group) {
        return Verdict::Invalid { field: "apiVersion", message: format!("`{group}` {why}") };
    }
    if group.contains("istio.io") {
        let groups: Vec<&str> = ISTIO_GROUPS.iter().map(|(g, ..)| *g).collect();
        return Verdict::Invalid {
            field: "apiVersion",
            message: format!("unknown Istio API group `{group}`; Istio's are {}", groups.join(", ")),
        };
    }
    if GATEWAY_API_GROUPS.contains(&group) {
        return Verdict::Ignored(not_yet(group, kind));
    }
    if POD_CONTROLLERS.contains(&(group, kind)) {
        return Verdict::Ignored(
            "strait's directory source reads Pods (with `spec.nodeName` and `status.podIP`), not the \
             controllers that create them; ignored"
                .into(),
        );
    }
    Verdict::Foreign
}

/// The warning for a kind strait will implement but does not yet, with what to do meanwhile
/// where there is something.
fn not_yet(group: &str, kind: &str) -> String {
    let hint = match (group, kind) {
        ("gateway.networking.k8s.io", "Gateway") => {
            " (only Gateways of class istio-waypoint or strait-waypoint are read: they declare waypoints, whose \
             pods are labelled `gateway.networking.k8s.io/gateway-name: NAME` and run `strait waypoint --name NAME`)"
        }
        ("gateway.networking.k8s.io", "HTTPRoute") => " (route with a VirtualService meanwhile)",
        ("telemetry.istio.io", _) => " (strait's metrics and access logs are always on, with Istio's names)",
        _ => "",
    };
    format!("not supported yet; ignored{hint}")
}

/// Kinds that are not namespaced, whose names print without one.
pub fn is_cluster_scoped(kind: &str) -> bool {
    matches!(kind, "Namespace" | "GatewayClass" | "Node" | "ClusterRole" | "ClusterRoleBinding")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unimplemented_istio_and_gateway_api_kinds_are_ignored_with_a_warning() {
        for (api_version, kind) in [
            ("networking.istio.io/v1alpha3", "Gateway"),
            ("networking.istio.io/v1beta1", "Sidecar"),
            ("networking.istio.io/v1alpha3", "EnvoyFilter"),
            ("networking.istio.io/v1", "WorkloadEntry"),
            ("networking.istio.io/v1", "WorkloadGroup"),
            ("networking.istio.io/v1beta1", "ProxyConfig"),
            ("telemetry.istio.io/v1", "Telemetry"),
            ("telemetry.istio.io/v1alpha1", "Telemetry"),
            ("extensions.istio.io/v1alpha1", "WasmPlugin"),
            ("gateway.networking.k8s.io/v1", "HTTPRoute"),
            ("gateway.networking.k8s.io/v1", "Gateway"),
            ("gateway.networking.k8s.io/v1alpha2", "TCPRoute"),
            ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant"),
        ] {
            let Verdict::Ignored(message) = classify(api_version, kind) else {
                panic!("{api_version} {kind}: {:?}", classify(api_version, kind))
            };
            assert!(message.starts_with("not supported yet; ignored"), "{kind}: {message}");
        }
        assert!(matches!(classify("install.istio.io/v1alpha1", "IstioOperator"), Verdict::Ignored(_)));
        assert!(matches!(classify("apps/v1", "Deployment"), Verdict::Ignored(_)));
    }

    #[test]
    fn misspelt_istio_kinds_and_versions_are_errors() {
        let field = |a, k| match classify(a, k) {
            Verdict::Invalid { field, .. } => field,
            other => panic!("{a} {k}: {other:?}"),
        };
        assert_eq!(field("networking.istio.io/v1", "VirtualSevice"), "kind");
        assert_eq!(field("telemetry.istio.io/v1", "Telemetries"), "kind");
        assert_eq!(field("networking.istio.io/v2", "Gateway"), "apiVersion");
        assert_eq!(field("rbac.istio.io/v1alpha1", "ServiceRole"), "apiVersion");
        assert_eq!(field("authentication.istio.io/v1alpha1", "Policy"), "apiVersion");
        assert_eq!(field("networking.istio.io.example/v1", "Thing"), "apiVersion");
    }

    #[test]
    fn foreign_kinds_pass_quietly() {
        for (api_version, kind) in [("v1", "ConfigMap"), ("v1", "ServiceAccount"), ("example.com/v1", "Widget")] {
            assert_eq!(classify(api_version, kind), Verdict::Foreign);
        }
    }
}
