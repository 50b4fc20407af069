//! Kubernetes Events on the objects `strait control --kubernetes` cannot read (CFG-3): the
//! user who applied a bad AuthorizationPolicy sees why it is not in force where they look
//! (`kubectl describe`, `kubectl get events`), as istiod's analysis reports on the object.
//!
//! core/v1 Events, not events.k8s.io: every API server strait supports (1.20 and current)
//! serves both, but core/v1 is what `kubectl describe` and older tooling read, and it needs no
//! `eventTime`/`action` bookkeeping. One Event per object, generation and message: its name is
//! derived from them, so a relist, a restart of the control plane or a second replica reporting
//! the same problem meets `AlreadyExists` instead of making another Event.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::{
    Api, Client,
    api::{DynamicObject, PostParams},
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::kubernetes::Kind;

/// `source.component` and `reportingComponent` of the Events strait writes.
pub const COMPONENT: &str = "strait-control";
/// The Events' `reason`, as istiod's analysis says of configuration it cannot use.
pub const REASON: &str = "InvalidConfig";
/// Events of cluster-scoped objects (Namespaces) go to this namespace, as the API requires.
const CLUSTER_SCOPED_EVENTS: &str = "default";
/// The API server accepts longer messages, but `kubectl describe` shows one line per Event.
const MAX_MESSAGE: usize = 1024;
/// Reports waiting to be written; when the API server is away longer than this many take to
/// queue, the rest are only logged (the control plane never blocks on its reports).
const QUEUE: usize = 256;
/// A write that fails (API server restarting) is tried again this often, this many times.
const RETRY: Duration = Duration::from_secs(1);
const ATTEMPTS: u32 = 3;

/// An object strait could not read, to be told on the object itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub involved: ObjectReference,
    pub message: String,
    /// Derived from the object's uid, generation (resourceVersion where it has none) and the
    /// message: the same problem on the same version always gets the same name.
    pub event_name: String,
}

impl Rejection {
    pub fn new(kind: &Kind, object: &DynamicObject, message: &str) -> Rejection {
        let meta = &object.metadata;
        let name = meta.name.clone().unwrap_or_default();
        // Generation changes with what the user wrote (spec), not with status or metadata
        // bookkeeping; kinds without it (Pods on older servers) fall back to resourceVersion.
        let version = match (meta.generation, &meta.resource_version) {
            (Some(generation), _) => format!("generation {generation}"),
            (None, Some(rv)) => format!("resourceVersion {rv}"),
            (None, None) => String::new(),
        };
        let message = truncate(message, MAX_MESSAGE);
        let event_name = event_name(&name, meta.uid.as_deref().unwrap_or(""), &version, &message);
        Rejection {
            involved: ObjectReference {
                api_version: Some(kind.api_version()),
                kind: Some(kind.kind.to_owned()),
                name: Some(name),
                namespace: meta.namespace.clone().filter(|_| kind.namespaced),
                uid: meta.uid.clone(),
                resource_version: meta.resource_version.clone(),
                field_path: None,
            },
            message,
            event_name,
        }
    }

    /// The namespace the Event lives in: the object's own.
    pub fn event_namespace(&self) -> &str {
        self.involved.namespace.as_deref().unwrap_or(CLUSTER_SCOPED_EVENTS)
    }

    /// The core/v1 Event telling it, written by `instance` (this replica).
    pub fn event(&self, instance: &str) -> Event {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        Event {
            metadata: ObjectMeta {
                name: Some(self.event_name.clone()),
                namespace: Some(self.event_namespace().to_owned()),
                ..ObjectMeta::default()
            },
            involved_object: self.involved.clone(),
            reason: Some(REASON.to_owned()),
            type_: Some("Warning".to_owned()),
            message: Some(self.message.clone()),
            source: Some(EventSource { component: Some(COMPONENT.to_owned()), host: None }),
            reporting_component: Some(COMPONENT.to_owned()),
            reporting_instance: Some(instance.to_owned()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        }
    }
}

/// `<object name>.<16 hex digits>`: a valid object name (a DNS subdomain, at most 253
/// characters) for any object name, unique per object, version and message.
pub fn event_name(object: &str, uid: &str, version: &str, message: &str) -> String {
    let mut input = Vec::with_capacity(uid.len() + version.len() + message.len() + 2);
    for part in [uid, version, message] {
        input.extend_from_slice(part.as_bytes());
        input.push(0);
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    let hex: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    let prefix = truncate(object, 200);
    let prefix = prefix.trim_end_matches(['-', '.']);
    if prefix.is_empty() { format!("strait.{hex}") } else { format!("{prefix}.{hex}") }
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Writes the Events in the background, so that the watches never wait for the API server.
#[derive(Debug, Clone)]
pub struct Reporter {
    queue: mpsc::Sender<Rejection>,
}

impl Reporter {
    /// Starts the writer on the current runtime.
    pub fn start(client: Client) -> Reporter {
        let (queue, pending) = mpsc::channel(QUEUE);
        tokio::spawn(write_events(client, instance(), pending));
        Reporter { queue }
    }

    /// Queues `rejection`; if the queue is full (the API server has been away a while), it is
    /// only in the log, where the watch already put it.
    pub fn report(&self, rejection: Rejection) {
        if let Err(e) = self.queue.try_send(rejection) {
            let rejection = match e {
                mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
            };
            warn!(event = rejection.event_name, "too many Events waiting for the API server: this one is not written");
        }
    }
}

/// This replica's name in `reportingInstance`: the host name, which is the pod's name in a
/// cluster.
fn instance() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| COMPONENT.to_owned())
}

async fn write_events(client: Client, instance: String, mut pending: mpsc::Receiver<Rejection>) {
    while let Some(rejection) = pending.recv().await {
        let api: Api<Event> = Api::namespaced(client.clone(), rejection.event_namespace());
        let event = rejection.event(&instance);
        for attempt in 1..=ATTEMPTS {
            match api.create(&PostParams::default(), &event).await {
                Ok(_) => {
                    debug!(event = rejection.event_name, "Event written");
                    break;
                }
                // Told already: by this process before a relist or restart, or by another replica.
                Err(kube::Error::Api(status)) if status.is_already_exists() => break,
                Err(e) if attempt == ATTEMPTS => {
                    warn!(event = rejection.event_name, "cannot write the Event ({e}); the problem is in the log only");
                }
                Err(_) => tokio::time::sleep(RETRY).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_valid_stable_and_distinct() {
        let a = event_name("deny-all", "uid-1", "generation 1", "field `spec.action`: bad");
        assert_eq!(a, event_name("deny-all", "uid-1", "generation 1", "field `spec.action`: bad"));
        assert!(a.starts_with("deny-all.") && a.len() == "deny-all.".len() + 16, "{a}");
        assert_ne!(a, event_name("deny-all", "uid-1", "generation 2", "field `spec.action`: bad"));
        assert_ne!(a, event_name("deny-all", "uid-2", "generation 1", "field `spec.action`: bad"));
        assert_ne!(a, event_name("deny-all", "uid-1", "generation 1", "field `spec.rules`: bad"));
        let long = format!("{}-{}", "a".repeat(199), "b".repeat(100));
        let name = event_name(&long, "u", "v", "m");
        assert!(name.len() <= 253 && name.starts_with(&"a".repeat(199)) && !name.contains("-."), "{name}");
    }

    #[test]
    fn an_event_names_the_object_and_the_field() {
        let kind =
            super::super::kubernetes::kinds().into_iter().find(|k| k.kind == "AuthorizationPolicy").expect("a kind");
        let object: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "bad", "namespace": "demo", "uid": "u-7", "resourceVersion": "42", "generation": 3},
            "spec": {}
        }))
        .expect("an object");
        let rejection = Rejection::new(&kind, &object, "field `spec.action`: `BOGUS` is not an action");
        let event = rejection.event("control-0");
        assert_eq!(event.metadata.namespace.as_deref(), Some("demo"));
        assert_eq!(event.involved_object.kind.as_deref(), Some("AuthorizationPolicy"));
        assert_eq!(event.involved_object.uid.as_deref(), Some("u-7"));
        assert_eq!(event.involved_object.namespace.as_deref(), Some("demo"));
        assert_eq!(event.reason.as_deref(), Some(REASON));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.reporting_component.as_deref(), Some(COMPONENT));
        assert!(event.message.as_deref().is_some_and(|m| m.contains("spec.action")));
        // Another resourceVersion of the same generation (a label changed): the same Event.
        let mut relabelled = object.clone();
        relabelled.metadata.resource_version = Some("43".into());
        assert_eq!(Rejection::new(&kind, &relabelled, &rejection.message).event_name, rejection.event_name);
        let namespace = super::super::kubernetes::kinds().into_iter().find(|k| k.kind == "Namespace").expect("ns");
        let ns: DynamicObject =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "demo", "uid": "u-8"}})).expect("ns");
        assert_eq!(Rejection::new(&namespace, &ns, "m").event_namespace(), CLUSTER_SCOPED_EVENTS);
    }
}
