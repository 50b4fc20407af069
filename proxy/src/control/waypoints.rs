//! Waypoints the Istio way (L4-3, CFG-3): a Gateway API `Gateway` of class `istio-waypoint`
//! (or `strait-waypoint`) declares a namespace's waypoint, and `strait control --kubernetes`
//! reconciles each into the objects that run it, rendered from `deploy/templates/waypoint.yaml`:
//! a ServiceAccount, a ConfigMap with the mesh's root certificate, a Service (HBONE on 15008,
//! readiness on 15021) and a Deployment of `strait waypoint`, all named after the Gateway and
//! owned by it (deleting the Gateway deletes them through the garbage collector). The Gateway's
//! status tells Accepted, and Programmed once the Deployment has a ready replica, with the
//! Service's cluster IP as its address.
//!
//! The model needs nothing more: the Service is `<name>.<namespace>.svc.cluster.local`, the
//! hostname `istio.io/use-waypoint: <name>` resolves to, and the Deployment's pods carry
//! `gateway.networking.k8s.io/gateway-name`, which makes them the waypoint's pods.
//!
//! Reconciling follows events only (Gateways, and the Deployments it owns), never a timer, so
//! a steady cluster costs no request. Only the leader writes ([`Leadership`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api, Client,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams},
    discovery::ApiResource,
    runtime::watcher,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::model::waypoints::WAYPOINT_POD_LABEL;

/// The Gateway API's group.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// Gateway classes strait runs waypoints for: Istio's (so Gateways written for Istio work
/// unchanged) and strait's own.
pub const WAYPOINT_CLASSES: [&str; 2] = crate::config::WAYPOINT_GATEWAY_CLASSES;
/// The class `strait ctl waypoint apply` writes, as istioctl does.
pub const DEFAULT_CLASS: &str = WAYPOINT_CLASSES[0];
pub use crate::model::waypoints::WAYPOINT_FOR_LABEL;
/// The one listener of a waypoint Gateway: HBONE on 15008, named as istioctl names it.
pub const MESH_LISTENER: &str = "mesh";
pub const HBONE_PORT: u16 = 15008;
/// The template of a waypoint's objects, shared with `deploy/`.
pub const TEMPLATE: &str = include_str!("../../../deploy/templates/waypoint.yaml");
/// The field manager of the reconciler's server-side applies.
pub const FIELD_MANAGER: &str = "strait-control";

/// The Gateway API version to use: `v1` where the server serves it, else `v1beta1`, else
/// `v1alpha2` (the versions waypoints were written in over the Gateway API's history).
pub async fn gateway_version(client: &Client) -> Result<String, String> {
    let group = kube::discovery::oneshot::group(client, GATEWAY_GROUP)
        .await
        .map_err(|e| format!("the Gateway API ({GATEWAY_GROUP}) is not installed on the API server: {e}"))?;
    ["v1", "v1beta1", "v1alpha2"]
        .into_iter()
        .find(|v| group.versions().any(|served| served == *v))
        .map(str::to_owned)
        .ok_or_else(|| {
            let served: Vec<&str> = group.versions().collect();
            format!("the API server serves {GATEWAY_GROUP} only as {served:?}; strait needs v1, v1beta1 or v1alpha2")
        })
}

pub fn gateway_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GATEWAY_GROUP, version, "Gateway"), "gateways")
}

/// The Gateway `strait ctl waypoint apply` writes: istioctl's, field for field.
pub fn gateway_object(name: &str, namespace: &str, class: &str, version: &str) -> Value {
    json!({
        "apiVersion": format!("{GATEWAY_GROUP}/{version}"),
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace, "labels": {WAYPOINT_FOR_LABEL: "service"}},
        "spec": {
            "gatewayClassName": class,
            "listeners": [{"name": MESH_LISTENER, "port": HBONE_PORT, "protocol": "HBONE"}],
        },
    })
}

/// The class of a Gateway, when it is one strait runs waypoints for.
pub fn waypoint_class(gateway: &DynamicObject) -> Option<&str> {
    let class = gateway.data.pointer("/spec/gatewayClassName")?.as_str()?;
    WAYPOINT_CLASSES.contains(&class).then_some(class)
}

/// A DNS-1035 label (what a Service's name must be), as the API server checks it.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// What the template's variables are replaced with.
#[derive(Debug, Clone)]
pub struct TemplateValues {
    pub name: String,
    pub namespace: String,
    pub image: String,
    pub xds_address: String,
    pub ca_server_name: String,
    pub trust_domain: String,
    pub root_cert: String,
}

/// The template's objects for one waypoint. The Gateway's name must be a DNS-1035 label (it
/// names the Service); values are checked to hold no character that could change the YAML's
/// structure, so a name can never inject a field.
pub fn render(template: &str, values: &TemplateValues) -> Result<Vec<Value>, String> {
    if !is_dns_label(&values.name) {
        return Err(format!(
            "metadata.name: `{}` cannot name the waypoint's Service and Deployment (a DNS-1035 label is needed: \
             lowercase letters, digits and '-', starting with a letter, at most 63 characters)",
            values.name
        ));
    }
    let plain = [
        ("NAME", &values.name),
        ("NAMESPACE", &values.namespace),
        ("IMAGE", &values.image),
        ("XDS_ADDRESS", &values.xds_address),
        ("CA_SERVER_NAME", &values.ca_server_name),
        ("TRUST_DOMAIN", &values.trust_domain),
    ];
    for (variable, value) in plain {
        if value.is_empty() || value.chars().any(|c| c.is_control() || "\"'#{}[],&*!|>%@`\\ ".contains(c)) {
            return Err(format!("the waypoint template's ${{{variable}}} cannot be `{value}`"));
        }
    }
    let root_lines: Vec<&str> = values.root_cert.trim().lines().collect();
    if root_lines.is_empty() || !root_lines[0].starts_with("-----BEGIN CERTIFICATE-----") {
        return Err("the waypoint template's ${ROOT_CERT} is not a PEM certificate".into());
    }
    let mut text = String::with_capacity(template.len() + values.root_cert.len());
    for line in template.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        if let Some(at) = line.find("${ROOT_CERT}") {
            // A block scalar: every line of the PEM at the placeholder's indentation.
            let indent = &line[..at];
            for pem in &root_lines {
                text.push_str(indent);
                text.push_str(pem.trim_end());
                text.push('\n');
            }
            continue;
        }
        let mut line = line.to_owned();
        for (variable, value) in plain {
            line = line.replace(&format!("${{{variable}}}"), value);
        }
        if let Some(at) = line.find("${") {
            return Err(format!("the waypoint template has an unknown variable at `{}`", &line[at..]));
        }
        text.push_str(&line);
        text.push('\n');
    }
    let mut objects = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value: Value =
            serde::Deserialize::deserialize(document).map_err(|e| format!("the waypoint template: {e}"))?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

/// The owner reference that makes `gateway` own an object: deleting the Gateway deletes it.
/// No `blockOwnerDeletion`: it would need update rights on `gateways/finalizers` for a
/// foreground deletion nobody asked for.
pub fn owner_reference(gateway: &DynamicObject, api_version: &str) -> Result<Value, String> {
    let name = gateway.metadata.name.as_deref().ok_or("the Gateway has no metadata.name")?;
    let uid = gateway.metadata.uid.as_deref().ok_or("the Gateway has no metadata.uid")?;
    Ok(json!({"apiVersion": api_version, "kind": "Gateway", "name": name, "uid": uid, "controller": true}))
}

/// What the reconciler found of a waypoint's objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Why the Gateway is not accepted (an error naming the field), if it is not.
    pub invalid: Option<String>,
    pub ready_replicas: i64,
    pub replicas: i64,
    pub cluster_ip: Option<String>,
}

fn condition(type_: &str, ok: bool, reason: &str, message: String, generation: Option<i64>) -> Value {
    json!({"type": type_, "status": if ok { "True" } else { "False" }, "reason": reason, "message": message,
           "observedGeneration": generation})
}

/// The Gateway status the reconciler writes: Accepted, Programmed, and the Service's cluster
/// IP. A condition whose status did not change keeps its `lastTransitionTime` (as the Gateway
/// API asks); `None` when `current` already says all of it, so nothing is written.
pub fn gateway_status(current: Option<&Value>, generation: Option<i64>, seen: &Observed, now: &str) -> Option<Value> {
    let mut conditions = Vec::new();
    match &seen.invalid {
        Some(why) => {
            conditions.push(condition("Accepted", false, "Invalid", why.clone(), generation));
            conditions.push(condition("Programmed", false, "Invalid", why.clone(), generation));
        }
        None => {
            conditions.push(condition("Accepted", true, "Accepted", "a strait waypoint".into(), generation));
            if seen.ready_replicas > 0 {
                let message = format!("the waypoint's Deployment has {} ready replica(s)", seen.ready_replicas);
                conditions.push(condition("Programmed", true, "Programmed", message, generation));
            } else {
                let message = format!(
                    "waiting for the waypoint's Deployment: {} of {} replica(s) ready",
                    seen.ready_replicas, seen.replicas
                );
                conditions.push(condition("Programmed", false, "Pending", message, generation));
            }
        }
    }
    let addresses: Vec<Value> = seen
        .cluster_ip
        .iter()
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .map(|ip| json!({"type": "IPAddress", "value": ip}))
        .collect();
    let old_conditions: Vec<&Value> = current
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .map(|c| c.iter().collect())
        .unwrap_or_default();
    let mut changed = current.and_then(|s| s.get("addresses")).cloned().unwrap_or(json!([])) != json!(addresses);
    for new in &mut conditions {
        let old = old_conditions.iter().find(|c| c.get("type") == new.get("type"));
        let same_status = old.is_some_and(|c| c.get("status") == new.get("status"));
        let unchanged = old.is_some_and(|c| {
            ["status", "reason", "message", "observedGeneration"].iter().all(|f| c.get(f) == new.get(f))
        });
        changed |= !unchanged;
        let since = match old.and_then(|c| c.get("lastTransitionTime")) {
            Some(t) if same_status => t.clone(),
            _ => now.into(),
        };
        new["lastTransitionTime"] = since;
    }
    changed.then(|| json!({"conditions": conditions, "addresses": addresses}))
}

/// Who may write: only the control plane replica holding the lease writes to the API server,
/// so two replicas never fight over a waypoint. Any `Fn() -> bool` is one (e.g. the leader
/// election's `is_leader`).
pub trait Leadership: Send + Sync {
    fn is_leader(&self) -> bool;
}

impl<F: Fn() -> bool + Send + Sync> Leadership for F {
    fn is_leader(&self) -> bool {
        self()
    }
}

/// Settings of the waypoints the reconciler creates.
#[derive(Debug, Clone)]
pub struct WaypointSettings {
    /// The image of `strait waypoint` (the control plane's own by default).
    pub image: String,
    /// Where waypoints follow the control plane (its Service).
    pub xds_address: String,
    pub trust_domain: String,
    /// The mesh's root certificate (PEM), handed to waypoints in a ConfigMap.
    pub root_cert: String,
}

type Key = (String, String);

fn key_of(object: &DynamicObject) -> Key {
    (object.metadata.namespace.clone().unwrap_or_default(), object.metadata.name.clone().unwrap_or_default())
}

/// The Gateways the watch has seen, and the keys to reconcile.
struct Shared {
    gateways: Mutex<HashMap<Key, DynamicObject>>,
    queue: mpsc::UnboundedSender<Key>,
}

impl Shared {
    fn gateways(&self) -> std::sync::MutexGuard<'_, HashMap<Key, DynamicObject>> {
        self.gateways.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn enqueue(&self, key: Key) {
        // The worker lives as long as the process: a send can only fail at shutdown.
        let _ = self.queue.send(key);
    }
}

/// Starts the reconciler on the current runtime: a watch of Gateways, one of the Deployments
/// it owns, and one worker applying changes. Waits for the Gateway API to be installed.
pub fn start(client: Client, settings: WaypointSettings, leader: Arc<dyn Leadership>) {
    tokio::spawn(async move {
        let mut told = false;
        let version = loop {
            match gateway_version(&client).await {
                Ok(version) => break version,
                Err(e) => {
                    if !told {
                        warn!("waypoints: {e}; looking again every 30 s");
                        told = true;
                    }
                    // Only while the Gateway API is missing: one discovery request per 30 s.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            }
        };
        info!(version, "waypoints: reconciling Gateways of class {}", WAYPOINT_CLASSES.join(" or "));
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared { gateways: Mutex::new(HashMap::new()), queue: tx });
        tokio::spawn(watch_gateways(client.clone(), version.clone(), shared.clone()));
        tokio::spawn(watch_deployments(client.clone(), shared.clone()));
        work(client, version, settings, leader, shared, rx).await;
    });
}

async fn watch_gateways(client: Client, version: String, shared: Arc<Shared>) {
    let api: Api<DynamicObject> = Api::all_with(client, &gateway_resource(&version));
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
    let mut relisted = BTreeSet::new();
    let mut failing = false;
    while let Some(event) = events.next().await {
        if event.is_ok() && std::mem::take(&mut failing) {
            info!("waypoints: watching Gateways again");
        }
        match event {
            Ok(watcher::Event::Apply(gateway) | watcher::Event::InitApply(gateway)) => {
                let key = key_of(&gateway);
                relisted.insert(key.clone());
                shared.gateways().insert(key.clone(), gateway);
                shared.enqueue(key);
            }
            Ok(watcher::Event::Delete(gateway)) => {
                let key = key_of(&gateway);
                shared.gateways().remove(&key);
                shared.enqueue(key);
            }
            Ok(watcher::Event::Init) => relisted.clear(),
            Ok(watcher::Event::InitDone) => {
                // Gateways deleted while the watch was away.
                let gone: Vec<Key> = shared.gateways().keys().filter(|k| !relisted.contains(*k)).cloned().collect();
                for key in gone {
                    shared.gateways().remove(&key);
                    shared.enqueue(key);
                }
            }
            Err(e) => {
                if !failing {
                    warn!("waypoints: the watch of Gateways failed: {e}; retrying every second");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// A Deployment's readiness changes its Gateway's status: its owner is reconciled again.
async fn watch_deployments(client: Client, shared: Arc<Shared>) {
    let api: Api<Deployment> = Api::all(client);
    let config =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by=strait,{WAYPOINT_POD_LABEL}"));
    let mut events = std::pin::pin!(watcher(api, config));
    let mut failing = false;
    while let Some(event) = events.next().await {
        if event.is_ok() && std::mem::take(&mut failing) {
            info!("waypoints: watching waypoint Deployments again");
        }
        match event {
            Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d) | watcher::Event::Delete(d)) => {
                let namespace = d.metadata.namespace.clone().unwrap_or_default();
                for owner in d.metadata.owner_references.iter().flatten() {
                    if owner.kind == "Gateway" && owner.api_version.starts_with(GATEWAY_GROUP) {
                        shared.enqueue((namespace.clone(), owner.name.clone()));
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                if !failing {
                    warn!("waypoints: the watch of waypoint Deployments failed: {e}; retrying every second");
                    failing = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Reconciles queued Gateways one at a time. A failure is retried with backoff (200 ms
/// doubling to 10 s); a replica not leading keeps its queue and starts on it when it leads.
async fn work(
    client: Client,
    version: String,
    settings: WaypointSettings,
    leader: Arc<dyn Leadership>,
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Key>,
) {
    let mut pending: BTreeSet<Key> = BTreeSet::new();
    let mut served: BTreeSet<Key> = BTreeSet::new();
    let mut failures: BTreeMap<Key, (u32, String)> = BTreeMap::new();
    let api_version = format!("{GATEWAY_GROUP}/{version}");
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(key) => {
                    pending.insert(key);
                }
                None => return,
            }
        }
        while let Ok(key) = rx.try_recv() {
            pending.insert(key);
        }
        if !leader.is_leader() {
            // A local check, no request: the lease is kept by its own task.
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let Some(key) = pending.pop_first() else { continue };
        let gateway = shared.gateways().get(&key).cloned();
        let result = match gateway {
            None => {
                if served.remove(&key) {
                    info!(
                        "waypoints: Gateway {}/{} deleted: no longer served; the garbage collector deletes its \
                         Deployment, Service, ServiceAccount and ConfigMap (owner references)",
                        key.0, key.1
                    );
                }
                Ok(())
            }
            Some(gateway) if waypoint_class(&gateway).is_none() || gateway.metadata.deletion_timestamp.is_some() => {
                if served.remove(&key) {
                    info!("waypoints: Gateway {}/{} is no longer a waypoint: no longer served", key.0, key.1);
                }
                Ok(())
            }
            Some(gateway) => reconcile(&client, &api_version, &settings, &gateway).await.map(|(seen, written)| {
                let (ns, name) = &key;
                match &seen.invalid {
                    Some(why) => {
                        if written {
                            error!("waypoints: Gateway {ns}/{name} refused: {why}");
                        }
                        served.remove(&key);
                    }
                    None => {
                        if served.insert(key.clone()) {
                            info!("waypoints: serving Gateway {ns}/{name}");
                        }
                        if written && seen.ready_replicas > 0 {
                            info!("waypoints: Gateway {ns}/{name} programmed");
                        }
                    }
                }
            }),
        };
        match result {
            Ok(()) => {
                failures.remove(&key);
            }
            Err(e) => {
                let (attempts, last) = failures.entry(key.clone()).or_insert((0, String::new()));
                if *last != e {
                    error!("waypoints: Gateway {}/{}: {e}; retrying", key.0, key.1);
                    *last = e;
                }
                let delay = Duration::from_millis(200 * 2u64.pow((*attempts).min(6))).min(Duration::from_secs(10));
                *attempts += 1;
                let queue = shared.queue.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = queue.send(key);
                });
            }
        }
    }
}

/// Applies the waypoint's objects for `gateway` and writes its status: what it saw, and whether
/// the status changed.
async fn reconcile(
    client: &Client,
    api_version: &str,
    settings: &WaypointSettings,
    gateway: &DynamicObject,
) -> Result<(Observed, bool), String> {
    let (namespace, name) = key_of(gateway);
    let values = TemplateValues {
        name: name.clone(),
        namespace: namespace.clone(),
        image: settings.image.clone(),
        xds_address: settings.xds_address.clone(),
        ca_server_name: crate::identity::caserver::CA_SERVER_NAMES[1].into(),
        trust_domain: settings.trust_domain.clone(),
        root_cert: settings.root_cert.clone(),
    };
    let mut seen = Observed::default();
    match render(TEMPLATE, &values) {
        Err(invalid) => seen.invalid = Some(invalid),
        Ok(objects) => {
            let owner = owner_reference(gateway, api_version)?;
            for mut object in objects {
                object["metadata"]["ownerReferences"] = json!([owner]);
                let applied = apply(client, &namespace, &object).await?;
                match object.get("kind").and_then(Value::as_str) {
                    Some("Service") => {
                        seen.cluster_ip =
                            applied.data.pointer("/spec/clusterIP").and_then(Value::as_str).map(str::to_owned);
                    }
                    Some("Deployment") => {
                        let count = |field: &str| applied.data.pointer(field).and_then(Value::as_i64).unwrap_or(0);
                        seen.ready_replicas = count("/status/readyReplicas");
                        seen.replicas = count("/spec/replicas");
                    }
                    _ => {}
                }
            }
        }
    }
    let now = now_rfc3339();
    let Some(status) = gateway_status(gateway.data.get("status"), gateway.metadata.generation, &seen, &now) else {
        return Ok((seen, false));
    };
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, &gateway_resource(version_of(api_version)));
    // A merge patch of status only: the spec stays its user's.
    let params = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..PatchParams::default() };
    api.patch_status(&name, &params, &Patch::Merge(json!({ "status": status })))
        .await
        .map_err(|e| format!("cannot write the Gateway's status: {e}"))?;
    Ok((seen, true))
}

/// Now, as the API's timestamps are written (RFC 3339, whole seconds, UTC).
fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

fn version_of(api_version: &str) -> &str {
    api_version.rsplit('/').next().unwrap_or(api_version)
}

/// Server-side apply of one rendered object, forcing strait's ownership of the fields it sets.
async fn apply(client: &Client, namespace: &str, object: &Value) -> Result<DynamicObject, String> {
    let field = |f: &str| object.pointer(f).and_then(Value::as_str).unwrap_or_default();
    let (api_version, kind, name) = (field("/apiVersion"), field("/kind"), field("/metadata/name"));
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let plural = format!("{}s", kind.to_ascii_lowercase());
    let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), &plural);
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object))
        .await
        .map_err(|e| format!("cannot apply {kind} {namespace}/{name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\nAAAA\n-----END CERTIFICATE-----\n";

    fn values(name: &str) -> TemplateValues {
        TemplateValues {
            name: name.into(),
            namespace: "shop".into(),
            image: "strait:1".into(),
            xds_address: "https://strait-control.strait-system.svc:15012".into(),
            ca_server_name: "strait-ca".into(),
            trust_domain: "cluster.local".into(),
            root_cert: ROOT.into(),
        }
    }

    // L4-3: the template renders the four objects, named after the Gateway, the pods labelled
    // as the model knows a waypoint's pods, the root certificate intact.
    #[test]
    fn the_template_renders_a_waypoint() {
        let objects = render(TEMPLATE, &values("waypoint")).expect("renders");
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(kinds, ["ServiceAccount", "ConfigMap", "Service", "Deployment"]);
        for o in &objects {
            assert_eq!(o["metadata"]["namespace"], "shop", "{o}");
        }
        let deployment = &objects[3];
        assert_eq!(deployment["metadata"]["name"], "waypoint");
        assert_eq!(deployment["spec"]["template"]["metadata"]["labels"][WAYPOINT_POD_LABEL], "waypoint");
        let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].as_array().expect("args");
        assert!(args.contains(&json!("--name=waypoint")) && args.contains(&json!("--namespace=shop")), "{args:?}");
        assert_eq!(objects[1]["data"]["root-cert.pem"], ROOT);
        let ports: Vec<i64> =
            objects[2]["spec"]["ports"].as_array().expect("ports").iter().filter_map(|p| p["port"].as_i64()).collect();
        assert_eq!(ports, [15021, 15008]);
    }

    // Bad input is named, never rendered: a Gateway name no Service can have, a value that
    // would change the YAML's structure.
    #[test]
    fn bad_values_are_refused() {
        let e = render(TEMPLATE, &values("my.waypoint")).expect_err("not a DNS label");
        assert!(e.starts_with("metadata.name: `my.waypoint`"), "{e}");
        let mut v = values("waypoint");
        v.image = "x\"\n  hostNetwork: true".into();
        assert!(render(TEMPLATE, &v).expect_err("injection").contains("${IMAGE}"));
        v = values("waypoint");
        v.root_cert = "garbage".into();
        assert!(render(TEMPLATE, &v).is_err());
    }

    // The status is written only when it changes, and a condition keeps the time it last
    // changed status.
    #[test]
    fn status_changes_only_when_something_does() {
        let mut seen = Observed { replicas: 1, cluster_ip: Some("10.96.0.9".into()), ..Observed::default() };
        let pending = gateway_status(None, Some(1), &seen, "T1").expect("first status");
        assert_eq!(pending["conditions"][1]["status"], "False");
        assert_eq!(pending["addresses"], json!([{"type": "IPAddress", "value": "10.96.0.9"}]));
        assert!(gateway_status(Some(&pending), Some(1), &seen, "T2").is_none(), "nothing changed");
        seen.ready_replicas = 1;
        let ready = gateway_status(Some(&pending), Some(1), &seen, "T3").expect("programmed");
        assert_eq!(ready["conditions"][0]["lastTransitionTime"], "T1", "Accepted did not change");
        assert_eq!(ready["conditions"][1]["lastTransitionTime"], "T3");
        assert_eq!(
            (ready["conditions"][1]["status"].as_str(), ready["conditions"][1]["reason"].as_str()),
            (Some("True"), Some("Programmed"))
        );
        seen.invalid = Some("metadata.name: bad".into());
        let invalid = gateway_status(Some(&ready), Some(2), &seen, "T4").expect("invalid");
        assert_eq!(invalid["conditions"][0]["reason"], "Invalid");
    }

    #[test]
    fn the_gateway_is_istioctls() {
        let g = gateway_object("waypoint", "shop", DEFAULT_CLASS, "v1");
        assert_eq!(g["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(g["metadata"]["labels"][WAYPOINT_FOR_LABEL], "service");
        assert_eq!(g["spec"]["gatewayClassName"], "istio-waypoint");
        assert_eq!(g["spec"]["listeners"], json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}]));
    }
}
