//! Multi-document YAML to typed resources, with file:line on every resource and error.

use std::{fmt, path::Path, sync::Arc};

use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess};
use serde::{Deserialize, Deserializer};

use super::kinds::{self, GATEWAY_API, NETWORKING, SECURITY, Verdict};
use super::syntax::{explain, normalize_indentation};
use super::{DISCOVERY, Diagnostic, Located, Origin, Resource, mesh, positions};

/// What every document has: its type, its name, and which other top-level fields it carries
/// (read without deserializing them).
#[derive(Default)]
struct TypeMeta {
    api_version: Option<String>,
    kind: Option<String>,
    name: Option<String>,
    namespace: Option<String>,
    /// Top-level keys besides `apiVersion`, `kind` and `metadata`.
    others: Vec<String>,
}

impl<'de> Deserialize<'de> for TypeMeta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = TypeMeta;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a resource: a mapping with `apiVersion`, `kind` and `metadata`")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TypeMeta, A::Error> {
                let mut meta = TypeMeta::default();
                while let Some(key) = map.next_key::<serde_yaml_ng::Value>()? {
                    match key.as_str() {
                        Some("apiVersion") => meta.api_version = map.next_value()?,
                        Some("kind") => meta.kind = map.next_value()?,
                        Some("metadata") => {
                            // Read leniently: the kind's own type checks it where it matters.
                            let metadata: serde_yaml_ng::Value = map.next_value()?;
                            let text = |field: &str| metadata.get(field).and_then(|v| v.as_str()).map(str::to_owned);
                            meta.name = text("name");
                            meta.namespace = text("namespace");
                        }
                        other => {
                            meta.others.push(other.map_or_else(|| format!("{key:?}"), str::to_owned));
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(meta)
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// Parses one file's text. Returns the resources and the diagnostics found; a file with any
/// error diagnostic must not be applied.
pub fn parse_file(file: &Path, text: &str) -> (Vec<Located<Resource>>, Vec<Diagnostic>) {
    let (text, nbsp_lines) = normalize_indentation(text);
    let mut resources = Vec::new();
    let mut diagnostics = Vec::new();
    if let Some(first) = nbsp_lines.first() {
        diagnostics.push(Diagnostic::warning(
            Origin::new(file, *first),
            None,
            format!(
                "{} line(s) from here are indented with non-breaking spaces (U+00A0), as text copied from a web \
                 page often is; strait reads them as spaces, but kubectl would reject this file",
                nbsp_lines.len()
            ),
        ));
    }
    for (first_line, doc) in split_documents(&text) {
        if is_blank(doc) {
            continue;
        }
        let origin = Origin::new(file, first_line);
        match parse_document(file, first_line, doc) {
            Ok((resource, warnings)) => {
                let document = resource.forwarded_as_written().then(|| Arc::from(doc));
                resources.push(Located { origin, resource, document });
                diagnostics.extend(warnings);
            }
            Err(diagnostic) => diagnostics.push(diagnostic),
        }
    }
    positions::locate(&mut diagnostics, file, &text);
    (resources, diagnostics)
}

/// Splits YAML text at `---` lines, returning each document with the 1-based line its
/// content starts on. (A `---` inside a block scalar is indented, so it never matches.)
pub(super) fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start_byte = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") {
            docs.push((start_line, &text[start_byte..offset]));
            start_byte = offset + line.len();
            start_line = index + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start_byte..]));
    docs
}

fn is_blank(doc: &str) -> bool {
    doc.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "..."
    })
}

/// Typographic quotes, which documents converted by word processors or PDF tools carry and
/// YAML does not read as quotes.
const CURLY_QUOTES: [char; 4] = ['\u{201c}', '\u{201d}', '\u{2018}', '\u{2019}'];

/// One document: the resource, and warnings about it (a kind strait ignores).
fn parse_document(file: &Path, first_line: usize, doc: &str) -> Result<(Resource, Vec<Diagnostic>), Diagnostic> {
    let meta: TypeMeta = from_yaml(file, first_line, doc)?;
    let origin = Origin::new(file, first_line);
    let error = |field: &str, message: String| Diagnostic::error(origin.clone(), Some(field), message);
    let missing = "missing; every document needs `apiVersion` and `kind`";
    let api_version = meta.api_version.clone().ok_or_else(|| error("apiVersion", missing.into()))?;
    let kind = meta.kind.clone().ok_or_else(|| error("kind", missing.into()))?;
    for (field, value) in [("apiVersion", &api_version), ("kind", &kind)] {
        if value.contains(CURLY_QUOTES) {
            return Err(error(
                field,
                format!(
                    "`{value}` is written with typographic quotes (“ ” ‘ ’), which YAML reads as text; use \" or '"
                ),
            ));
        }
    }
    let reads = matches!((api_version.as_str(), kind.as_str()), ("v1", "Namespace" | "Pod" | "Service"))
        || (SECURITY.contains(&api_version.as_str())
            && matches!(kind.as_str(), "AuthorizationPolicy" | "PeerAuthentication" | "RequestAuthentication"))
        || (NETWORKING.contains(&api_version.as_str())
            && matches!(kind.as_str(), "VirtualService" | "DestinationRule" | "ServiceEntry"));
    if reads {
        // Before the typed parse, whose complaint about a flattened document (`spec` empty, a
        // field missing) would not say why.
        check_top_level(&meta, &kind, &origin)?;
    }
    let checked =
        |resource: Resource| -> Result<(Resource, Vec<Diagnostic>), Diagnostic> { Ok((resource, Vec::new())) };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => checked(Resource::Namespace(from_yaml(file, first_line, doc)?)),
        ("v1", "Pod") => checked(Resource::Pod(from_yaml(file, first_line, doc)?)),
        ("v1", "Service") => checked(Resource::Service(from_yaml(file, first_line, doc)?)),
        // No `spec`: its fields are top-level (addressType, endpoints, ports).
        (group, "EndpointSlice") if DISCOVERY.contains(&group) => {
            checked(Resource::EndpointSlice(from_yaml(file, first_line, doc)?))
        }
        (group, "AuthorizationPolicy") if SECURITY.contains(&group) => {
            checked(Resource::AuthorizationPolicy(from_yaml(file, first_line, doc)?))
        }
        (group, "PeerAuthentication") if SECURITY.contains(&group) => {
            checked(Resource::PeerAuthentication(from_yaml(file, first_line, doc)?))
        }
        (group, "RequestAuthentication") if SECURITY.contains(&group) => {
            checked(Resource::RequestAuthentication(from_yaml(file, first_line, doc)?))
        }
        (group, "VirtualService") if NETWORKING.contains(&group) => {
            checked(Resource::VirtualService(from_yaml(file, first_line, doc)?))
        }
        (group, "DestinationRule") if NETWORKING.contains(&group) => {
            checked(Resource::DestinationRule(from_yaml(file, first_line, doc)?))
        }
        (group, "ServiceEntry") if NETWORKING.contains(&group) => {
            checked(Resource::ServiceEntry(from_yaml(file, first_line, doc)?))
        }
        ("v1", "ConfigMap") if mesh::is_mesh_config(meta.name.as_deref(), meta.namespace.as_deref()) => {
            mesh::parse(doc).map(|config| (Resource::MeshConfig(config), Vec::new())).map_err(|(field, message)| {
                let field = (!field.is_empty()).then_some(field);
                Diagnostic::error(origin.clone(), field.as_deref(), format!("mesh config: {message}"))
            })
        }
        (group, "Gateway") if GATEWAY_API.contains(&group) && is_waypoint_gateway(doc) => {
            check_top_level(&meta, &kind, &origin)?;
            checked(Resource::Gateway(from_yaml(file, first_line, doc)?))
        }
        ("v1", "List") => Err(error(
            "kind",
            "`List` documents are not supported; write one document per resource, separated by `---`".into(),
        )),
        _ => match kinds::classify(&api_version, &kind) {
            Verdict::Foreign => Ok((Resource::Other { api_version, kind }, Vec::new())),
            Verdict::Invalid { field, message } => Err(error(field, message)),
            Verdict::Ignored(message) => {
                if api_version.contains("istio.io") {
                    check_top_level(&meta, &kind, &origin)?;
                }
                let name = meta.name.as_deref().unwrap_or("(unnamed)");
                let what = match meta.namespace.as_deref() {
                    _ if kinds::is_cluster_scoped(&kind) => name.to_owned(),
                    namespace => format!("{}/{name}", namespace.unwrap_or("default")),
                };
                let warning = Diagnostic::warning(origin.clone(), Some("kind"), format!("{kind} {what}: {message}"));
                Ok((Resource::Other { api_version, kind }, vec![warning]))
            }
        },
    }
}

/// Whether a Gateway API `Gateway` document is of a waypoint class (the others are not read).
fn is_waypoint_gateway(doc: &str) -> bool {
    let class = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(doc)
        .ok()
        .and_then(|v| v.get("spec")?.get("gatewayClassName")?.as_str().map(str::to_owned));
    class.is_some_and(|c| super::WAYPOINT_GATEWAY_CLASSES.contains(&c.as_str()))
}

/// Istio and Kubernetes resources have `apiVersion`, `kind`, `metadata`, `spec` and `status` at
/// the top: anything else there is a field that lost its indentation (a document copied from a
/// page that flattened it), which would otherwise leave `spec` empty without a word.
fn check_top_level(meta: &TypeMeta, kind: &str, origin: &Origin) -> Result<(), Diagnostic> {
    let Some(stray) = meta.others.iter().find(|k| !matches!(k.as_str(), "spec" | "status")) else {
        return Ok(());
    };
    Err(Diagnostic::error(
        origin.clone(),
        Some(stray),
        format!(
            "`{stray}` is not a top-level field of a {kind} (those are apiVersion, kind, metadata, spec and \
             status); it probably belongs under `metadata` or `spec` and lost its indentation"
        ),
    ))
}

/// Deserializes a document, turning serde_yaml_ng's error into a diagnostic whose line is
/// relative to the file, not to the document.
fn from_yaml<T: DeserializeOwned>(file: &Path, first_line: usize, doc: &str) -> Result<T, Diagnostic> {
    serde_yaml_ng::from_str(doc).map_err(|e| {
        let text = e.to_string();
        if let Some(explained) = explain(&text, doc) {
            return Diagnostic::error(Origin::new(file, first_line + explained.line - 1), None, explained.message);
        }
        let line = e.location().map_or(first_line, |l| first_line + l.line().saturating_sub(1));
        let message = strip_location(&text);
        let (field, message) = split_field(&message);
        Diagnostic::error(Origin::new(file, line), field.as_deref(), message)
    })
}

/// serde_yaml_ng appends " at line L column C" (relative to the document); we give our own.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// serde_yaml_ng prefixes errors inside a structure with the dotted path (`spec.ports[0]: ...`).
fn split_field(message: &str) -> (Option<String>, String) {
    if let Some((path, rest)) = message.split_once(": ") {
        let looks_like_path = !path.contains(' ') && path.chars().all(|c| c.is_alphanumeric() || "._[]-".contains(c));
        if looks_like_path {
            return (Some(path.to_owned()), rest.to_owned());
        }
    }
    (None, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Vec<Located<Resource>>, Vec<Diagnostic>) {
        parse_file(Path::new("c.yaml"), text)
    }

    #[test]
    fn multi_document_file_keeps_lines() {
        let text = "# comment\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: a\nspec:\n  nodeName: n1\nstatus:\n  podIP: 10.1.0.10\n";
        let (resources, diagnostics) = parse(text);
        assert!(diagnostics.is_empty(), "{diagnostics:?}");
        assert_eq!(resources.len(), 2);
        assert_eq!(resources[0].origin.line, 1);
        assert_eq!(resources[1].origin.line, 7);
        let Resource::Pod(pod) = &resources[1].resource else { panic!("not a pod") };
        assert_eq!(pod.status.pod_ip, Some("10.1.0.10".parse().expect("ip")));
        assert_eq!(pod.spec.node_name.as_deref(), Some("n1"));
    }

    #[test]
    fn bad_value_names_file_line_and_field() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nstatus:\n  podIP: not-an-ip\n";
        let (resources, diagnostics) = parse(text);
        assert_eq!(resources.len(), 1);
        assert_eq!(diagnostics.len(), 1);
        let d = &diagnostics[0];
        assert!(d.is_error());
        assert_eq!(d.origin.line, 11, "{d}");
        assert_eq!(d.field.as_deref(), Some("status.podIP"), "{d}");
        assert!(d.to_string().starts_with("c.yaml:11: error: field `status.podIP`"), "{d}");
    }

    #[test]
    fn broken_yaml_syntax_is_located() {
        let (_, diagnostics) = parse("apiVersion: v1\nkind: Pod\nmetadata:\n  name: [unclosed\n");
        assert_eq!(diagnostics.len(), 1);
        assert!(diagnostics[0].origin.line >= 4, "{}", diagnostics[0]);
    }

    #[test]
    fn missing_kind_and_unknown_istio_version_are_errors() {
        let (_, d) = parse("apiVersion: v1\nmetadata:\n  name: x\n");
        assert_eq!(d[0].field.as_deref(), Some("kind"));
        let (_, d) = parse("apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata:\n  name: x\n");
        assert_eq!(d[0].field.as_deref(), Some("apiVersion"));
    }

    #[test]
    fn foreign_kinds_are_kept_not_rejected() {
        let (r, d) = parse("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata: {a: b}\n");
        assert!(d.is_empty(), "{d:?}");
        assert!(matches!(r[0].resource, Resource::Other { .. }));
    }

    // CFG-1: a kind strait does not implement yet is one warning at its `kind:` line, naming
    // the resource; the directory still loads.
    #[test]
    fn unimplemented_kinds_warn_once_at_their_kind_line() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n# the ingress\napiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: gw\n  namespace: shop\nspec:\n  selector: {istio: ingressgateway}\n---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata:\n  name: mesh-default\nspec:\n  accessLogging: [{providers: [{name: envoy}]}]\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {}\n";
        let (r, d) = parse(text);
        assert_eq!(r.len(), 4);
        let lines: Vec<String> = d.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "c.yaml:7: warning: field `kind`: Gateway shop/gw: not supported yet; ignored",
                "c.yaml:15: warning: field `kind`: Telemetry default/mesh-default: not supported yet; ignored (strait's \
                 metrics and access logs are always on, with Istio's names)",
                "c.yaml:22: warning: field `kind`: Deployment default/web: strait's directory source reads Pods (with \
                 `spec.nodeName` and `status.podIP`), not the controllers that create them; ignored",
            ]
        );
    }

    #[test]
    fn flattened_documents_are_rejected_at_the_stray_field() {
        let text = "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata:\nname: httpbin\nspec:\nhosts:\n- httpbin.example.com\n";
        let (_, d) = parse(text);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!((d[0].origin.line, d[0].field.as_deref()), (4, Some("name")), "{}", d[0]);
        assert!(d[0].message.contains("lost its indentation"), "{}", d[0]);
    }

    #[test]
    fn syntax_errors_are_explained_at_their_line() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n\tnamespace: a\n";
        let (r, d) = parse(text);
        assert_eq!(r.len(), 1);
        assert_eq!(
            d[0].to_string(),
            "c.yaml:9: error: this line is indented with a tab; YAML indents with spaces only"
        );
    }

    #[test]
    fn copied_web_text_is_read_with_a_warning_and_curly_quotes_are_named() {
        let (r, d) = parse("apiVersion: v1\nkind: Namespace\nmetadata:\n\u{a0} name: a\n");
        assert_eq!(r.len(), 1);
        assert_eq!((d.len(), d[0].is_error(), d[0].origin.line), (1, false, 4), "{d:?}");
        let (_, d) = parse(
            "apiVersion: \u{201c}security.istio.io/v1beta1\u{201d}\nkind: PeerAuthentication\nmetadata: {name: a}\n",
        );
        assert_eq!((d[0].origin.line, d[0].field.as_deref()), (1, Some("apiVersion")), "{d:?}");
        assert!(d[0].message.contains("typographic quotes"), "{}", d[0]);
    }

    #[test]
    fn service_target_port_by_number_or_name() {
        let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: a}\n  ports:\n  - port: 80\n    targetPort: 8080\n  - port: 81\n    targetPort: http\n";
        let (r, d) = parse(text);
        assert!(d.is_empty(), "{d:?}");
        let Resource::Service(s) = &r[0].resource else { panic!("not a service") };
        assert_eq!(s.spec.ports[0].target_port, Some(super::super::PortRef::Number(8080)));
        assert_eq!(s.spec.ports[1].target_port, Some(super::super::PortRef::Name("http".into())));
    }

    #[test]
    fn security_kinds_are_typed_and_misspelt_kinds_rejected() {
        let (r, d) =
            parse("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: x\nspec: {}\n");
        assert!(d.is_empty(), "{d:?}");
        assert!(matches!(r[0].resource, Resource::AuthorizationPolicy(_)));
        let (_, d) = parse("apiVersion: security.istio.io/v1beta1\nkind: AuthorisationPolicy\nmetadata:\n  name: x\n");
        assert_eq!(d[0].field.as_deref(), Some("kind"), "{d:?}");
    }
}
