//! Authorization (AUTHZ-1..3) and peer authentication modes (L4-4): pure decisions over the
//! compiled model, so every rule of Istio's semantics is a table test rather than a socket test.
//!
//! `compile` turns AuthorizationPolicy resources into `Policy` values (called by
//! `model::compile`, which also scopes them to workloads); `evaluate` decides one connection or
//! request. The node proxy evaluates with no HTTP request (L4); a waypoint passes the request and
//! gets the full L7 semantics from the same policies.

mod compile;
pub mod peer_authn;
pub mod policy;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, net::IpAddr};

pub use compile::compile_policy;
pub use policy::{Action, Attribute, Layer, Policy, Predicate, Rule, Scope, StringMatch, Value};

use crate::identity::Identity;

/// Annotation that makes a policy report-only.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// What a policy decision looks at.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The peer's verified identity (mTLS); `None` for plaintext. The source principal and
    /// namespace both come from here and from nowhere else: an address proves neither.
    pub source: Option<Identity>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
    /// The request, when the deciding proxy parsed HTTP (waypoint, gateway); `None` at L4.
    pub http: Option<HttpRequest>,
}

/// The HTTP attributes of a request, for L7 authorization.
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    /// `:authority` / `Host`, port included or not.
    pub host: Option<String>,
    pub method: String,
    /// Path with any query string (the query is ignored when matching).
    pub path: String,
    /// Header names in any case.
    pub headers: Vec<(String, String)>,
    /// Original client from `X-Forwarded-For`, when trusted; defaults to the source IP.
    pub remote_ip: Option<IpAddr>,
    /// `iss/sub` of a validated JWT.
    pub request_principal: Option<String>,
    pub audiences: Vec<String>,
    /// `azp` of the JWT.
    pub presenter: Option<String>,
    /// JWT claims by name (nested claims by dotted path), list claims with every element.
    pub claims: BTreeMap<String, Vec<String>>,
    /// SNI of the TLS connection the request arrived on, when this proxy terminated it.
    pub sni: Option<String>,
}

/// The outcome of authorization, with enough to explain it in an access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the policy that decided; `None` when no policy did (allowed for
    /// want of ALLOW policies, or denied because none of them matched).
    pub policy: Option<String>,
    pub reason: String,
    /// Every dry-run policy evaluated, with whether it matched: a matching dry-run DENY, or no
    /// matching dry-run ALLOW, is what enforcing them would have changed.
    pub dry_run: Vec<(String, bool)>,
}

impl Decision {
    /// Words for an access log: which policy denied, or that none allowed.
    pub fn denial_reason(&self) -> String {
        match &self.policy {
            Some(policy) => format!("denied by AuthorizationPolicy {policy}: {}", self.reason),
            None => format!("denied: {}", self.reason),
        }
    }
}

/// Decides a connection (or, with `conn.http`, a request) against the policies that apply to
/// its destination, in Istio's order: DENY first, then "no ALLOW policy means allow", then any
/// matching ALLOW, else deny. Dry-run policies are only recorded; AUDIT policies do not take
/// part. CUSTOM policies count as DENY: strait cannot ask their external authorizer, so what
/// their rules match is refused (fail closed; `compile` warns).
pub fn evaluate<'a>(policies: impl IntoIterator<Item = &'a Policy>, conn: &Connection) -> Decision {
    let mut dry_run = Vec::new();
    let mut denied_by = None;
    let mut allowed_by = None;
    let mut has_allow = false;
    for policy in policies {
        if !matches!(policy.action, Action::Allow | Action::Deny | Action::Custom) {
            continue;
        }
        if policy.dry_run {
            dry_run.push((policy.key(), policy.matches(conn)));
            continue;
        }
        match policy.action {
            Action::Deny | Action::Custom if denied_by.is_none() && policy.matches(conn) => denied_by = Some(policy),
            Action::Allow => {
                has_allow = true;
                if allowed_by.is_none() && policy.matches(conn) {
                    allowed_by = Some(policy);
                }
            }
            _ => {}
        }
    }
    let (allowed, policy, reason) = match (denied_by, allowed_by) {
        (Some(p), _) if p.action == Action::Custom => (
            false,
            Some(p.key()),
            format!("denied by CUSTOM policy {}: strait has no external authorizer to ask (fail closed)", p.key()),
        ),
        (Some(p), _) => (false, Some(p.key()), format!("denied by DENY policy {}", p.key())),
        _ if !has_allow => (true, None, "no ALLOW policy applies".to_owned()),
        (None, Some(p)) => (true, Some(p.key()), format!("allowed by ALLOW policy {}", p.key())),
        (None, None) => (false, None, "ALLOW policies apply but none matched".to_owned()),
    };
    Decision { allowed, policy, reason, dry_run }
}
