//! Callers of the control plane authenticated by their Kubernetes service-account token (ID-2,
//! CFG-3), as istiod authenticates them: the projected token (audience `istio-ca`) comes as
//! `authorization: Bearer <jwt>`, the API server verifies it (TokenReview, `authentication.k8s.io/v1`,
//! `spec.audiences: [istio-ca]`), and the caller is the service account it names.
//!
//! A token of a node proxy's service account (`--node-service-account`, and Istio's
//! `istio-system/ztunnel`) that is bound to a pod makes its caller the node proxy of the node
//! that pod runs on: the pod is read back from the API server, its uid must be the token's, and
//! its `spec.nodeName` is the node. A token bound to no pod, or to a pod not scheduled yet,
//! authenticates the service account only: no impersonation.
//!
//! Everything else fails closed: a review that does not say `authenticated`, or does not echo
//! the audience (an API server that ignores audiences), a user that is not a service account,
//! an unreachable API server, a `ClusterID` metadata naming another cluster.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};
use tonic::{Status, metadata::MetadataMap};
use tracing::{debug, info, warn};

use super::{
    Identity,
    caller::{Caller, Credential, NodeAccounts},
};

/// The audience Istio's proxies ask their CA token for, and the only one accepted.
pub const CA_AUDIENCE: &str = "istio-ca";
/// Istio's default cluster ID, which its proxies send when not told otherwise.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// The gRPC metadata Istio's proxies name their cluster in (`ClusterID`, lowercased on the wire).
const CLUSTER_ID_METADATA: &str = "clusterid";
/// The user name prefix of service-account tokens.
const SERVICE_ACCOUNT_USER: &str = "system:serviceaccount:";
/// `status.user.extra` keys of a token bound to a pod; `node-name` only from Kubernetes 1.30.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// How long a positive review is reused (never past the token's `exp`). A TokenReview is a
/// round trip to the API server (plus a GET of the pod for a node proxy): 2.1-2.5 ms each
/// against a local kube-apiserver 1.20 on an idle machine, 6-7 ms with its cores busy (debug
/// build; tests/tests/kube_ca.rs prints it), as much as the rest of a CSR; and Istio's ztunnel
/// sends its token with every CSR, so a node starting 100 pods would cost the API server 100
/// reviews. 10 s keeps that to one per token while bounding how long a revoked token
/// (its pod deleted) still works.
const REVIEW_CACHE_TTL: Duration = Duration::from_secs(10);
/// Bound on cached reviews: one per live token, so a caller presenting many valid tokens cannot
/// grow the cache without limit; when full, expired entries go, and failing that, nothing more
/// is cached (reviews still work, uncached).
const REVIEW_CACHE_MAX: usize = 10_000;

/// What a successful TokenReview says about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSubject {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to, if any.
    pub pod: Option<BoundPod>,
}

/// The pod a token is bound to, as the review names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    pub name: String,
    pub uid: Option<String>,
    /// Only from API servers that bind tokens to nodes too (1.30 and later).
    pub node: Option<String>,
}

/// Reads a TokenReview's status, failing closed: the token must be authenticated, for
/// `audience`, and name a service account.
pub fn subject_of(status: Option<&TokenReviewStatus>, audience: &str) -> Result<TokenSubject, String> {
    let status = status.ok_or("the TokenReview came back without a status")?;
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().filter(|e| !e.is_empty()).unwrap_or("no reason given");
        return Err(format!("the API server did not authenticate the token: {why}"));
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(format!(
            "the API server did not confirm the token's audience `{audience}` (status.audiences {audiences:?})"
        ));
    }
    let user = status.user.as_ref().ok_or("the TokenReview names no user")?;
    let username = user.username.as_deref().unwrap_or_default();
    let (namespace, service_account) = username
        .strip_prefix(SERVICE_ACCOUNT_USER)
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .ok_or_else(|| format!("the token is not a service account's (user `{username}`)"))?;
    let empty = BTreeMap::new();
    let extra = user.extra.as_ref().unwrap_or(&empty);
    let one = |key: &str| -> Result<Option<String>, String> {
        match extra.get(key).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([value]) if !value.is_empty() => Ok(Some(value.clone())),
            Some(values) => Err(format!("status.user.extra `{key}` is not one value: {values:?}")),
        }
    };
    let pod = match one(EXTRA_POD_NAME)? {
        Some(name) => Some(BoundPod { name, uid: one(EXTRA_POD_UID)?, node: one(EXTRA_NODE_NAME)? }),
        None => None,
    };
    Ok(TokenSubject { namespace: namespace.to_owned(), service_account: service_account.to_owned(), pod })
}

/// The node a node proxy's bound pod runs on, from the pod as the API server has it now
/// (`found`: its uid and `spec.nodeName`, `None` when there is no such pod). `Ok(None)`: not
/// scheduled yet, so no node to serve.
pub fn node_of_bound_pod(
    namespace: &str,
    bound: &BoundPod,
    found: Option<(Option<&str>, Option<&str>)>,
) -> Result<Option<String>, String> {
    let name = format!("{namespace}/{}", bound.name);
    let Some((uid, node)) = found else {
        return Err(format!("the token's pod {name} does not exist"));
    };
    if bound.uid.as_deref().is_some_and(|want| uid != Some(want)) {
        return Err(format!("the token's pod {name} was replaced (uid {:?}, the token's {:?})", uid, bound.uid));
    }
    let node = node.filter(|n| !n.is_empty());
    if let (Some(claimed), Some(actual)) = (bound.node.as_deref(), node)
        && claimed != actual
    {
        return Err(format!("the token's pod {name} runs on {actual}, the token says {claimed}"));
    }
    Ok(node.map(str::to_owned))
}

/// The caller a token subject is: its own service account, and for a node proxy's account the
/// node its pod runs on (`node`, from [`node_of_bound_pod`]).
pub fn caller_of_subject(
    subject: &TokenSubject,
    node: Option<String>,
    trust_domain: &str,
    node_accounts: &NodeAccounts,
) -> Caller {
    let identity = Identity::new(trust_domain, &subject.namespace, &subject.service_account);
    let node = if node_accounts.contains(&subject.namespace, &subject.service_account) { node } else { None };
    Caller { identity, node, by: Credential::KubernetesToken }
}

/// The `exp` claim of a JWT, read without checking the signature: only used, after the API
/// server accepted the token, to keep a cached review no longer than the token lives.
pub fn expiry_of(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(claims.get("exp")?.as_u64()?))
}

/// Verifies callers' service-account tokens with the API server.
pub struct KubeTokens {
    client: Client,
    trust_domain: String,
    cluster_id: String,
    node_accounts: NodeAccounts,
    /// Positive reviews by token digest, until when they may be reused.
    cache: Mutex<HashMap<[u8; 32], (Caller, Instant)>>,
    /// Reviews under way, by token digest: requests with the same token arriving together (a
    /// node agent asking for all its pods at once) wait for one review instead of each making one.
    reviewing: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Mutex<()>>>>,
}

impl KubeTokens {
    pub fn new(client: Client, trust_domain: &str, cluster_id: &str, node_accounts: NodeAccounts) -> Self {
        Self {
            client,
            trust_domain: trust_domain.to_owned(),
            cluster_id: cluster_id.to_owned(),
            node_accounts,
            cache: Mutex::new(HashMap::new()),
            reviewing: Mutex::new(HashMap::new()),
        }
    }

    /// The caller `token` names, or why not.
    pub async fn authenticate(&self, token: &str, metadata: &MetadataMap) -> Result<Caller, Status> {
        // Istio's proxies may name their cluster; a name that is not ours (or not text) is refused.
        let claimed = metadata.get(CLUSTER_ID_METADATA).map(|v| v.to_str().unwrap_or("<not text>"));
        if let Some(claimed) = claimed.filter(|c| !c.is_empty() && *c != self.cluster_id) {
            return Err(Status::unauthenticated(format!(
                "the caller says it is in cluster `{claimed}`; this control plane verifies tokens of cluster `{}` \
                 only (--cluster-id)",
                self.cluster_id
            )));
        }
        let key = super::caller::digest(token);
        if let Some(caller) = self.cached(&key) {
            return Ok(caller);
        }
        let turn = self.reviewing.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().clone();
        let result = {
            let _turn = turn.lock().await;
            match self.cached(&key) {
                Some(caller) => Ok(caller),
                None => {
                    let started = Instant::now();
                    let result = self.review(token).await;
                    let took_us = started.elapsed().as_micros() as u64;
                    match &result {
                        Ok(caller) => {
                            debug!(caller = %caller, took_us, "Kubernetes token reviewed");
                            self.remember(key, token, caller);
                        }
                        Err(status) => debug!(took_us, "Kubernetes token refused: {}", status.message()),
                    }
                    result
                }
            }
        };
        let mut reviewing = self.reviewing.lock().unwrap_or_else(|p| p.into_inner());
        // Ours and the map's: nobody else waits, so the entry can go.
        if Arc::strong_count(&turn) <= 2 {
            reviewing.remove(&key);
        }
        result
    }

    async fn review(&self, token: &str) -> Result<Caller, Status> {
        let request = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![CA_AUDIENCE.to_owned()]) },
            ..TokenReview::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &request)
            .await
            .map_err(|e| {
                warn!("TokenReview failed: {e}");
                Status::unavailable(format!("cannot verify the Kubernetes token: the TokenReview failed: {e}"))
            })?;
        let subject = subject_of(reviewed.status.as_ref(), CA_AUDIENCE)
            .map_err(|e| Status::unauthenticated(format!("Kubernetes token refused: {e}")))?;
        let node = match &subject.pod {
            Some(pod) if self.node_accounts.contains(&subject.namespace, &subject.service_account) => {
                self.node_of(&subject.namespace, pod).await?
            }
            _ => None,
        };
        let caller = caller_of_subject(&subject, node, &self.trust_domain, &self.node_accounts);
        if self.node_accounts.contains(&subject.namespace, &subject.service_account) && caller.node.is_none() {
            info!("{caller}: a node proxy's token without a scheduled pod: it may not impersonate workloads");
        }
        Ok(caller)
    }

    async fn node_of(&self, namespace: &str, pod: &BoundPod) -> Result<Option<String>, Status> {
        let found = Api::<Pod>::namespaced(self.client.clone(), namespace).get_opt(&pod.name).await.map_err(|e| {
            warn!("cannot read pod {namespace}/{}: {e}", pod.name);
            Status::unavailable(format!(
                "cannot verify the Kubernetes token: reading its pod {namespace}/{}: {e}",
                pod.name
            ))
        })?;
        let found =
            found.as_ref().map(|p| (p.metadata.uid.as_deref(), p.spec.as_ref().and_then(|s| s.node_name.as_deref())));
        node_of_bound_pod(namespace, pod, found)
            .map_err(|e| Status::unauthenticated(format!("Kubernetes token refused: {e}")))
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Caller> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(key).filter(|(_, until)| Instant::now() < *until).map(|(caller, _)| caller.clone())
    }

    fn remember(&self, key: [u8; 32], token: &str, caller: &Caller) {
        let now = Instant::now();
        let mut until = now + REVIEW_CACHE_TTL;
        if let Some(exp) = expiry_of(token) {
            until = until.min(now + exp.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO));
        }
        if until <= now {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= REVIEW_CACHE_MAX {
            cache.retain(|_, (_, until)| now < *until);
        }
        if cache.len() < REVIEW_CACHE_MAX {
            cache.insert(key, (caller.clone(), until));
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn status(authenticated: bool, audiences: &[&str], username: &str, extra: &[(&str, &[&str])]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            error: (!authenticated).then(|| "token has expired".into()),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: Some(
                    extra.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect(),
                ),
                ..UserInfo::default()
            }),
        }
    }

    const POD: (&str, &[&str]) = (EXTRA_POD_NAME, &["web-0"]);
    const UID: (&str, &[&str]) = (EXTRA_POD_UID, &["u1"]);

    #[test]
    fn reviews_fail_closed() {
        let sa = "system:serviceaccount:shop:web";
        let ok = subject_of(Some(&status(true, &["istio-ca"], sa, &[POD, UID])), CA_AUDIENCE).expect("valid");
        let pod = BoundPod { name: "web-0".into(), uid: Some("u1".into()), node: None };
        assert_eq!(ok, TokenSubject { namespace: "shop".into(), service_account: "web".into(), pod: Some(pod) });
        let unbound = subject_of(Some(&status(true, &["x", "istio-ca"], sa, &[])), CA_AUDIENCE).expect("valid");
        assert_eq!(unbound.pod, None);
        let cases: Vec<(&str, Option<TokenReviewStatus>, &str)> = vec![
            ("no status", None, "without a status"),
            ("not authenticated", Some(status(false, &["istio-ca"], sa, &[])), "token has expired"),
            ("wrong audience", Some(status(true, &["other"], sa, &[])), "audience `istio-ca`"),
            ("audience not echoed", Some(status(true, &[], sa, &[])), "audience `istio-ca`"),
            ("a user", Some(status(true, &["istio-ca"], "alice", &[])), "user `alice`"),
            ("bad account", Some(status(true, &["istio-ca"], "system:serviceaccount:shop", &[])), "not a service"),
            ("two pods", Some(status(true, &["istio-ca"], sa, &[(EXTRA_POD_NAME, &["a", "b"])])), "not one value"),
        ];
        for (what, status, needle) in cases {
            let err = subject_of(status.as_ref(), CA_AUDIENCE).expect_err(what);
            assert!(err.contains(needle), "{what}: {err}");
        }
    }

    #[test]
    fn a_node_proxy_serves_the_node_its_live_pod_runs_on() {
        let bound = BoundPod { name: "strait-node-x".into(), uid: Some("u1".into()), node: None };
        assert_eq!(node_of_bound_pod("ns", &bound, Some((Some("u1"), Some("node1")))), Ok(Some("node1".into())));
        assert_eq!(node_of_bound_pod("ns", &bound, Some((Some("u1"), None))), Ok(None), "not scheduled");
        assert!(node_of_bound_pod("ns", &bound, None).is_err_and(|e| e.contains("ns/strait-node-x does not exist")));
        let replaced = node_of_bound_pod("ns", &bound, Some((Some("u2"), Some("node1"))));
        assert!(replaced.is_err_and(|e| e.contains("replaced")));
        let claims_other = BoundPod { node: Some("node2".into()), ..bound };
        let lied = node_of_bound_pod("ns", &claims_other, Some((Some("u1"), Some("node1"))));
        assert!(lied.is_err_and(|e| e.contains("runs on node1")));
    }

    #[test]
    fn only_node_proxy_accounts_get_a_node() {
        let accounts = NodeAccounts::new(vec![("strait-system".into(), "strait-node".into())]);
        let subject = |ns: &str, sa: &str| TokenSubject { namespace: ns.into(), service_account: sa.into(), pod: None };
        for (ns, sa, node) in [
            ("strait-system", "strait-node", Some("n1")),
            ("istio-system", "ztunnel", Some("n1")),
            ("strait-system", "other", None),
            ("shop", "web", None),
        ] {
            let caller = caller_of_subject(&subject(ns, sa), Some("n1".into()), "td", &accounts);
            assert_eq!(caller.identity, Identity::new("td", ns, sa));
            assert_eq!(caller.node.as_deref(), node, "{ns}/{sa}");
            assert_eq!(caller.by, Credential::KubernetesToken);
        }
    }

    fn jwt_expiring_in(seconds: i64) -> String {
        let encode = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs() as i64;
        format!("{}.{}.sig", encode("{\"alg\":\"ES256\"}"), encode(&format!("{{\"exp\":{}}}", now + seconds)))
    }

    /// Verifying against an address where no API server listens.
    fn unreachable() -> KubeTokens {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        let client = Client::try_from(config).expect("client");
        KubeTokens::new(client, "td", DEFAULT_CLUSTER_ID, NodeAccounts::default())
    }

    // A review is reused no longer than the token lives; no API server to ask, or a caller of
    // another cluster: refused.
    #[tokio::test]
    async fn reviews_are_cached_within_the_tokens_life_and_failures_refuse() {
        let tokens = unreachable();
        let caller = Caller { identity: Identity::new("td", "a", "b"), node: None, by: Credential::KubernetesToken };
        let (lives, expiring, expired) = (jwt_expiring_in(3600), jwt_expiring_in(2), jwt_expiring_in(-10));
        for token in [&lives, &expiring, &expired] {
            tokens.remember(crate::identity::caller::digest(token), token, &caller);
        }
        let cached = |token: &str| tokens.cached(&crate::identity::caller::digest(token));
        assert_eq!(cached(&lives), Some(caller.clone()));
        assert_eq!(cached(&expiring), Some(caller.clone()));
        assert_eq!(cached(&expired), None, "an expired token is not cached");
        // exp has whole seconds: 1-2 s were left.
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(cached(&expiring), None, "gone with the token's exp");
        let metadata = MetadataMap::new();
        assert_eq!(tokens.authenticate(&lives, &metadata).await.expect("cached"), caller);

        let down = tokens.authenticate(&jwt_expiring_in(60), &metadata).await.expect_err("no API server");
        assert_eq!(down.code(), tonic::Code::Unavailable, "{down:?}");
        assert!(down.message().contains("TokenReview failed"), "{down:?}");
        let mut elsewhere = MetadataMap::new();
        elsewhere.insert("clusterid", "cluster-2".parse().expect("ascii"));
        let refused = tokens.authenticate(&lives, &elsewhere).await.expect_err("another cluster");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(refused.message().contains("cluster-2"), "{refused:?}");
        let mut ours = MetadataMap::new();
        ours.insert("clusterid", DEFAULT_CLUSTER_ID.parse().expect("ascii"));
        assert_eq!(tokens.authenticate(&lives, &ours).await.expect("our cluster"), caller);
    }

    #[test]
    fn expiry_comes_from_the_exp_claim() {
        let encode = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let token = format!("{}.{}.sig", encode("{\"alg\":\"RS256\"}"), encode("{\"exp\":1700000000,\"sub\":\"x\"}"));
        assert_eq!(expiry_of(&token), Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)));
        for junk in ["", "a.b.c", "only-one-part", &format!("x.{}.y", encode("{\"exp\":\"soon\"}"))] {
            assert_eq!(expiry_of(junk), None, "{junk}");
        }
    }
}
