//! Multi-document YAML to typed resources, with file:line on every resource and error.

use std::{path::Path, sync::Arc};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{Diagnostic, Located, Origin, Resource};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
}

/// API groups whose resources strait will read (SPEC conventions); accepted now and applied
/// by the issues that implement them.
const ISTIO_GROUPS: [&str; 5] = [
    "networking.istio.io/v1alpha3",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1",
    SECURITY_V1BETA1,
    SECURITY_V1,
];
const NETWORKING: [&str; 3] = ["networking.istio.io/v1alpha3", "networking.istio.io/v1beta1", "networking.istio.io/v1"];
const SECURITY_V1BETA1: &str = "security.istio.io/v1beta1";
const SECURITY_V1: &str = "security.istio.io/v1";

/// Parses one file's text. Returns the resources and the diagnostics found; a file with any
/// error diagnostic must not be applied.
pub fn parse_file(file: &Path, text: &str) -> (Vec<Located<Resource>>, Vec<Diagnostic>) {
    let mut resources = Vec::new();
    let mut diagnostics = Vec::new();
    for (first_line, doc) in split_documents(text) {
        if is_blank(doc) {
            continue;
        }
        let origin = Origin::new(file, first_line);
        match parse_document(file, first_line, doc) {
            Ok(Some(resource)) => {
                let document = resource.forwarded_as_written().then(|| Arc::from(doc));
                resources.push(Located { origin, resource, document });
            }
            Ok(None) => {}
            Err(diagnostic) => diagnostics.push(diagnostic),
        }
    }
    (resources, diagnostics)
}

/// Splits YAML text at `---` lines, returning each document with the 1-based line its
/// content starts on. (A `---` inside a block scalar is indented, so it never matches.)
fn split_documents(text: &str) -> Vec<(usize, &str)> {
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

fn parse_document(file: &Path, first_line: usize, doc: &str) -> Result<Option<Resource>, Diagnostic> {
    let meta: TypeMeta = from_yaml(file, first_line, doc)?;
    let origin = Origin::new(file, first_line);
    let api_version = meta.api_version.ok_or_else(|| {
        Diagnostic::error(origin.clone(), Some("apiVersion"), "missing; every document needs `apiVersion` and `kind`")
    })?;
    let kind = meta.kind.ok_or_else(|| {
        Diagnostic::error(origin.clone(), Some("kind"), "missing; every document needs `apiVersion` and `kind`")
    })?;
    let resource = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => Resource::Namespace(from_yaml(file, first_line, doc)?),
        ("v1", "Pod") => Resource::Pod(from_yaml(file, first_line, doc)?),
        ("v1", "Service") => Resource::Service(from_yaml(file, first_line, doc)?),
        (SECURITY_V1BETA1 | SECURITY_V1, "AuthorizationPolicy") => {
            Resource::AuthorizationPolicy(from_yaml(file, first_line, doc)?)
        }
        (SECURITY_V1BETA1 | SECURITY_V1, "PeerAuthentication") => {
            Resource::PeerAuthentication(from_yaml(file, first_line, doc)?)
        }
        (SECURITY_V1BETA1 | SECURITY_V1, "RequestAuthentication") => {
            Resource::RequestAuthentication(from_yaml(file, first_line, doc)?)
        }
        (group, "VirtualService") if NETWORKING.contains(&group) => {
            Resource::VirtualService(from_yaml(file, first_line, doc)?)
        }
        (group, "DestinationRule") if NETWORKING.contains(&group) => {
            Resource::DestinationRule(from_yaml(file, first_line, doc)?)
        }
        (SECURITY_V1BETA1 | SECURITY_V1, other) => {
            return Err(Diagnostic::error(
                origin,
                Some("kind"),
                format!(
                    "unknown kind `{other}` in {api_version}; it has AuthorizationPolicy, PeerAuthentication and \
                     RequestAuthentication"
                ),
            ));
        }
        ("v1", "List") => {
            return Err(Diagnostic::error(
                origin,
                Some("kind"),
                "`List` documents are not supported; write one document per resource, separated by `---`",
            ));
        }
        (group, _) if ISTIO_GROUPS.contains(&group) || group == "v1" || group.starts_with("apps/") => {
            Resource::Other { api_version, kind }
        }
        (group, _) if group.contains("istio.io") => {
            return Err(Diagnostic::error(
                origin,
                Some("apiVersion"),
                format!("unknown API version `{group}`; strait reads {}", ISTIO_GROUPS.join(", ")),
            ));
        }
        _ => Resource::Other { api_version, kind },
    };
    Ok(Some(resource))
}

/// Deserializes a document, turning serde_yaml_ng's error into a diagnostic whose line is
/// relative to the file, not to the document.
fn from_yaml<T: DeserializeOwned>(file: &Path, first_line: usize, doc: &str) -> Result<T, Diagnostic> {
    serde_yaml_ng::from_str(doc).map_err(|e| {
        let line = e.location().map_or(first_line, |l| first_line + l.line().saturating_sub(1));
        let message = strip_location(&e.to_string());
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
        let (r, d) = parse("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\n");
        assert!(d.is_empty());
        assert!(matches!(r[0].resource, Resource::Other { .. }));
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
