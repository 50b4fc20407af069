//! Security resources in the model: AuthorizationPolicies scoped to the workloads they apply
//! to, PeerAuthentications indexed by level, RequestAuthentications stored for the waypoint.
//!
//! Scoping happens once per configuration, so the data path looks up a workload's policies
//! instead of testing every policy's selector on every connection.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use serde::Serialize;

use super::{Service, WaypointName, Workload};
use crate::authz::{
    Policy, Scope, compile_policy,
    peer_authn::{PeerAuthn, PeerAuthnChain, PeerAuthnScope, compile_peer_authn},
};
use crate::config::{Diagnostic, JwtRule, Located, Origin, PolicyTargetRef, RequestAuthentication, Resource};

/// A RequestAuthentication (L7-10): enforced by the waypoints it is bound to with
/// `targetRefs`; the node proxy does not use it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestAuthn {
    pub name: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub target_refs: Vec<PolicyTargetRef>,
    pub jwt_rules: Vec<JwtRule>,
    #[serde(skip)]
    pub origin: Origin,
}

/// Everything security-related the model holds.
#[derive(Debug, Default, Serialize)]
pub struct Security {
    pub authorization_policies: Vec<Arc<Policy>>,
    pub peer_authentications: Vec<Arc<PeerAuthn>>,
    pub request_authentications: Vec<Arc<RequestAuthn>>,
    /// Policies applying to each workload, by namespace then pod name, in file order.
    #[serde(skip)]
    authz_by_workload: HashMap<String, HashMap<String, Vec<Arc<Policy>>>>,
    #[serde(skip)]
    peer_mesh: Option<Arc<PeerAuthn>>,
    #[serde(skip)]
    peer_by_namespace: HashMap<String, Arc<PeerAuthn>>,
    #[serde(skip)]
    peer_by_workload: HashMap<String, HashMap<String, Arc<PeerAuthn>>>,
    /// The namespace whose policies apply mesh-wide.
    #[serde(skip)]
    pub root_namespace: String,
}

/// The parts of a `Security` that arrive already scoped, as a control plane serves them (CFG-2):
/// policies bound to workloads by the control plane rather than by labels, and each workload's
/// mTLS settings resolved into one workload-level PeerAuthentication.
#[derive(Debug, Default)]
pub struct SecurityParts {
    /// The namespace whose policies apply mesh-wide.
    pub root_namespace: String,
    /// Every policy, those bound to workloads and those bound to waypoints (`targetRefs`).
    pub authorization_policies: Vec<Arc<Policy>>,
    /// The policies applying to each workload, by (namespace, pod name), in evaluation order.
    pub authorization_by_workload: HashMap<(String, String), Vec<Arc<Policy>>>,
    /// The mTLS settings of each workload that has any, by (namespace, pod name).
    pub peer_authn_by_workload: HashMap<(String, String), Arc<PeerAuthn>>,
    pub request_authentications: Vec<Arc<RequestAuthn>>,
}

impl Security {
    /// Builds the security part of a model from parts scoped elsewhere, with its indexes.
    pub fn from_parts(parts: SecurityParts) -> Security {
        let mut security = Security {
            authorization_policies: parts.authorization_policies,
            request_authentications: parts.request_authentications,
            root_namespace: parts.root_namespace,
            ..Security::default()
        };
        for ((namespace, name), policies) in parts.authorization_by_workload {
            security.authz_by_workload.entry(namespace).or_default().insert(name, policies);
        }
        let mut peer: Vec<_> = parts.peer_authn_by_workload.into_iter().collect();
        peer.sort_by(|a, b| a.0.cmp(&b.0));
        for ((namespace, name), pa) in peer {
            security.peer_authentications.push(pa.clone());
            security.peer_by_workload.entry(namespace).or_default().insert(name, pa);
        }
        security
    }

    pub fn authorization_for(&self, workload: &Workload) -> &[Arc<Policy>] {
        self.authz_by_workload
            .get(&workload.namespace)
            .and_then(|pods| pods.get(&workload.name))
            .map_or(&[], Vec::as_slice)
    }

    /// The AuthorizationPolicies a waypoint enforces for a request to `service` (AUTHZ-3 at
    /// the waypoint): those bound to the service, to the waypoint, or to every waypoint.
    pub fn authorization_at_waypoint<'a>(
        &'a self,
        service: Option<&'a Service>,
        waypoint: &'a WaypointName,
    ) -> impl Iterator<Item = &'a Policy> + 'a {
        self.authorization_policies
            .iter()
            .map(Arc::as_ref)
            .filter(move |p| p.binds_waypoint(service, waypoint, &self.root_namespace))
    }

    /// The RequestAuthentications a waypoint enforces for requests to `service` (L7-10).
    pub fn request_authn_at_waypoint<'a>(
        &'a self,
        service: Option<&'a Service>,
        waypoint: &'a WaypointName,
    ) -> impl Iterator<Item = &'a Arc<RequestAuthn>> + 'a {
        self.request_authentications.iter().filter(move |ra| {
            crate::authz::policy::targets_bind_waypoint(
                &ra.target_refs,
                &ra.namespace,
                service,
                waypoint,
                &self.root_namespace,
            )
        })
    }

    pub fn peer_authn_for(&self, workload: &Workload) -> PeerAuthnChain<'_> {
        PeerAuthnChain {
            mesh: self.peer_mesh.as_deref(),
            namespace: self.peer_by_namespace.get(&workload.namespace).map(Arc::as_ref),
            workload: self
                .peer_by_workload
                .get(&workload.namespace)
                .and_then(|pods| pods.get(&workload.name))
                .map(Arc::as_ref),
        }
    }
}

pub fn compile_security(
    resources: &[Located<Resource>],
    workloads: &[Arc<Workload>],
    root_namespace: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Security {
    let mut security = Security { root_namespace: root_namespace.to_owned(), ..Security::default() };
    for located in resources {
        match &located.resource {
            Resource::AuthorizationPolicy(policy) => {
                if let Some(policy) = compile_policy(&located.origin, policy, root_namespace, diagnostics) {
                    security.authorization_policies.push(Arc::new(policy));
                }
            }
            Resource::PeerAuthentication(pa) => {
                if let Some(pa) = compile_peer_authn(&located.origin, pa, root_namespace, diagnostics) {
                    security.peer_authentications.push(Arc::new(pa));
                }
            }
            Resource::RequestAuthentication(ra) => {
                if let Some(ra) = compile_request_authn(&located.origin, ra, diagnostics) {
                    security.request_authentications.push(Arc::new(ra));
                }
            }
            _ => {}
        }
    }
    scope_authorization(&mut security, workloads, diagnostics);
    index_peer_authn(&mut security, workloads, diagnostics);
    for ra in &security.request_authentications {
        let selects =
            |w: &Workload| w.namespace == ra.namespace && ra.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v));
        if !ra.selector.is_empty() && !workloads.iter().any(|w| selects(w)) {
            diagnostics.push(selects_nothing(&ra.origin, &ra.selector));
        }
    }
    security
}

fn scope_authorization(security: &mut Security, workloads: &[Arc<Workload>], diagnostics: &mut Vec<Diagnostic>) {
    let by_namespace = super::services::by_namespace(workloads);
    let all: Vec<&Arc<Workload>> = workloads.iter().collect();
    for policy in &security.authorization_policies {
        let mut selected = false;
        // Only the workloads the policy's scope can reach are looked at (see `by_namespace`).
        let candidates: &[&Arc<Workload>] = match &policy.scope {
            Scope::Mesh | Scope::Selector { all_namespaces: true, .. } => &all,
            Scope::Namespace | Scope::Selector { .. } => {
                by_namespace.get(policy.namespace.as_str()).map_or(&[][..], Vec::as_slice)
            }
            Scope::TargetRefs(_) => &[],
        };
        for w in candidates.iter().filter(|w| policy.selects(w)) {
            selected = true;
            let pods = security.authz_by_workload.entry(w.namespace.clone()).or_default();
            pods.entry(w.name.clone()).or_default().push(policy.clone());
        }
        if let (Scope::Selector { labels, .. }, false) = (&policy.scope, selected) {
            diagnostics.push(selects_nothing(&policy.origin, labels));
        }
    }
}

/// One policy per level, the first in file order where Istio would keep the oldest, with a
/// warning for each one shadowed.
fn index_peer_authn(security: &mut Security, workloads: &[Arc<Workload>], diagnostics: &mut Vec<Diagnostic>) {
    let shadowed = |pa: &PeerAuthn, winner: &PeerAuthn, what: &str| {
        Diagnostic::warning(
            pa.origin.clone(),
            Some("metadata.name"),
            format!(
                "{what} is already set by PeerAuthentication {} at {}; this one is ignored (Istio keeps the oldest)",
                winner.key(),
                winner.origin
            ),
        )
    };
    for pa in &security.peer_authentications {
        match &pa.scope {
            PeerAuthnScope::Mesh => match &security.peer_mesh {
                Some(winner) => diagnostics.push(shadowed(pa, winner, "the mesh-wide mTLS mode")),
                None => security.peer_mesh = Some(pa.clone()),
            },
            PeerAuthnScope::Namespace => match security.peer_by_namespace.get(&pa.namespace) {
                Some(winner) => {
                    diagnostics.push(shadowed(pa, winner, &format!("the mTLS mode of namespace `{}`", pa.namespace)))
                }
                None => {
                    security.peer_by_namespace.insert(pa.namespace.clone(), pa.clone());
                }
            },
            PeerAuthnScope::Selector(labels) => {
                let selected = workloads
                    .iter()
                    .filter(|w| w.namespace == pa.namespace && labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)));
                let mut any = false;
                for w in selected {
                    any = true;
                    let pods = security.peer_by_workload.entry(w.namespace.clone()).or_default();
                    match pods.get(&w.name) {
                        Some(winner) => diagnostics.push(shadowed(
                            pa,
                            winner,
                            &format!("the mTLS mode of pod {}", w.display_name()),
                        )),
                        None => {
                            pods.insert(w.name.clone(), pa.clone());
                        }
                    }
                }
                if !any {
                    diagnostics.push(selects_nothing(&pa.origin, labels));
                }
            }
        }
    }
}

fn compile_request_authn(
    origin: &Origin,
    ra: &RequestAuthentication,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<RequestAuthn> {
    let mut errors = 0;
    let mut warnings = Vec::new();
    for (i, rule) in ra.spec.jwt_rules.iter().enumerate() {
        let mut error = |field: String, message: String| {
            errors += 1;
            diagnostics.push(Diagnostic::error(origin.clone(), Some(&field), message));
        };
        if rule.issuer.is_empty() {
            error(format!("spec.jwtRules[{i}].issuer"), "must be set".to_owned());
        }
        let unapplied = [
            ("outputClaimToHeaders", !rule.output_claim_to_headers.is_empty(), "claims are not copied to headers"),
            ("timeout", rule.timeout.is_some(), "strait's own JWKS fetch timeout applies"),
        ];
        for (field, set, what) in unapplied {
            if set {
                warnings.push(Diagnostic::warning(
                    origin.clone(),
                    Some(&format!("spec.jwtRules[{i}].{field}")),
                    format!("not supported yet; ignored ({what})"),
                ));
            }
        }
        if let Some(uri) = &rule.jwks_uri {
            let field = format!("spec.jwtRules[{i}].jwksUri");
            if uri.starts_with("https://") && rule.jwks.is_none() {
                warnings.push(Diagnostic::warning(
                    origin.clone(),
                    Some(&field),
                    format!(
                        "`{uri}`: strait has no public CA bundle to fetch https:// JWKS with; tokens of this issuer \
                         are refused until the keys are given inline (`jwks`) or as a file:// URI"
                    ),
                ));
            } else if !(uri.starts_with("http://") || uri.starts_with("https://") || uri.starts_with("file:///")) {
                error(field, format!("`{uri}` is not an http://, https:// or file:/// URI"));
            }
        }
    }
    diagnostics.append(&mut warnings);
    let mut target_refs = ra.spec.target_refs.clone();
    target_refs.extend(ra.spec.target_ref.clone());
    if target_refs.is_empty() {
        diagnostics.push(Diagnostic::warning(
            origin.clone(),
            Some("spec.targetRefs"),
            "in ambient mode JWTs are checked by waypoints: bind the RequestAuthentication to a Service or a \
             waypoint Gateway with `targetRefs`, or it is not enforced",
        ));
    }
    (errors == 0).then(|| RequestAuthn {
        name: ra.metadata.name.clone(),
        namespace: ra.metadata.namespace_or_default().to_owned(),
        selector: ra.spec.selector.as_ref().map(|s| s.match_labels.clone()).unwrap_or_default(),
        target_refs,
        jwt_rules: ra.spec.jwt_rules.clone(),
        origin: origin.clone(),
    })
}

/// Istio's IST0127 (NoMatchingWorkloadsFound), as a warning: the policy may be ahead of its pods.
fn selects_nothing(origin: &Origin, labels: &BTreeMap<String, String>) -> Diagnostic {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Diagnostic::warning(
        origin.clone(),
        Some("spec.selector.matchLabels"),
        format!("no workload has the labels {}; the policy applies to nothing", labels.join(",")),
    )
}
