//! ServiceEntry as written (GW-3, L4-3, L4-5): services strait's registry does not learn from
//! Kubernetes, most often hosts outside the mesh, with their ports, virtual addresses and how
//! their endpoints are found (listed, resolved through DNS, or the address the client dialled).
//!
//! Istio's validation rules that need only the entry itself are checked while it is read, so a
//! mistake is reported at the entry's line: hosts required and never `*`, endpoints only where the
//! resolution uses them, IP endpoints for STATIC, no wildcard host resolved through DNS without
//! endpoints, at most one endpoint for DNS_ROUND_ROBIN, unique port numbers and names, endpoint
//! ports naming declared ports. What strait accepts but does not use is warned about by
//! `model::service_entries`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Deserializer};

use super::{Check, count, enum_value, hosts, null_as_default, required_port, scalar};
use crate::config::{Cidr, ObjectMeta};

/// `networking.istio.io` ServiceEntry.
#[derive(Debug, Clone, Deserialize)]
pub struct ServiceEntry {
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: ServiceEntrySpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "ServiceEntrySpec"))]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    /// DNS names, possibly starting with `*.`.
    #[serde(default, deserialize_with = "hosts")]
    pub hosts: Vec<String>,
    /// Virtual addresses (IPs or CIDR blocks) the service is reached on.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Vec<String>"))]
    #[serde(default)]
    pub addresses: Vec<Cidr>,
    #[serde(default)]
    pub ports: Vec<ServiceEntryPort>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<String>"))]
    #[serde(default)]
    pub location: Location,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<String>"))]
    #[serde(default)]
    pub resolution: Resolution,
    #[serde(default)]
    pub endpoints: Vec<EntryEndpoint>,
    /// Selects pods as endpoints: not supported by strait; kept so that it can be reported.
    #[serde(default)]
    pub workload_selector: Option<EntryWorkloadSelector>,
    /// Accepted for compatibility and ignored: strait has a single visibility scope.
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Accepted and not used: strait reaches MESH_EXTERNAL hosts without mesh identities.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

impl Check for ServiceEntrySpec {
    fn check(&self) -> Result<(), String> {
        if self.hosts.is_empty() {
            return Err("`hosts` is required: the names the service is known by".into());
        }
        if self.hosts.iter().any(|h| h == "*") {
            return Err("`*` is not a valid ServiceEntry host; write a DNS name, optionally starting with `*.`".into());
        }
        let mut numbers = BTreeSet::new();
        let mut names = BTreeSet::new();
        for port in &self.ports {
            if !numbers.insert(port.number) {
                return Err(format!("port {} is declared twice in `ports`", port.number));
            }
            if !names.insert(port.name.as_str()) {
                return Err(format!("port name `{}` is used twice in `ports`", port.name));
            }
        }
        if self.workload_selector.is_some() && !self.endpoints.is_empty() {
            return Err("set only one of `workloadSelector` and `endpoints`".into());
        }
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if let Some(unknown) = endpoint.ports.keys().find(|name| !names.contains(name.as_str())) {
                return Err(format!(
                    "endpoints[{i}].ports names `{unknown}`, which is not the name of a port in `ports`"
                ));
            }
        }
        match self.resolution {
            Resolution::None if !self.endpoints.is_empty() => Err(
                "resolution NONE takes the address the client dialled; it cannot have `endpoints` (use STATIC or DNS)"
                    .into(),
            ),
            Resolution::Static => {
                if self.endpoints.is_empty() && self.workload_selector.is_none() {
                    return Err("resolution STATIC needs `endpoints` with IP addresses".into());
                }
                match self.endpoints.iter().position(|e| e.address.parse::<std::net::IpAddr>().is_err()) {
                    Some(i) => Err(format!(
                        "endpoints[{i}].address `{}` is not an IP address, as resolution STATIC needs (use resolution DNS \
                         for host names)",
                        self.endpoints[i].address
                    )),
                    None => Ok(()),
                }
            }
            Resolution::Dns | Resolution::DnsRoundRobin => {
                if self.endpoints.is_empty() && self.hosts.iter().any(|h| h.starts_with("*.")) {
                    return Err(
                        "a wildcard host cannot be resolved through DNS; give `endpoints` or use resolution NONE"
                            .into(),
                    );
                }
                if self.resolution == Resolution::DnsRoundRobin && self.endpoints.len() > 1 {
                    return Err("resolution DNS_ROUND_ROBIN takes at most one endpoint".into());
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// One `ports[]` entry.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntryPort {
    #[cfg_attr(feature = "crd-schema", schemars(with = "u16"))]
    #[serde(deserialize_with = "required_port")]
    pub number: u16,
    /// HTTP, HTTPS, HTTP2, GRPC, TCP, TLS, MONGO, ... (as Istio names them).
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<String>"))]
    #[serde(default, deserialize_with = "protocol")]
    pub protocol: Option<String>,
    pub name: String,
    /// The port endpoints listen on, when it differs from `number` and an endpoint does not say.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<u16>"))]
    #[serde(default, deserialize_with = "opt_port")]
    pub target_port: Option<u16>,
}

/// Istio's port protocols (`protocol.Instance`), upper case.
const PROTOCOLS: [&str; 11] =
    ["HTTP", "HTTPS", "HTTP2", "GRPC", "GRPC-WEB", "TCP", "TLS", "MONGO", "MYSQL", "REDIS", "UDP"];

fn protocol<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    scalar(d, "a port protocol", |text| {
        let upper = text.trim().to_ascii_uppercase();
        if PROTOCOLS.contains(&upper.as_str()) {
            Ok(Some(upper))
        } else {
            Err(format!("unknown protocol `{text}`; expected one of {}", PROTOCOLS.join(", ")))
        }
    })
}

fn opt_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    required_port(d).map(Some)
}

/// `location`: whether the service is part of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum Location {
    /// Outside the mesh: no mesh identity, reached in plaintext or the application's own TLS.
    #[default]
    MeshExternal,
    /// Part of the mesh (a VM, a pod strait does not know as one).
    MeshInternal,
}

impl<'de> Deserialize<'de> for Location {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const VALUES: &[(&str, Location)] =
            &[("MESH_EXTERNAL", Location::MeshExternal), ("MESH_INTERNAL", Location::MeshInternal)];
        enum_value(d, "location", VALUES)
    }
}

/// `resolution`: how the endpoints of a connection are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum Resolution {
    /// The address the client dialled is the endpoint (Istio's default).
    #[default]
    None,
    /// The `endpoints`, by IP.
    Static,
    /// The hosts (or the endpoints' names) resolved through DNS.
    Dns,
    /// Like DNS, one endpoint; strait treats both alike.
    DnsRoundRobin,
}

impl<'de> Deserialize<'de> for Resolution {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const VALUES: &[(&str, Resolution)] = &[
            ("NONE", Resolution::None),
            ("STATIC", Resolution::Static),
            ("DNS", Resolution::Dns),
            ("DNS_ROUND_ROBIN", Resolution::DnsRoundRobin),
        ];
        enum_value(d, "resolution", VALUES)
    }
}

/// One `endpoints[]` entry (Istio's WorkloadEntry, inline).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntryEndpoint {
    /// An IP address, or a DNS name for resolution DNS.
    #[serde(deserialize_with = "endpoint_address")]
    pub address: String,
    /// Port name (as in `ports`) to the port this endpoint listens on.
    #[cfg_attr(feature = "crd-schema", schemars(with = "BTreeMap<String, u16>"))]
    #[serde(default, deserialize_with = "endpoint_ports")]
    pub ports: BTreeMap<String, u16>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Accepted; strait has a single network.
    #[serde(default)]
    pub network: Option<String>,
    /// Accepted; strait balances without locality.
    #[serde(default)]
    pub locality: Option<String>,
    /// Accepted; strait balances endpoints equally.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<u32>"))]
    #[serde(default, deserialize_with = "count")]
    pub weight: Option<u32>,
    #[serde(default)]
    pub service_account: Option<String>,
}

fn endpoint_address<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    scalar(d, "an IP address or a host name", |text| {
        if text.parse::<std::net::IpAddr>().is_ok() {
            return Ok(text.to_owned());
        }
        if text.starts_with("unix://") {
            return Err(format!("`{text}`: unix socket endpoints are not supported by strait"));
        }
        match super::host_name(text) {
            Ok(name) if !name.starts_with('*') => Ok(name),
            _ => Err(format!("`{text}` is not an IP address or a host name")),
        }
    })
}

fn endpoint_ports<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, u16>, D::Error> {
    struct Port(u16);
    impl<'de> Deserialize<'de> for Port {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            required_port(d).map(Port)
        }
    }
    Ok(BTreeMap::<String, Port>::deserialize(d)?.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// `workloadSelector` of a ServiceEntry: `labels`, not `matchLabels`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct EntryWorkloadSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

checked!(ServiceEntrySpec);

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Diagnostic, Resource, parse_file};

    fn parse(spec: &str) -> Result<super::ServiceEntrySpec, Vec<Diagnostic>> {
        let yaml =
            format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: e\nspec:\n{spec}");
        let (resources, diagnostics) = parse_file(Path::new("se.yaml"), &yaml);
        if diagnostics.iter().any(Diagnostic::is_error) {
            return Err(diagnostics);
        }
        match resources.into_iter().next().map(|r| r.resource) {
            Some(Resource::ServiceEntry(se)) => Ok(se.spec),
            other => panic!("{other:?}"),
        }
    }

    fn error(spec: &str) -> Diagnostic {
        parse(spec).expect_err("must be rejected").remove(0)
    }

    // GW-3: the fields of Istio's ServiceEntry, in all their forms.
    #[test]
    fn reads_every_field() {
        let spec = parse(
            "  hosts: [api.example.com, \"*.example.org\"]\n  addresses: [240.0.0.1, 240.1.0.0/16]\n  ports:\n  - {number: 80, name: http, protocol: http, targetPort: 8080}\n  - {number: \"443\", name: tls, protocol: TLS}\n  location: MESH_INTERNAL\n  resolution: STATIC\n  endpoints:\n  - address: 192.0.2.1\n    ports: {http: 9080}\n    labels: {v: one}\n    network: n1\n    locality: us/east\n    weight: 3\n  exportTo: [\".\"]\n  subjectAltNames: [spiffe://x]\n",
        )
        .expect("valid");
        assert_eq!(spec.hosts, ["api.example.com", "*.example.org"]);
        assert_eq!(spec.addresses.len(), 2);
        assert_eq!(spec.ports[0].protocol.as_deref(), Some("HTTP"));
        assert_eq!((spec.ports[1].number, spec.ports[0].target_port), (443, Some(8080)));
        assert_eq!(spec.location, super::Location::MeshInternal);
        assert_eq!(spec.resolution, super::Resolution::Static);
        assert_eq!(spec.endpoints[0].ports.get("http"), Some(&9080));
        assert_eq!(spec.endpoints[0].weight, Some(3));
        let defaults = parse("  hosts: [a.example.com]\n  ports: [{number: 80, name: http}]\n").expect("valid");
        assert_eq!((defaults.location, defaults.resolution), (super::Location::MeshExternal, super::Resolution::None));
    }

    // GW-3: Istio's validation rules, each at its line with its field.
    #[test]
    fn istio_rules_are_errors_with_lines() {
        let cases = [
            ("  ports: [{number: 80, name: http}]\n", "`hosts` is required"),
            ("  hosts: [\"*\"]\n", "not a valid ServiceEntry host"),
            ("  hosts: [a.b]\n  ports: [{number: 80, name: a}, {number: 80, name: b}]\n", "declared twice"),
            ("  hosts: [a.b]\n  ports: [{number: 80, name: a}, {number: 81, name: a}]\n", "used twice"),
            ("  hosts: [a.b]\n  resolution: NONE\n  endpoints: [{address: 1.2.3.4}]\n", "cannot have `endpoints`"),
            ("  hosts: [a.b]\n  resolution: STATIC\n", "needs `endpoints`"),
            ("  hosts: [a.b]\n  resolution: STATIC\n  endpoints: [{address: x.example}]\n", "not an IP address"),
            ("  hosts: [\"*.b.c\"]\n  resolution: DNS\n", "wildcard host cannot be resolved"),
            (
                "  hosts: [a.b]\n  resolution: DNS_ROUND_ROBIN\n  endpoints: [{address: x.b}, {address: y.b}]\n",
                "at most one endpoint",
            ),
            (
                "  hosts: [a.b]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  endpoints: [{address: 1.2.3.4, ports: {web: 8080}}]\n",
                "not the name of a port",
            ),
            ("  hosts: [a.b]\n  resolution: MAGIC\n", "unknown resolution `MAGIC`"),
            ("  hosts: [a.b]\n  location: OUTSIDE\n", "unknown location"),
            ("  hosts: [a.b]\n  ports: [{number: 80, name: http, protocol: SMTP}]\n", "unknown protocol"),
            ("  hosts: [a.b]\n  ports: [{number: 0, name: http}]\n", "not a port number"),
            ("  hosts: [a.b]\n  addresses: [not-an-ip]\n", "not an IP address or CIDR"),
            ("  hosts: [a.b]\n  prots: []\n", "unknown field `prots`"),
            (
                "  hosts: [a.b]\n  workloadSelector: {labels: {app: x}}\n  endpoints: [{address: 1.2.3.4}]\n",
                "only one of `workloadSelector` and `endpoints`",
            ),
        ];
        for (spec, expected) in cases {
            let d = error(spec);
            assert!(d.message.contains(expected), "{spec}: {d}");
            assert!(d.origin.line >= 5, "{spec}: {d}");
        }
        let d = error("  hosts: [a.b]\n  ports:\n  - number: 80\n    name: http\n    protocol: SMTP\n");
        assert_eq!(d.origin.line, 10, "{d}");
    }
}
