//! Policy at the node proxy (L4-4, AUTHZ-1, AUTHZ-2, CAP-4): the decisions of `authz` applied to
//! connections, and the part of them the kernel can apply before any socket exists.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use crate::{
    authz::{
        self, Connection, Decision,
        peer_authn::{self, MtlsMode},
        policy::{Action, Attribute, Predicate, Rule, Value},
    },
    capture::{KernelPolicy, PortMode},
    identity::Identity,
    model::{Model, Workload},
};

/// Decides a connection to `target` (at `destination`) from `source` (its verified identity,
/// `None` for plaintext) at `source_ip`.
pub fn authorize(
    model: &Model,
    target: &Workload,
    source: Option<&Identity>,
    source_ip: IpAddr,
    destination: SocketAddr,
) -> Decision {
    let connection = Connection {
        source: source.cloned(),
        source_ip,
        destination_ip: destination.ip(),
        destination_port: destination.port(),
        http: None,
    };
    authz::evaluate(model.authorization_for(target), &connection)
}

/// Whether plaintext may reach `workload` on `port` (PeerAuthentication). DISABLE means what it
/// does in Istio ambient: plaintext accepted, HBONE still mTLS.
pub fn plaintext_allowed(model: &Model, workload: &Workload, port: u16) -> bool {
    peer_authn::mode_for(model, workload, port) != MtlsMode::Strict
}

/// What the kernel enforces for this node's captured pods: their STRICT default, port-level
/// overrides, and DENY policies whose only conditions are source addresses and ports (they need
/// no identity, so XDP can drop such packets before the stack sees them).
pub fn kernel_policy(model: &Model, node: &str) -> KernelPolicy {
    let mut policy = KernelPolicy::default();
    for workload in model.workloads_on(node).filter(|w| w.captured) {
        let IpAddr::V4(ip) = workload.ip else { continue };
        // Port 0 never carries a port-level setting, so this is the workload's default mode.
        if peer_authn::mode_for(model, workload, 0) == MtlsMode::Strict {
            policy.strict.insert(ip);
        }
        if let Some(pa) = model.peer_authn_for(workload).workload {
            for (port, mode) in &pa.port_level {
                let mode = match mode {
                    MtlsMode::Strict => PortMode::Strict,
                    MtlsMode::Permissive => PortMode::Permissive,
                    MtlsMode::Disable => PortMode::Disable,
                };
                policy.port_modes.insert((ip, *port), mode);
            }
        }
        for denied in model.authorization_for(workload).filter(|p| p.action == Action::Deny && !p.dry_run) {
            for rule in &denied.rules {
                deny_entries(ip, rule, &mut policy.deny_sources);
            }
        }
    }
    policy
}

/// The (pod, port, source network, prefix) entries a DENY rule amounts to, when it is only
/// "from these addresses" and optionally "to these ports"; nothing for any other rule, which
/// the proxy evaluates itself.
fn deny_entries(pod: Ipv4Addr, rule: &Rule, out: &mut BTreeSet<(Ipv4Addr, u16, Ipv4Addr, u8)>) {
    if !rule.when.is_empty() || rule.from.is_empty() {
        return;
    }
    let positive = |p: &Predicate, attribute: Attribute| !p.negated && p.attribute == attribute;
    let mut sources = Vec::new();
    for alternative in &rule.from {
        let [only] = alternative.as_slice() else { return };
        if !positive(only, Attribute::SourceIp) {
            return;
        }
        for value in &only.values {
            match value {
                Value::Cidr(cidr) => match cidr.addr() {
                    IpAddr::V4(net) => sources.push((net, cidr.prefix())),
                    IpAddr::V6(_) => {}
                },
                _ => return,
            }
        }
    }
    let mut ports = Vec::new();
    for alternative in &rule.to {
        let [only] = alternative.as_slice() else { return };
        if !positive(only, Attribute::DestinationPort) {
            return;
        }
        for value in &only.values {
            let Value::Port(port) = value else { return };
            ports.push(*port);
        }
    }
    if ports.is_empty() {
        ports.push(0);
    }
    for (net, prefix) in sources {
        for port in &ports {
            out.insert((pod, *port, net, prefix));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{config::parse_file, model::compile};

    fn model(extra: &str) -> Model {
        let yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {{istio.io/dataplane-mode: ambient}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  labels: {{app: web}}\nspec:\n  nodeName: n1\nstatus:\n  podIP: 10.1.0.10\n---\n{extra}"
        );
        let (resources, d) = parse_file(Path::new("t.yaml"), &yaml);
        assert!(d.is_empty(), "{d:?}");
        let (m, d) = compile(&resources);
        assert!(d.iter().all(|d| !d.is_error()), "{d:?}");
        m
    }

    // CAP-4: STRICT pods, port-level modes and address-only DENY rules reach the kernel.
    #[test]
    fn kernel_policy_holds_what_needs_no_identity() {
        let m = model(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: shop\nspec:\n  selector:\n    matchLabels: {app: web}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: PERMISSIVE}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: block\n  namespace: shop\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [10.9.0.0/16]\n    to:\n    - operation:\n        ports: [\"9000\"]\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: needs-identity\n  namespace: shop\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [evil]\n",
        );
        let p = kernel_policy(&m, "n1");
        let web: Ipv4Addr = "10.1.0.10".parse().expect("ip");
        assert!(p.strict.contains(&web));
        assert_eq!(p.port_modes.get(&(web, 8080)), Some(&PortMode::Permissive));
        let net: Ipv4Addr = "10.9.0.0".parse().expect("ip");
        assert_eq!(p.deny_sources.iter().copied().collect::<Vec<_>>(), vec![(web, 9000, net, 16)]);
        assert!(!plaintext_allowed(&m, m.workload_by_ip(web.into()).expect("web"), 80));
        assert!(plaintext_allowed(&m, m.workload_by_ip(web.into()).expect("web"), 8080));
    }

    #[test]
    fn default_is_permissive_with_nothing_for_the_kernel() {
        let m = model("");
        assert_eq!(kernel_policy(&m, "n1"), KernelPolicy::default());
    }
}
