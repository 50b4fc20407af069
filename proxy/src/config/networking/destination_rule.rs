//! DestinationRule as written (L7-4): how traffic to a host is balanced, limited, ejected and
//! secured, for the whole host, per subset and per port.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Deserializer, de::IgnoredAny};

use super::{
    Check, at_most_one, count, duration, enum_value, header_name, host, null_as_default, percent_integer,
    port_selector, scalar, subset_name,
};
use crate::config::{ObjectMeta, WorkloadSelector, parse_duration};

/// `networking.istio.io` DestinationRule.
#[derive(Debug, Clone, Deserialize)]
pub struct DestinationRule {
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: DestinationRuleSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    /// As written; resolved later in the rule's namespace. Empty only for `spec:` left blank.
    #[serde(deserialize_with = "host")]
    pub host: String,
    /// Boxed: it is the bulk of the rule, and resources of every kind share one enum.
    #[serde(default)]
    pub traffic_policy: Option<Box<TrafficPolicySpec>>,
    #[serde(default)]
    pub subsets: Vec<SubsetSpec>,
    /// Accepted for compatibility and ignored: strait has a single visibility scope.
    #[serde(default)]
    pub export_to: Vec<String>,
    /// Not supported by strait; kept so that it can be reported.
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct SubsetSpec {
    #[serde(deserialize_with = "name")]
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, rename = "trafficPolicy")]
    pub traffic_policy: Option<TrafficPolicySpec>,
}

/// `trafficPolicy`, at the rule or subset level.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "TrafficPolicySpec"))]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicySpec {
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionSettings>,
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
}

impl Check for TrafficPolicySpec {
    fn check(&self) -> Result<(), String> {
        let set = [
            self.load_balancer.is_some(),
            self.connection_pool.is_some(),
            self.outlier_detection.is_some(),
            self.tls.is_some(),
            !self.port_level_settings.is_empty(),
        ];
        if !set.contains(&true) {
            return Err("a traffic policy needs at least one of `loadBalancer`, `connectionPool`, \
                        `outlierDetection`, `tls` and `portLevelSettings`"
                .into());
        }
        Ok(())
    }
}

/// `portLevelSettings[]`: overrides for one service port.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "PortTrafficPolicy"))]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    #[cfg_attr(feature = "crd-schema", schemars(with = "crate::config::schema::PortSelector"))]
    #[serde(deserialize_with = "port_selector")]
    pub port: u16,
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
    #[serde(default)]
    pub connection_pool: Option<ConnectionPoolSettings>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionSettings>,
    #[serde(default)]
    pub tls: Option<ClientTlsSettings>,
}

impl Check for PortTrafficPolicy {
    fn check(&self) -> Result<(), String> {
        let set = [
            self.load_balancer.is_some(),
            self.connection_pool.is_some(),
            self.outlier_detection.is_some(),
            self.tls.is_some(),
        ];
        if !set.contains(&true) {
            return Err("port-level settings need at least one of `loadBalancer`, `connectionPool`, \
                        `outlierDetection` and `tls`"
                .into());
        }
        Ok(())
    }
}

/// `loadBalancer`: `simple` or `consistentHash`.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "LoadBalancerSettings"))]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSettings {
    #[serde(default)]
    pub simple: Option<SimpleLb>,
    #[serde(default)]
    pub consistent_hash: Option<ConsistentHash>,
    /// Not supported by strait (no localities); kept so that it can be reported.
    #[serde(default)]
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::Ignored>"))]
    pub locality_lb_setting: Option<IgnoredAny>,
    /// Not supported by strait; kept so that it can be reported.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::DurationText>"))]
    #[serde(default, deserialize_with = "duration")]
    pub warmup_duration_secs: Option<Duration>,
}

impl Check for LoadBalancerSettings {
    fn check(&self) -> Result<(), String> {
        at_most_one(&[("simple", self.simple.is_some()), ("consistentHash", self.consistent_hash.is_some())])
    }
}

/// `loadBalancer.simple`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimpleLb {
    /// Istio's default choice.
    Unspecified,
    RoundRobin,
    Random,
    LeastRequest,
    /// Deprecated in Istio, which treats it as LEAST_REQUEST.
    LeastConn,
    /// Envoy's original-destination balancing; strait has no equivalent.
    Passthrough,
}

impl<'de> Deserialize<'de> for SimpleLb {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const VALUES: &[(&str, SimpleLb)] = &[
            ("UNSPECIFIED", SimpleLb::Unspecified),
            ("ROUND_ROBIN", SimpleLb::RoundRobin),
            ("RANDOM", SimpleLb::Random),
            ("LEAST_REQUEST", SimpleLb::LeastRequest),
            ("LEAST_CONN", SimpleLb::LeastConn),
            ("PASSTHROUGH", SimpleLb::Passthrough),
        ];
        enum_value(d, "load balancer", VALUES)
    }
}

/// `consistentHash`: exactly one hash key; the ring tuning is accepted and has no effect.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "ConsistentHash"))]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHash {
    /// Lower case.
    #[serde(default, deserialize_with = "opt_header_name")]
    pub http_header_name: Option<String>,
    #[serde(default)]
    pub http_cookie: Option<HttpCookie>,
    #[serde(default)]
    pub use_source_ip: bool,
    #[serde(default)]
    pub http_query_parameter_name: Option<String>,
    #[serde(default)]
    pub ring_hash: Option<RingHash>,
    #[serde(default)]
    pub maglev: Option<Maglev>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub minimum_ring_size: Option<u32>,
}

impl Check for ConsistentHash {
    fn check(&self) -> Result<(), String> {
        let keys = [
            ("httpHeaderName", self.http_header_name.is_some()),
            ("httpCookie", self.http_cookie.is_some()),
            ("useSourceIp", self.use_source_ip),
            ("httpQueryParameterName", self.http_query_parameter_name.is_some()),
        ];
        at_most_one(&keys)?;
        if !keys.iter().any(|(_, set)| *set) {
            return Err("`consistentHash` needs a hash key: `httpHeaderName`, `httpCookie`, `useSourceIp: true` or \
                        `httpQueryParameterName`"
                .into());
        }
        at_most_one(&[("ringHash", self.ring_hash.is_some()), ("maglev", self.maglev.is_some())])
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HttpCookie {
    pub name: String,
    #[serde(default)]
    pub path: Option<String>,
    /// `0s` is allowed: a session cookie.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::DurationText>"))]
    #[serde(default, deserialize_with = "cookie_ttl")]
    pub ttl: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RingHash {
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub minimum_ring_size: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Maglev {
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub table_size: Option<u32>,
}

/// `connectionPool`. Istio reads 0 as "not set" for every limit.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "ConnectionPoolSettings"))]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct ConnectionPoolSettings {
    #[serde(default)]
    pub tcp: Option<TcpPoolSettings>,
    #[serde(default)]
    pub http: Option<HttpPoolSettings>,
}

impl Check for ConnectionPoolSettings {
    fn check(&self) -> Result<(), String> {
        match (&self.tcp, &self.http) {
            (None, None) => Err("a connection pool needs `tcp`, `http` or both".into()),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpPoolSettings {
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub max_connections: Option<u32>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::DurationText>"))]
    #[serde(default, deserialize_with = "duration")]
    pub connect_timeout: Option<Duration>,
    /// Not supported by strait; kept so that it can be reported.
    #[serde(default)]
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// Not supported by strait; kept so that it can be reported.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::DurationText>"))]
    #[serde(default, deserialize_with = "duration")]
    pub max_connection_duration: Option<Duration>,
    /// Not supported by strait; kept so that it can be reported.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::DurationText>"))]
    #[serde(default, deserialize_with = "duration")]
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct TcpKeepalive {
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub probes: Option<u32>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::DurationText>"))]
    #[serde(default, deserialize_with = "duration")]
    pub time: Option<Duration>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::DurationText>"))]
    #[serde(default, deserialize_with = "duration")]
    pub interval: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "HttpPoolSettings"))]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpPoolSettings {
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub http1_max_pending_requests: Option<u32>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub http2_max_requests: Option<u32>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub max_requests_per_connection: Option<u32>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub max_retries: Option<u32>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::DurationText>"))]
    #[serde(default, deserialize_with = "duration")]
    pub idle_timeout: Option<Duration>,
    /// Accepted and ignored: strait speaks to each upstream in the protocol of its port.
    #[serde(default)]
    pub h2_upgrade_policy: Option<H2UpgradePolicy>,
    /// Accepted and ignored, as `h2UpgradePolicy`.
    #[serde(default)]
    pub use_client_protocol: bool,
    /// Not supported by strait; kept so that it can be reported.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub max_concurrent_streams: Option<u32>,
}

impl Check for HttpPoolSettings {
    fn check(&self) -> Result<(), String> {
        if self.h2_upgrade_policy == Some(H2UpgradePolicy::Upgrade) && self.use_client_protocol {
            return Err("`useClientProtocol: true` contradicts `h2UpgradePolicy: UPGRADE`".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2UpgradePolicy {
    Default,
    DoNotUpgrade,
    Upgrade,
}

impl<'de> Deserialize<'de> for H2UpgradePolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const VALUES: &[(&str, H2UpgradePolicy)] = &[
            ("DEFAULT", H2UpgradePolicy::Default),
            ("DO_NOT_UPGRADE", H2UpgradePolicy::DoNotUpgrade),
            ("UPGRADE", H2UpgradePolicy::Upgrade),
        ];
        enum_value(d, "h2UpgradePolicy", VALUES)
    }
}

/// `outlierDetection`, as written; defaults are applied by the model.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "OutlierDetectionSettings"))]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSettings {
    /// Legacy: Istio reads it as gateway errors (502, 503, 504) and then stops counting 5xx.
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub consecutive_errors: Option<u32>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, rename = "consecutive5xxErrors", deserialize_with = "count")]
    pub consecutive_5xx_errors: Option<u32>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub consecutive_gateway_errors: Option<u32>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "count")]
    pub consecutive_local_origin_failures: Option<u32>,
    #[serde(default)]
    pub split_external_local_origin_errors: bool,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::DurationText>"))]
    #[serde(default, deserialize_with = "duration")]
    pub interval: Option<Duration>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::DurationText>"))]
    #[serde(default, deserialize_with = "duration")]
    pub base_ejection_time: Option<Duration>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "percent_integer")]
    pub max_ejection_percent: Option<u32>,
    #[cfg_attr(feature = "crd-schema", schemars(with = "Option<crate::config::schema::IntOrString>"))]
    #[serde(default, deserialize_with = "percent_integer")]
    pub min_health_percent: Option<u32>,
}

impl Check for OutlierDetectionSettings {
    fn check(&self) -> Result<(), String> {
        if self.consecutive_local_origin_failures.unwrap_or(0) > 0 && !self.split_external_local_origin_errors {
            return Err(
                "`consecutiveLocalOriginFailures` only counts with `splitExternalLocalOriginErrors: true`".into()
            );
        }
        Ok(())
    }
}

/// `tls`: how to secure connections to the destination.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "crd-schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "crd-schema", schemars(rename = "ClientTlsSettings"))]
#[serde(remote = "Self", rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTlsSettings {
    #[serde(default = "tls_disable")]
    pub mode: TlsMode,
    #[serde(default)]
    pub client_certificate: Option<String>,
    #[serde(default)]
    pub private_key: Option<String>,
    #[serde(default)]
    pub ca_certificates: Option<String>,
    #[serde(default)]
    pub credential_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub insecure_skip_verify: Option<bool>,
    #[serde(default)]
    pub ca_crl: Option<String>,
}

impl Check for ClientTlsSettings {
    fn check(&self) -> Result<(), String> {
        let files = self.client_certificate.is_some() || self.private_key.is_some() || self.ca_certificates.is_some();
        match self.mode {
            TlsMode::Simple | TlsMode::Mutual if self.credential_name.is_some() && files => {
                Err("set `credentialName` or certificate files (`clientCertificate`, `privateKey`, \
                     `caCertificates`), not both"
                    .into())
            }
            TlsMode::Mutual
                if self.credential_name.is_none()
                    && (self.client_certificate.is_none() || self.private_key.is_none()) =>
            {
                Err("MUTUAL TLS needs `clientCertificate` and `privateKey` (or a `credentialName`)".into())
            }
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

impl<'de> Deserialize<'de> for TlsMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const VALUES: &[(&str, TlsMode)] = &[
            ("DISABLE", TlsMode::Disable),
            ("SIMPLE", TlsMode::Simple),
            ("MUTUAL", TlsMode::Mutual),
            ("ISTIO_MUTUAL", TlsMode::IstioMutual),
        ];
        enum_value(d, "TLS mode", VALUES)
    }
}

fn tls_disable() -> TlsMode {
    TlsMode::Disable
}

checked!(
    TrafficPolicySpec,
    PortTrafficPolicy,
    LoadBalancerSettings,
    ConsistentHash,
    ConnectionPoolSettings,
    HttpPoolSettings,
    OutlierDetectionSettings,
    ClientTlsSettings,
);

fn name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    scalar(d, "a subset name", subset_name)
}

fn opt_header_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    scalar(d, "an HTTP header name", |text| header_name(text).map(Some))
}

fn cookie_ttl<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    scalar(d, "a duration such as 10s", |text| parse_duration(text).map(Some))
}
