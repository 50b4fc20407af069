//! Host names in routing resources: short names resolved the way Istio reads them on Kubernetes,
//! and wildcard matching, both pure so that the index rules can be tested alone.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use crate::{
    config::{Located, Resource},
    model::Service,
};

/// The Kubernetes cluster domain (`<svc>.<ns>.svc.cluster.local`).
const CLUSTER_DOMAIN: &str = "cluster.local";

/// What host resolution needs to know about the configuration: its namespaces and services.
pub(super) struct KnownHosts<'a> {
    namespaces: HashSet<&'a str>,
    services: HashMap<&'a str, &'a Arc<Service>>,
}

impl<'a> KnownHosts<'a> {
    pub(super) fn new(resources: &'a [Located<Resource>], services: &'a [Arc<Service>]) -> Self {
        let mut namespaces: HashSet<&str> = services.iter().map(|s| s.namespace.as_str()).collect();
        namespaces.extend(resources.iter().filter_map(|r| match &r.resource {
            Resource::Namespace(ns) => Some(ns.metadata.name.as_str()),
            _ => None,
        }));
        let services = services.iter().map(|s| (s.hostname.as_str(), s)).collect();
        Self { namespaces, services }
    }

    /// A host as written in a resource of `namespace`, as an FQDN or wildcard in lower case:
    /// `reviews` is `reviews.<namespace>.svc.cluster.local` (Istio reads short names in the
    /// namespace of the rule, not of the service); `reviews.other` and `reviews.other.svc` are
    /// expanded the way cluster DNS would, when `other` is a namespace of this configuration
    /// (otherwise `httpbin.org` would become a cluster name). Names ending in `.local`, longer
    /// names, wildcards and IP addresses are kept.
    pub(super) fn resolve(&self, host: &str, namespace: &str) -> String {
        let host = host.trim().to_ascii_lowercase();
        if host.starts_with('*') || host.ends_with(".local") || host.parse::<IpAddr>().is_ok() {
            return host;
        }
        let labels: Vec<&str> = host.split('.').collect();
        match labels.as_slice() {
            [_] => format!("{host}.{namespace}.svc.{CLUSTER_DOMAIN}"),
            [_, ns] if self.namespaces.contains(ns) => format!("{host}.svc.{CLUSTER_DOMAIN}"),
            [_, _, "svc"] => format!("{host}.{CLUSTER_DOMAIN}"),
            _ => host,
        }
    }

    /// The service whose hostname is `fqdn`.
    pub(super) fn service(&self, fqdn: &str) -> Option<&'a Arc<Service>> {
        self.services.get(fqdn).copied()
    }

    /// Service hostnames of the model, in a stable order.
    pub(super) fn service_hosts(&self) -> Vec<&'a str> {
        let mut hosts: Vec<&str> = self.services.keys().copied().collect();
        hosts.sort_unstable();
        hosts
    }
}

/// Whether `pattern` (an FQDN, `*.suffix` or `*`) matches the concrete host `host`. A wildcard
/// covers any number of labels, as in Istio: `*.example.com` matches `a.b.example.com`.
pub(crate) fn matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

/// Whether every host `inner` matches is matched by `outer` too (both may be wildcards).
pub(crate) fn covers(outer: &str, inner: &str) -> bool {
    match (outer.strip_prefix('*'), inner.strip_prefix('*')) {
        (Some(""), _) => true,
        (Some(outer), Some(inner)) => inner.ends_with(outer),
        (_, None) => matches(outer, inner),
        (None, Some(_)) => false,
    }
}

/// How specific a host pattern is, for "exact beats wildcard, longer wildcard beats shorter":
/// greater is more specific.
pub(crate) fn specificity(pattern: &str) -> (bool, usize) {
    (!pattern.starts_with('*'), pattern.len())
}

/// Gateway names as the model keeps them: `mesh`, or `namespace/name` (a bare name is in the
/// namespace of the resource; the legacy `name.namespace...` form is converted).
pub(super) fn gateway_name(name: &str, namespace: &str) -> String {
    if name == super::MESH_GATEWAY || name.contains('/') {
        return name.to_owned();
    }
    match name.split_once('.') {
        Some((gateway, rest)) => format!("{}/{gateway}", rest.split('.').next().unwrap_or(rest)),
        None => format!("{namespace}/{name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> KnownHosts<'static> {
        KnownHosts { namespaces: ["default", "other"].into_iter().collect(), services: HashMap::new() }
    }

    #[test]
    fn short_names_resolve_in_the_namespace_of_the_rule() {
        let k = known();
        let cases = [
            ("reviews", "default", "reviews.default.svc.cluster.local"),
            ("Reviews", "shop", "reviews.shop.svc.cluster.local"),
            ("reviews.other", "default", "reviews.other.svc.cluster.local"),
            ("reviews.other.svc", "default", "reviews.other.svc.cluster.local"),
            ("reviews.other.svc.cluster.local", "default", "reviews.other.svc.cluster.local"),
            ("httpbin.org", "default", "httpbin.org"),
            ("edition.cnn.com", "default", "edition.cnn.com"),
            ("my.service.local", "default", "my.service.local"),
            ("*.example.com", "default", "*.example.com"),
            ("*", "default", "*"),
            ("10.0.0.1", "default", "10.0.0.1"),
        ];
        for (host, ns, expected) in cases {
            assert_eq!(k.resolve(host, ns), expected, "{host} in {ns}");
        }
    }

    #[test]
    fn wildcards_match_and_cover() {
        assert!(matches("*.example.com", "a.example.com"));
        assert!(matches("*.example.com", "a.b.example.com"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(matches("*", "anything"));
        assert!(matches("a.example.com", "a.example.com"));
        assert!(!matches("a.example.com", "b.example.com"));
        assert!(covers("*.com", "*.example.com"));
        assert!(!covers("*.example.com", "*.com"));
        assert!(covers("*.example.com", "login.example.com"));
        assert!(!covers("login.example.com", "*.example.com"));
        assert!(specificity("a.example.com") > specificity("*.a.example.com"));
        assert!(specificity("*.a.example.com") > specificity("*.example.com"));
    }

    #[test]
    fn gateway_names_are_namespaced() {
        assert_eq!(gateway_name("mesh", "shop"), "mesh");
        assert_eq!(gateway_name("bookinfo-gateway", "shop"), "shop/bookinfo-gateway");
        assert_eq!(gateway_name("istio-system/ingress", "shop"), "istio-system/ingress");
        assert_eq!(gateway_name("ingress.istio-system.svc.cluster.local", "shop"), "istio-system/ingress");
    }
}
