//! Istio's `networking.istio.io` Gateway as written (GW-1, GW-2): the listeners of the gateway
//! pods its `selector` picks. Not to be confused with the Gateway API's `Gateway`
//! (`gateway.networking.k8s.io`), which declares waypoints (`config::Gateway`).
//!
//! Rules within one object are checked as it is read (`Check`), so errors carry its line:
//! a TLS server needs a mode, SIMPLE, MUTUAL and OPTIONAL_MUTUAL need a certificate (files or
//! `credentialName`), MUTUAL and OPTIONAL_MUTUAL need a CA. Rules across resources (which VirtualService binds,
//! duplicate port and host) are `model::gateways`' warnings.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use super::{Check, enum_value, host_name, null_as_default, required_port, scalar};
use crate::config::ObjectMeta;

/// `networking.istio.io` Gateway.
#[derive(Debug, Clone, Deserialize)]
pub struct IstioGateway {
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: IstioGatewaySpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "GatewaySpec"))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IstioGatewaySpec {
    /// Labels of the gateway pods that serve it (`istio: ingressgateway`); empty: every one.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub servers: Vec<ServerSpec>,
}

/// One `servers[]` entry: a port, the hosts served on it, and TLS.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "Server"))]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerSpec {
    pub port: ServerPort,
    /// `host`, `ns/host`, `*/host` or `./host`; wildcards allowed.
    #[serde(default, deserialize_with = "server_hosts")]
    pub hosts: Vec<ServerHost>,
    #[serde(default)]
    pub tls: Option<ServerTls>,
    /// Accepted for compatibility: strait listens on every address.
    #[serde(default)]
    pub bind: Option<String>,
    #[serde(default)]
    pub default_endpoint: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

impl Check for ServerSpec {
    fn check(&self) -> Result<(), String> {
        if self.hosts.is_empty() {
            return Err("`hosts` is empty; a server needs at least one host (`\"*\"` for any)".into());
        }
        let tls_port = matches!(self.port.protocol, ServerProtocol::Https | ServerProtocol::Tls);
        if tls_port && self.tls.as_ref().and_then(|t| t.mode).is_none() {
            return Err(format!(
                "port `{}` has protocol {} but the server has no `tls`; add `tls.mode`",
                self.port.name,
                self.port.protocol.name()
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerPort {
    #[cfg_attr(feature = "crd-schema", schemars(with = "crate::config::schema::IntOrString"))]
    #[serde(deserialize_with = "required_port")]
    pub number: u16,
    pub protocol: ServerProtocol,
    #[serde(default)]
    pub name: String,
    /// The port the gateway pod listens on, when it differs (Istio: for gateways only).
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "super::port")]
    pub target_port: Option<u16>,
}

/// `port.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ServerProtocol {
    Http,
    Https,
    Http2,
    Grpc,
    Tls,
    Tcp,
}

impl ServerProtocol {
    pub fn name(self) -> &'static str {
        match self {
            ServerProtocol::Http => "HTTP",
            ServerProtocol::Https => "HTTPS",
            ServerProtocol::Http2 => "HTTP2",
            ServerProtocol::Grpc => "GRPC",
            ServerProtocol::Tls => "TLS",
            ServerProtocol::Tcp => "TCP",
        }
    }
}

impl<'de> Deserialize<'de> for ServerProtocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const VALUES: &[(&str, ServerProtocol)] = &[
            ("HTTP", ServerProtocol::Http),
            ("HTTPS", ServerProtocol::Https),
            ("HTTP2", ServerProtocol::Http2),
            ("GRPC", ServerProtocol::Grpc),
            ("TLS", ServerProtocol::Tls),
            ("TCP", ServerProtocol::Tcp),
            ("MONGO", ServerProtocol::Tcp),
        ];
        enum_value(d, "server protocol", VALUES)
    }
}

/// `tls` of a server.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "ServerTLSSettings"))]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerTls {
    /// `httpsRedirect`: an HTTP server answers 301 to https.
    #[serde(default)]
    pub https_redirect: bool,
    #[serde(default)]
    pub mode: Option<ServerTlsMode>,
    #[serde(default)]
    pub server_certificate: Option<String>,
    #[serde(default)]
    pub private_key: Option<String>,
    #[serde(default)]
    pub ca_certificates: Option<String>,
    #[serde(default)]
    pub credential_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub min_protocol_version: Option<TlsVersion>,
    #[serde(default)]
    pub max_protocol_version: Option<TlsVersion>,
    /// Accepted for compatibility; rustls chooses among its own safe suites.
    #[serde(default)]
    pub cipher_suites: Vec<String>,
}

impl Check for ServerTls {
    fn check(&self) -> Result<(), String> {
        let files = self.server_certificate.is_some() || self.private_key.is_some();
        match self.mode {
            Some(mode @ (ServerTlsMode::Simple | ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual)) => {
                if self.credential_name.is_some() && files {
                    return Err("set either `credentialName` or `serverCertificate`/`privateKey`, not both".into());
                }
                if self.credential_name.is_none() && (self.server_certificate.is_none() || self.private_key.is_none()) {
                    return Err("SIMPLE, MUTUAL and OPTIONAL_MUTUAL need `credentialName`, or both \
                                `serverCertificate` and `privateKey`"
                        .into());
                }
                // OPTIONAL_MUTUAL verifies the certificates clients do present: it needs the CA too.
                if mode != ServerTlsMode::Simple && self.credential_name.is_none() && self.ca_certificates.is_none() {
                    return Err(
                        "MUTUAL and OPTIONAL_MUTUAL need `caCertificates` (or a `credentialName` with a CA)".into()
                    );
                }
                Ok(())
            }
            Some(ServerTlsMode::IstioMutual) => {
                Err("ISTIO_MUTUAL is not supported by strait gateways; use MUTUAL with `caCertificates`".into())
            }
            _ => Ok(()),
        }
    }
}

/// `tls.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ServerTlsMode {
    Passthrough,
    Simple,
    Mutual,
    AutoPassthrough,
    IstioMutual,
    OptionalMutual,
}

impl<'de> Deserialize<'de> for ServerTlsMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const VALUES: &[(&str, ServerTlsMode)] = &[
            ("PASSTHROUGH", ServerTlsMode::Passthrough),
            ("SIMPLE", ServerTlsMode::Simple),
            ("MUTUAL", ServerTlsMode::Mutual),
            ("AUTO_PASSTHROUGH", ServerTlsMode::AutoPassthrough),
            ("ISTIO_MUTUAL", ServerTlsMode::IstioMutual),
            ("OPTIONAL_MUTUAL", ServerTlsMode::OptionalMutual),
        ];
        enum_value(d, "server TLS mode", VALUES)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum TlsVersion {
    Auto,
    V1_0,
    V1_1,
    V1_2,
    V1_3,
}

impl<'de> Deserialize<'de> for TlsVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const VALUES: &[(&str, TlsVersion)] = &[
            ("TLS_AUTO", TlsVersion::Auto),
            ("TLSV1_0", TlsVersion::V1_0),
            ("TLSV1_1", TlsVersion::V1_1),
            ("TLSV1_2", TlsVersion::V1_2),
            ("TLSV1_3", TlsVersion::V1_3),
        ];
        enum_value(d, "TLS version", VALUES)
    }
}

/// A server host: the namespace whose VirtualServices may bind (`None` = any: `host` and
/// `*/host`; `.` is the Gateway's own namespace) and the host, lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHost {
    pub namespace: Option<String>,
    pub host: String,
}

fn server_host(text: &str) -> Result<ServerHost, String> {
    let (namespace, host) = match text.split_once('/') {
        Some((ns, host)) => (Some(ns), host),
        None => (None, text),
    };
    let namespace = match namespace {
        None | Some("*") => None,
        Some(ns)
            if ns == "."
                || (!ns.is_empty()
                    && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')) =>
        {
            Some(ns.to_owned())
        }
        Some(ns) => {
            return Err(format!("`{ns}` in `{text}` is not a namespace; write `ns/host`, `*/host` or `./host`"));
        }
    };
    Ok(ServerHost { namespace, host: host_name(host)?.to_ascii_lowercase() })
}

fn server_hosts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ServerHost>, D::Error> {
    struct Host(ServerHost);
    impl<'de> Deserialize<'de> for Host {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            scalar(d, "a host such as example.com or ns/example.com", server_host).map(Host)
        }
    }
    Ok(Vec::<Host>::deserialize(d)?.into_iter().map(|h| h.0).collect())
}

checked!(ServerSpec, ServerTls);

#[cfg(feature = "crd-schema")]
mod schema {
    use std::borrow::Cow;

    use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

    use super::{ServerHost, ServerProtocol, ServerTlsMode, TlsVersion};

    macro_rules! text {
        ($($ty:ident => $description:literal),* $(,)?) => {$(
            impl JsonSchema for $ty {
                fn schema_name() -> Cow<'static, str> {
                    stringify!($ty).into()
                }
                fn json_schema(_: &mut SchemaGenerator) -> Schema {
                    json_schema!({ "type": "string", "description": $description })
                }
            }
        )*};
    }

    text!(
        ServerHost => "A host such as example.com or *.example.com, optionally prefixed by a namespace (ns/, */ or ./).",
        ServerProtocol => "One of HTTP, HTTPS, HTTP2, GRPC, TLS, TCP, MONGO (any case).",
        ServerTlsMode => "One of PASSTHROUGH, SIMPLE, MUTUAL, AUTO_PASSTHROUGH, ISTIO_MUTUAL, OPTIONAL_MUTUAL (any case).",
        TlsVersion => "One of TLS_AUTO, TLSV1_0, TLSV1_1, TLSV1_2, TLSV1_3 (any case).",
    );
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Resource, parse_file};

    fn parse(yaml: &str) -> Result<super::IstioGateway, String> {
        let (resources, diagnostics) = parse_file(Path::new("gw.yaml"), yaml);
        if let Some(d) = diagnostics.first() {
            return Err(d.to_string());
        }
        match resources.into_iter().next().map(|r| r.resource) {
            Some(Resource::IstioGateway(g)) => Ok(g),
            other => Err(format!("not a Gateway: {other:?}")),
        }
    }

    const HEAD: &str = "apiVersion: networking.istio.io/v1beta1\nkind: Gateway\nmetadata: {name: gw, namespace: web}\n";

    // GW-1: the forms Istio's docs write, in every served version.
    #[test]
    fn reads_servers_hosts_and_tls() {
        for version in ["v1alpha3", "v1beta1", "v1"] {
            let yaml = format!(
                "apiVersion: networking.istio.io/{version}\nkind: Gateway\nmetadata: {{name: gw}}\nspec:\n  \
                 selector: {{istio: ingressgateway}}\n  servers:\n  - port: {{number: 443, name: https, protocol: \
                 https}}\n    hosts: [\"shop/*.example.com\", \"./a.example.com\", \"*/b.example.com\", \"*\"]\n    \
                 tls: {{mode: MUTUAL, credentialName: shop-cert}}\n"
            );
            let gw = parse(&yaml).expect("parses");
            let server = &gw.spec.servers[0];
            assert_eq!(server.port.number, 443);
            assert_eq!(server.port.protocol, super::ServerProtocol::Https);
            let hosts: Vec<(Option<&str>, &str)> =
                server.hosts.iter().map(|h| (h.namespace.as_deref(), h.host.as_str())).collect();
            assert_eq!(
                hosts,
                [(Some("shop"), "*.example.com"), (Some("."), "a.example.com"), (None, "b.example.com"), (None, "*")]
            );
            assert_eq!(server.tls.as_ref().and_then(|t| t.mode), Some(super::ServerTlsMode::Mutual));
        }
    }

    // GW-1: mistakes are reported at their own line and field.
    #[test]
    fn rejects_mistakes_with_line_and_field() {
        let cases = [
            ("  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: [\"a b\"]\n", "gw.yaml:7"),
            ("  servers:\n  - port: {number: 80, name: http, protocol: QUIC}\n    hosts: [\"*\"]\n", "QUIC"),
            ("  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n", "no `tls`"),
            (
                "  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: \
                 {mode: SIMPLE}\n",
                "credentialName",
            ),
            (
                "  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: \
                 {mode: MUTUAL, serverCertificate: /c, privateKey: /k}\n",
                "caCertificates",
            ),
            (
                "  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: \
                 {mode: OPTIONAL_MUTUAL, serverCertificate: /c, privateKey: /k}\n",
                "caCertificates",
            ),
            (
                "  servers:\n  - port: {number: 443, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: \
                 {mode: OPTIONAL_MUTUAL}\n",
                "credentialName",
            ),
            ("  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hostz: [\"*\"]\n", "hostz"),
            ("  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: []\n", "at least one host"),
        ];
        for (spec, expected) in cases {
            let yaml = format!("{HEAD}spec:\n{spec}");
            let error = parse(&yaml).expect_err(spec);
            assert!(error.contains(expected), "{spec}: {error}");
        }
    }
}
