//! Istio's security resources (`security.istio.io/v1beta1|v1`) as users write them:
//! AuthorizationPolicy (AUTHZ-1..3), PeerAuthentication (L4-4) and RequestAuthentication (L7-10,
//! kept for the waypoint).
//!
//! Values whose form the schema fixes (actions, mTLS modes, CIDR blocks, port numbers) are
//! checked while deserializing, so a typo is reported at its own line and field path rather than
//! at the top of the document. Unknown fields are rejected too: a misspelt `principal:` silently
//! ignored would turn an ALLOW rule into one that allows everyone.

use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::ObjectMeta;

/// `security.istio.io` AuthorizationPolicy.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthorizationPolicy {
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: AuthorizationPolicySpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    /// Binds the policy to a Service or Gateway (enforced by a waypoint or gateway).
    #[serde(default)]
    pub target_ref: Option<PolicyTargetRef>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetRef>,
    #[serde(default)]
    pub action: AuthorizationAction,
    /// The external authorizer of a CUSTOM policy.
    #[serde(default)]
    pub provider: Option<ExtensionProvider>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthorizationAction {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetRef {
    #[serde(default)]
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ExtensionProvider {
    #[serde(default)]
    pub name: String,
}

/// One rule: `from` AND `to` AND `when`. A list left out is no constraint; `Some(vec![])` is an
/// explicit empty list, which Istio rejects.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Option<Vec<RuleFrom>>,
    #[serde(default)]
    pub to: Option<Vec<RuleTo>>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RuleFrom {
    #[serde(default)]
    pub source: Option<Source>,
}

/// Who is calling. Fields AND, values within a field OR, `not*` fields must match none.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    /// Trust domains of the peer identity (Istio 1.30), with the usual `*` forms.
    #[serde(default)]
    pub trust_domains: Vec<String>,
    #[serde(default)]
    pub not_trust_domains: Vec<String>,
    /// `namespace/name` or `name` (in the policy's namespace), newer Istio releases.
    #[serde(default)]
    pub service_accounts: Vec<String>,
    #[serde(default)]
    pub not_service_accounts: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<Cidr>,
    #[serde(default)]
    pub not_ip_blocks: Vec<Cidr>,
    /// The original client as `X-Forwarded-For` reports it: an HTTP attribute.
    #[serde(default)]
    pub remote_ip_blocks: Vec<Cidr>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<Cidr>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RuleTo {
    #[serde(default)]
    pub operation: Option<Operation>,
}

/// What is being done to the workload.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Vec<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "ports")]
    pub ports: Vec<u16>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Vec<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "ports")]
    pub not_ports: Vec<u16>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// `when` entry: an attribute (`source.ip`, `request.headers[x]`, ...) and the values it must
/// (or must not) have. Values are checked against the key when the policy is compiled.
#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Vec<crate::config::schema::Scalar>"))]
    #[serde(default, deserialize_with = "scalars")]
    pub values: Vec<String>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Vec<crate::config::schema::Scalar>"))]
    #[serde(default, deserialize_with = "scalars")]
    pub not_values: Vec<String>,
}

/// `security.istio.io` PeerAuthentication.
#[derive(Debug, Clone, Deserialize)]
pub struct PeerAuthentication {
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: PeerAuthenticationSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub mtls: Option<MutualTls>,
    /// Per target port of the selected pods; `None` when absent, so that an explicit empty map
    /// can be rejected as Istio does.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<std::collections::BTreeMap<String, MutualTls>>"))]
    #[serde(default, deserialize_with = "port_map")]
    pub port_level_mtls: Option<BTreeMap<u16, MutualTls>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MutualTls {
    #[serde(default)]
    pub mode: MtlsModeSetting,
}

/// A mode as written; `Unset` inherits from the enclosing scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsModeSetting {
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
}

/// `security.istio.io` RequestAuthentication: stored for the waypoint (L7-10), not enforced by
/// the node proxy.
#[derive(Debug, Clone, Deserialize)]
pub struct RequestAuthentication {
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: RequestAuthenticationSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    #[serde(default)]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub target_ref: Option<PolicyTargetRef>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetRef>,
    #[serde(default)]
    pub jwt_rules: Vec<JwtRule>,
}

/// How to find and check one issuer's tokens. Unknown fields are rejected like everywhere else:
/// a misspelt `audience:` silently ignored would drop the audience check.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    #[serde(default)]
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Inline JWKS document.
    #[serde(default)]
    pub jwks: Option<String>,
    #[serde(default)]
    pub from_headers: Vec<JwtHeader>,
    #[serde(default)]
    pub from_params: Vec<String>,
    #[serde(default)]
    pub from_cookies: Vec<String>,
    #[serde(default)]
    pub output_payload_to_header: Option<String>,
    #[serde(default)]
    pub forward_original_token: bool,
    /// Istio's claim-to-header copies; accepted so valid Istio YAML loads, not applied yet
    /// (`model::compile` warns).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// How long to wait for the JWKS server; accepted, and strait's own fetch timeout applies
    /// (`model::compile` warns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// `outputClaimToHeaders` entry: copy a claim of a verified token into a request header.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct JwtHeader {
    pub name: String,
    #[serde(default)]
    pub prefix: Option<String>,
}

/// An IP block: a CIDR, or a bare address meaning a /32 (IPv4) or /128 (IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        (prefix <= max_prefix(addr)).then_some(Self { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                same_prefix(u32::from(net).into(), u32::from(ip).into(), 32, self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => same_prefix(u128::from(net), u128::from(ip), 128, self.prefix),
            _ => false,
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// Whether the first `prefix` of `bits` bits of two addresses are equal.
fn same_prefix(a: u128, b: u128, bits: u32, prefix: u8) -> bool {
    let host_bits = bits - u32::from(prefix);
    host_bits >= bits || (a >> host_bits) == (b >> host_bits)
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{text}` is not an IP address or CIDR block (e.g. 10.0.0.0/16, 10.1.2.3, fd00::/8)");
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix = match prefix {
            None => max_prefix(addr),
            Some(p) => p.parse::<u8>().map_err(|_| bad())?,
        };
        Self::new(addr, prefix).ok_or_else(bad)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Checking inside the visitor (not after) lets the error carry the scalar's own line.
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Cidr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an IP address or CIDR block")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Cidr, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parses a port number as Istio writes it (a string, `"8080"`) or as YAML users often do (a
/// bare number).
pub fn parse_port(text: &str) -> Result<u16, String> {
    match text.trim().parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n as u16),
        _ => Err(format!("`{text}` is not a port number (1-65535)")),
    }
}

/// A scalar read as text: strings as they are, numbers and booleans as YAML wrote them.
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A port number, checked where it is written.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Port(u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Port, E> {
                parse_port(v).map(Port).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                self.visit_str(&v.to_string())
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn scalars<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Vec::<Scalar>::deserialize(d)?.into_iter().map(|s| s.0).collect())
}

fn ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
    Ok(Vec::<Port>::deserialize(d)?.into_iter().map(|p| p.0).collect())
}

fn port_map<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<u16, MutualTls>>, D::Error> {
    let map = Option::<BTreeMap<Port, MutualTls>>::deserialize(d)?;
    Ok(map.map(|m| m.into_iter().map(|(p, tls)| (p.0, tls)).collect()))
}

/// `spec:` with nothing after it is YAML null; treat it like `spec: {}`.
fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_contain() {
        let cases = [
            ("10.0.0.0/8", "10.200.1.1", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("10.1.2.3", "10.1.2.3", true),
            ("10.1.2.3", "10.1.2.4", false),
            ("0.0.0.0/0", "192.168.1.1", true),
            ("0.0.0.0/0", "::1", false),
            ("fd00::/8", "fd12::1", true),
            ("fd00::1", "fd00::1", true),
            ("fd00::1", "fd00::2", false),
        ];
        for (cidr, ip, expected) in cases {
            let c: Cidr = cidr.parse().expect(cidr);
            assert_eq!(c.contains(ip.parse().expect(ip)), expected, "{cidr} ∋ {ip}");
        }
        assert_eq!("10.1.2.3".parse::<Cidr>().expect("ip").to_string(), "10.1.2.3/32");
        for bad in ["10.0.0.300/8", "10.0.0.0/33", "fd00::/129", "10.0.0.0/", "host.example", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    // L7-10: a misspelt JWT rule field is an error at its own line, not a silently dropped
    // check; Istio's fields strait does not apply yet are accepted.
    #[test]
    fn jwt_rules_reject_unknown_fields() {
        let ra = |rule: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata:\n  name: jwt\nspec:\n  jwtRules:\n  - issuer: https://issuer.example\n{rule}"
            )
        };
        let file = std::path::Path::new("ra.yaml");
        let (resources, d) = crate::config::parse_file(file, &ra("    audience: [bookstore]\n"));
        assert!(resources.is_empty());
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!((d[0].origin.line, d[0].field.as_deref()), (8, Some("spec.jwtRules[0]")), "{}", d[0]);
        assert!(d[0].message.contains("unknown field `audience`"), "{}", d[0]);
        let istio_fields = "    outputClaimToHeaders:\n    - header: x-sub\n      claim: sub\n    timeout: 5s\n";
        let (resources, d) = crate::config::parse_file(file, &ra(istio_fields));
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(resources.len(), 1);
    }

    #[test]
    fn ports_are_checked() {
        assert_eq!(parse_port("27017"), Ok(27017));
        for bad in ["0", "65536", "http", "-1", ""] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }
}
