//! Peer authentication (L4-4): whether a workload accepts plaintext, resolved from the mesh-wide,
//! namespace and workload PeerAuthentications the way Istio does.
//!
//! The narrowest policy that sets a mode wins; `UNSET` inherits from the next wider one; a
//! workload policy's `portLevelMtls` (keyed by the pod's target port) overrides for that port;
//! with nothing set the mode is PERMISSIVE.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{Diagnostic, MtlsModeSetting, MutualTls, Origin, PeerAuthentication};
use crate::model::{Model, Workload};

/// The mTLS requirement on inbound traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MtlsMode {
    /// mTLS only: plaintext is refused.
    Strict,
    /// mTLS and plaintext both accepted.
    Permissive,
    /// Plaintext expected. Istio ambient ignores DISABLE (HBONE is always mTLS), so the node
    /// proxy should treat it as PERMISSIVE: accept plaintext, keep mTLS for HBONE.
    Disable,
}

impl MtlsMode {
    /// `None` for UNSET, which inherits.
    fn from_setting(setting: MtlsModeSetting) -> Option<Self> {
        match setting {
            MtlsModeSetting::Unset => None,
            MtlsModeSetting::Strict => Some(MtlsMode::Strict),
            MtlsModeSetting::Permissive => Some(MtlsMode::Permissive),
            MtlsModeSetting::Disable => Some(MtlsMode::Disable),
        }
    }
}

/// The level a PeerAuthentication applies at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PeerAuthnScope {
    /// Root namespace, no selector.
    Mesh,
    /// Any other namespace, no selector.
    Namespace,
    /// Workloads of the policy's namespace carrying these labels.
    Selector(BTreeMap<String, String>),
}

/// One PeerAuthentication, compiled.
#[derive(Debug, Clone, Serialize)]
pub struct PeerAuthn {
    pub name: String,
    pub namespace: String,
    pub scope: PeerAuthnScope,
    /// `None` when UNSET.
    pub mode: Option<MtlsMode>,
    /// Modes by target port; UNSET entries are left out since they change nothing.
    pub port_level: BTreeMap<u16, MtlsMode>,
    #[serde(skip)]
    pub origin: Origin,
}

impl PeerAuthn {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The policies in force for one workload, one per level.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerAuthnChain<'a> {
    pub mesh: Option<&'a PeerAuthn>,
    pub namespace: Option<&'a PeerAuthn>,
    pub workload: Option<&'a PeerAuthn>,
}

/// The mode for inbound traffic to `workload` on `target_port` (the pod's port, after any
/// Service port mapping).
pub fn mode_for(model: &Model, workload: &Workload, target_port: u16) -> MtlsMode {
    resolve(model.peer_authn_for(workload), target_port)
}

/// Istio's precedence over one workload's chain (pure, for tests and for callers that hold
/// the chain already).
pub fn resolve(chain: PeerAuthnChain, target_port: u16) -> MtlsMode {
    let workload_port = chain.workload.and_then(|w| w.port_level.get(&target_port).copied());
    workload_port
        .or(chain.workload.and_then(|w| w.mode))
        .or(chain.namespace.and_then(|n| n.mode))
        .or(chain.mesh.and_then(|m| m.mode))
        .unwrap_or(MtlsMode::Permissive)
}

/// Compiles one PeerAuthentication; `None` on errors, or when Istio would ignore it (a
/// selector in the root namespace), which is reported as a warning.
pub fn compile_peer_authn(
    origin: &Origin,
    pa: &PeerAuthentication,
    root_namespace: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<PeerAuthn> {
    let namespace = pa.metadata.namespace_or_default();
    let labels = pa.spec.selector.as_ref().map(|s| s.match_labels.clone()).unwrap_or_default();
    let mut errors = 0;
    for (k, v) in &labels {
        if k.is_empty() || k.contains('*') || v.contains('*') {
            errors += 1;
            diagnostics.push(Diagnostic::error(
                origin.clone(),
                Some("spec.selector.matchLabels"),
                format!("`{k}: {v}`: label selectors take no empty keys and no wildcards"),
            ));
        }
    }
    let port_level = pa.spec.port_level_mtls.as_ref();
    if labels.is_empty() && port_level.is_some_and(|p| !p.is_empty()) {
        errors += 1;
        diagnostics.push(Diagnostic::error(
            origin.clone(),
            Some("spec.portLevelMtls"),
            "only a workload policy (with a `selector`) can set port-level mTLS; ports belong to pods",
        ));
    }
    if port_level.is_some_and(BTreeMap::is_empty) {
        errors += 1;
        diagnostics.push(Diagnostic::error(
            origin.clone(),
            Some("spec.portLevelMtls"),
            "must have at least one port when present",
        ));
    }
    if errors > 0 {
        return None;
    }
    let scope = match (labels.is_empty(), namespace == root_namespace) {
        (true, true) => PeerAuthnScope::Mesh,
        (true, false) => PeerAuthnScope::Namespace,
        (false, true) => {
            diagnostics.push(Diagnostic::warning(
                origin.clone(),
                Some("spec.selector"),
                format!(
                    "a PeerAuthentication with a selector in the root namespace `{root_namespace}` is ignored, as Istio \
                     ambient does; put it in the workloads' namespace"
                ),
            ));
            return None;
        }
        (false, false) => PeerAuthnScope::Selector(labels),
    };
    let mode = |tls: Option<&MutualTls>| tls.and_then(|t| MtlsMode::from_setting(t.mode));
    Some(PeerAuthn {
        name: pa.metadata.name.clone(),
        namespace: namespace.to_owned(),
        scope,
        mode: mode(pa.spec.mtls.as_ref()),
        port_level: port_level
            .into_iter()
            .flatten()
            .filter_map(|(port, tls)| Some((*port, mode(Some(tls))?)))
            .collect(),
        origin: origin.clone(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse_file;
    use crate::model::compile;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: foo\n---\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: example\n  namespace: foo\n  labels: {app: example-app}\nstatus:\n  podIP: 10.1.0.10\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: other\n  namespace: foo\n  labels: {app: other}\nstatus:\n  podIP: 10.1.0.11\n---\n";

    fn pa(name: &str, namespace: &str, selector: Option<&str>, mode: Option<&str>, ports: &[(u16, &str)]) -> String {
        let mut doc = format!(
            "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n"
        );
        if let Some(app) = selector {
            doc.push_str(&format!("  selector:\n    matchLabels:\n      app: {app}\n"));
        }
        if let Some(mode) = mode {
            doc.push_str(&format!("  mtls:\n    mode: {mode}\n"));
        }
        if !ports.is_empty() {
            doc.push_str("  portLevelMtls:\n");
            for (port, mode) in ports {
                doc.push_str(&format!("    {port}:\n      mode: {mode}\n"));
            }
        }
        doc.push_str("---\n");
        doc
    }

    /// Mode of pod `name` on `port` under `policies`, plus the diagnostics.
    fn mode(policies: &[String], pod: &str, port: u16) -> (MtlsMode, Vec<Diagnostic>) {
        let yaml = [NS, POD].concat() + &policies.concat();
        let (resources, d) = parse_file(Path::new("pa.yaml"), &yaml);
        assert!(d.is_empty(), "{d:?}");
        let (model, diagnostics) = compile(&resources);
        let w = model.workloads.iter().find(|w| w.name == pod).expect("pod");
        (mode_for(&model, w, port), diagnostics)
    }

    // L4-4: mesh → namespace → workload, narrowest set mode wins, UNSET inherits.
    #[test]
    fn precedence_table() {
        use MtlsMode::*;
        let mesh = |m| pa("default", "istio-system", None, m, &[]);
        let ns = |m| pa("ns", "foo", None, m, &[]);
        let wl = |m| pa("wl", "foo", Some("example-app"), m, &[]);
        let cases: Vec<(&str, Vec<String>, MtlsMode)> = vec![
            ("nothing", vec![], Permissive),
            ("mesh strict", vec![mesh(Some("STRICT"))], Strict),
            ("mesh unset", vec![mesh(Some("UNSET"))], Permissive),
            ("mesh without mtls", vec![mesh(None)], Permissive),
            ("namespace beats mesh", vec![mesh(Some("STRICT")), ns(Some("PERMISSIVE"))], Permissive),
            ("namespace unset inherits mesh", vec![mesh(Some("STRICT")), ns(Some("UNSET"))], Strict),
            ("workload beats namespace", vec![ns(Some("STRICT")), wl(Some("DISABLE"))], Disable),
            ("workload unset inherits namespace", vec![ns(Some("STRICT")), wl(None)], Strict),
            ("all unset", vec![mesh(None), ns(None), wl(None)], Permissive),
            ("namespace in another namespace", vec![pa("ns", "bar", None, Some("STRICT"), &[])], Permissive),
        ];
        for (name, policies, expected) in cases {
            let (got, d) = mode(&policies, "example", 8080);
            assert_eq!(got, expected, "{name}");
            assert!(d.iter().all(|d| !d.is_error()), "{name}: {d:?}");
        }
        let (other, _) = mode(&[ns(Some("PERMISSIVE")), wl(Some("STRICT"))], "other", 8080);
        assert_eq!(other, Permissive, "selector narrows to app=example-app");
    }

    // The seed's example-workload-policy: port 80 DISABLE, other ports as the namespace says.
    #[test]
    fn port_level_mtls_table() {
        use MtlsMode::*;
        let ns_strict = pa("example-policy", "foo", None, Some("STRICT"), &[]);
        let seed = pa("example-workload-policy", "foo", Some("example-app"), None, &[(80, "DISABLE")]);
        let cases: Vec<(&str, Vec<String>, u16, MtlsMode)> = vec![
            ("seed: port 80 disabled", vec![ns_strict.clone(), seed.clone()], 80, Disable),
            ("seed: other ports inherit STRICT", vec![ns_strict.clone(), seed.clone()], 8000, Strict),
            (
                "port STRICT under a PERMISSIVE workload",
                vec![pa("w", "foo", Some("example-app"), Some("PERMISSIVE"), &[(9000, "STRICT")])],
                9000,
                Strict,
            ),
            (
                "port UNSET falls back to the workload mode",
                vec![pa("w", "foo", Some("example-app"), Some("STRICT"), &[(9000, "UNSET")])],
                9000,
                Strict,
            ),
            (
                "port PERMISSIVE under mesh STRICT",
                vec![
                    pa("m", "istio-system", None, Some("STRICT"), &[]),
                    pa("w", "foo", Some("example-app"), None, &[(9000, "PERMISSIVE")]),
                ],
                9000,
                Permissive,
            ),
        ];
        for (name, policies, port, expected) in cases {
            assert_eq!(mode(&policies, "example", port).0, expected, "{name}");
        }
    }

    #[test]
    fn conflicts_warn_and_first_in_file_order_wins() {
        let (got, d) = mode(
            &[pa("a", "foo", None, Some("STRICT"), &[]), pa("b", "foo", None, Some("DISABLE"), &[])],
            "example",
            80,
        );
        assert_eq!(got, MtlsMode::Strict);
        assert!(d.iter().any(|d| !d.is_error() && d.message.contains("foo/a")), "{d:?}");
        let (got, d) = mode(
            &[pa("a", "istio-system", None, Some("DISABLE"), &[]), pa("b", "istio-system", None, Some("STRICT"), &[])],
            "example",
            80,
        );
        assert_eq!(got, MtlsMode::Disable);
        assert!(d.iter().any(|d| !d.is_error() && d.message.contains("mesh-wide")), "{d:?}");
        let (got, d) = mode(
            &[
                pa("w1", "foo", Some("example-app"), Some("STRICT"), &[]),
                pa("w2", "foo", Some("example-app"), Some("PERMISSIVE"), &[]),
            ],
            "example",
            80,
        );
        assert_eq!(got, MtlsMode::Strict);
        assert!(d.iter().any(|d| !d.is_error() && d.message.contains("foo/w1")), "{d:?}");
    }

    #[test]
    fn invalid_peer_authentications_are_rejected() {
        let compile_one = |yaml: &str| {
            let (resources, d) = parse_file(Path::new("pa.yaml"), yaml);
            if !d.is_empty() {
                return d;
            }
            compile(&resources).1
        };
        let namespace_with_ports = pa("ns", "foo", None, Some("STRICT"), &[(80, "DISABLE")]);
        let d = compile_one(&namespace_with_ports);
        assert!(d.iter().any(|d| d.is_error() && d.field.as_deref() == Some("spec.portLevelMtls")), "{d:?}");
        let d = compile_one(&pa("ns", "foo", None, Some("STRCT"), &[]));
        assert!(d[0].is_error() && d[0].field.as_deref() == Some("spec.mtls.mode") && d[0].origin.line == 8, "{d:?}");
        let d = compile_one(&pa("w", "foo", Some("x"), None, &[(0, "STRICT")]));
        assert!(d[0].is_error() && d[0].field.as_deref() == Some("spec.portLevelMtls"), "{d:?}");
        let d = compile_one(&pa("w", "istio-system", Some("x"), Some("STRICT"), &[]));
        assert!(d.iter().any(|d| !d.is_error() && d.field.as_deref() == Some("spec.selector")), "{d:?}");
    }
}
