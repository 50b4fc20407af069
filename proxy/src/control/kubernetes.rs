//! The Kubernetes source of `strait control --kubernetes` (CFG-3): the API server's Namespaces,
//! Pods, Services and the Istio kinds strait reads, followed with watches and compiled exactly
//! as a configuration directory is (CFG-1).
//!
//! Every kind is read as a dynamic object and converted through serde into the same
//! `config::Resource` types the directory loader fills, so compilation does not know where a
//! resource came from; its origin reads `k8s:<kind>/<namespace>/<name>`. The store keeps only
//! the converted resources (not the API objects), keyed by kind, namespace and name.
//!
//! Watches resume from the last `resourceVersion` seen and relist when the server answers 410
//! Gone (kube's watcher); a relist replaces everything of its kind, so a deletion missed while
//! disconnected is applied too. An object strait cannot read is logged, reported on the object
//! as a Kubernetes Event (`events`) and left out, never fatal; an object that becomes unreadable
//! keeps its last readable version (last good state). Each version is told once: a relist
//! returning it again neither logs nor reports it again.
//!
//! Endpoints of a Service with a selector come from Pods and the selector: the EndpointSlice
//! controller derives its slices from the same Pods, and strait's workloads (as ambient's,
//! whose proxies address pods by IP from the workload API) are Pods. A Service without a
//! selector takes its endpoints from its EndpointSlices (L4-3), watched at `discovery.k8s.io/v1`
//! where the server serves it (Kubernetes 1.21 and later); a server serving only `v1beta1`
//! (1.20) is not watched for slices, and such Services have no endpoints there.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use kube::{
    Api, Client,
    api::{DynamicObject, GroupVersionKind},
    discovery::ApiResource,
    runtime::watcher,
};
use serde_json::{Map, Value};
use tracing::{error, info, warn};

use super::events::{Rejection, Reporter};
use crate::config::{Loaded, Located, Origin, Resource, parse_file};
use crate::model::reload::Source;

/// How long the store must stay unchanged before it is compiled: a `kubectl apply` of several
/// objects arrives as events milliseconds apart, and one compile for all of them is cheaper
/// than one each. 100 ms as istiod's debounce (`PILOT_DEBOUNCE_AFTER`), which keeps "applied
/// within 1 s" with room to spare: one poll (100 ms) plus this plus the compile.
pub const SETTLE: Duration = Duration::from_millis(100);
/// A store that never settles (steady pod churn) is compiled anyway after this long, as the
/// directory source and istiod (`PILOT_DEBOUNCE_MAX`) do.
pub const MAX_UNSETTLED: Duration = crate::config::MAX_UNSETTLED;

/// A kind strait watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kind {
    pub group: &'static str,
    /// The version watched: for the Istio groups, chosen from what the server serves.
    pub version: String,
    pub kind: &'static str,
    /// What the store keys this kind's objects by and messages call it: the kind, or
    /// `group/kind` where two watched groups share a kind's name (Istio's and the Gateway API's
    /// `Gateway`).
    pub id: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    /// A label selector the watch asks the server to apply, if any.
    pub label_selector: Option<&'static str>,
    /// A field selector the watch asks the server to apply, if any.
    pub field_selector: Option<&'static str>,
}

impl Kind {
    fn core(kind: &'static str, plural: &'static str, namespaced: bool) -> Self {
        Self {
            group: "",
            version: "v1".into(),
            kind,
            id: kind,
            plural,
            namespaced,
            label_selector: None,
            field_selector: None,
        }
    }

    /// EndpointSlices, only ever at `v1`: see [`endpoint_slices`].
    fn endpoint_slices() -> Self {
        Self {
            group: DISCOVERY_GROUP,
            version: "v1".into(),
            kind: "EndpointSlice",
            id: "EndpointSlice",
            plural: "endpointslices",
            namespaced: true,
            // The slices the EndpointSlice controller writes are those of Services with a
            // selector, whose endpoints strait takes from the Pods: asking the server to leave
            // them out spares one object per Service (and a rewrite per pod change) in the watch
            // and the store; slices of Services without a selector are written by users or
            // mirrored from Endpoints by another controller, and keep coming.
            label_selector: Some(NOT_FROM_SELECTORS),
            field_selector: None,
        }
    }

    /// Istio's mesh configuration (L4-5): the one ConfigMap `istio` of `istio-system`, asked
    /// for by name so that no other ConfigMap of the cluster is listed.
    fn mesh_config() -> Self {
        Self {
            field_selector: Some("metadata.namespace=istio-system,metadata.name=istio"),
            ..Self::core("ConfigMap", "configmaps", true)
        }
    }

    /// Kinds converted straight from JSON by serde (no directory parser in between).
    fn is_plain(&self) -> bool {
        (self.group.is_empty() && self.kind != "ConfigMap") || self.group == DISCOVERY_GROUP
    }

    fn istio(group: &'static str, kind: &'static str, plural: &'static str) -> Self {
        Self {
            group,
            version: "v1beta1".into(),
            kind,
            id: kind,
            plural,
            namespaced: true,
            label_selector: None,
            field_selector: None,
        }
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(self.group, &self.version, self.kind), self.plural)
    }
}

/// Every kind strait reads from the API server, Istio kinds at `v1beta1` (served by every Istio
/// release strait supports) until [`choose_versions`] finds better.
pub fn kinds() -> Vec<Kind> {
    vec![
        Kind::core("Namespace", "namespaces", false),
        Kind::core("Pod", "pods", true),
        Kind::core("Service", "services", true),
        Kind::endpoint_slices(),
        Kind::istio("security.istio.io", "AuthorizationPolicy", "authorizationpolicies"),
        Kind::istio("security.istio.io", "PeerAuthentication", "peerauthentications"),
        Kind::istio("security.istio.io", "RequestAuthentication", "requestauthentications"),
        Kind::istio("networking.istio.io", "VirtualService", "virtualservices"),
        Kind::istio("networking.istio.io", "DestinationRule", "destinationrules"),
        Kind::istio("networking.istio.io", "ServiceEntry", "serviceentries"),
        // Ingress and egress gateways' listeners (GW-1), forwarded to `strait gateway`.
        Kind { id: "networking.istio.io/Gateway", ..Kind::istio("networking.istio.io", "Gateway", "gateways") },
        Kind::mesh_config(),
        // Waypoints' Gateways (L4-3): those of a waypoint class declare waypoints, others are
        // not read yet (GWAPI-1).
        Kind::istio("gateway.networking.k8s.io", "Gateway", "gateways"),
    ]
}

const DISCOVERY_GROUP: &str = "discovery.k8s.io";
/// EndpointSlices not written by the controller that derives them from Service selectors.
const NOT_FROM_SELECTORS: &str = "endpointslice.kubernetes.io/managed-by!=endpointslice-controller.k8s.io";

/// Keeps the EndpointSlice watch only where the server serves `discovery.k8s.io/v1`; elsewhere
/// (Kubernetes 1.20 serves only `v1beta1`) Services keep their selector's Pods, and those
/// without a selector have no endpoints. Told once at start, either way.
pub async fn endpoint_slices(client: &Client, kinds: &mut Vec<Kind>) {
    let served = match kube::discovery::oneshot::group(client, DISCOVERY_GROUP).await {
        Ok(found) => found.versions().any(|v| v == "v1"),
        Err(e) => {
            warn!("cannot discover {DISCOVERY_GROUP} ({e}); EndpointSlices are not watched");
            false
        }
    };
    if served {
        info!(
            "watching EndpointSlices ({DISCOVERY_GROUP}/v1): Services without a selector take their endpoints from them"
        );
    } else {
        info!(
            "the API server does not serve {DISCOVERY_GROUP}/v1 (Kubernetes before 1.21): EndpointSlices are not \
             watched; endpoints come from Pods and Service selectors, and Services without a selector have none"
        );
        kinds.retain(|k| k.group != DISCOVERY_GROUP);
    }
}

/// Watches the Istio groups at `v1` where the server serves it (Istio 1.22 and later), else
/// at `v1beta1`; a group not installed yet keeps `v1beta1`, whose watch waits for it.
pub async fn choose_versions(client: &Client, kinds: &mut [Kind]) {
    let groups: BTreeSet<&'static str> = kinds.iter().filter(|k| !k.is_plain()).map(|k| k.group).collect();
    for group in groups {
        let version = match kube::discovery::oneshot::group(client, group).await {
            Ok(found) if found.versions().any(|v| v == "v1") => "v1",
            Ok(_) => "v1beta1",
            Err(e) => {
                warn!(group, "cannot discover {group} ({e}): watching v1beta1, which waits until it is installed");
                "v1beta1"
            }
        };
        for kind in kinds.iter_mut().filter(|k| k.group == group) {
            kind.version = version.into();
        }
    }
}

/// Where a resource read from the API server comes from: `k8s:<kind>/<namespace>/<name>`, or
/// `k8s:<kind>/<name>` for a cluster-scoped kind. Line 0: an API object has no lines.
pub fn origin(kind: &str, namespace: Option<&str>, name: &str) -> Origin {
    let file = match namespace {
        Some(ns) => format!("k8s:{kind}/{ns}/{name}"),
        None => format!("k8s:{kind}/{name}"),
    };
    Origin::new(Path::new(&file), 0)
}

/// Converts one API object into strait's resource, through the same types (and, for the Istio
/// kinds, the same parser and checks) as a file in a configuration directory.
pub fn convert(kind: &Kind, object: &DynamicObject) -> Result<Located<Resource>, String> {
    let name = object.metadata.name.as_deref().ok_or("the object has no metadata.name")?;
    let namespace = if kind.namespaced {
        Some(object.metadata.namespace.as_deref().ok_or("the object has no metadata.namespace")?)
    } else {
        None
    };
    let origin = origin(kind.id, namespace, name);
    // Only what strait reads: the API's bookkeeping (managedFields, uid, ...) is left behind.
    let mut metadata = Map::new();
    metadata.insert("name".into(), name.into());
    if let Some(ns) = namespace {
        metadata.insert("namespace".into(), ns.into());
    }
    for (field, map) in [("labels", &object.metadata.labels), ("annotations", &object.metadata.annotations)] {
        if let Some(map) = map.as_ref().filter(|m| !m.is_empty()) {
            let value = serde_json::to_value(map).map_err(|e| format!("metadata.{field}: {e}"))?;
            metadata.insert(field.into(), value);
        }
    }
    let mut document = Map::new();
    document.insert("apiVersion".into(), kind.api_version().into());
    document.insert("kind".into(), kind.kind.into());
    document.insert("metadata".into(), Value::Object(metadata));
    let spec = object.data.get("spec").cloned();
    if let Some(spec) = &spec {
        document.insert("spec".into(), spec.clone());
    }
    // The mesh ConfigMap's settings are under `data`.
    if let Some(data) = object.data.get("data").filter(|_| kind.kind == "ConfigMap") {
        document.insert("data".into(), data.clone());
    }
    if kind.is_plain() {
        // Core kinds and EndpointSlices: plain serde types, read straight from JSON (no text in
        // between: with 10,000 pods this is what a relist costs). A slice's fields are
        // top-level, it has no spec.
        for field in ["status", "addressType", "endpoints", "ports"] {
            if let Some(value) = object.data.get(field) {
                document.insert(field.into(), value.clone());
            }
        }
        let value = Value::Object(document);
        let resource = match kind.kind {
            "Namespace" => serde_json::from_value(value).map(Resource::Namespace),
            "Pod" => serde_json::from_value(value).map(Resource::Pod),
            "Service" => serde_json::from_value(value).map(Resource::Service),
            "EndpointSlice" => serde_json::from_value(value).map(Resource::EndpointSlice),
            other => return Err(format!("strait does not read the kind {other}")),
        }
        .map_err(|e| e.to_string())?;
        return Ok(Located::new(origin, resource));
    }
    // Istio kinds: as written by their user (without status), through the directory's parser,
    // so the checks and the document forwarded to waypoints are the same as from a file.
    let text = serde_yaml_ng::to_string(&Value::Object(document)).map_err(|e| e.to_string())?;
    let (mut resources, diagnostics) = parse_file(&origin.file, &text);
    // Told without the place: the caller names the object.
    let errors: Vec<String> = diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| match &d.field {
            Some(field) => format!("field `{field}`: {}", d.message),
            None => d.message.clone(),
        })
        .collect();
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    for warning in &diagnostics {
        warn!("{}", without_place(warning, &origin));
    }
    match (resources.pop(), resources.is_empty()) {
        (Some(mut located), true) => {
            located.origin = origin;
            Ok(located)
        }
        _ => Err("the object did not read as exactly one resource".into()),
    }
}

/// A diagnostic about the generated text, told at the object (its line means nothing to users).
fn without_place(d: &crate::config::Diagnostic, origin: &Origin) -> String {
    crate::config::Diagnostic { origin: origin.clone(), ..d.clone() }.to_string()
}

type Key = (&'static str, String, String);

#[derive(Debug, Clone)]
struct Entry {
    resource_version: Option<String>,
    located: Located<Resource>,
}

/// The version of an object last found unreadable, and the Event that told it.
#[derive(Debug, Clone)]
struct Rejected {
    resource_version: Option<String>,
    event_name: String,
}

/// A relist in progress: what it returned so far, readable or not.
#[derive(Debug, Default)]
struct Relist {
    entries: BTreeMap<Key, Entry>,
    seen: BTreeSet<Key>,
}

/// What the watches have seen, converted; applies watch events, and tells when to compile.
#[derive(Debug)]
pub struct Store {
    entries: BTreeMap<Key, Entry>,
    /// Kinds whose first list is complete (or whose API is not installed).
    synced: BTreeSet<&'static str>,
    expected: BTreeSet<&'static str>,
    /// A relist in progress, per kind.
    relisting: BTreeMap<&'static str, Relist>,
    /// Objects whose current version cannot be read.
    rejected: BTreeMap<Key, Rejected>,
    /// Rejections not yet handed to the [`Reporter`].
    rejections: Vec<Rejection>,
    /// Since when the store differs from what was last taken, and when it last changed.
    dirty: Option<(Instant, Instant)>,
}

impl Store {
    pub fn new(kinds: &[Kind]) -> Self {
        Self {
            entries: BTreeMap::new(),
            synced: BTreeSet::new(),
            expected: kinds.iter().map(|k| k.id).collect(),
            relisting: BTreeMap::new(),
            rejected: BTreeMap::new(),
            rejections: Vec::new(),
            dirty: None,
        }
    }

    fn key(kind: &Kind, object: &DynamicObject) -> Key {
        (
            kind.id,
            object.metadata.namespace.clone().unwrap_or_default(),
            object.metadata.name.clone().unwrap_or_default(),
        )
    }

    fn touch(&mut self, now: Instant) {
        let since = self.dirty.map_or(now, |(since, _)| since);
        self.dirty = Some((since, now));
    }

    /// The entry for `object`: converted, or the previous one kept when it cannot be read.
    fn read(&mut self, kind: &Kind, key: &Key, object: &DynamicObject) -> Option<Entry> {
        let resource_version = object.metadata.resource_version.clone();
        // Borrowed, not cloned: a relist reads every object of its kind.
        let previous = self.entries.get(key);
        let same_version = |rv: &Option<String>| rv.is_some() && *rv == resource_version;
        if let Some(previous) = previous.filter(|p| same_version(&p.resource_version)) {
            return Some(previous.clone());
        }
        // A version already found unreadable (a relist returns it again): told once.
        if self.rejected.get(key).is_some_and(|r| same_version(&r.resource_version)) {
            return previous.cloned();
        }
        match convert(kind, object) {
            Ok(located) => {
                self.rejected.remove(key);
                Some(Entry { resource_version, located })
            }
            Err(e) => {
                let what = origin(kind.id, kind.namespaced.then_some(key.1.as_str()), &key.2);
                let outcome = if previous.is_some() { "its previous version stays in force" } else { "left out" };
                error!("{what}: {e}; {outcome}");
                let rejection =
                    Rejection::new(kind, object, &format!("strait cannot use this {}: {e}; {outcome}", kind.kind));
                let told = self.rejected.get(key).is_some_and(|r| r.event_name == rejection.event_name);
                self.rejected
                    .insert(key.clone(), Rejected { resource_version, event_name: rejection.event_name.clone() });
                if !told {
                    self.rejections.push(rejection);
                }
                previous.cloned()
            }
        }
    }

    /// The rejections found since the last call, to report on their objects.
    pub fn take_rejections(&mut self) -> Vec<Rejection> {
        std::mem::take(&mut self.rejections)
    }

    /// Applies one watch event of `kind`.
    pub fn apply(&mut self, kind: &Kind, event: watcher::Event<DynamicObject>, now: Instant) {
        match event {
            watcher::Event::Apply(object) => {
                let key = Self::key(kind, &object);
                let unchanged = self.entries.get(&key).is_some_and(|e| {
                    e.resource_version.is_some() && e.resource_version == object.metadata.resource_version
                });
                if unchanged {
                    return;
                }
                if let Some(entry) = self.read(kind, &key, &object) {
                    self.entries.insert(key, entry);
                    self.touch(now);
                }
            }
            watcher::Event::Delete(object) => {
                let key = Self::key(kind, &object);
                self.rejected.remove(&key);
                if self.entries.remove(&key).is_some() {
                    self.touch(now);
                }
            }
            watcher::Event::Init => {
                self.relisting.insert(kind.id, Relist::default());
            }
            watcher::Event::InitApply(object) => {
                let key = Self::key(kind, &object);
                let entry = self.read(kind, &key, &object);
                let relist = self.relisting.entry(kind.id).or_default();
                relist.seen.insert(key.clone());
                if let Some(entry) = entry {
                    relist.entries.insert(key, entry);
                }
            }
            watcher::Event::InitDone => {
                let Relist { entries: listed, seen } = self.relisting.remove(kind.id).unwrap_or_default();
                // Objects deleted while the watch was away are not rejected any more.
                self.rejected.retain(|k, _| k.0 != kind.id || seen.contains(k));
                let current: BTreeMap<&Key, Option<&String>> = self
                    .entries
                    .iter()
                    .filter(|(k, _)| k.0 == kind.id)
                    .map(|(k, e)| (k, e.resource_version.as_ref()))
                    .collect();
                let relisted: BTreeMap<&Key, Option<&String>> =
                    listed.iter().map(|(k, e)| (k, e.resource_version.as_ref())).collect();
                // A relist that finds what the store holds changes nothing: no compile, and
                // nothing resent to proxies.
                let changed = current != relisted;
                if changed {
                    self.entries.retain(|k, _| k.0 != kind.id);
                    self.entries.extend(listed);
                    self.touch(now);
                }
                if self.synced.insert(kind.id) {
                    info!(kind = kind.id, "listed {}", kind.plural);
                    self.touch(now);
                }
            }
        }
    }

    /// The API of `kind` is not installed (404): nothing of it to wait for.
    pub fn absent(&mut self, kind: &Kind, now: Instant) {
        if self.synced.insert(kind.id) {
            self.touch(now);
        }
    }

    pub fn is_synced(&self) -> bool {
        self.synced.is_superset(&self.expected)
    }

    /// Kinds not listed yet.
    pub fn waiting_for(&self) -> Vec<&'static str> {
        self.expected.difference(&self.synced).copied().collect()
    }

    /// The resources to compile, once every kind is listed and the store has settled (or has
    /// kept changing for [`MAX_UNSETTLED`]).
    pub fn take(&mut self, now: Instant, settle: Duration) -> Option<Loaded> {
        let (since, last) = self.dirty?;
        if !self.is_synced() {
            return None;
        }
        let settled = now.saturating_duration_since(last) >= settle;
        if !settled && now.saturating_duration_since(since) < MAX_UNSETTLED {
            return None;
        }
        self.dirty = None;
        Some(self.loaded())
    }

    fn loaded(&self) -> Loaded {
        Loaded {
            resources: self.entries.values().map(|e| e.located.clone()).collect(),
            diagnostics: Vec::new(),
            texts: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The source the model follows: the store the watch tasks fill.
pub struct KubeSource {
    store: Arc<Mutex<Store>>,
    server: String,
}

fn lock(store: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // A watch task that panicked mid-update leaves a store still worth reading.
    store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Source for KubeSource {
    fn first_read(&mut self) -> Loaded {
        let started = Instant::now();
        let mut told = started;
        loop {
            {
                let mut store = lock(&self.store);
                if store.is_synced() {
                    store.dirty = None;
                    info!(
                        resources = store.len(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "read every kind from {}",
                        self.server
                    );
                    return store.loaded();
                }
                if told.elapsed() >= Duration::from_secs(10) {
                    told = Instant::now();
                    warn!(waiting_for = ?store.waiting_for(), "still listing from {}", self.server);
                }
            }
            std::thread::sleep(crate::config::CONFIG_POLL);
        }
    }

    fn poll(&mut self) -> Option<Loaded> {
        lock(&self.store).take(Instant::now(), SETTLE)
    }

    fn describe(&self) -> String {
        format!("the Kubernetes API ({})", self.server)
    }

    fn skips_invalid(&self) -> bool {
        true
    }
}

/// A client of the API server (the in-cluster service account, else KUBECONFIG).
pub async fn client() -> anyhow::Result<Client> {
    let (config, server) = config().await?;
    Client::try_from(config).map_err(|e| anyhow::anyhow!("cannot create the Kubernetes client for {server}: {e}"))
}

async fn config() -> anyhow::Result<(kube::Config, String)> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| anyhow::anyhow!("cannot configure the Kubernetes client (in-cluster or KUBECONFIG): {e}"))?;
    let server = config.cluster_url.to_string();
    Ok((config, server))
}

/// Connects (in-cluster service account, else `KUBECONFIG` or `~/.kube/config`) and starts
/// one watch task per kind on the current runtime, and the writer of Events on unreadable
/// objects.
pub async fn start() -> anyhow::Result<KubeSource> {
    let (config, server) = config().await?;
    let client_for = |config: kube::Config| {
        Client::try_from(config).map_err(|e| anyhow::anyhow!("cannot create the Kubernetes client for {server}: {e}"))
    };
    // The watches retry on their own schedule (`WatchBackoff`). kube's retry of 503s honours the
    // server's Retry-After, which a starting API server sets to 10 s: behind it, a change made
    // right after an API server restart reached the snapshot 9 s late (measured).
    let mut watch_config = config.clone();
    watch_config.default_retry = false;
    let watches = client_for(watch_config)?;
    let client = client_for(config)?;
    let mut kinds = kinds();
    endpoint_slices(&client, &mut kinds).await;
    choose_versions(&client, &mut kinds).await;
    let store = Arc::new(Mutex::new(Store::new(&kinds)));
    let reporter = Reporter::start(client);
    for kind in kinds {
        tokio::spawn(follow(watches.clone(), kind, store.clone(), reporter.clone()));
    }
    Ok(KubeSource { store, server })
}

/// How a failing watch retries: 200 ms, doubling up to [`WatchBackoff::MAX`], each with up to
/// 50 % jitter so the watches of many replicas do not retry in step; reset by the next event
/// that shows the watch working (not the `Init` a failing relist starts with).
#[derive(Debug)]
struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    const FIRST: Duration = Duration::from_millis(200);
    /// kube's default goes up to 30 s, so a control plane whose API server restarted for 10 s
    /// followed it again 10-20 s later (measured); 2 s keeps changes made right after a restart
    /// within a few seconds, for at most one request per kind every 2 s while the server is away.
    const MAX: Duration = Duration::from_secs(2);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay.mul_f64(1.0 + fastrand::f64() / 2.0)
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// One kind's watch, for as long as the process runs. kube's watcher resumes from the last
/// `resourceVersion` after a dropped connection and relists after 410 Gone; errors back off
/// ([`WatchBackoff`]) and never end the watch.
async fn follow(client: Client, kind: Kind, store: Arc<Mutex<Store>>, reporter: Reporter) {
    let api: Api<DynamicObject> = Api::all_with(client, &kind.api_resource());
    let mut config = watcher::Config::default();
    if let Some(selector) = kind.label_selector {
        config = config.labels(selector);
    }
    if let Some(selector) = kind.field_selector {
        config = config.fields(selector);
    }
    let mut events = std::pin::pin!(watcher(api, config));
    let mut backoff = WatchBackoff::new();
    let mut failing = false;
    while let Some(event) = events.next().await {
        match event {
            Ok(event) => {
                if !matches!(event, watcher::Event::Init) {
                    backoff.reset();
                    if failing {
                        info!(kind = kind.kind, "watching {} again", kind.plural);
                        failing = false;
                    }
                }
                let rejections = {
                    let mut store = lock(&store);
                    store.apply(&kind, event, Instant::now());
                    store.take_rejections()
                };
                for rejection in rejections {
                    reporter.report(rejection);
                }
            }
            Err(e) => {
                if not_installed(&e) {
                    lock(&store).absent(&kind, Instant::now());
                }
                if !failing {
                    warn!(kind = kind.kind, "watch of {} ({}) failed: {e}; retrying", kind.plural, kind.api_version());
                    failing = true;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

fn not_installed(e: &watcher::Error) -> bool {
    match e {
        // The body of this 404 is plain text ("404 page not found"), so only the code tells.
        watcher::Error::InitialListFailed(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(json: Value) -> DynamicObject {
        serde_json::from_value(json).expect("a dynamic object")
    }

    fn kind(name: &str) -> Kind {
        let mut found = kinds().into_iter().find(|k| k.id == name).expect("a known kind");
        if name == "AuthorizationPolicy" {
            found.version = "v1".into();
        }
        found
    }

    fn pod(name: &str, rv: &str, ip: &str) -> DynamicObject {
        object(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "demo", "resourceVersion": rv, "labels": {"app": "web"},
                         "managedFields": [{"manager": "kubectl"}], "uid": "u-1"},
            "spec": {"nodeName": "node-a", "serviceAccountName": "web",
                     "containers": [{"name": "web", "image": "x", "ports": [{"containerPort": 8080, "name": "http"}]}]},
            "status": {"phase": "Running", "podIP": ip}
        }))
    }

    fn policy(name: &str, rv: &str, action: &str) -> DynamicObject {
        object(serde_json::json!({
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "demo", "resourceVersion": rv},
            "spec": {"action": action, "selector": {"matchLabels": {"app": "web"}},
                     "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}]},
            "status": {"validationMessages": []}
        }))
    }

    // CFG-3: an API object becomes the same resource a file would give, with its origin.
    #[test]
    fn a_pod_converts_through_the_directory_types() {
        let located = convert(&kind("Pod"), &pod("web-0", "5", "10.244.0.5")).expect("converts");
        assert_eq!(located.origin.to_string(), "k8s:Pod/demo/web-0");
        let Resource::Pod(p) = &located.resource else { panic!("not a pod: {:?}", located.resource) };
        assert_eq!(p.metadata.namespace.as_deref(), Some("demo"));
        assert_eq!(p.metadata.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(p.spec.node_name.as_deref(), Some("node-a"));
        assert_eq!(p.spec.service_account_name.as_deref(), Some("web"));
        assert_eq!(p.spec.containers[0].ports[0].container_port, 8080);
        assert_eq!(p.status.pod_ip, Some("10.244.0.5".parse().expect("ip")));
        assert!(located.document.is_none());
    }

    #[test]
    fn a_namespace_is_cluster_scoped() {
        let ns = object(serde_json::json!({
            "metadata": {"name": "demo", "labels": {"istio.io/dataplane-mode": "ambient"}, "resourceVersion": "1"},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}
        }));
        let located = convert(&kind("Namespace"), &ns).expect("converts");
        assert_eq!(located.origin.to_string(), "k8s:Namespace/demo");
        assert_eq!(located.resource.key(), Some(("Namespace", "", "demo")));
    }

    // CFG-3, L4-3: an EndpointSlice as the API serves it (top-level fields, no spec; nulls
    // where empty) converts to the directory's type, with its Service's label.
    #[test]
    fn an_endpoint_slice_converts_from_discovery_v1() {
        let slice = object(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "db-x7k2p", "namespace": "demo", "resourceVersion": "9", "generateName": "db-",
                         "labels": {"kubernetes.io/service-name": "db",
                                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "db", "uid": "u"}]},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.7"], "conditions": {"ready": true, "serving": true, "terminating": false},
                 "nodeName": "node-a", "targetRef": {"kind": "Pod", "namespace": "demo", "name": "db-0", "uid": "p"}},
                {"addresses": ["192.0.2.1"], "conditions": {"ready": false}},
                {"addresses": ["192.0.2.2"], "conditions": {}}
            ],
            "ports": [{"name": "sql", "port": 5432, "protocol": "TCP", "appProtocol": "postgresql"}]
        }));
        let slices = kind("EndpointSlice");
        assert_eq!(
            (slices.api_version(), slices.label_selector),
            ("discovery.k8s.io/v1".into(), Some(NOT_FROM_SELECTORS))
        );
        let located = convert(&slices, &slice).expect("converts");
        assert_eq!(located.origin.to_string(), "k8s:EndpointSlice/demo/db-x7k2p");
        assert_eq!(located.resource.key(), Some(("EndpointSlice", "demo", "db-x7k2p")));
        let Resource::EndpointSlice(s) = &located.resource else { panic!("not a slice: {:?}", located.resource) };
        assert_eq!((s.service_name(), s.address_type.as_str()), (Some("db"), "IPv4"));
        let ready: Vec<Option<bool>> = s.endpoints.iter().map(|e| e.conditions.ready).collect();
        assert_eq!(ready, [Some(true), Some(false), None]);
        let target = s.endpoints[0].target_ref.as_ref().expect("targetRef");
        assert_eq!((target.kind.as_deref(), target.name.as_deref()), (Some("Pod"), Some("db-0")));
        assert_eq!((s.ports[0].name.as_deref(), s.ports[0].port), (Some("sql"), Some(5432)));

        let empty = object(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "e", "namespace": "demo", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4", "endpoints": null, "ports": null
        }));
        let Resource::EndpointSlice(s) = convert(&kind("EndpointSlice"), &empty).expect("converts").resource else {
            panic!("not a slice")
        };
        assert!(s.endpoints.is_empty() && s.ports.is_empty());
        // Bad objects are errors (reported on the object by the store), never panics.
        let untyped = object(serde_json::json!({"metadata": {"name": "b", "namespace": "demo"}, "endpoints": []}));
        let error = convert(&kind("EndpointSlice"), &untyped).expect_err("no addressType");
        assert!(error.contains("addressType"), "{error}");
        let broken = object(serde_json::json!({
            "metadata": {"name": "b", "namespace": "demo"}, "addressType": "IPv4",
            "endpoints": [{"addresses": "10.0.0.1"}]
        }));
        assert!(convert(&kind("EndpointSlice"), &broken).is_err());
    }

    // Istio kinds go through the directory's parser: same checks, and the document forwarded
    // to waypoints is the object as its user wrote it (no status, no API bookkeeping).
    #[test]
    fn an_istio_object_keeps_its_document_and_checks() {
        let located = convert(&kind("AuthorizationPolicy"), &policy("allow", "7", "ALLOW")).expect("converts");
        assert_eq!(located.origin.to_string(), "k8s:AuthorizationPolicy/demo/allow");
        let document = located.document.as_deref().expect("forwarded as written");
        assert!(document.contains("apiVersion: security.istio.io/v1"), "{document}");
        assert!(document.contains("principals"), "{document}");
        assert!(!document.contains("status") && !document.contains("resourceVersion"), "{document}");
        let error = convert(&kind("AuthorizationPolicy"), &policy("bad", "8", "BOGUS")).expect_err("rejected");
        assert!(error.starts_with("field `spec.action`") && error.contains("BOGUS"), "{error}");
    }

    fn names(store: &Store) -> Vec<String> {
        store.entries.values().map(|e| e.located.origin.to_string()).collect()
    }

    fn synced_store() -> (Store, Instant) {
        let kinds = kinds();
        let mut store = Store::new(&kinds);
        let t0 = Instant::now();
        for k in &kinds {
            store.apply(k, watcher::Event::Init, t0);
            store.apply(k, watcher::Event::InitDone, t0);
        }
        assert!(store.is_synced());
        assert!(store.take(t0 + SETTLE, SETTLE).is_some());
        (store, t0)
    }

    // Events: add, update, delete; a relist replaces its kind (a deletion missed while
    // disconnected is applied), and a relist that finds nothing new changes nothing.
    #[test]
    fn events_apply_and_a_relist_loses_nothing() {
        let (mut store, t0) = synced_store();
        let pods = kind("Pod");
        let ap = kind("AuthorizationPolicy");
        store.apply(&pods, watcher::Event::Apply(pod("a", "10", "10.0.0.1")), t0);
        store.apply(&pods, watcher::Event::Apply(pod("b", "11", "10.0.0.2")), t0);
        store.apply(&ap, watcher::Event::Apply(policy("allow", "12", "ALLOW")), t0);
        assert_eq!(names(&store), ["k8s:AuthorizationPolicy/demo/allow", "k8s:Pod/demo/a", "k8s:Pod/demo/b"]);
        assert!(store.take(t0 + SETTLE, SETTLE).is_some());

        store.apply(&pods, watcher::Event::Delete(pod("a", "13", "10.0.0.1")), t0);
        assert_eq!(names(&store), ["k8s:AuthorizationPolicy/demo/allow", "k8s:Pod/demo/b"]);
        assert!(store.take(t0 + SETTLE, SETTLE).is_some());

        // 410 Gone: relist; pod b was deleted and c created meanwhile.
        store.apply(&pods, watcher::Event::Init, t0);
        store.apply(&pods, watcher::Event::InitApply(pod("c", "20", "10.0.0.3")), t0);
        assert_eq!(names(&store).len(), 2, "nothing changes until the relist is complete");
        store.apply(&pods, watcher::Event::InitDone, t0);
        assert_eq!(names(&store), ["k8s:AuthorizationPolicy/demo/allow", "k8s:Pod/demo/c"]);
        assert!(store.take(t0 + SETTLE, SETTLE).is_some());

        // The same relist again, and an Apply of a version already held: nothing to compile.
        store.apply(&pods, watcher::Event::Init, t0);
        store.apply(&pods, watcher::Event::InitApply(pod("c", "20", "10.0.0.3")), t0);
        store.apply(&pods, watcher::Event::InitDone, t0);
        store.apply(&pods, watcher::Event::Apply(pod("c", "20", "10.0.0.3")), t0);
        assert!(store.take(t0 + SETTLE * 10, SETTLE).is_none());
    }

    // An object that cannot be read is left out; one that becomes unreadable keeps its last
    // readable version (last good state); neither stops anything else.
    #[test]
    fn unreadable_objects_are_skipped_and_the_last_good_version_kept() {
        let (mut store, t0) = synced_store();
        let ap = kind("AuthorizationPolicy");
        store.apply(&ap, watcher::Event::Apply(policy("bad", "1", "BOGUS")), t0);
        assert!(names(&store).is_empty());
        store.apply(&ap, watcher::Event::Apply(policy("deny", "2", "DENY")), t0);
        store.apply(&ap, watcher::Event::Apply(policy("deny", "3", "BOGUS")), t0);
        assert_eq!(names(&store), ["k8s:AuthorizationPolicy/demo/deny"]);
        let Resource::AuthorizationPolicy(p) = &store.entries.values().next().expect("one").located.resource else {
            panic!("not a policy")
        };
        assert_eq!(format!("{:?}", p.spec.action), "Deny");
    }

    // Each unreadable version is reported once, naming the object and the field: a relist
    // returning it again reports nothing more; a new bad version is reported again; a fixed
    // object, then broken again, too.
    #[test]
    fn each_unreadable_version_is_reported_once() {
        let (mut store, t0) = synced_store();
        let ap = kind("AuthorizationPolicy");
        store.apply(&ap, watcher::Event::Apply(policy("bad", "1", "BOGUS")), t0);
        let first = store.take_rejections();
        assert_eq!(first.len(), 1, "{first:?}");
        assert_eq!(first[0].involved.name.as_deref(), Some("bad"));
        assert!(first[0].message.contains("field `spec.action`") && first[0].message.contains("left out"), "{first:?}");
        for _ in 0..3 {
            store.apply(&ap, watcher::Event::Init, t0);
            store.apply(&ap, watcher::Event::InitApply(policy("bad", "1", "BOGUS")), t0);
            store.apply(&ap, watcher::Event::InitDone, t0);
            store.apply(&ap, watcher::Event::Apply(policy("bad", "1", "BOGUS")), t0);
        }
        assert!(store.take_rejections().is_empty(), "relists report nothing more");
        store.apply(&ap, watcher::Event::Apply(policy("bad", "2", "NOPE")), t0);
        let second = store.take_rejections();
        assert_eq!(second.len(), 1);
        assert_ne!(second[0].event_name, first[0].event_name);
        store.apply(&ap, watcher::Event::Apply(policy("bad", "3", "DENY")), t0);
        assert_eq!(names(&store), ["k8s:AuthorizationPolicy/demo/bad"]);
        store.apply(&ap, watcher::Event::Apply(policy("bad", "4", "NOPE")), t0);
        let third = store.take_rejections();
        assert!(third.len() == 1 && third[0].message.contains("previous version stays in force"), "{third:?}");
        assert_eq!(names(&store), ["k8s:AuthorizationPolicy/demo/bad"], "the last good version stays");
        // Deleted while the watch was away: forgotten by the relist.
        store.apply(&ap, watcher::Event::Init, t0);
        store.apply(&ap, watcher::Event::InitDone, t0);
        assert!(store.rejected.is_empty() && store.is_empty());
    }

    // Nothing is compiled before every kind is listed; then only once the store settles, or
    // after MAX_UNSETTLED of steady changes.
    #[test]
    fn compiles_when_listed_and_settled() {
        let kinds = kinds();
        let pods = kind("Pod");
        let mut store = Store::new(&kinds);
        let t0 = Instant::now();
        store.apply(&pods, watcher::Event::Init, t0);
        store.apply(&pods, watcher::Event::InitApply(pod("a", "1", "10.0.0.1")), t0);
        store.apply(&pods, watcher::Event::InitDone, t0);
        assert!(store.take(t0 + Duration::from_secs(1), SETTLE).is_none(), "other kinds not listed");
        for k in kinds.iter().filter(|k| k.kind != "Pod") {
            if k.group.is_empty() {
                store.apply(k, watcher::Event::Init, t0);
                store.apply(k, watcher::Event::InitDone, t0);
            } else {
                store.absent(k, t0);
            }
        }
        assert!(store.take(t0 + SETTLE / 2, SETTLE).is_none(), "not settled");
        assert_eq!(store.take(t0 + SETTLE, SETTLE).expect("settled").resources.len(), 1);

        let mut t = t0 + Duration::from_secs(1);
        let start = t;
        let mut taken = None;
        for i in 0..400 {
            store.apply(&pods, watcher::Event::Apply(pod("a", &format!("{}", 100 + i), "10.0.0.1")), t);
            if let Some(loaded) = store.take(t, SETTLE) {
                taken = Some((t, loaded));
                break;
            }
            t += Duration::from_millis(50);
        }
        let (at, _) = taken.expect("compiled while changing");
        assert_eq!(at.saturating_duration_since(start), MAX_UNSETTLED);
    }
}
