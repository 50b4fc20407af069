//! RequestAuthentication at the waypoint (L7-10): which JWT rules apply to a request, with
//! their keys loaded: inline and file JWKS when the configuration changes, http:// JWKS
//! fetched in the background and refreshed, so no request ever waits for a key download.
//!
//! Until a rule's keys are loaded its tokens are refused (401), never waved through.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::jwt::{self, JwksSource, JwtProvider};
use crate::{
    authz::policy::targets_bind_waypoint,
    config::JwtRule,
    model::{Model, ModelHandle, RequestAuthn, Service, WaypointName},
};

/// How long a fetched JWKS is used before it is fetched again (Istio refreshes every 20 min;
/// keys rotate rarely, and a failed refresh keeps the last good keys).
const JWKS_REFRESH: Duration = Duration::from_secs(5 * 60);
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the background task looks for due refreshes and pending fetches.
const TICK: Duration = Duration::from_secs(1);

/// The JWT providers in force, by the service they guard.
#[derive(Default)]
pub struct Authn {
    table: RwLock<Arc<AuthnTable>>,
}

#[derive(Default)]
struct AuthnTable {
    /// By service hostname: providers of every RequestAuthentication bound to the service or
    /// to the waypoint.
    by_service: HashMap<String, Arc<[JwtProvider]>>,
    /// For pods addressed directly: those bound to the waypoint.
    waypoint_only: Arc<[JwtProvider]>,
}

impl Authn {
    /// The providers checking requests to `service` (`None`: to a pod).
    pub fn providers(&self, service: Option<&Service>) -> Arc<[JwtProvider]> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner()).clone();
        match service {
            Some(s) => table.by_service.get(&s.hostname).cloned().unwrap_or_else(|| Arc::from(Vec::new())),
            None => table.waypoint_only.clone(),
        }
    }

    /// Loads the rules of `model` (fetching http:// keys once), then keeps them in step with
    /// every configuration change and keeps http:// JWKS fresh, in the background. Returns
    /// once the first table is in place, so no request is served before its rules apply.
    pub async fn start(model: ModelHandle, waypoint: WaypointName) -> Arc<Self> {
        let authn = Arc::new(Self::default());
        let mut fetched: HashMap<String, (String, Instant)> = HashMap::new();
        let current = model.current();
        refresh_due(&current, &waypoint, &mut fetched).await;
        authn.set(build(&current, &waypoint, &fetched));
        tokio::spawn(authn.clone().keep_in_step(model, waypoint, fetched, current.generation));
        authn
    }

    fn set(&self, table: AuthnTable) {
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }

    async fn keep_in_step(
        self: Arc<Self>,
        mut model: ModelHandle,
        waypoint: WaypointName,
        mut fetched: HashMap<String, (String, Instant)>,
        mut built_for: u64,
    ) {
        loop {
            tokio::select! {
                changed = model.changed() => if !changed { return },
                _ = tokio::time::sleep(TICK) => {}
            }
            let current = model.current();
            let due = refresh_due(&current, &waypoint, &mut fetched).await;
            if due || built_for != current.generation {
                self.set(build(&current, &waypoint, &fetched));
                built_for = current.generation;
            }
        }
    }
}

/// RequestAuthentications bound to this waypoint or to one of its services.
fn applying<'a>(model: &'a Model, waypoint: &'a WaypointName) -> impl Iterator<Item = &'a Arc<RequestAuthn>> + 'a {
    let root = model.security.root_namespace.as_str();
    model.security.request_authentications.iter().filter(move |ra| {
        let binds = |s: Option<&Service>| targets_bind_waypoint(&ra.target_refs, &ra.namespace, s, waypoint, root);
        binds(None) || model.services.iter().filter(|s| s.waypoint.as_ref() == Some(waypoint)).any(|s| binds(Some(s)))
    })
}

/// Fetches the http:// JWKS that are missing or older than `JWKS_REFRESH`; whether any
/// changed.
async fn refresh_due(model: &Model, waypoint: &WaypointName, fetched: &mut HashMap<String, (String, Instant)>) -> bool {
    let mut changed = false;
    let uris: Vec<http::Uri> = applying(model, waypoint)
        .flat_map(|ra| &ra.jwt_rules)
        .filter_map(|rule| match jwt::jwks_source(rule) {
            JwksSource::Http(uri) => Some(uri),
            _ => None,
        })
        .collect();
    for uri in uris {
        let key = uri.to_string();
        let fresh = fetched.get(&key).is_some_and(|(_, at)| at.elapsed() < JWKS_REFRESH);
        if fresh {
            continue;
        }
        match jwt::fetch_jwks(&uri, JWKS_FETCH_TIMEOUT).await {
            Ok(text) => {
                info!(jwks = %key, "fetched JWKS");
                changed |= fetched.get(&key).is_none_or(|(old, _)| *old != text);
                fetched.insert(key, (text, Instant::now()));
            }
            Err(e) => {
                warn!(jwks = %key, "cannot fetch JWKS (the last keys stay in use, tokens wait for them): {e}");
                if let Some(entry) = fetched.get_mut(&key) {
                    // Try again in a little while, not at every tick.
                    entry.1 = Instant::now() - JWKS_REFRESH + Duration::from_secs(10);
                }
            }
        }
    }
    changed
}

fn build(model: &Model, waypoint: &WaypointName, fetched: &HashMap<String, (String, Instant)>) -> AuthnTable {
    let provider_list = |ras: &mut dyn Iterator<Item = &Arc<RequestAuthn>>| -> Arc<[JwtProvider]> {
        ras.flat_map(|ra| ra.jwt_rules.iter().filter_map(|rule| provider(ra, rule, fetched))).collect()
    };
    let by_service = model
        .services
        .iter()
        .filter(|s| s.waypoint.as_ref() == Some(waypoint))
        .map(|s| (s.hostname.clone(), provider_list(&mut model.security.request_authn_at_waypoint(Some(s), waypoint))))
        .filter(|(_, providers)| !providers.is_empty())
        .collect();
    let waypoint_only = provider_list(&mut model.security.request_authn_at_waypoint(None, waypoint));
    AuthnTable { by_service, waypoint_only }
}

/// One rule's provider, with its keys if they are loaded; a rule whose keys cannot be had
/// still refuses its tokens.
fn provider(ra: &RequestAuthn, rule: &JwtRule, fetched: &HashMap<String, (String, Instant)>) -> Option<JwtProvider> {
    let jwks = match jwt::jwks_source(rule) {
        JwksSource::Inline(text) => Ok(text),
        JwksSource::File(path) => {
            std::fs::read_to_string(&path).map_err(|e| format!("cannot read JWKS file {}: {e}", path.display()))
        }
        JwksSource::Http(uri) => {
            fetched.get(&uri.to_string()).map(|(t, _)| t.clone()).ok_or_else(|| format!("JWKS {uri} not fetched yet"))
        }
        JwksSource::Unsupported(reason) => Err(reason),
    };
    let built = jwks.and_then(|text| JwtProvider::from_rule(rule, &text));
    let built = built.or_else(|reason| {
        warn!(requestauthentication = %format!("{}/{}", ra.namespace, ra.name), issuer = %rule.issuer, "{reason}");
        JwtProvider::unavailable(rule, reason)
    });
    match built {
        Ok(p) => Some(p),
        Err(e) => {
            warn!(issuer = %rule.issuer, "JWT rule unusable: {e}");
            None
        }
    }
}
