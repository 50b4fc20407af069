//! The model as Istio's workload API and strait's L7 resource type, and back (CFG-2, CFG-3).
//!
//! `snapshot` turns a compiled model into what `strait control` serves, the way istiod would
//! serve the same cluster: one `istio.workload.Address` per workload and per service, one
//! `istio.security.Authorization` per L4 AuthorizationPolicy and per PeerAuthentication istiod
//! converts for ztunnel, and one `strait.config.v1.L7Resource` per VirtualService,
//! DestinationRule, `targetRefs`-bound AuthorizationPolicy and RequestAuthentication, for the
//! waypoints they are relevant to. `model_from_xds` rebuilds a model from what a proxy received,
//! giving the same decisions as the model it was served from. Both are pure, so the round trip
//! is a table test.
//!
//! What the workload API leaves out and strait's waypoints need (pod and service labels, port
//! names and `appProtocol`) travels in `istio.workload.Extension` entries (`strait.io/workload`,
//! `strait.io/service`) that other consumers skip. Resources from istiod have none: labels then
//! default to the canonical name and revision, and ports to protocol detection.

mod address;
mod authorization;
mod decode;
mod l7;
#[cfg(test)]
mod tests;

use std::{path::Path, sync::Arc};

use ring::digest;
use strait_proto::{prost::Message, prost_types::Any};

use super::{AUTHORIZATION_TYPE_URL, Received, Snapshot, Subscriber, XdsResource};
use crate::{
    config::{Located, Origin, Resource},
    model::{CompileOptions, Model},
};

pub use l7::{GATEWAY_METADATA, WAYPOINT_METADATA, subscriber_gateway, subscriber_waypoint};

/// Istio's cluster id of a single-cluster mesh, part of every workload uid.
pub const CLUSTER_ID: &str = crate::telemetry::DEFAULT_CLUSTER;
/// The trust domain istiod leaves out of `Workload.trust_domain` (empty means this one).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// istiod's name for the DENY-plaintext policy it attaches to every workload whose effective
/// PeerAuthentication is STRICT (in the root namespace).
pub const STATIC_STRICT_POLICY: &str = "istio_converted_static_strict";
/// istiod's prefix for a workload PeerAuthentication with port-level modes, converted to an
/// Authorization (`converted_peer_authentication_<name>`).
pub const CONVERTED_PEER_AUTHN_PREFIX: &str = "converted_peer_authentication_";
/// The `Workload.extensions` entry strait adds, and its message type.
pub const WORKLOAD_EXTENSION: &str = "strait.io/workload";
const WORKLOAD_EXTENSION_TYPE_URL: &str = "type.googleapis.com/strait.config.v1.WorkloadExtension";
/// The `Service.extensions` entry strait adds, and its message type.
pub const SERVICE_EXTENSION: &str = "strait.io/service";
const SERVICE_EXTENSION_TYPE_URL: &str = "type.googleapis.com/strait.config.v1.ServiceExtension";

/// Everything `strait control` serves for `model` (compiled from `resources`), by type URL and
/// resource name. Versions are hashes of the encoded bodies, so a resource that did not change
/// keeps its version across recompilations and control-plane restarts, and a one-pod change
/// changes one resource (CFG-3).
pub fn snapshot(model: &Model, resources: &[Located<Resource>], trust_domain: &str) -> Snapshot {
    let mut snapshot = Snapshot::new();
    let peer_authn = authorization::plan_peer_authn(model);
    snapshot.insert(super::ADDRESS_TYPE_URL.to_owned(), address::encode(model, trust_domain, &peer_authn));
    snapshot.insert(AUTHORIZATION_TYPE_URL.to_owned(), authorization::encode(model, peer_authn));
    snapshot.insert(super::L7_TYPE_URL.to_owned(), l7::encode(model, resources));
    snapshot
}

/// Whether `subscriber` gets `resource` of `type_url`. Workloads, services and L4 policies go
/// to every subscriber, as istiod sends them to every ztunnel; an L7 resource only to the
/// waypoints it is relevant to (see `subscriber_waypoint` for how a waypoint says which it is),
/// every one to gateways (`subscriber_gateway`), and to node proxies (which name their node)
/// the mesh config and the routes of ServiceEntry hosts (GW-3, L4-5).
pub fn visible(subscriber: &Subscriber, type_url: &str, resource: &XdsResource) -> bool {
    if type_url != super::L7_TYPE_URL || subscriber_gateway(subscriber).is_some() {
        return true;
    }
    match subscriber_waypoint(subscriber) {
        Some(waypoint) => l7::relevant_to(resource, &waypoint),
        None => subscriber.node_name.is_some() && l7::relevant_to_node_proxies(resource),
    }
}

/// Rebuilds a model from the resources a proxy holds, with the default root namespace. On
/// errors, one message per bad resource, naming it and the field; the caller keeps its state.
pub fn model_from_xds(received: &Received, trust_domain: &str) -> Result<Model, Vec<String>> {
    model_from_xds_with(received, trust_domain, &CompileOptions::default())
}

/// `model_from_xds` with the mesh's compile options (its root namespace).
pub fn model_from_xds_with(
    received: &Received,
    trust_domain: &str,
    options: &CompileOptions,
) -> Result<Model, Vec<String>> {
    decode::decode(received, trust_domain, options)
}

/// One served resource: its body encoded once, versioned by a hash of the bytes.
fn resource(name: String, aliases: Vec<String>, type_url: &str, message: &impl Message) -> (String, Arc<XdsResource>) {
    let value = message.encode_to_vec();
    let version = version_of(&value);
    let body = Any { type_url: type_url.to_owned(), value };
    (name.clone(), Arc::new(XdsResource { name, version, aliases, body }))
}

/// A resource's version: the first 64 bits of the SHA-256 of its encoding, in hex. Stable
/// across processes (unlike a counter) and collision-free in practice at mesh sizes.
fn version_of(bytes: &[u8]) -> String {
    let digest = digest::digest(&digest::SHA256, bytes);
    digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a resource that arrived over xDS came from, for diagnostics: `xds:<type>/<name>`.
fn xds_origin(kind: &str, name: &str) -> Origin {
    Origin::new(Path::new(&format!("xds:{kind}/{name}")), 0)
}

/// Whether an Authorization is a PeerAuthentication in istiod's converted form.
fn is_peer_authn_policy(name: &str) -> bool {
    name == STATIC_STRICT_POLICY || name.starts_with(CONVERTED_PEER_AUTHN_PREFIX)
}
