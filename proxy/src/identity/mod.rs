//! Workload identity (ID-1, ID-2, ID-3): SPIFFE names, the certificates that prove them, where
//! certificates come from (a local CA or Istio's CA API), and the TLS settings that check them.

mod ca;
mod caclient;
pub mod caller;
pub mod caserver;
pub mod credentials;
pub mod kube_tokens;
mod renewal;
mod store;
mod tls;

use std::{fmt, future::Future, pin::Pin, str::FromStr, time::SystemTime};

use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use thiserror::Error;

pub use ca::LocalCa;
pub(crate) use ca::parse_certs;
pub use caclient::{BearerToken, CaClientOptions, DEFAULT_CA_PORT, IstioCaClient, keep_own_certificate};
pub use caller::{
    Authenticate, Caller, CallerAuthenticator, ClientCertSlot, NodeAccounts, PeerCertificate, node_proxy_identity,
};
pub use caserver::{CA_SERVER_NAMES, CaServerOptions, IMPERSONATED_IDENTITY, serve_ca};
pub use store::{CertStore, PendingCert};
pub use tls::{ALPN_H2, TlsSettings, peer_identity};

/// The default trust domain, as Istio's.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A workload's SPIFFE identity: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// The principal form used by AuthorizationPolicy: `<td>/ns/<ns>/sa/<sa>`.
    pub fn principal(&self) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let bad = || IdentityError::BadSpiffeId(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => Ok(Self::new(td, ns, sa)),
            _ => Err(bad()),
        }
    }
}

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("`{0}` is not a SPIFFE workload identity (spiffe://<trust domain>/ns/<namespace>/sa/<service account>)")]
    BadSpiffeId(String),
    #[error("CA directory {dir}: {reason}")]
    CaDirectory { dir: String, reason: String },
    #[error("cannot issue a certificate for {identity}: {reason}")]
    Issue { identity: String, reason: String },
    #[error("certificate authority unreachable or refused the request: {0}")]
    CaRequest(String),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("no certificate for {identity} yet: the CA failed {failures} time(s) in a row, next attempt in {}s; last error: {last}", retry_in.as_secs_f64().ceil())]
    BackingOff { identity: String, failures: u32, retry_in: std::time::Duration, last: String },
}

/// A certificate and key for one identity, with the roots that peers' certificates must chain to.
#[derive(Debug)]
pub struct IssuedCert {
    pub identity: Identity,
    /// Leaf first, then any intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// When this process received it: renewal counts from here, as `not_before` is back-dated.
    pub received: SystemTime,
    /// Hex serial number, as `/certs` reports it.
    pub serial: String,
}

impl IssuedCert {
    /// When to renew: at about half of the life it had when received (ID-1, see `renewal`).
    pub fn refresh_at(&self) -> SystemTime {
        renewal::refresh_at(self.received, self.not_before, self.not_after, renewal::jitter_of(&self.serial))
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that issues certificates: the local CA, or a remote CA over Istio's CA API.
pub trait CertificateProvider: Send + Sync {
    fn issue<'a>(
        &'a self,
        identity: &'a Identity,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<IssuedCert, IdentityError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_reject_junk() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/sleep".parse().expect("valid");
        assert_eq!(id, Identity::new("cluster.local", "default", "sleep"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
        for junk in ["spiffe://td/ns/a", "http://td/ns/a/sa/b", "spiffe:///ns/a/sa/b", "spiffe://td/ns/a/sa/b/c"] {
            assert!(junk.parse::<Identity>().is_err(), "{junk}");
        }
    }
}
