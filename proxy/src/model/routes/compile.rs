//! VirtualServices and DestinationRules → `Routing`: each resource compiled on its own (with the
//! checks `istioctl analyze` makes, CFG-4), then the two indexes by service hostname.

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::Arc,
};

use super::{
    DestinationRule, MESH_GATEWAY, Routing, VirtualService, destination_rule,
    hosts::{KnownHosts, matches, specificity},
    virtual_service,
};
use crate::{
    config::{Diagnostic, Located, Origin, Resource},
    model::Service,
};

/// Compiles the VirtualServices and DestinationRules of `resources` against the model's
/// services. A resource with an error is left out (and the error makes the whole configuration
/// unusable); warnings only report.
pub fn compile_routing(
    resources: &[Located<Resource>],
    services: &[Arc<Service>],
    diagnostics: &mut Vec<Diagnostic>,
) -> Routing {
    let known = KnownHosts::new(resources, services);
    let mut routing = Routing::default();
    for located in resources {
        let Resource::DestinationRule(rule) = &located.resource else { continue };
        let mut cx = Context::new(&located.origin, rule.metadata.namespace_or_default(), &known, diagnostics);
        if let Some(rule) = destination_rule::compile(&mut cx, rule) {
            routing.destination_rules.push(Arc::new(rule));
        }
    }
    // Subsets named by routes are checked against the rule in force, so rules are indexed first.
    routing.destination_rule_by_host = index_destination_rules(&routing.destination_rules, &known, diagnostics);
    for located in resources {
        let Resource::VirtualService(vs) = &located.resource else { continue };
        let mut cx = Context::new(&located.origin, vs.metadata.namespace_or_default(), &known, diagnostics);
        if let Some(vs) = virtual_service::compile(&mut cx, &routing.destination_rule_by_host, vs) {
            routing.virtual_services.push(Arc::new(vs));
        }
    }
    routing.mesh_routes = index_mesh_routes(&routing.virtual_services, &known, diagnostics);
    routing
}

/// One resource being compiled: where it is, its namespace, and its diagnostics.
pub(super) struct Context<'a> {
    pub origin: &'a Origin,
    pub namespace: &'a str,
    pub known: &'a KnownHosts<'a>,
    diagnostics: &'a mut Vec<Diagnostic>,
    errors: usize,
}

impl<'a> Context<'a> {
    fn new(
        origin: &'a Origin,
        namespace: &'a str,
        known: &'a KnownHosts<'a>,
        diagnostics: &'a mut Vec<Diagnostic>,
    ) -> Self {
        Self { origin, namespace, known, diagnostics, errors: 0 }
    }

    pub fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors += 1;
        self.diagnostics.push(Diagnostic::error(self.origin.clone(), Some(field), message));
    }

    pub fn warning(&mut self, field: &str, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic::warning(self.origin.clone(), Some(field), message));
    }

    /// A field strait reads but does not act on.
    pub fn unsupported(&mut self, field: &str, what: &str) {
        self.warning(field, format!("{what} is not supported by strait; ignored"));
    }

    pub fn has_errors(&self) -> bool {
        self.errors > 0
    }

    /// A host as written in this resource, as an FQDN or wildcard.
    pub fn resolve(&self, host: &str) -> String {
        self.known.resolve(host, self.namespace)
    }
}

/// The first (in `candidates` order) of the most specific patterns: exact beats wildcard,
/// longer wildcard beats shorter.
fn most_specific<'a, T>(candidates: impl Iterator<Item = (&'a str, T)>) -> Option<T> {
    let mut best: Option<((bool, usize), T)> = None;
    for (pattern, item) in candidates {
        let rank = specificity(pattern);
        if best.as_ref().is_none_or(|(best_rank, _)| rank > *best_rank) {
            best = Some((rank, item));
        }
    }
    best.map(|(_, item)| item)
}

/// Rules by the host they name (the first in file order wins), plus every service hostname a
/// wildcard rule matches (the most specific rule wins).
fn index_destination_rules(
    rules: &[Arc<DestinationRule>],
    known: &KnownHosts,
    diagnostics: &mut Vec<Diagnostic>,
) -> HashMap<String, Arc<DestinationRule>> {
    let mut index: HashMap<String, Arc<DestinationRule>> = HashMap::new();
    for rule in rules {
        match index.entry(rule.host.clone()) {
            Entry::Occupied(first) => {
                let first = first.get();
                diagnostics.push(Diagnostic::warning(
                    rule.origin.clone(),
                    Some("spec.host"),
                    format!(
                        "DestinationRule {} configures host `{}` like {} (at {}); strait applies only {}, the first \
                         in file order",
                        rule.key(),
                        rule.host,
                        first.key(),
                        first.origin,
                        first.key()
                    ),
                ));
            }
            Entry::Vacant(slot) => {
                slot.insert(rule.clone());
            }
        }
    }
    for host in known.service_hosts() {
        if index.contains_key(host) {
            continue;
        }
        let wildcards = rules.iter().filter(|r| r.host.starts_with('*') && matches(&r.host, host));
        if let Some(rule) = most_specific(wildcards.map(|r| (r.host.as_str(), r))) {
            index.insert(host.to_owned(), rule.clone());
        }
    }
    index
}

/// For each service hostname, the VirtualService routing mesh traffic to it. Two mesh
/// VirtualServices naming the same host is Istio's IST0109: only the first is used.
fn index_mesh_routes(
    virtual_services: &[Arc<VirtualService>],
    known: &KnownHosts,
    diagnostics: &mut Vec<Diagnostic>,
) -> HashMap<String, Arc<VirtualService>> {
    let mesh: Vec<&Arc<VirtualService>> =
        virtual_services.iter().filter(|vs| vs.gateways.iter().any(|g| g == MESH_GATEWAY)).collect();
    let mut claimed: HashMap<&str, &Arc<VirtualService>> = HashMap::new();
    for vs in &mesh {
        for host in &vs.hosts {
            match claimed.entry(host.as_str()) {
                Entry::Occupied(first) => {
                    let first = first.get();
                    diagnostics.push(Diagnostic::warning(
                        vs.origin.clone(),
                        Some("spec.hosts"),
                        format!(
                            "VirtualServices {} (at {}) and {} both route host `{host}` for the mesh; strait uses \
                             only {}, the first in file order (IST0109: merge them into one VirtualService)",
                            first.key(),
                            first.origin,
                            vs.key(),
                            first.key()
                        ),
                    ));
                }
                Entry::Vacant(slot) => {
                    slot.insert(vs);
                }
            }
        }
    }
    let mut index = HashMap::new();
    for host in known.service_hosts() {
        let candidates =
            mesh.iter().flat_map(|vs| vs.hosts.iter().filter(|h| matches(h, host)).map(move |h| (h.as_str(), *vs)));
        if let Some(vs) = most_specific(candidates) {
            index.insert(host.to_owned(), vs.clone());
        }
    }
    index
}
