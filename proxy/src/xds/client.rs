//! The delta ADS client of `strait node` and `strait waypoint` (CFG-2): follows a control plane
//! (`strait control`, or istiod) instead of a directory.
//!
//! It speaks as ztunnel does, so istiod accepts it: TLS with ALPN `h2` verified against the
//! mesh root, the proxy's own certificate when it holds one (else `authorization: Bearer
//! <token>`), a `node` with Istio's id and metadata, and one wildcard subscription per type.
//! Each response is applied to what the client holds ([`Received`], a mirror of what the server
//! believes it sent) and the whole is handed to the sink: Ok is ACKed; an error is NACKed with
//! its text and the model in force stays, exactly as a directory with a bad file keeps the last
//! good configuration (CFG-1). The first sink call waits until every type has answered, so a
//! proxy never runs on addresses without their policies.
//!
//! The stream is re-opened after a failure with jittered exponential back-off, subscribing again
//! with `initial_resource_versions`, so the control plane sends only what changed meanwhile.
//! While it is away, the last model keeps serving.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls::{RootCertStore, crypto::ring, pki_types::ServerName};
use serde::Serialize;
use strait_proto::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::rpc::Status as RpcStatus,
};
use thiserror::Error;
use tokio::{net::TcpStream, sync::mpsc};
use tokio_rustls::TlsConnector;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, error, info, warn};

use super::Received;
use crate::{grpc::H2Channel, identity::ClientCertSlot};

/// istiod's secure gRPC port, used when the address names none.
pub const DEFAULT_XDS_PORT: u16 = 15012;
/// Connecting, TLS and the stream's opening included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Back-off between attempts: from this, doubling, up to `MAX_BACKOFF`, each with up to 50 %
/// random extra, so proxies that lost the control plane together do not return together.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// Responses are whole snapshots at first: 10,000 workloads take a few MiB.
const MAX_RESPONSE: usize = 256 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum XdsError {
    #[error("xDS address {address}: {reason}")]
    Setup { address: String, reason: String },
    #[error("{0}")]
    Stream(String),
}

/// How to reach and authenticate to the control plane.
#[derive(Clone)]
pub struct XdsClientOptions {
    /// `[https://]host[:port]` (port 15012 when absent).
    pub address: String,
    /// PEM roots the control plane's certificate chains to (`--ca-root`).
    pub root: PathBuf,
    /// The name to verify in the server's certificate when it differs from the address's host.
    pub server_name: Option<String>,
    /// Sent as `authorization: Bearer <token>`, read afresh for each stream.
    pub token: Option<crate::identity::BearerToken>,
    /// The proxy's own certificate, presented when set.
    pub client_cert: Option<Arc<ClientCertSlot>>,
    /// Sent in the first request of each type.
    pub node: Node,
    /// What to subscribe to, each as a wildcard.
    pub type_urls: Vec<String>,
    /// Also subscribed to, but not waited for: a control plane that does not serve them
    /// (istiod, for strait's own types) never answers, and the proxy runs without them.
    pub optional_type_urls: Vec<String>,
}

impl std::fmt::Debug for XdsClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsClientOptions")
            .field("address", &self.address)
            .field("node", &self.node.id)
            .field("type_urls", &self.type_urls)
            .field("optional_type_urls", &self.optional_type_urls)
            .finish_non_exhaustive()
    }
}

/// What `/config_dump` shows of the client.
#[derive(Debug, Default, Clone, Serialize)]
pub struct XdsStatus {
    pub address: String,
    pub connected: bool,
    /// Streams opened so far.
    pub streams: u64,
    pub last_error: Option<String>,
    /// Whether the model in force came from the resources held now (false after a NACK).
    pub in_sync: bool,
    pub types: BTreeMap<String, TypeStatus>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct TypeStatus {
    /// Resources held.
    pub resources: usize,
    pub responses: u64,
    pub last_nonce: String,
    /// The text of the last NACK sent, until the next ACK.
    pub rejected: Option<String>,
}

/// The client's status, shared with the admin API.
pub type SharedStatus = Arc<Mutex<XdsStatus>>;

/// Applies a whole [`Received`]; the error messages are NACKed.
pub type Sink = Box<dyn FnMut(&Received) -> Result<(), Vec<String>> + Send>;

pub struct XdsClient {
    options: XdsClientOptions,
    authority: String,
    origin: http::Uri,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    status: SharedStatus,
    /// What the server sent and we hold: bodies, and their versions for resubscribing.
    received: Received,
    versions: BTreeMap<String, HashMap<String, String>>,
}

impl XdsClient {
    pub fn new(options: XdsClientOptions) -> Result<Self, XdsError> {
        let address = options.address.clone();
        let bad = |reason: String| XdsError::Setup { address: address.clone(), reason };
        let crate::grpc::TlsEndpoint { authority, origin, server_name } =
            crate::grpc::TlsEndpoint::parse(&address, DEFAULT_XDS_PORT, options.server_name.as_deref(), "xDS")
                .map_err(bad)?;
        let pem = fs::read_to_string(&options.root)
            .map_err(|e| bad(format!("cannot read the root file {}: {e}", options.root.display())))?;
        let mut roots = RootCertStore::empty();
        for cert in crate::identity::parse_certs(&pem).map_err(|e| bad(format!("{}: {e}", options.root.display())))? {
            roots.add(cert).map_err(|e| bad(format!("{}: unusable root: {e}", options.root.display())))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots);
        let mut tls = match &options.client_cert {
            Some(slot) => builder.with_client_cert_resolver(slot.clone()),
            None => builder.with_no_client_auth(),
        };
        // A resumed session keeps the identity of the one it resumes: one opened before the
        // proxy held its certificate would go on without it.
        tls.resumption = rustls::client::Resumption::disabled();
        tls.alpn_protocols = vec![crate::identity::ALPN_H2.to_vec()];
        let status = Arc::new(Mutex::new(XdsStatus { address: address.clone(), ..XdsStatus::default() }));
        Ok(Self {
            options,
            authority,
            origin,
            server_name,
            tls: TlsConnector::from(Arc::new(tls)),
            status,
            received: Received::new(),
            versions: BTreeMap::new(),
        })
    }

    pub fn status(&self) -> SharedStatus {
        self.status.clone()
    }

    /// Follows the control plane forever. `synced` fires after the first successful sink
    /// call.
    pub async fn run(mut self, mut sink: Sink, synced: tokio::sync::oneshot::Sender<()>) {
        let mut synced = Some(synced);
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let result = self.follow(&mut sink, &mut synced).await;
            let (healthy, reason) = match result {
                Ok(healthy) => (healthy, "the control plane closed the stream".to_owned()),
                Err(e) => (false, e.to_string()),
            };
            if healthy {
                backoff = INITIAL_BACKOFF;
            }
            let wait = jittered(backoff);
            warn!(address = %self.options.address, "xDS stream lost: {reason}; reconnecting in {:.2}s", wait.as_secs_f64());
            self.update_status(|s| {
                s.connected = false;
                s.last_error = Some(reason.clone());
            });
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn update_status(&self, update: impl FnOnce(&mut XdsStatus)) {
        update(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    async fn connect(&self) -> Result<H2Channel, XdsError> {
        let fail = |reason: String| XdsError::Stream(format!("{}: {reason}", self.options.address));
        let tcp = TcpStream::connect(&self.authority).await.map_err(|e| fail(format!("cannot connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let tls = self.tls.connect(self.server_name.clone(), tcp).await.map_err(|e| {
            fail(format!(
                "TLS handshake failed (is --ca-root the control plane's root, and does its certificate name {:?}?): {e}",
                self.server_name.to_str()
            ))
        })?;
        H2Channel::handshake(tls).await.map_err(|e| fail(format!("HTTP/2 handshake failed: {e}")))
    }

    /// One stream, until it fails. Returns whether it got as far as a response (the back-off
    /// starts over then).
    async fn follow(
        &mut self,
        sink: &mut Sink,
        synced: &mut Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<bool, XdsError> {
        let address = self.options.address.clone();
        let fail = |reason: String| XdsError::Stream(format!("{address}: {reason}"));
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        // Optional types first: a control plane answering in order (strait's) has them applied
        // before the required ones complete the first state, so no proxy starts without them.
        for type_url in self.options.optional_type_urls.iter().chain(&self.options.type_urls) {
            let initial = self.versions.get(type_url).cloned().unwrap_or_default();
            debug!(r#type = %type_url, held = initial.len(), "xDS: subscribing");
            let request = DeltaDiscoveryRequest {
                node: Some(self.options.node.clone()),
                type_url: type_url.clone(),
                initial_resource_versions: initial,
                ..DeltaDiscoveryRequest::default()
            };
            tx.send(request).await.map_err(|_| fail("request queue closed".into()))?;
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = &self.options.token {
            request.metadata_mut().insert("authorization", token.metadata().map_err(fail)?);
        }
        let opened = async {
            let channel = self.connect().await?;
            let mut client = AggregatedDiscoveryServiceClient::with_origin(channel, self.origin.clone())
                .max_decoding_message_size(MAX_RESPONSE);
            client
                .delta_aggregated_resources(request)
                .await
                .map_err(|s| fail(format!("{:?}: {}", s.code(), s.message())))
        };
        let mut responses = tokio::time::timeout(CONNECT_TIMEOUT, opened)
            .await
            .map_err(|_| fail(format!("no stream within {}s", CONNECT_TIMEOUT.as_secs())))??
            .into_inner();
        let certificate = self.options.client_cert.as_ref().is_some_and(|c| c.is_set());
        info!(address = %self.options.address, client_certificate = certificate, "xDS stream open");
        self.update_status(|s| {
            s.connected = true;
            s.streams += 1;
        });

        let mut answered: BTreeSet<String> = BTreeSet::new();
        // Responses applied but not yet handed to the sink (until every type has answered).
        let mut unacked: Vec<(String, String)> = Vec::new();
        let mut dirty = false;
        let mut healthy = false;
        loop {
            let response = match responses.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Ok(healthy),
                Err(status) => return Err(fail(format!("{:?}: {}", status.code(), status.message()))),
            };
            healthy = true;
            let (type_url, nonce) = (response.type_url.clone(), response.nonce.clone());
            if !self.options.type_urls.contains(&type_url) && !self.options.optional_type_urls.contains(&type_url) {
                let error = format!("type {type_url} was not subscribed to");
                nack(&tx, &type_url, &nonce, &error).await.map_err(|_| fail("request queue closed".into()))?;
                continue;
            }
            dirty |= self.apply(&response);
            answered.insert(type_url.clone());
            unacked.push((type_url, nonce));
            let optional = &self.options.optional_type_urls;
            if !self.options.type_urls.iter().filter(|t| !optional.contains(t)).all(|t| answered.contains(t)) {
                continue;
            }
            let result = if dirty || synced.is_some() { sink(&self.received) } else { Ok(()) };
            dirty = false;
            let error = result.err().map(|errors| errors.join("; "));
            match &error {
                None => {
                    if let Some(synced) = synced.take() {
                        let _ = synced.send(());
                    }
                }
                Some(text) => {
                    error!(address = %self.options.address, "xDS: configuration rejected (NACK), the previous one stays in force: {text}")
                }
            }
            self.update_status(|s| s.in_sync = error.is_none());
            for (type_url, nonce) in unacked.drain(..) {
                self.update_status(|s| {
                    let t = s.types.entry(type_url.clone()).or_default();
                    t.responses += 1;
                    t.last_nonce = nonce.clone();
                    t.rejected = error.clone();
                });
                let sent = match &error {
                    None => ack(&tx, &type_url, &nonce).await,
                    Some(text) => nack(&tx, &type_url, &nonce, text).await,
                };
                sent.map_err(|_| fail("request queue closed".into()))?;
            }
        }
    }

    /// Applies one response to what is held; returns whether anything changed.
    fn apply(&mut self, response: &DeltaDiscoveryResponse) -> bool {
        let bodies = self.received.entry(response.type_url.clone()).or_default();
        let versions = self.versions.entry(response.type_url.clone()).or_default();
        let mut changed = false;
        for name in &response.removed_resources {
            changed |= bodies.remove(name).is_some();
            versions.remove(name);
        }
        for resource in &response.resources {
            let Some(body) = &resource.resource else {
                // Istio's convention for "exists, but nothing to send"; treat as a removal.
                changed |= bodies.remove(&resource.name).is_some();
                versions.remove(&resource.name);
                continue;
            };
            bodies.insert(resource.name.clone(), body.clone());
            versions.insert(resource.name.clone(), resource.version.clone());
            changed = true;
        }
        let held = bodies.len();
        debug!(
            r#type = %response.type_url,
            nonce = %response.nonce,
            resources = response.resources.len(),
            removed = response.removed_resources.len(),
            held,
            "xDS: response"
        );
        self.update_status(|s| s.types.entry(response.type_url.clone()).or_default().resources = held);
        changed
    }
}

async fn ack(tx: &mpsc::Sender<DeltaDiscoveryRequest>, type_url: &str, nonce: &str) -> Result<(), ()> {
    let request =
        DeltaDiscoveryRequest { type_url: type_url.to_owned(), response_nonce: nonce.to_owned(), ..Default::default() };
    tx.send(request).await.map_err(|_| ())
}

async fn nack(tx: &mpsc::Sender<DeltaDiscoveryRequest>, type_url: &str, nonce: &str, error: &str) -> Result<(), ()> {
    let request = DeltaDiscoveryRequest {
        type_url: type_url.to_owned(),
        response_nonce: nonce.to_owned(),
        // google.rpc.Code INVALID_ARGUMENT, as Envoy NACKs.
        error_detail: Some(RpcStatus { code: 3, message: error.to_owned(), details: Vec::new() }),
        ..Default::default()
    };
    tx.send(request).await.map_err(|_| ())
}

/// `base` plus up to 50 % more, from the clock's nanoseconds (spread, not secrecy).
fn jittered(base: Duration) -> Duration {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    base + base.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

/// The `node` a strait proxy sends, shaped as ztunnel's so istiod accepts it:
/// `<kind>~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local` and metadata `NAME`,
/// `NAMESPACE`, `INSTANCE_IPS`, `NODE_NAME`, plus `extra`.
pub fn proxy_node(
    kind: &str,
    ip: &str,
    pod: &str,
    namespace: &str,
    node_name: Option<&str>,
    extra: &[(&str, String)],
) -> Node {
    let mut fields =
        vec![("NAME", pod.to_owned()), ("NAMESPACE", namespace.to_owned()), ("INSTANCE_IPS", ip.to_owned())];
    if let Some(node) = node_name {
        fields.push(("NODE_NAME", node.to_owned()));
    }
    fields.extend(extra.iter().cloned());
    Node {
        id: format!("{kind}~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local"),
        metadata: Some(super::server::metadata_struct(fields)),
        ..Node::default()
    }
}

/// The model of a proxy that follows a control plane: starts the client and returns once the
/// first state has been accepted (a proxy without configuration must not start serving). The
/// model is replaced on every accepted change; the status feeds `/config_dump`.
pub async fn follow(
    options: XdsClientOptions,
    trust_domain: &str,
) -> Result<(crate::model::ModelHandle, SharedStatus), XdsError> {
    let address = options.address.clone();
    let client = XdsClient::new(options)?;
    let status = client.status();
    let (mut publisher, model) = crate::model::channel(crate::model::Model::default());
    let trust_domain = trust_domain.to_owned();
    let sink: Sink = Box::new(move |received: &Received| {
        let model = super::resources::model_from_xds(received, &trust_domain)?;
        info!(
            workloads = model.workloads.len(),
            services = model.services.len(),
            "configuration applied (from the control plane)"
        );
        publisher.publish(model);
        Ok(())
    });
    let (synced_tx, mut synced) = tokio::sync::oneshot::channel();
    tokio::spawn(client.run(sink, synced_tx));
    let started = std::time::Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), &mut synced).await {
            Ok(Ok(())) => return Ok((model, status)),
            Ok(Err(_)) => return Err(XdsError::Stream(format!("{address}: the xDS client stopped"))),
            Err(_) => {
                let last = {
                    let status = status.lock().unwrap_or_else(|p| p.into_inner());
                    let rejected = status.types.values().find_map(|t| t.rejected.clone());
                    rejected.map(|r| format!("configuration rejected: {r}")).or_else(|| status.last_error.clone())
                };
                warn!(
                    %address,
                    waited_s = started.elapsed().as_secs(),
                    last_error = last.as_deref().unwrap_or("none"),
                    "still waiting for a valid configuration from the control plane"
                );
            }
        }
    }
}
