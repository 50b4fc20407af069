//! The mesh's root certificate where gateways run (GW-1, GW-2, CFG-3): `strait control
//! --kubernetes` keeps Istio's ConfigMap `istio-ca-root-cert` (key `root-cert.pem`) in
//! `istio-system` and in every namespace holding a pod labelled `strait.io/gateway`, so a
//! gateway Deployment (deploy/gateways/) mounts it and verifies the control plane with it, as
//! Istio's gateways mount the one istiod writes.
//!
//! Least privilege: istiod writes this ConfigMap into every namespace because sidecars need it;
//! in ambient mode only gateways and waypoints dial the control plane, so strait writes it only
//! where one runs (waypoints get their own `<name>-strait-root`, see `waypoints.rs`). It reads
//! no ConfigMap but these by name (a watch with `metadata.name=istio-ca-root-cert`, which RBAC
//! limits with `resourceNames`), and writes with server-side apply (create and patch).
//!
//! Event driven, as the waypoint reconciler: the watches of gateway pods, of these ConfigMaps
//! and of the namespace `istio-system` say what to write; a ConfigMap deleted or edited is
//! written again; a steady cluster costs no request. Only the leader writes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::watcher,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::waypoints::{FIELD_MANAGER, Leadership};
use crate::model::gateways::GATEWAY_POD_LABEL;

/// Istio's name of the ConfigMap of the mesh's root certificate, and its key.
pub const ROOT_CONFIG_MAP: &str = "istio-ca-root-cert";
pub const ROOT_KEY: &str = "root-cert.pem";
/// Where Istio installs its gateways (`istio-ingressgateway`, `istio-egressgateway`): the
/// ConfigMap is kept there even before a gateway pod exists, so a pod never waits for it.
pub const GATEWAY_NAMESPACE: &str = "istio-system";

/// The ConfigMap written into `namespace`.
pub fn config_map(namespace: &str, root_cert: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": ROOT_CONFIG_MAP,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "strait"},
        },
        "data": {ROOT_KEY: root_cert},
    })
}

/// What the watches have seen.
#[derive(Default)]
struct State {
    /// Namespaces the ConfigMap belongs in.
    wanted: BTreeSet<String>,
    /// `root-cert.pem` of the ConfigMap of each namespace that has one.
    current: HashMap<String, String>,
    /// The ConfigMaps of a relist in progress (a relist reports no deletions: what it does not
    /// list is gone).
    relisting: Option<HashMap<String, String>>,
}

struct Shared {
    state: Mutex<State>,
    queue: mpsc::UnboundedSender<String>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn enqueue(&self, namespace: String) {
        // The worker lives as long as the process: a send can only fail at shutdown.
        let _ = self.queue.send(namespace);
    }
}

/// Starts the writer on the current runtime.
pub fn start(client: Client, root_cert: String, leader: Arc<dyn Leadership>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut state = State::default();
    state.wanted.insert(GATEWAY_NAMESPACE.to_owned());
    let shared = Arc::new(Shared { state: Mutex::new(state), queue: tx });
    shared.enqueue(GATEWAY_NAMESPACE.to_owned());
    tokio::spawn(watch_pods(client.clone(), shared.clone()));
    tokio::spawn(watch_config_maps(client.clone(), shared.clone()));
    tokio::spawn(watch_namespace(client.clone(), shared.clone()));
    tokio::spawn(work(client, root_cert, leader, shared, rx));
}

/// Logs a failing watch once, and once again when it works again; the watcher retries.
async fn failed(what: &str, failing: &mut bool, e: &watcher::Error) {
    if !*failing {
        warn!("root certificate: the watch of {what} failed: {e}; retrying every second");
        *failing = true;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn watch_pods(client: Client, shared: Arc<Shared>) {
    let api: Api<Pod> = Api::all(client);
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default().labels(GATEWAY_POD_LABEL)));
    let mut failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                failing = false;
                // The model's rule: the label with a non-empty value makes a gateway pod.
                let labelled =
                    pod.metadata.labels.as_ref().and_then(|l| l.get(GATEWAY_POD_LABEL)).is_some_and(|v| !v.is_empty());
                if let (true, Some(namespace)) = (labelled, pod.metadata.namespace) {
                    let new = shared.state().wanted.insert(namespace.clone());
                    if new {
                        shared.enqueue(namespace);
                    }
                }
            }
            Ok(_) => failing = false,
            Err(e) => failed("gateway pods", &mut failing, &e).await,
        }
    }
}

async fn watch_config_maps(client: Client, shared: Arc<Shared>) {
    let api: Api<ConfigMap> = Api::all(client);
    let selector = format!("metadata.name={ROOT_CONFIG_MAP}");
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default().fields(&selector)));
    let mut failing = false;
    let root_of = |cm: &ConfigMap| cm.data.as_ref().and_then(|d| d.get(ROOT_KEY)).cloned().unwrap_or_default();
    while let Some(event) = events.next().await {
        if event.is_ok() {
            failing = false;
        }
        match event {
            Ok(watcher::Event::Init) => shared.state().relisting = Some(HashMap::new()),
            Ok(watcher::Event::InitApply(cm)) => {
                let namespace = cm.metadata.namespace.clone().unwrap_or_default();
                if let Some(seen) = shared.state().relisting.as_mut() {
                    seen.insert(namespace, root_of(&cm));
                }
            }
            Ok(watcher::Event::InitDone) => {
                let wanted: Vec<String> = {
                    let mut state = shared.state();
                    if let Some(seen) = state.relisting.take() {
                        state.current = seen;
                    }
                    state.wanted.iter().cloned().collect()
                };
                wanted.into_iter().for_each(|ns| shared.enqueue(ns));
            }
            Ok(watcher::Event::Apply(cm)) => {
                let namespace = cm.metadata.namespace.clone().unwrap_or_default();
                shared.state().current.insert(namespace.clone(), root_of(&cm));
                shared.enqueue(namespace);
            }
            Ok(watcher::Event::Delete(cm)) => {
                let namespace = cm.metadata.namespace.clone().unwrap_or_default();
                shared.state().current.remove(&namespace);
                shared.enqueue(namespace);
            }
            Err(e) => failed("the istio-ca-root-cert ConfigMaps", &mut failing, &e).await,
        }
    }
}

/// `istio-system` created (or created again) after the control plane started.
async fn watch_namespace(client: Client, shared: Arc<Shared>) {
    let api: Api<Namespace> = Api::all(client);
    let selector = format!("metadata.name={GATEWAY_NAMESPACE}");
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default().fields(&selector)));
    let mut failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::InitApply(_)) => {
                failing = false;
                shared.enqueue(GATEWAY_NAMESPACE.to_owned());
            }
            Ok(_) => failing = false,
            Err(e) => failed("the namespace istio-system", &mut failing, &e).await,
        }
    }
}

/// Writes queued namespaces one at a time when the ConfigMap there is missing or differs. A
/// namespace that does not exist waits for its creation (the namespace watch, or a pod in it);
/// other failures are retried with backoff (200 ms doubling to 10 s).
async fn work(
    client: Client,
    root_cert: String,
    leader: Arc<dyn Leadership>,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<String>,
) {
    let mut pending: BTreeSet<String> = BTreeSet::new();
    let mut failures: BTreeMap<String, (u32, String)> = BTreeMap::new();
    let mut missing: BTreeSet<String> = BTreeSet::new();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(ns) => {
                    pending.insert(ns);
                }
                None => return,
            }
        }
        while let Ok(ns) = rx.try_recv() {
            pending.insert(ns);
        }
        if !leader.is_leader() {
            // A local check, no request: the lease is kept by its own task.
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let Some(namespace) = pending.pop_first() else { continue };
        let needed = {
            let state = shared.state();
            state.wanted.contains(&namespace) && state.current.get(&namespace) != Some(&root_cert)
        };
        if !needed {
            continue;
        }
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
        match api.patch(ROOT_CONFIG_MAP, &params, &Patch::Apply(config_map(&namespace, &root_cert))).await {
            Ok(_) => {
                failures.remove(&namespace);
                missing.remove(&namespace);
                // Written now: a watch event that is late must not make the next check write again.
                shared.state().current.insert(namespace.clone(), root_cert.clone());
                info!("root certificate: wrote ConfigMap {namespace}/{ROOT_CONFIG_MAP}");
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {
                // No such namespace: nothing to retry until it exists.
                failures.remove(&namespace);
                if missing.insert(namespace.clone()) {
                    info!("root certificate: namespace {namespace} does not exist (yet); written once it does");
                }
            }
            Err(e) => {
                let e = format!("cannot apply ConfigMap {namespace}/{ROOT_CONFIG_MAP}: {e}");
                let (attempts, last) = failures.entry(namespace.clone()).or_insert((0, String::new()));
                if *last != e {
                    error!("root certificate: {e}; retrying");
                    *last = e;
                }
                let delay = Duration::from_millis(200 * 2u64.pow((*attempts).min(6))).min(Duration::from_secs(10));
                *attempts += 1;
                let queue = shared.queue.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = queue.send(namespace);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // GW-1: Istio's name and key, the PEM as it is, nothing else in `data`.
    #[test]
    fn the_config_map_is_istios() {
        let root = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let cm = config_map("istio-system", root);
        assert_eq!(cm["metadata"]["name"], "istio-ca-root-cert");
        assert_eq!(cm["metadata"]["namespace"], "istio-system");
        assert_eq!(cm["data"], json!({"root-cert.pem": root}));
    }
}
