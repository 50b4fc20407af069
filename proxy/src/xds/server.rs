//! The delta ADS server of `strait control` (CFG-3): `envoy.service.discovery.v3.
//! AggregatedDiscoveryService/DeltaAggregatedResources`, as istiod serves it to ztunnel.
//!
//! Every new snapshot is compared with the previous one once (`Published`); each stream then
//! looks only at the resources that changed, so delivering a change to a subscriber costs in
//! proportion to the change, not to the mesh. Each stream keeps, per type URL, the subscriber's
//! subscription and what it holds (`delta::Subscription`); the resources it may see are decided
//! by the visibility function, per subscriber.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use strait_proto::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
            aggregated_discovery_service_server::{AggregatedDiscoveryService, AggregatedDiscoveryServiceServer},
        },
    },
    prost_types::{self, value::Kind},
};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming, codegen::tokio_stream::wrappers::ReceiverStream};
use tracing::{debug, info, warn};

use super::{
    ADDRESS_TYPE_URL, Snapshot, Subscriber, XdsResource,
    delta::{Examine, RequestNames, Subscription, TypeResources, alias_index, changed_names},
};
use crate::{
    identity::Authenticate,
    telemetry::{MetricsRegistry, ScrapedCounters},
};

/// Decides whether a subscriber may see a resource of a type URL.
pub type Visibility = Arc<dyn Fn(&Subscriber, &str, &XdsResource) -> bool + Send + Sync>;

/// Responses a stream may have queued before its task waits for the subscriber to read them.
const STREAM_QUEUE: usize = 16;
/// Type URLs one stream may subscribe to: a few are served; the bound keeps a client naming
/// made-up types from growing the stream's state.
const MAX_TYPES_PER_STREAM: usize = 16;

/// A snapshot as the streams consume it: numbered, with what changed since the one before.
#[derive(Debug, Default)]
pub struct Published {
    pub generation: u64,
    pub snapshot: Arc<Snapshot>,
    /// By type URL: names added, changed or removed since generation - 1.
    pub changed: BTreeMap<String, BTreeSet<String>>,
    /// By type URL: alias -> resource name.
    pub aliases: HashMap<String, HashMap<String, String>>,
}

impl Published {
    pub fn next(previous: Option<&Published>, snapshot: Arc<Snapshot>) -> Self {
        let empty = Snapshot::new();
        let before = previous.map_or(&empty, |p| p.snapshot.as_ref());
        let types: BTreeSet<&String> = before.keys().chain(snapshot.keys()).collect();
        let changed = types
            .into_iter()
            .map(|t| (t.clone(), changed_names(before.get(t), snapshot.get(t))))
            .filter(|(_, names)| !names.is_empty())
            .collect();
        let aliases = snapshot.iter().map(|(t, resources)| (t.clone(), alias_index(resources))).collect();
        Self { generation: previous.map_or(1, |p| p.generation + 1), snapshot, changed, aliases }
    }
}

/// Counters of what the server sent and heard, by type URL.
#[derive(Debug, Default)]
pub struct AdsMetrics {
    by_type: Mutex<BTreeMap<String, TypeCounters>>,
    /// Streams opened and closed so far (their difference is open now).
    pub streams_opened: AtomicU64,
    pub streams_closed: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
struct TypeCounters {
    responses: u64,
    resources: u64,
    bytes: u64,
    removed: u64,
    nacks: u64,
}

impl AdsMetrics {
    fn count(&self, type_url: &str, update: impl FnOnce(&mut TypeCounters)) {
        let mut by_type = self.by_type.lock().unwrap_or_else(|p| p.into_inner());
        update(by_type.entry(type_url.to_owned()).or_default());
    }

    /// Resources sent so far of `type_url`.
    pub fn resources_sent(&self, type_url: &str) -> u64 {
        self.by_type.lock().unwrap_or_else(|p| p.into_inner()).get(type_url).map_or(0, |c| c.resources)
    }

    /// Body bytes sent so far of `type_url`.
    pub fn bytes_sent(&self, type_url: &str) -> u64 {
        self.by_type.lock().unwrap_or_else(|p| p.into_inner()).get(type_url).map_or(0, |c| c.bytes)
    }

    /// `strait_xds_*_total{type}` on the control plane's `/metrics`.
    pub fn register(self: &Arc<Self>, registry: &mut MetricsRegistry) {
        type Family = (&'static str, &'static str, fn(&TypeCounters) -> u64);
        let families: [Family; 5] = [
            ("strait_xds_responses", "Delta xDS responses sent, by type URL", |c| c.responses),
            ("strait_xds_resources_sent", "Resources sent in delta xDS responses, by type URL", |c| c.resources),
            ("strait_xds_bytes_sent", "Encoded resource bytes sent in delta xDS responses, by type URL", |c| c.bytes),
            ("strait_xds_resources_removed", "Names sent as removed_resources, by type URL", |c| c.removed),
            ("strait_xds_nacks", "Responses subscribers rejected (NACK), by type URL", |c| c.nacks),
        ];
        for (name, help, read) in families {
            let metrics = self.clone();
            registry.register(ScrapedCounters::by_label(name, help, "type", move || {
                let by_type = metrics.by_type.lock().unwrap_or_else(|p| p.into_inner());
                by_type.iter().map(|(t, c)| (short_type(t).to_owned(), read(c))).collect::<Vec<_>>()
            }));
        }
        let metrics = self.clone();
        registry.register(ScrapedCounters::each("strait_xds", "Delta xDS streams of subscribers", move || {
            [
                ("streams_opened", metrics.streams_opened.load(Ordering::Relaxed)),
                ("streams_closed", metrics.streams_closed.load(Ordering::Relaxed)),
            ]
        }));
    }
}

/// `Address` for `type.googleapis.com/istio.workload.Address`.
fn short_type(type_url: &str) -> &str {
    type_url.rsplit(['/', '.']).next().unwrap_or(type_url)
}

/// The address a connection to the control plane comes from, set on each request by the
/// listener.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// The proxies following the control plane now, by subscriber id, with the address each
/// connected from: where the control plane reads their mesh maps (OBS-6).
#[derive(Debug, Default)]
pub struct ConnectedProxies {
    next: AtomicU64,
    streams: Mutex<BTreeMap<u64, (String, std::net::IpAddr)>>,
}

impl ConnectedProxies {
    fn add(&self, id: &str, ip: std::net::IpAddr) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (id.to_owned(), ip));
        key
    }

    fn remove(&self, key: u64) {
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
    }

    /// Each connected subscriber once (a proxy reconnecting may briefly hold two streams).
    pub fn list(&self) -> Vec<(String, std::net::IpAddr)> {
        let streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let unique: BTreeMap<&String, std::net::IpAddr> = streams.values().map(|(id, ip)| (id, *ip)).collect();
        unique.into_iter().map(|(id, ip)| (id.clone(), ip)).collect()
    }
}

/// The ADS service; cheap to clone into a gRPC server.
pub struct AdsServer {
    published: watch::Receiver<Arc<Published>>,
    visible: Visibility,
    authenticator: Arc<dyn Authenticate>,
    metrics: Arc<AdsMetrics>,
    connected: Arc<ConnectedProxies>,
}

impl AdsServer {
    /// Serves the snapshots `snapshots` carries. Must be called in a tokio runtime: a task
    /// numbers the snapshots and works out what changed in each, once for all streams.
    pub fn new(
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        visible: Visibility,
        authenticator: Arc<dyn Authenticate>,
        metrics: Arc<AdsMetrics>,
    ) -> Self {
        let first = Arc::new(Published::next(None, snapshots.borrow_and_update().clone()));
        let (tx, published) = watch::channel(first.clone());
        tokio::spawn(async move {
            let mut previous = first;
            while snapshots.changed().await.is_ok() {
                let snapshot = snapshots.borrow_and_update().clone();
                let next = Arc::new(Published::next(Some(&previous), snapshot));
                if tx.send(next.clone()).is_err() {
                    return;
                }
                previous = next;
            }
        });
        Self { published, visible, authenticator, metrics, connected: Arc::default() }
    }

    /// The proxies connected now.
    pub fn connected(&self) -> Arc<ConnectedProxies> {
        self.connected.clone()
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        // The default 4 MiB limit on requests is plenty: requests carry names, not resources.
        AggregatedDiscoveryServiceServer::new(self).max_encoding_message_size(usize::MAX)
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let caller = match self.authenticator.authenticate(request.extensions(), request.metadata()).await {
            Ok(caller) => caller,
            Err(status) => {
                warn!("ADS: refused a stream: {}", status.message());
                return Err(status);
            }
        };
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let peer = request.extensions().get::<PeerAddr>().map(|p| p.0.ip());
        let stream = Stream {
            peer,
            connected: self.connected.clone(),
            published: self.published.clone(),
            visible: self.visible.clone(),
            metrics: self.metrics.clone(),
            tx,
            subscriber: Subscriber { identity: Some(caller.identity.clone()), ..Subscriber::default() },
            node: caller.node.clone(),
            by: caller.to_string(),
            types: BTreeMap::new(),
            nonces: 0,
        };
        tokio::spawn(stream.run(request.into_inner()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One subscriber's stream.
struct Stream {
    /// Where the subscriber connected from, when the listener said.
    peer: Option<std::net::IpAddr>,
    connected: Arc<ConnectedProxies>,
    published: watch::Receiver<Arc<Published>>,
    visible: Visibility,
    metrics: Arc<AdsMetrics>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    subscriber: Subscriber,
    /// The node an authenticated node proxy serves: its `NODE_NAME` must agree.
    node: Option<String>,
    /// The caller, for the logs.
    by: String,
    types: BTreeMap<String, TypeStream>,
    /// Responses sent on this stream, for unique nonces.
    nonces: u64,
}

#[derive(Default)]
struct TypeStream {
    subscription: Subscription,
    /// The nonce of the latest response: an ACK or NACK of an older one is stale.
    last_nonce: String,
}

/// Why a stream ended early.
struct Closed;

impl Stream {
    async fn run(mut self, mut requests: Streaming<DeltaDiscoveryRequest>) {
        let first = match requests.message().await {
            Ok(Some(first)) => first,
            Ok(None) => return,
            Err(status) => return debug!("ADS: stream from {} ended before its first request: {status}", self.by),
        };
        match subscriber_of(first.node.as_ref(), self.node.as_deref(), self.subscriber.identity.clone()) {
            Ok(subscriber) => self.subscriber = subscriber,
            Err(status) => {
                warn!("ADS: refused {}: {}", self.by, status.message());
                let _ = self.tx.send(Err(status)).await;
                return;
            }
        }
        info!(subscriber = %self.subscriber.id, caller = %self.by, "ADS: subscriber connected");
        self.metrics.streams_opened.fetch_add(1, Ordering::Relaxed);
        let listed = self.peer.map(|ip| self.connected.add(&self.subscriber.id, ip));
        let mut current = self.published.borrow_and_update().clone();
        let mut outcome = self.on_request(&current, first).await;
        while outcome.is_ok() {
            tokio::select! {
                message = requests.message() => match message {
                    Ok(Some(request)) => outcome = self.on_request(&current, request).await,
                    Ok(None) => break,
                    Err(status) => {
                        debug!(subscriber = %self.subscriber.id, "ADS: stream error: {status}");
                        break;
                    }
                },
                changed = self.published.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let next = self.published.borrow_and_update().clone();
                    outcome = self.push(&current, &next).await;
                    current = next;
                }
            }
        }
        self.metrics.streams_closed.fetch_add(1, Ordering::Relaxed);
        if let Some(key) = listed {
            self.connected.remove(key);
        }
        info!(subscriber = %self.subscriber.id, "ADS: subscriber disconnected");
    }

    async fn on_request(&mut self, published: &Published, request: DeltaDiscoveryRequest) -> Result<(), Closed> {
        if request.type_url.is_empty() {
            debug!(subscriber = %self.subscriber.id, "ADS: request without type_url ignored");
            return Ok(());
        }
        let type_url = request.type_url.clone();
        if !self.types.contains_key(&type_url) && self.types.len() >= MAX_TYPES_PER_STREAM {
            warn!(subscriber = %self.subscriber.id, r#type = %type_url, "ADS: too many type URLs on one stream; ignored");
            return Ok(());
        }
        let state = self.types.entry(type_url.clone()).or_default();
        if !request.response_nonce.is_empty() {
            let stale = request.response_nonce != state.last_nonce;
            match &request.error_detail {
                Some(error) => {
                    // The subscriber keeps what it had; nothing is resent until it changes.
                    warn!(
                        subscriber = %self.subscriber.id,
                        r#type = short_type(&type_url),
                        nonce = %request.response_nonce,
                        stale,
                        "ADS: NACK: {}",
                        error.message
                    );
                    self.metrics.count(&type_url, |c| c.nacks += 1);
                }
                None => {
                    debug!(subscriber = %self.subscriber.id, r#type = short_type(&type_url), nonce = %request.response_nonce, stale, "ADS: ACK")
                }
            }
        }
        let empty = TypeResources::new();
        let resources = published.snapshot.get(&type_url).unwrap_or(&empty);
        let no_aliases = HashMap::new();
        let aliases = published.aliases.get(&type_url).unwrap_or(&no_aliases);
        let names = RequestNames {
            subscribe: &request.resource_names_subscribe,
            unsubscribe: &request.resource_names_unsubscribe,
            initial_versions: Some(&request.initial_resource_versions).filter(|v| !v.is_empty()),
        };
        let Some(examine) = state.subscription.on_request(names, resources, aliases) else { return Ok(()) };
        // A request that (re)subscribes is always answered, even with nothing: clients wait for
        // the first answer of each type before they call themselves synced.
        self.respond(published, &type_url, &examine, true).await
    }

    /// A new snapshot: each type gets what changed in it, if anything it holds or may see did.
    async fn push(&mut self, current: &Published, next: &Published) -> Result<(), Closed> {
        let consecutive = next.generation == current.generation + 1;
        let types: Vec<String> = self.types.keys().cloned().collect();
        for type_url in types {
            let examine = match next.changed.get(&type_url) {
                _ if !consecutive => Examine { all: true, ..Examine::default() },
                Some(names) => Examine { names: names.clone(), ..Examine::default() },
                None => continue,
            };
            self.respond(next, &type_url, &examine, false).await?;
        }
        Ok(())
    }

    async fn respond(
        &mut self,
        published: &Published,
        type_url: &str,
        examine: &Examine,
        always: bool,
    ) -> Result<(), Closed> {
        let empty = TypeResources::new();
        let resources = published.snapshot.get(type_url).unwrap_or(&empty);
        let (visible, subscriber) = (&self.visible, &self.subscriber);
        let check = |resource: &XdsResource| visible(subscriber, type_url, resource);
        let Some(state) = self.types.get_mut(type_url) else { return Ok(()) };
        let delta = state.subscription.delta(resources, examine, &check, type_url == ADDRESS_TYPE_URL);
        if delta.is_empty() && !always {
            return Ok(());
        }
        self.nonces += 1;
        let nonce = format!("{}-{}", published.generation, self.nonces);
        state.last_nonce = nonce.clone();
        let bytes: usize = delta.resources.iter().map(|r| r.body.value.len()).sum();
        let (sent, removed) = (delta.resources.len() as u64, delta.removed.len() as u64);
        self.metrics.count(type_url, |c| {
            c.responses += 1;
            c.resources += sent;
            c.bytes += bytes as u64;
            c.removed += removed;
        });
        debug!(
            subscriber = %self.subscriber.id,
            r#type = short_type(type_url),
            %nonce,
            resources = sent,
            removed,
            bytes,
            "ADS: push"
        );
        let response = DeltaDiscoveryResponse {
            system_version_info: published.generation.to_string(),
            resources: delta.resources.iter().map(|r| to_proto(r)).collect(),
            type_url: type_url.to_owned(),
            removed_resources: delta.removed,
            nonce,
            control_plane: None,
        };
        self.tx.send(Ok(response)).await.map_err(|_| Closed)
    }
}

fn to_proto(resource: &XdsResource) -> Resource {
    Resource {
        name: resource.name.clone(),
        aliases: resource.aliases.clone(),
        version: resource.version.clone(),
        resource: Some(resource.body.clone()),
        ttl: None,
        cache_control: None,
    }
}

/// The subscriber a stream's first request describes, checked against the authenticated
/// caller: a node proxy speaks for its own node only.
pub fn subscriber_of(
    node: Option<&Node>,
    authenticated_node: Option<&str>,
    identity: Option<crate::identity::Identity>,
) -> Result<Subscriber, Status> {
    let node = node.filter(|n| !n.id.is_empty()).ok_or_else(|| {
        Status::invalid_argument(
            "the first request of a stream must carry `node` with an id (missing node information)",
        )
    })?;
    let metadata: HashMap<String, String> = node
        .metadata
        .as_ref()
        .map(|m| m.fields.iter().filter_map(|(k, v)| Some((k.clone(), flatten(v.kind.as_ref()?)))).collect())
        .unwrap_or_default();
    let claimed_node = metadata.get("NODE_NAME").filter(|n| !n.is_empty()).cloned();
    let node_name = match (authenticated_node, claimed_node) {
        (Some(ours), Some(claimed)) if ours != claimed => {
            return Err(Status::permission_denied(format!(
                "the node proxy of {ours} cannot subscribe as node {claimed} (NODE_NAME)"
            )));
        }
        (Some(ours), _) => Some(ours.to_owned()),
        // Only a node proxy's node is trusted: filtering by node must not be steerable.
        (None, _) => None,
    };
    // Istio's ids: `<type>~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`.
    let from_id = node.id.split('~').nth(3).and_then(|d| d.split('.').next()).filter(|s| !s.is_empty());
    let namespace = metadata.get("NAMESPACE").filter(|n| !n.is_empty()).cloned().or_else(|| from_id.map(str::to_owned));
    let subscriber = Subscriber { id: node.id.clone(), node_name, namespace, identity, metadata };
    // A waypoint's L7 resources go to its subscribers only: the claim must come from the
    // waypoint's own namespace, where its service account lives.
    // The same for a gateway, which gets every L7 resource.
    let claims = [
        ("waypoint", super::resources::subscriber_waypoint(&subscriber)),
        ("gateway", super::resources::subscriber_gateway(&subscriber)),
    ];
    for (role, claimed) in claims {
        if let Some(name) = claimed
            && subscriber.identity.as_ref().is_none_or(|id| id.namespace != name.namespace)
        {
            let who =
                subscriber.identity.as_ref().map_or_else(|| "an unidentified caller".to_owned(), |id| id.to_string());
            return Err(Status::permission_denied(format!(
                "{who} cannot subscribe as {role} {name}: only an identity of namespace {} can",
                name.namespace
            )));
        }
    }
    Ok(subscriber)
}

fn flatten(kind: &Kind) -> String {
    match kind {
        Kind::StringValue(s) => s.clone(),
        Kind::NumberValue(n) => n.to_string(),
        Kind::BoolValue(b) => b.to_string(),
        Kind::NullValue(_) => String::new(),
        Kind::ListValue(list) => {
            list.values.iter().filter_map(|v| v.kind.as_ref()).map(flatten).collect::<Vec<_>>().join(",")
        }
        Kind::StructValue(s) => {
            let fields: Vec<String> =
                s.fields.iter().filter_map(|(k, v)| Some(format!("{k}={}", flatten(v.kind.as_ref()?)))).collect();
            fields.join(",")
        }
    }
}

/// Metadata as a `Struct` of strings, the way Istio's agents send it.
pub fn metadata_struct<'a>(fields: impl IntoIterator<Item = (&'a str, String)>) -> prost_types::Struct {
    prost_types::Struct {
        fields: fields
            .into_iter()
            .map(|(k, v)| (k.to_owned(), prost_types::Value { kind: Some(Kind::StringValue(v)) }))
            .collect(),
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
