//! Routing compilation tested through the real parser (CFG-1): YAML in, model and diagnostics
//! out. `seeds` replays the traffic-management tasks of the seed docs, `invalid` the mistakes
//! users make, `index` the host and policy lookup rules.

mod index;
mod invalid;
mod seeds;

use std::path::Path;

use crate::{
    config::{Diagnostic, parse_file},
    model::{Model, compile},
};

/// Parses and compiles `yaml` as the file `t.yaml`; parse errors fail the test.
fn compile_yaml(yaml: &str) -> (Model, Vec<Diagnostic>) {
    let (resources, d) = parse_file(Path::new("t.yaml"), yaml);
    assert!(d.is_empty(), "parse: {d:?}");
    compile(&resources)
}

/// Compiles `yaml` and fails the test on any diagnostic at all, but for Gateways missing: the
/// seeds' VirtualServices are tested here without their Gateways (`model::gateways` has those).
fn compile_clean(yaml: &str) -> Model {
    let (model, mut d) = compile_yaml(yaml);
    d.retain(|d| !(d.message.starts_with("Gateway ") && d.message.contains(" does not exist")));
    assert!(d.is_empty(), "{}", d.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"));
    model
}

/// The parser's diagnostics if there are any, else the compiler's.
fn diagnostics(yaml: &str) -> Vec<Diagnostic> {
    let (resources, d) = parse_file(Path::new("t.yaml"), yaml);
    if !d.is_empty() {
        return d;
    }
    compile(&resources).1
}

fn namespace(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n---\n")
}

/// A Service with the given `(port, name)` pairs.
fn service(name: &str, namespace: &str, ports: &[(u16, &str)]) -> String {
    let ports: String =
        ports.iter().map(|(port, port_name)| format!("  - port: {port}\n    name: {port_name}\n")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  selector: {{app: {name}}}\n  ports:\n{ports}---\n"
    )
}

/// A DestinationRule with subsets selecting `version: <subset>`.
fn subsets(name: &str, namespace: &str, versions: &[&str]) -> String {
    let subsets: String =
        versions.iter().map(|v| format!("  - name: {v}\n    labels:\n      version: {v}\n")).collect();
    format!(
        "apiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  host: {name}\n  subsets:\n{subsets}---\n"
    )
}

/// Bookinfo in `default` as the seeds deploy it, with `destination-rule-all.yaml`.
fn bookinfo() -> String {
    [
        namespace("default"),
        service("productpage", "default", &[(9080, "http")]),
        service("reviews", "default", &[(9080, "http")]),
        service("ratings", "default", &[(9080, "http")]),
        service("details", "default", &[(9080, "http")]),
        subsets("productpage", "default", &["v1"]),
        subsets("reviews", "default", &["v1", "v2", "v3"]),
        subsets("ratings", "default", &["v1", "v2"]),
        subsets("details", "default", &["v1", "v2"]),
    ]
    .concat()
}

const REVIEWS: &str = "reviews.default.svc.cluster.local";
const RATINGS: &str = "ratings.default.svc.cluster.local";
