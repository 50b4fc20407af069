//! Istio's delta xDS (CFG-2, CFG-3): the resources a control plane serves and proxies follow.
//!
//! Two halves meet at the types below:
//! - `resources`: the model as Istio's workload API (`istio.workload.Address`,
//!   `istio.security.Authorization`) plus strait's own L7 resource type for waypoints, and back
//!   again. Pure functions, so a model compiled from a directory and a model rebuilt from what
//!   a control plane served can be compared decision by decision.
//! - the transport: the delta ADS server of `strait control` and the client of `strait node` and
//!   `strait waypoint`, which move [`XdsResource`]s without knowing what they mean.

pub mod client;
pub mod delta;
pub mod resources;
pub mod server;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use strait_proto::prost_types;
pub use strait_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

use crate::identity::Identity;

/// strait's own resource type: one Istio networking or security resource a waypoint needs
/// (VirtualService, DestinationRule, L7 AuthorizationPolicy, RequestAuthentication), as its user
/// wrote it. `strait_proto::strait::L7Resource`.
pub const L7_TYPE_URL: &str = "type.googleapis.com/strait.config.v1.L7Resource";

/// One resource as a control plane serves it.
#[derive(Debug, Clone, PartialEq)]
pub struct XdsResource {
    /// The xDS resource name (Istio's: a workload's uid, `namespace/hostname` for a service,
    /// `namespace/name` for a policy).
    pub name: String,
    /// Changes exactly when the encoded body does (a hash of it), so an unchanged resource is
    /// never resent, even across a control-plane restart.
    pub version: String,
    /// Other names a subscriber may ask for this resource by (on-demand lookups by address,
    /// `network/ip`).
    pub aliases: Vec<String>,
    pub body: prost_types::Any,
}

/// Everything a control plane serves: by type URL, then by resource name.
pub type Snapshot = BTreeMap<String, BTreeMap<String, Arc<XdsResource>>>;

/// What a proxy holds after applying responses: encoded bodies by type URL, then by name.
pub type Received = BTreeMap<String, BTreeMap<String, prost_types::Any>>;

/// Who is subscribing, from the request's `node` and the authenticated peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscriber {
    /// `node.id` as sent (Istio's `ztunnel~IP~POD.NS~NS.svc.cluster.local` form, or strait's).
    pub id: String,
    /// The Kubernetes node the proxy serves (`NODE_NAME` metadata), for a node proxy.
    pub node_name: Option<String>,
    /// The proxy's own namespace (`NAMESPACE` metadata, or from the id).
    pub namespace: Option<String>,
    /// The identity the peer authenticated as (client certificate, token), when known.
    pub identity: Option<Identity>,
    /// The rest of `node.metadata`, flattened to strings. A strait waypoint names itself here
    /// with `STRAIT_WAYPOINT=<namespace>/<name>` (`resources::subscriber_waypoint`).
    pub metadata: HashMap<String, String>,
}
