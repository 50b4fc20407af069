//! Versions follow content only, so a restarted control plane resends nothing unchanged and a
//! one-pod change is one resource (CFG-3, O(change)).

use std::collections::BTreeSet;

use super::*;

/// (type URL, name, version) of every resource.
fn versions(snapshot: &Snapshot) -> BTreeSet<(String, String, String)> {
    snapshot
        .iter()
        .flat_map(|(t, resources)| resources.values().map(move |r| (t.clone(), r.name.clone(), r.version.clone())))
        .collect()
}

/// The names of resources added, changed or removed between two snapshots.
fn changed(before: &Snapshot, after: &Snapshot) -> BTreeSet<String> {
    let (a, b) = (versions(before), versions(after));
    a.symmetric_difference(&b).map(|(_, name, _)| name.clone()).collect()
}

fn served(yaml: &str) -> Snapshot {
    let (resources, model) = directory_from(yaml);
    snapshot(&model, &resources, "cluster.local")
}

#[test]
fn versions_are_stable_and_follow_content() {
    let first = served(DIRECTORY);
    // A second compilation (a restarted control plane) serves the same versions.
    assert_eq!(versions(&served(DIRECTORY)), versions(&first));
    let total: usize = first.values().map(|r| r.len()).sum();
    assert!(total >= 20, "{total} resources");
    for resources in first.values() {
        for (name, r) in resources {
            assert_eq!((&r.name, r.version.len()), (name, 16), "{name}");
        }
    }
    // Two different resources never share a version by accident of encoding.
    let distinct: BTreeSet<&str> = first.values().flat_map(|r| r.values().map(|r| r.version.as_str())).collect();
    assert_eq!(distinct.len(), total);

    let edited = DIRECTORY.replace("cluster.local/ns/shop/sa/cli*", "cluster.local/ns/shop/sa/clerk");
    assert_eq!(changed(&first, &served(&edited)), BTreeSet::from(["bank/ledger-allow".to_owned()]));
    let edited = DIRECTORY.replace("timeout: 3s", "timeout: 4s");
    assert_eq!(changed(&first, &served(&edited)), BTreeSet::from(["VirtualService/shop/web".to_owned()]));
}

// A pod relabelled, added or removed changes exactly its own Address: services do not list
// their endpoints, policies are listed by the workloads they bind.
#[test]
fn one_pod_change_is_one_resource() {
    let first = served(DIRECTORY);
    let relabelled = DIRECTORY.replace("{app: web, version: v2}", "{app: web, version: v3}");
    assert_eq!(changed(&first, &served(&relabelled)), BTreeSet::from(["Kubernetes//Pod/shop/web-2".to_owned()]));

    let added = format!(
        "{DIRECTORY}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web-3, namespace: shop, labels: {{app: web, version: v1}}}}\n\
         spec:\n  nodeName: n2\n  serviceAccountName: web\n  containers: [{{name: web, ports: [{{name: http, containerPort: 8080}}]}}]\n\
         status: {{podIP: 10.2.0.13}}\n"
    );
    let after = served(&added);
    assert_eq!(changed(&first, &after), BTreeSet::from(["Kubernetes//Pod/shop/web-3".to_owned()]));
    let body = &after[crate::xds::ADDRESS_TYPE_URL]["Kubernetes//Pod/shop/web-3"].body.value;
    assert!(body.len() < 1024, "one pod is {} bytes", body.len());

    let start = DIRECTORY.find("apiVersion: v1\nkind: Pod\nmetadata: {name: client").expect("client pod");
    let end = start + DIRECTORY[start..].find("---\n").expect("end of the pod");
    // Blank lines in its place keep every other resource on its line (origins are content).
    let blank = "\n".repeat(DIRECTORY[start..end].lines().count());
    let removed = format!("{}{blank}{}", &DIRECTORY[..start], &DIRECTORY[end..]);
    assert_eq!(changed(&first, &served(&removed)), BTreeSet::from(["Kubernetes//Pod/shop/client".to_owned()]));
}

/// Figures at the size of `cargo xtask bench control` (10,000 pods, 1,000 services, 500 policies):
/// `cargo test -p strait --release --lib scale_figures -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a test"]
fn scale_figures() {
    use std::{fmt::Write as _, time::Instant};
    let mut yaml = String::new();
    for ns in 0..20 {
        let _ = write!(
            yaml,
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns{ns}\n  labels: {{istio.io/dataplane-mode: ambient}}\n---\n"
        );
    }
    for i in 0..10_000u32 {
        let (ns, app) = (i % 20, i % 1000);
        let ip = format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256);
        let _ = write!(
            yaml,
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: ns{ns}, labels: {{app: a{app}}}}}\n\
             spec: {{nodeName: n{}, serviceAccountName: sa{app}}}\nstatus: {{podIP: {ip}}}\n---\n",
            i % 100
        );
    }
    for s in 0..1000u32 {
        let _ = write!(
            yaml,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: a{s}, namespace: ns{}}}\nspec:\n  clusterIP: 10.96.{}.{}\n  \
             selector: {{app: a{s}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n",
            s % 20,
            s / 256,
            s % 256
        );
    }
    for p in 0..500u32 {
        let _ = write!(
            yaml,
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: pol{p}, namespace: ns{}}}\nspec:\n  \
             selector: {{matchLabels: {{app: a{}}}}}\n  rules: [{{from: [{{source: {{namespaces: [ns{}]}}}}], to: [{{operation: {{ports: [\"8080\"]}}}}]}}]\n---\n",
            p % 20,
            p * 2,
            (p + 1) % 20
        );
    }
    let clock = Instant::now();
    let (resources, model) = directory_from(&yaml);
    let compiled = clock.elapsed();
    let clock = Instant::now();
    let served = snapshot(&model, &resources, "cluster.local");
    let snapshotted = clock.elapsed();
    let bytes: usize = served.values().flat_map(|r| r.values()).map(|r| r.body.value.len()).sum();
    let count: usize = served.values().map(|r| r.len()).sum();
    let received = received_by(&served, &node_proxy("n1"));
    let clock = Instant::now();
    let decoded = model_from_xds(&received, "cluster.local").expect("decodes");
    let rebuilt = clock.elapsed();
    assert_eq!(decoded.workloads.len(), 10_000);
    eprintln!(
        "compile {compiled:?}; snapshot {snapshotted:?} ({count} resources, {bytes} bytes); model_from_xds {rebuilt:?}"
    );
}
