//! Kubernetes YAML for the objects a test topology stands for: Namespaces, Pods, Services.
//!
//! strait reads cluster state from YAML files (see `Topology::write_config`); these renderers
//! keep tests short and make the Pod objects match the topology's addresses and nodes. Each
//! returns one document starting with `---`, so documents can simply be concatenated.

use std::fmt::Write;

use crate::topology::Pod;

/// A `v1` Namespace, e.g. with `("istio.io/dataplane-mode", "ambient")`.
pub fn namespace_yaml(name: &str, labels: &[(&str, &str)]) -> String {
    format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n  labels:{}",
        quote(name),
        map_block(labels, 4)
    )
}

/// A `v1` Pod for `pod`, with its node, service account, hostNetwork flag and IP.
pub fn pod_yaml(pod: &Pod, namespace: &str, service_account: &str, labels: &[(&str, &str)]) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  labels:{}\
         spec:\n  nodeName: {}\n  serviceAccountName: {}\n  hostNetwork: {}\n\
         status:\n  hostIP: {}\n  podIP: {}\n  podIPs:\n  - ip: {}\n",
        quote(pod.name()),
        quote(namespace),
        map_block(labels, 4),
        quote(pod.node_name()),
        quote(service_account),
        pod.host_network(),
        quote(&pod.node_ip().to_string()),
        quote(&pod.ip().to_string()),
        quote(&pod.ip().to_string()),
    )
}

/// A `v1` Service with a cluster IP; `ports` are `(port, targetPort)` pairs, all TCP. Ports are
/// named `port-<port>`, which carries no protocol hint, so the mesh detects the protocol.
pub fn service_yaml(
    name: &str,
    namespace: &str,
    cluster_ip: &str,
    ports: &[(u16, u16)],
    selector: &[(&str, &str)],
) -> String {
    let mut port_list = String::new();
    for (port, target) in ports {
        let _ = write!(
            port_list,
            "\n  - name: {}\n    port: {port}\n    targetPort: {target}\n    protocol: TCP",
            quote(&format!("port-{port}"))
        );
    }
    if ports.is_empty() {
        port_list.push_str(" []");
    }
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\n\
         spec:\n  clusterIP: {}\n  selector:{}  ports:{port_list}\n",
        quote(name),
        quote(namespace),
        quote(cluster_ip),
        map_block(selector, 4),
    )
}

/// A `v1` Service with labels and named ports `(name, port, targetPort)`: a name like `http`,
/// `grpc` or `tcp` declares the port's protocol, as Istio reads it.
pub fn named_service_yaml(
    name: &str,
    namespace: &str,
    cluster_ip: &str,
    ports: &[(&str, u16, u16)],
    selector: &[(&str, &str)],
    labels: &[(&str, &str)],
) -> String {
    let mut port_list = String::new();
    for (port_name, port, target) in ports {
        let _ = write!(port_list, "\n  - name: {}\n    port: {port}\n    targetPort: {target}", quote(port_name));
    }
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}\n  labels:{}\
         spec:\n  clusterIP: {}\n  selector:{}  ports:{port_list}\n",
        quote(name),
        quote(namespace),
        map_block(labels, 4),
        quote(cluster_ip),
        map_block(selector, 4),
    )
}

/// A YAML block mapping at `indent` (starting on a new line), or ` {}` when empty; the result
/// ends with a newline.
fn map_block(entries: &[(&str, &str)], indent: usize) -> String {
    if entries.is_empty() {
        return " {}\n".to_string();
    }
    let mut out = String::from("\n");
    for (key, value) in entries {
        let _ = writeln!(out, "{:indent$}{}: {}", "", quote(key), quote(value));
    }
    out
}

/// A double-quoted YAML scalar: values like `true`, `1.0` or `*` stay strings.
fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Istio's mesh configuration (the `istio` ConfigMap of `istio-system`) with
/// `outboundTrafficPolicy.mode` set to `mode` (`REGISTRY_ONLY` or `ALLOW_ANY`).
pub fn mesh_config_yaml(mode: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: istio-system\ndata:\n  mesh: |-\n    \
         accessLogFile: /dev/stdout\n    outboundTrafficPolicy:\n      mode: {mode}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn namespace_with_and_without_labels() {
        assert_eq!(
            namespace_yaml("demo", &[("istio.io/dataplane-mode", "ambient")]),
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"demo\"\n  labels:\n    \
             \"istio.io/dataplane-mode\": \"ambient\"\n"
        );
        assert!(namespace_yaml("plain", &[]).ends_with("  labels: {}\n"));
    }

    #[test]
    fn pod_carries_node_account_and_addresses() {
        let pod = Pod::detached("client", Ipv4Addr::new(10, 1, 0, 10), "node1", false);
        assert_eq!(
            pod_yaml(&pod, "demo", "sleep", &[("app", "client")]),
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: \"client\"\n  namespace: \"demo\"\n  labels:\n    \
             \"app\": \"client\"\nspec:\n  nodeName: \"node1\"\n  serviceAccountName: \"sleep\"\n  \
             hostNetwork: false\nstatus:\n  hostIP: \"10.255.0.1\"\n  podIP: \"10.1.0.10\"\n  podIPs:\n  - ip: \"10.1.0.10\"\n"
        );
        let host = Pod::detached("agent", Ipv4Addr::new(10, 255, 0, 1), "node1", true);
        assert!(pod_yaml(&host, "kube-system", "default", &[]).contains("  hostNetwork: true\n"));
    }

    #[test]
    fn service_lists_ports_and_selector() {
        let yaml = service_yaml("web", "demo", "10.96.0.10", &[(80, 8080), (443, 8443)], &[("app", "web")]);
        assert_eq!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: \"web\"\n  namespace: \"demo\"\n\
             spec:\n  clusterIP: \"10.96.0.10\"\n  selector:\n    \"app\": \"web\"\n  ports:\n\
             \x20 - name: \"port-80\"\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n\
             \x20 - name: \"port-443\"\n    port: 443\n    targetPort: 8443\n    protocol: TCP\n"
        );
        assert!(service_yaml("s", "n", "10.96.0.1", &[], &[]).contains("  ports: []\n"));
    }

    #[test]
    fn quoting_keeps_strings_strings() {
        assert_eq!(quote("true"), "\"true\"");
        assert_eq!(quote("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
    }
}
