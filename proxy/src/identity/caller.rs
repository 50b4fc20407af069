//! Who is calling the control plane (CFG-3, ID-2): a node proxy or a workload, established by a
//! bootstrap token, a Kubernetes service-account token (`kube_tokens`, with `--kubernetes`), or
//! a client certificate the control plane's CA issued.
//!
//! Bootstrap tokens live in one directory, one file per caller, holding the token on one line:
//! ```text
//! TOKENS/nodes/<node-name>                          the node proxy of <node-name>
//! TOKENS/serviceaccounts/<namespace>/<account>      a workload running as that service account
//!                                                   (a waypoint, a gateway)
//! ```
//! The directory is read again at most once a second, so tokens can be added and revoked while
//! the control plane runs.
//!
//! A node proxy's certificate names its node: its SPIFFE URI is a node proxy's service account
//! (`spiffe://<td>/ns/istio-system/sa/ztunnel`, the one istiod trusts to impersonate workloads,
//! which bootstrap tokens give, or another of [`NodeAccounts`]) and its subject is
//! `O=system:nodes, CN=system:node:<node-name>`, as Kubernetes names nodes in their client
//! certificates. Only the CA puts that subject in, and only for a caller already authenticated
//! as that node, so presenting the certificate proves the node.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use rustls::{
    client::ResolvesClientCert,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer},
    sign::CertifiedKey,
};
use tonic::{Status, metadata::MetadataMap};
use tracing::warn;

use super::{Identity, IssuedCert, kube_tokens::KubeTokens, tls::identity_of};

/// Namespace and service account of node proxies: Istio's ztunnel's, which is what istiod lets
/// impersonate the workloads of its node.
pub const NODE_PROXY_NAMESPACE: &str = "istio-system";
pub const NODE_PROXY_SERVICE_ACCOUNT: &str = "ztunnel";
/// The node proxies' service account in a strait install (its DaemonSet's), the default of
/// `--node-service-account`.
pub const STRAIT_NODE_ACCOUNT: (&str, &str) = ("strait-system", "strait-node");
/// Prefix of the common name of a node proxy's certificate (Kubernetes' node naming).
pub const NODE_COMMON_NAME_PREFIX: &str = "system:node:";
/// Organization of a node proxy's certificate.
pub const NODE_ORGANIZATION: &str = "system:nodes";
/// A token directory is read again after this long; cheap, and revocation is quick.
const TOKENS_REFRESH: Duration = Duration::from_secs(1);
/// An unknown token makes the directory be read again if the last read is older than this, so
/// a token added just before its proxy starts works at once, while a caller trying tokens
/// cannot make the control plane read the directory more than ten times a second.
const TOKENS_REFRESH_ON_MISS: Duration = Duration::from_millis(100);

/// The identity node proxies hold in `trust_domain`.
pub fn node_proxy_identity(trust_domain: &str) -> Identity {
    Identity::new(trust_domain, NODE_PROXY_NAMESPACE, NODE_PROXY_SERVICE_ACCOUNT)
}

/// The service accounts node proxies run as: their tokens and certificates may name a node, and
/// so impersonate the workloads of that node. Istio's `istio-system/ztunnel` always is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAccounts(Vec<(String, String)>);

impl NodeAccounts {
    pub fn new(accounts: Vec<(String, String)>) -> Self {
        Self(accounts)
    }

    pub fn contains(&self, namespace: &str, service_account: &str) -> bool {
        (namespace, service_account) == (NODE_PROXY_NAMESPACE, NODE_PROXY_SERVICE_ACCOUNT)
            || self.0.iter().any(|(ns, sa)| ns == namespace && sa == service_account)
    }

    /// `namespace/service-account`, as `--node-service-account` takes it.
    pub fn parse_account(text: &str) -> Result<(String, String), String> {
        match text.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => Ok((ns.into(), sa.into())),
            _ => Err(format!("`{text}` is not <namespace>/<service-account>")),
        }
    }
}

impl Default for NodeAccounts {
    fn default() -> Self {
        Self(vec![(STRAIT_NODE_ACCOUNT.0.into(), STRAIT_NODE_ACCOUNT.1.into())])
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The identity it holds: the node proxies' identity for a node proxy.
    pub identity: Identity,
    /// Set for a node proxy: the node it serves.
    pub node: Option<String>,
    /// How it proved it, for the logs.
    pub by: Credential,
}

/// What a caller proved itself with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    BootstrapToken,
    ClientCertificate,
    /// A service-account token the Kubernetes API server verified (TokenReview).
    KubernetesToken,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let by = match self.by {
            Credential::BootstrapToken => "bootstrap token",
            Credential::ClientCertificate => "client certificate",
            Credential::KubernetesToken => "Kubernetes token",
        };
        match &self.node {
            Some(node) => write!(f, "the node proxy of {node} (by {by})"),
            None => write!(f, "{} (by {by})", self.identity),
        }
    }
}

/// The caller a verified client certificate names, put in each request's extensions by the
/// server that did the handshake.
#[derive(Debug, Clone)]
pub struct PeerCertificate(pub Caller);

/// The caller named by a client certificate that chains to the mesh root (checked by TLS).
pub fn caller_of_certificate(leaf: &CertificateDer<'_>, node_accounts: &NodeAccounts) -> Result<Caller, String> {
    let identity = identity_of(leaf).map_err(|e| format!("client certificate: {e}"))?;
    let (_, x509) = x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("client certificate: {e}"))?;
    let node = x509
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .find_map(|cn| cn.strip_prefix(NODE_COMMON_NAME_PREFIX))
        .map(str::to_owned);
    let node = match node {
        Some(node) if node_accounts.contains(&identity.namespace, &identity.service_account) => Some(node),
        Some(node) => {
            return Err(format!("client certificate names node {node} but is for {identity}, not a node proxy"));
        }
        None => None,
    };
    Ok(Caller { identity, node, by: Credential::ClientCertificate })
}

/// Authenticates callers of the control plane: a verified client certificate first, else a
/// bearer token.
#[tonic::async_trait]
pub trait Authenticate: Send + Sync {
    async fn authenticate(&self, extensions: &http::Extensions, metadata: &MetadataMap) -> Result<Caller, Status>;
}

/// Client certificates, bootstrap tokens from a directory (layout in the module docs), and
/// Kubernetes service-account tokens when the control plane runs with `--kubernetes`.
pub struct CallerAuthenticator {
    trust_domain: String,
    tokens: Option<BootstrapTokens>,
    kube: Option<KubeTokens>,
}

impl CallerAuthenticator {
    pub fn new(trust_domain: &str, token_dir: Option<&Path>) -> Self {
        Self { trust_domain: trust_domain.to_owned(), tokens: token_dir.map(BootstrapTokens::new), kube: None }
    }

    /// Also accepts service-account tokens, verified by the API server.
    pub fn with_kubernetes(mut self, kube: KubeTokens) -> Self {
        self.kube = Some(kube);
        self
    }
}

#[tonic::async_trait]
impl Authenticate for CallerAuthenticator {
    async fn authenticate(&self, extensions: &http::Extensions, metadata: &MetadataMap) -> Result<Caller, Status> {
        if let Some(PeerCertificate(caller)) = extensions.get::<PeerCertificate>() {
            return Ok(caller.clone());
        }
        let Some(header) = metadata.get("authorization") else {
            return Err(Status::unauthenticated(
                "no credential: present a client certificate issued by this control plane, or \
                 `authorization: Bearer <token>` with a bootstrap token or a Kubernetes service-account token \
                 (audience istio-ca)",
            ));
        };
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| Status::unauthenticated("the authorization metadata is not `Bearer <token>`"))?;
        let holder = self.tokens.as_ref().and_then(|tokens| tokens.lookup(token));
        match holder {
            Some(Holder::Node(node)) => Ok(Caller {
                identity: node_proxy_identity(&self.trust_domain),
                node: Some(node),
                by: Credential::BootstrapToken,
            }),
            Some(Holder::ServiceAccount(ns, sa)) => Ok(Caller {
                identity: Identity::new(&self.trust_domain, &ns, &sa),
                node: None,
                by: Credential::BootstrapToken,
            }),
            None => match (&self.kube, &self.tokens) {
                (Some(kube), _) => kube.authenticate(token, metadata).await,
                (None, Some(_)) => Err(Status::unauthenticated("bootstrap token not accepted by this control plane")),
                (None, None) => Err(Status::unauthenticated(
                    "this control plane has no bootstrap tokens (--bootstrap-tokens) and does not verify Kubernetes \
                     tokens (--kubernetes): present a client certificate",
                )),
            },
        }
    }
}

/// Who a bootstrap token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Holder {
    Node(String),
    ServiceAccount(String, String),
}

/// The token directory, cached for a second. Tokens are kept as their SHA-256, so a lookup's
/// timing says nothing about how much of a guess was right.
struct BootstrapTokens {
    dir: PathBuf,
    cache: Mutex<Option<(Instant, Arc<TokenTable>)>>,
}

/// Token digests and whose they are.
type TokenTable = HashMap<[u8; 32], Holder>;

impl BootstrapTokens {
    fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), cache: Mutex::new(None) }
    }

    fn lookup(&self, token: &str) -> Option<Holder> {
        let key = digest(token);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let fresh_enough =
            |age: Duration, found: bool| age < if found { TOKENS_REFRESH } else { TOKENS_REFRESH_ON_MISS };
        if let Some((read_at, tokens)) = &*cache {
            let found = tokens.get(&key).cloned();
            if fresh_enough(read_at.elapsed(), found.is_some()) {
                return found;
            }
        }
        let tokens = Arc::new(read_tokens(&self.dir));
        *cache = Some((Instant::now(), tokens.clone()));
        tokens.get(&key).cloned()
    }
}

pub(super) fn digest(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(::ring::digest::digest(&::ring::digest::SHA256, token.trim().as_bytes()).as_ref());
    out
}

/// Reads every token file; a token found in two files belongs to neither.
fn read_tokens(dir: &Path) -> TokenTable {
    let mut found: Vec<(String, Holder)> = Vec::new();
    let read = |path: &Path| match fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
        Ok(_) => {
            warn!(file = %path.display(), "empty bootstrap token file: ignored");
            None
        }
        Err(e) => {
            warn!(file = %path.display(), "cannot read the bootstrap token file: {e}");
            None
        }
    };
    for (node, path) in files_in(&dir.join("nodes")) {
        if let Some(token) = read(&path) {
            found.push((token, Holder::Node(node)));
        }
    }
    for (namespace, ns_dir) in files_in(&dir.join("serviceaccounts")) {
        for (account, path) in files_in(&ns_dir) {
            if let Some(token) = read(&path) {
                found.push((token, Holder::ServiceAccount(namespace.clone(), account)));
            }
        }
    }
    let mut tokens = TokenTable::new();
    let mut shared = Vec::new();
    for (token, holder) in found {
        let key = digest(&token);
        if let Some(first) = tokens.insert(key, holder.clone()) {
            warn!(?first, second = ?holder, "two callers share one bootstrap token: it authenticates neither");
            shared.push(key);
        }
    }
    for key in shared {
        tokens.remove(&key);
    }
    tokens
}

/// `(file name, path)` of the entries of `dir` (none if it does not exist), skipping hidden
/// ones (editors' and Kubernetes' `..data` links).
fn files_in(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .filter(|(name, _)| !name.starts_with('.'))
        .collect()
}

/// The certificate a client presents to the control plane, when it holds one: read at every
/// handshake, so a renewed certificate is used from the next connection on.
pub struct ClientCertSlot {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for ClientCertSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.current.read().map(|c| c.is_some()).unwrap_or(false);
        f.debug_struct("ClientCertSlot").field("held", &held).finish()
    }
}

impl Default for ClientCertSlot {
    fn default() -> Self {
        Self { current: RwLock::new(None) }
    }
}

impl ClientCertSlot {
    /// Presents `cert` from the next handshake on.
    pub fn set(&self, cert: &IssuedCert) -> Result<(), super::IdentityError> {
        let key = ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(cert.key.clone_key()))
            .map_err(|e| super::IdentityError::Tls(e.to_string()))?;
        let certified = Arc::new(CertifiedKey::new(cert.chain.clone(), key));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(certified);
        Ok(())
    }

    pub fn is_set(&self) -> bool {
        self.current.read().map(|c| c.is_some()).unwrap_or(false)
    }
}

impl ResolvesClientCert for ClientCertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().and_then(|c| c.clone())
    }

    fn has_certs(&self) -> bool {
        self.is_set()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LocalCa;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("strait-caller-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn metadata(token: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(t) = token {
            m.insert("authorization", format!("Bearer {t}").parse().expect("ascii"));
        }
        m
    }

    // The documented layout: nodes/<node>, serviceaccounts/<ns>/<sa>; shared tokens count for
    // nobody; files added later are found.
    #[tokio::test]
    async fn tokens_name_nodes_and_service_accounts() {
        let dir = temp("tokens");
        fs::create_dir_all(dir.join("nodes")).expect("mkdir");
        fs::create_dir_all(dir.join("serviceaccounts/shop")).expect("mkdir");
        fs::write(dir.join("nodes/node1"), "n1-secret\n").expect("write");
        fs::write(dir.join("nodes/node2"), "shared").expect("write");
        fs::write(dir.join("serviceaccounts/shop/waypoint"), "wp-secret").expect("write");
        fs::write(dir.join("serviceaccounts/shop/other"), "shared").expect("write");
        let auth = CallerAuthenticator::new("cluster.local", Some(&dir));
        let ext = http::Extensions::new();
        let node1 = auth.authenticate(&ext, &metadata(Some("n1-secret"))).await.expect("node1");
        assert_eq!(node1.node.as_deref(), Some("node1"));
        assert_eq!(node1.identity, node_proxy_identity("cluster.local"));
        let wp = auth.authenticate(&ext, &metadata(Some("wp-secret"))).await.expect("waypoint");
        assert_eq!((wp.identity, wp.node), (Identity::new("cluster.local", "shop", "waypoint"), None));
        for bad in [Some("shared"), Some("nope"), None] {
            let err = auth.authenticate(&ext, &metadata(bad)).await.expect_err("refused");
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    // A node proxy's certificate names its node; a workload's names none; the certificate wins
    // over a token.
    #[tokio::test]
    async fn certificates_name_their_caller() {
        let dir = temp("certs");
        let ca = LocalCa::load_or_create(&dir, "cluster.local").expect("ca");
        let node = ca.issue_for_node(&node_proxy_identity("cluster.local"), "node7", Duration::from_secs(60));
        let node = node.expect("issue");
        let caller = caller_of_certificate(&node.chain[0], &NodeAccounts::default()).expect("caller");
        assert_eq!(caller.node.as_deref(), Some("node7"));
        let workload =
            ca.issue_local(&Identity::new("cluster.local", "a", "b"), Duration::from_secs(60)).expect("issue");
        let caller = caller_of_certificate(&workload.chain[0], &NodeAccounts::default()).expect("caller");
        assert_eq!(caller.node, None);
        // A node certificate is believed only for a node proxy's service account.
        let strait_node = Identity::new("cluster.local", "strait-system", "strait-node");
        let cert = ca.issue_for_node(&strait_node, "node8", Duration::from_secs(60)).expect("issue");
        let named = caller_of_certificate(&cert.chain[0], &NodeAccounts::default()).expect("caller");
        assert_eq!((named.identity, named.node.as_deref()), (strait_node, Some("node8")));
        let only_istio = NodeAccounts::new(Vec::new());
        let refused = caller_of_certificate(&cert.chain[0], &only_istio).expect_err("not a node account");
        assert!(refused.contains("not a node proxy"), "{refused}");
        let mut ext = http::Extensions::new();
        ext.insert(PeerCertificate(caller.clone()));
        let auth = CallerAuthenticator::new("cluster.local", None);
        assert_eq!(auth.authenticate(&ext, &metadata(Some("whatever"))).await.expect("cert"), caller);
        let _ = fs::remove_dir_all(&dir);
    }
}
