//! The mesh-wide settings, in Istio's own form: the ConfigMap `istio` of namespace
//! `istio-system` whose `mesh` key holds MeshConfig as YAML text (what istiod reads). strait reads
//! `outboundTrafficPolicy.mode` (L4-5); the rest of MeshConfig is for Istio's other components
//! and is accepted without a word.

use serde::Deserialize;

use super::ObjectMeta;

/// Where Istio keeps the mesh configuration.
pub const MESH_CONFIG_NAMESPACE: &str = "istio-system";
pub const MESH_CONFIG_NAME: &str = "istio";

/// What outbound connections of enrolled pods may reach (`outboundTrafficPolicy.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum OutboundMode {
    /// Anything: destinations outside the registry get plain TCP passthrough (Istio's default).
    #[default]
    AllowAny,
    /// Only services and workloads of the registry and ServiceEntries; the rest is refused.
    RegistryOnly,
}

/// The `istio` ConfigMap, read for the settings strait uses.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub metadata: ObjectMeta,
    pub outbound_mode: OutboundMode,
}

#[derive(Deserialize)]
struct ConfigMap {
    metadata: ObjectMeta,
    #[serde(default)]
    data: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct MeshConfigText {
    #[serde(default)]
    outbound_traffic_policy: Option<OutboundTrafficPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboundTrafficPolicy {
    #[serde(default)]
    mode: Option<String>,
}

/// Whether a `v1` ConfigMap document is the mesh configuration (by its name and namespace).
pub fn is_mesh_config(name: Option<&str>, namespace: Option<&str>) -> bool {
    name == Some(MESH_CONFIG_NAME) && namespace == Some(MESH_CONFIG_NAMESPACE)
}

/// Reads the ConfigMap document. Errors name the field (`data.mesh` and the setting within it)
/// and, for YAML inside `mesh`, the line within that text.
pub fn parse(doc: &str) -> Result<MeshConfig, (String, String)> {
    let map: ConfigMap = serde_yaml_ng::from_str(doc).map_err(|e| (String::new(), e.to_string()))?;
    let text = map.data.get("mesh").map(String::as_str).unwrap_or_default();
    let mesh: MeshConfigText = if text.trim().is_empty() {
        MeshConfigText::default()
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| ("data.mesh".to_owned(), format!("MeshConfig YAML: {e}")))?
    };
    let mode = mesh.outbound_traffic_policy.and_then(|p| p.mode);
    let outbound_mode = match mode.as_deref().map(str::trim) {
        None | Some("ALLOW_ANY") => OutboundMode::AllowAny,
        Some("REGISTRY_ONLY") => OutboundMode::RegistryOnly,
        Some(other) => {
            return Err((
                "data.mesh".to_owned(),
                format!("outboundTrafficPolicy.mode `{other}` is unknown; expected ALLOW_ANY or REGISTRY_ONLY"),
            ));
        }
    };
    Ok(MeshConfig { metadata: map.metadata, outbound_mode })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(mesh: &str) -> String {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: istio-system\ndata:\n  mesh: |-\n{mesh}"
        )
    }

    // L4-5: Istio's form of the mesh config, ALLOW_ANY by default.
    #[test]
    fn reads_the_outbound_mode() {
        let registry =
            parse(&doc("    accessLogFile: /dev/stdout\n    outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n"));
        assert_eq!(registry.map(|m| m.outbound_mode), Ok(OutboundMode::RegistryOnly));
        let allow = parse(&doc("    outboundTrafficPolicy:\n      mode: ALLOW_ANY\n"));
        assert_eq!(allow.map(|m| m.outbound_mode), Ok(OutboundMode::AllowAny));
        let unset = parse("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\n");
        assert_eq!(unset.map(|m| m.outbound_mode), Ok(OutboundMode::AllowAny));
        let bad = parse(&doc("    outboundTrafficPolicy:\n      mode: DENY_ALL\n")).map(|m| m.outbound_mode);
        assert!(
            matches!(&bad, Err((field, message)) if field == "data.mesh" && message.contains("DENY_ALL")),
            "{bad:?}"
        );
        let typo = parse(&doc("    outboundTrafficPolicy:\n      mdoe: REGISTRY_ONLY\n")).map(|m| m.outbound_mode);
        assert!(matches!(&typo, Err((_, message)) if message.contains("mdoe")), "{typo:?}");
    }
}
